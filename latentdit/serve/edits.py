"""The editing endpoints: img2img and inpainting (multipart uploads) and interpolation (a GIF).

They call the public editing functions of ``latentdit.edit`` on the batching worker, one request
per call (their inputs differ per request, so there is nothing to merge). No ``from __future__
import annotations``: FastAPI reads these annotations.
"""

import time
from typing import Annotated

from ..edit import img2img, inpaint, interpolate
from .codec import BadUpload, check_sides, gif_bytes, png_base64, read_upload
from .schemas import MAX_GUIDANCE, MAX_PROMPT_CHARS, MAX_SEED, MAX_STEPS, ImagesResponse, InterpolateRequest
from .state import State, check_condition, check_size, field_error, resolve_sampling, run_job

COMMON = {"prompt", "class_label", "negative_prompt", "strength", "steps", "guidance_scale", "sampler", "seed",
          "num_images", "image"}


def _sampling_form():
    """The form fields img2img and inpainting share, as one FastAPI dependency."""
    from fastapi import Form

    from .schemas import SamplerName

    def fields(prompt: Annotated[str | None, Form(max_length=MAX_PROMPT_CHARS)] = None,
               class_label: Annotated[int | None, Form(ge=0)] = None,
               negative_prompt: Annotated[str | None, Form(max_length=MAX_PROMPT_CHARS)] = None,
               steps: Annotated[int | None, Form(ge=1, le=MAX_STEPS)] = None,
               guidance_scale: Annotated[float | None, Form(ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False)] = None,
               sampler: Annotated[SamplerName | None, Form()] = None,
               seed: Annotated[int | None, Form(ge=0, le=MAX_SEED)] = None,
               num_images: Annotated[int, Form(ge=1, le=64)] = 1) -> dict:
        if prompt is not None and not prompt.strip():
            raise field_error("prompt", "prompt is empty")
        return {"prompt": prompt, "class_label": class_label, "negative_prompt": negative_prompt or None,
                "steps": steps, "guidance_scale": guidance_scale, "sampler": sampler, "seed": seed,
                "num_images": num_images}

    return fields


async def _only(request, allowed: set[str]) -> None:
    unknown = sorted(set((await request.form()).keys()) - allowed)
    if unknown:
        raise field_error(unknown[0], f"unknown field {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")


async def _image(state: State, upload, field: str, mode: str = "RGB"):
    img = read_upload(await upload.read(), field, state.limits.max_upload_pixels, mode)
    check_sides(img, field, state.limits.side_step, state.limits.max_side)
    return img


def _prepare(state: State, f: dict) -> tuple:
    cond = check_condition(state, f["prompt"], f["class_label"])
    if f["num_images"] > state.limits.max_images:
        raise field_error("num_images", f"at most {state.limits.max_images} images per request")
    s = resolve_sampling(state, f["steps"], f["guidance_scale"], f["sampler"], f["seed"], f["num_images"])
    kw = dict(steps=s["steps"], guidance_scale=s["guidance_scale"], sampler=s["sampler"], seed=s["seeds"][0],
              negative_prompt=f["negative_prompt"], num_images=f["num_images"], progress=False)
    return cond, s, kw


def _response(state: State, images: list[str], s: dict, size: tuple[int, int], start: float) -> ImagesResponse:
    return ImagesResponse(images=images, seeds=s["seeds"], width=size[0], height=size[1], steps=s["steps"],
                          sampler=s["sampler"], guidance_scale=s["guidance_scale"], batch_size=len(images),
                          seconds=round(time.perf_counter() - start, 4))


def add_edit_routes(router, state: State) -> None:
    from fastapi import Depends, File, Form, Request, UploadFile
    from fastapi.responses import Response

    form = _sampling_form()

    @router.post("/img2img", response_model=ImagesResponse)
    async def img2img_route(request: Request, image: Annotated[UploadFile, File(description="PNG, JPEG or WebP")],
                            f: Annotated[dict, Depends(form)],
                            strength: Annotated[float, Form(ge=0.0, le=1.0, allow_inf_nan=False)] = 0.6):
        await _only(request, COMMON)
        start, img = time.perf_counter(), await _image(state, image, "image")
        cond, s, kw = _prepare(state, f)
        pipe = state.pipe

        def work() -> list[str]:
            return [png_base64(i) for i in img2img(pipe, img, cond, strength=strength, **kw)]

        images, _ = await run_job(state, request, None, work, f["num_images"])
        return _response(state, images, s, img.size, start)

    @router.post("/inpaint", response_model=ImagesResponse)
    async def inpaint_route(request: Request, image: Annotated[UploadFile, File(description="PNG, JPEG or WebP")],
                            mask: Annotated[UploadFile, File(description="white = repaint; the image's size")],
                            f: Annotated[dict, Depends(form)],
                            strength: Annotated[float, Form(gt=0.0, le=1.0, allow_inf_nan=False)] = 1.0,
                            mask_blur: Annotated[float, Form(ge=0.0, le=32.0, allow_inf_nan=False)] = 0.0):
        await _only(request, COMMON | {"mask", "mask_blur"})
        start, img = time.perf_counter(), await _image(state, image, "image")
        m = read_upload(await mask.read(), "mask", state.limits.max_upload_pixels, "L")
        if m.size != img.size:
            raise BadUpload("mask", f"the mask is {m.size[0]}x{m.size[1]} but the image is "
                                    f"{img.size[0]}x{img.size[1]}; they must match")
        if m.getextrema()[1] == 0:
            raise BadUpload("mask", "the mask is all black: nothing to repaint (white = repaint)")
        cond, s, kw = _prepare(state, f)
        pipe = state.pipe

        def work() -> list[str]:
            out = inpaint(pipe, img, m, cond, strength=strength, mask_blur=mask_blur, **kw)
            return [png_base64(i) for i in out]

        images, _ = await run_job(state, request, None, work, f["num_images"])
        return _response(state, images, s, img.size, start)

    @router.post("/interpolate", response_class=Response,
                 responses={200: {"content": {"image/gif": {}}, "description": "an animated GIF"}})
    async def interpolate_route(body: InterpolateRequest, request: Request):
        if state.pipe.model.config.num_classes:
            raise field_error("prompts", "interpolation between prompts needs a text model")
        if body.frames > state.limits.max_frames:
            raise field_error("frames", f"at most {state.limits.max_frames} frames")
        h, w = check_size(state, body.height, body.width)
        s = resolve_sampling(state, body.steps, body.guidance_scale, body.sampler, body.seed, 2)
        seeds = body.seeds or (s["seeds"] if len(body.prompts) == 1 else s["seeds"][:1])
        if len(body.prompts) == 1 and len(seeds) == 1 or body.prompts[0] == body.prompts[-1] and seeds[0] == seeds[-1]:
            raise field_error("seeds", "give two different prompts, two different seeds, or both")
        pipe = state.pipe

        def work() -> bytes:
            frames = interpolate(pipe, body.prompts, seeds, frames=body.frames, steps=s["steps"],
                                 guidance_scale=s["guidance_scale"], sampler=s["sampler"], height=h, width=w)
            return gif_bytes(frames, body.fps)

        gif, _ = await run_job(state, request, None, work, body.frames)
        return Response(gif, media_type="image/gif", headers={"X-Seeds": ",".join(map(str, seeds))})
