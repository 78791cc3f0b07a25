"""The FastAPI app: a ``Text2Image`` behind a REST API, a batching worker and a web UI.

FastAPI is imported inside the functions (DESIGN §1); no ``from __future__ import annotations``
here, because FastAPI reads the endpoint annotations, which name classes imported locally.
"""

import base64
import hmac
import logging
import time
from collections.abc import Hashable, Sequence

from ..pipeline import Text2Image
from .codec import BadUpload, png_base64
from .schemas import GenerateRequest, ImagesResponse, Limits, ModelInfo
from .state import (
    State,
    check_condition,
    check_size,
    default_limits,
    field_error,
    resolve_sampling,
    run_job,
)

log = logging.getLogger("latentdit.serve")
EXAMPLES = ["a large red circle in the center", "a small blue square in the top left",
            "a green triangle at the bottom", "a yellow star on a black background",
            "a red circle to the left of a blue square", "three purple hearts"]


def create_app(pipe: Text2Image, *, name: str = "shapes", token: str | None = None, limits: Limits | None = None,
               max_batch: int = 16, max_wait: float = 0.01, max_queue: int = 64, timeout: float = 120.0):
    """A FastAPI app serving ``pipe``. ``token``: require ``Authorization: Bearer <token>`` on /v1.
    ``max_batch`` images per sampler call, gathered for up to ``max_wait`` seconds; beyond
    ``max_queue`` waiting requests the answer is 429; each request gives up after ``timeout`` s."""
    import contextlib

    from fastapi import FastAPI

    from .batching import Batcher

    limits = limits or default_limits(pipe)
    batcher = Batcher(lambda key, payloads: _run_generate(pipe, key, payloads), max_batch, max_wait, max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        batcher.stop()

    app = FastAPI(title="latentdit", version="1", lifespan=lifespan,
                  description="Text-to-image with a latent diffusion transformer. Every image comes with "
                              "its seed: send the same settings and seed to draw it again.")
    app.state.serve = State(pipe, name, limits, batcher, token or None, timeout)
    _add_errors(app)
    _add_routes(app, app.state.serve)
    from .ui import add_ui

    add_ui(app)
    return BodyLimit(app, limits.max_body_bytes)


class BodyLimit:
    """ASGI middleware: refuse a request body over ``limit`` bytes with 413, whether it declares
    its length or streams chunks, before the app reads any of it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    def __getattr__(self, name: str):  # reach the wrapped FastAPI app (state, routes, openapi)
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await _too_large(send, self.limit)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                return await _too_large(send, self.limit)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


async def _too_large(send, limit: int) -> None:
    import json

    body = json.dumps({"detail": f"request body over {limit} bytes"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _add_errors(app) -> None:
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    @app.exception_handler(RequestValidationError)  # FastAPI's own handler echoes the input, which
    async def invalid(request: Request, e: RequestValidationError):  # fails to render a NaN: 500
        errors = [{"loc": list(err.get("loc", ())), "msg": str(err.get("msg", "")), "type": str(err.get("type", ""))}
                  for err in e.errors()]
        return JSONResponse({"detail": errors}, 422)

    @app.exception_handler(BadUpload)
    async def bad_upload(request: Request, e: BadUpload):
        return JSONResponse({"detail": [{"loc": ["body", e.field], "msg": e.message, "type": "value_error"}]}, 422)

    @app.exception_handler(ValueError)  # the pipeline's checks: the request asked for something invalid
    async def bad_value(request: Request, e: ValueError):
        return JSONResponse({"detail": [{"loc": ["body"], "msg": str(e), "type": "value_error"}]}, 422)


def _authorize(state: State):
    from fastapi import HTTPException, Request

    def check(request: Request) -> None:
        if state.token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), state.token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    return check


def _add_routes(app, state: State) -> None:
    from fastapi import APIRouter, Depends

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "queued": state.batcher.queued()}

    router = APIRouter(prefix="/v1", dependencies=[Depends(_authorize(state))])

    @router.get("/model", response_model=ModelInfo)
    def model_info() -> ModelInfo:
        pipe, b = state.pipe, state.batcher
        cfg, side = pipe.model.config, pipe.model.config.base_size * pipe.autoencoder.downsample
        sampling = {k: getattr(pipe.sampling, k)
                    for k in ("sampler", "steps", "guidance_scale", "guidance_interval", "count_contrast")}
        stats = vars(b.stats) | {"max_batch": b.max_batch, "max_wait_s": b.max_wait, "max_queue": b.max_queue,
                                 "queued": b.queued()}
        return ModelInfo(model=state.name, conditioning="class" if cfg.num_classes else "text",
                         num_classes=cfg.num_classes, default_size=[side, side], sampling=sampling,
                         limits=state.limits.as_dict(), samplers=sorted(_samplers()),
                         examples=[] if cfg.num_classes else EXAMPLES, batching=stats)

    _add_generate(router, state)
    from .edits import add_edit_routes

    add_edit_routes(router, state)
    if state.pipe.model.config.control:  # a control model also follows uploaded control maps
        from .control import add_control_routes

        add_control_routes(router, state)
    app.include_router(router)


def _samplers() -> set[str]:
    import typing

    from .schemas import SamplerName

    return set(typing.get_args(SamplerName))


def _add_generate(router, state: State) -> None:
    from fastapi import Request
    from fastapi.responses import Response

    @router.post("/generate", response_model=ImagesResponse,
                 responses={200: {"content": {"image/png": {}}}, 429: {"description": "queue full"}})
    async def generate(body: GenerateRequest, request: Request):
        condition = check_condition(state, body.prompt, body.class_label)
        h, w = check_size(state, body.height, body.width)
        if body.num_images > state.limits.max_images:
            raise field_error("num_images", f"at most {state.limits.max_images} images per request")
        as_png = "image/png" in request.headers.get("accept", "")
        if as_png and body.num_images != 1:
            raise field_error("num_images", "Accept: image/png returns one image; ask for num_images 1 "
                                             "or accept application/json", 406)
        s = resolve_sampling(state, body.steps, body.guidance_scale, body.sampler, body.seed, body.num_images,
                             body.guidance_interval)
        key = (("steps", s["steps"]), ("guidance_scale", s["guidance_scale"]), ("sampler", s["sampler"]),
               ("height", h), ("width", w), ("guidance_interval", s["guidance_interval"]),
               ("negative", body.negative_prompt is not None))
        payload = ([condition] * body.num_images, s["seeds"], body.negative_prompt)
        start = time.perf_counter()
        images, batch_size = await run_job(state, request, key, payload, body.num_images)
        if as_png:
            return Response(base64.b64decode(images[0]), media_type="image/png", headers={"X-Seed": str(s["seeds"][0])})
        return ImagesResponse(images=images, seeds=s["seeds"], width=w, height=h, steps=s["steps"],
                              sampler=s["sampler"], guidance_scale=s["guidance_scale"], batch_size=batch_size,
                              seconds=round(time.perf_counter() - start, 4))


def _run_generate(pipe: Text2Image, key: Hashable, payloads: Sequence[tuple]) -> list[tuple[list[str], int]]:
    """One pipeline call for every request in the batch (runs on the worker thread): each
    image keeps its own seed, so it does not depend on the batch it was drawn in."""
    s = dict(key)
    prompts = [c for conditions, _, _ in payloads for c in conditions]
    seeds = [seed for _, request_seeds, _ in payloads for seed in request_seeds]
    negatives = ([neg for conditions, _, neg in payloads for _ in conditions] if s["negative"] else None)
    images = pipe(prompts, negative_prompt=negatives, seed=seeds, steps=s["steps"],
                  guidance_scale=s["guidance_scale"], sampler=s["sampler"], height=s["height"], width=s["width"],
                  guidance_interval=s["guidance_interval"], progress=False)
    encoded = [png_base64(img) for img in images]
    out, i = [], 0
    for conditions, _, _ in payloads:
        out.append(encoded[i: i + len(conditions)])
        i += len(conditions)
    return out

