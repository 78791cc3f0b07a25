"""What the server's routes share: the serving state, the request checks that answer 422 with
the field named, the sampling plan of a request, and queueing a job on the batcher. FastAPI is
imported inside the functions (DESIGN §1)."""

import secrets
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from ..pipeline import Text2Image
from .schemas import MAX_SEED, Limits


def default_limits(pipe: Text2Image) -> Limits:
    cfg, d = pipe.model.config, pipe.autoencoder.downsample
    return Limits(max_side=4 * cfg.base_size * d, side_step=d * cfg.patch_size)


@dataclass
class State:
    pipe: Text2Image
    name: str
    limits: Limits
    batcher: Any
    token: str | None
    timeout: float


def field_error(field: str, message: str, status: int = 422):
    from fastapi import HTTPException

    return HTTPException(status, detail=[{"loc": ["body", field], "msg": message, "type": "value_error"}])


def check_condition(state: State, prompt: str | None, class_label: int | None) -> str | int:
    n = state.pipe.model.config.num_classes
    if n:
        if class_label is None:
            raise field_error("class_label", "this model is class-conditional: give class_label, not prompt")
        if class_label >= n:
            raise field_error("class_label", f"class_label must be in [0, {n - 1}], got {class_label}")
        return class_label
    if prompt is None:
        raise field_error("prompt", "this model is text-conditional: give prompt, not class_label")
    return prompt


def check_size(state: State, height: int | None, width: int | None) -> tuple[int, int]:
    lim, base = state.limits, state.pipe.model.config.base_size * state.pipe.autoencoder.downsample
    sides = {"height": base if height is None else height, "width": base if width is None else width}
    for field, v in sides.items():
        if v % lim.side_step or not lim.side_step <= v <= lim.max_side:
            raise field_error(field, f"{field} must be a multiple of {lim.side_step} between "
                                      f"{lim.side_step} and {lim.max_side}, got {v}")
    return sides["height"], sides["width"]


def resolve_sampling(state: State, steps: int | None, guidance: float | None, sampler: str | None,
                     seed: int | None, n: int, guidance_interval: tuple[float, float] | None = None) -> dict[str, Any]:
    """The pipeline's plan for these options (its defaults filled in and checked), and one seed
    per image (random when none is given)."""
    if steps is not None and steps > state.limits.max_steps:
        raise field_error("steps", f"steps must be <= {state.limits.max_steps}, got {steps}")
    plan = state.pipe.prepare(steps, sampler=sampler, guidance_scale=guidance, guidance_interval=guidance_interval)
    seed = secrets.randbelow(2**32) if seed is None else seed
    if seed + n - 1 > MAX_SEED:
        raise field_error("seed", f"seed + num_images - 1 must be <= {MAX_SEED}")
    return {"steps": plan.steps, "guidance_scale": float(plan.guidance_scale), "sampler": plan.sampler,
            "guidance_interval": tuple(float(v) for v in plan.guidance_interval),
            "seeds": [seed + i for i in range(n)]}


async def run_job(state: State, request, key: Hashable | None, payload: Any, images: int) -> Any:
    """Queue a job and wait for it: 429 when the queue is full, 503 past the timeout; a client
    that disconnects cancels its job."""
    from fastapi import HTTPException

    from .batching import QueueFull

    b = state.batcher
    b.start()
    try:
        job = b.submit(key, payload, images)
    except QueueFull as e:
        raise HTTPException(429, str(e), headers={"Retry-After": str(e.retry_after)}) from None
    try:
        result = await b.wait(job, state.timeout, request.is_disconnected)
    except TimeoutError as e:
        raise HTTPException(503, f"{e}; the server is overloaded", headers={"Retry-After": "5"}) from None
    except ConnectionAbortedError:
        raise HTTPException(499, "client closed the request") from None
    return result, job.batch_size
