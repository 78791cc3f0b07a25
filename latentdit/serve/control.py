"""``POST /v1/control``: generation that follows a control map, served when the loaded model is a
control model (docs/control.md). The map is uploaded as ``control`` (white = object) or derived
from an uploaded ``image`` with the model's own kind of map. No ``from __future__ import
annotations``: FastAPI reads these annotations.
"""

import time
from typing import Annotated

from .codec import check_sides, png_base64, read_upload
from .edits import COMMON, _image, _only, _prepare, _response, _sampling_form
from .schemas import ImagesResponse
from .state import State, field_error, run_job


def add_control_routes(router, state: State) -> None:
    from fastapi import Depends, File, Form, Request, UploadFile

    form = _sampling_form()
    kind = state.pipe.model.config.control

    @router.post("/control", response_model=ImagesResponse)
    async def control_route(request: Request, f: Annotated[dict, Depends(form)],
                            control: Annotated[UploadFile | None, File(description="the map: white = object")] = None,
                            image: Annotated[UploadFile | None, File(description=f"an image to derive the {kind} "
                                                                                 "map from")] = None,
                            control_scale: Annotated[float, Form(ge=0.0, le=1.0, allow_inf_nan=False)] = 1.0):
        await _only(request, (COMMON - {"strength"}) | {"control", "control_scale"})
        if (control is None) == (image is None):
            raise field_error("control", "upload exactly one of control (a map) or image (to derive the map from)")
        start = time.perf_counter()
        if control is not None:
            source = read_upload(await control.read(), "control", state.limits.max_upload_pixels, "L")
            check_sides(source, "control", state.limits.side_step, state.limits.max_side)
        else:
            source = await _image(state, image, "image")
        cond, s, kw = _prepare(state, f)
        pipe = state.pipe

        def work() -> list[str]:
            from ..control import control_map

            m = control_map(source, kind).astype("float32") if image is not None else source
            out = pipe(cond, negative_prompt=kw["negative_prompt"], steps=kw["steps"],
                       guidance_scale=kw["guidance_scale"], sampler=kw["sampler"], seed=kw["seed"],
                       height=source.size[1], width=source.size[0], num_images_per_prompt=kw["num_images"],
                       progress=False, control=m, control_scale=control_scale)
            return [png_base64(i) for i in out]

        images, _ = await run_job(state, request, None, work, f["num_images"])
        return _response(state, images, s, source.size, start)

