"""Request and response bodies of the REST API, with the bounds that do not depend on the model.

Model-dependent checks (image sides, class ids, whether a prompt or a class label is needed) are
made in ``app.py`` against ``Limits``; pydantic rejects everything else with a 422 naming the field.
Imported only where pydantic (a FastAPI dependency) is installed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..config import SamplerName

MAX_PROMPT_CHARS = 500
MAX_SEED = 2**63 - 1
MAX_STEPS = 200
MAX_GUIDANCE = 50.0


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; the server's ``/v1/model`` reports them."""

    max_side: int  # pixels, each side
    side_step: int  # sides are multiples of this (autoencoder downsample x patch size)
    max_images: int = 8  # per request
    max_steps: int = MAX_STEPS
    max_frames: int = 16
    max_prompt_chars: int = MAX_PROMPT_CHARS
    max_body_bytes: int = 4 * 2**20
    max_upload_pixels: int = 1024 * 1024

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _text(v: str | None, name: str) -> str | None:
    if v is None:
        return None
    if not v.strip():
        raise ValueError(f"{name} is empty")
    return v


class SamplingFields(_Strict):
    """Settings every sampling endpoint shares (None: the model's sampling config)."""

    steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="sampler steps")
    guidance_scale: float | None = Field(None, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False,
                                         description="classifier-free guidance scale (1 = none)")
    sampler: SamplerName | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="image i uses seed + i; random when omitted")


class GenerateRequest(SamplingFields):
    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="text models")
    class_label: int | None = Field(None, ge=0, description="class-conditional models")
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    num_images: int = Field(1, ge=1, le=64)
    guidance_interval: tuple[float, float] | None = Field(
        None, description="guide only while lo <= t <= hi (t = 1 is noise)")
    height: int | None = Field(None, ge=1, le=8192)
    width: int | None = Field(None, ge=1, le=8192)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | None) -> str | None:
        return _text(v, "prompt")

    @field_validator("negative_prompt")
    @classmethod
    def _negative(cls, v: str | None) -> str | None:
        return _text(v, "negative_prompt")

    @field_validator("guidance_interval")
    @classmethod
    def _interval(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0.0 <= v[0] <= v[1] <= 1.0:
            raise ValueError(f"guidance_interval must satisfy 0 <= lo <= hi <= 1, got {list(v)}")
        return v

    @model_validator(mode="after")
    def _one_condition(self) -> GenerateRequest:
        if (self.prompt is None) == (self.class_label is None):
            raise ValueError("give exactly one of prompt (text models) or class_label (class models)")
        return self


class InterpolateRequest(SamplingFields):
    prompts: list[str] = Field(..., min_length=1, max_length=2,
                               description="one prompt (seed interpolation) or the two end prompts")
    seeds: list[int] | None = Field(None, min_length=1, max_length=2,
                                    description="one seed or the two end seeds (default: seed, or 0)")
    frames: int = Field(8, ge=2, le=64)
    fps: float = Field(8.0, gt=0.0, le=60.0, allow_inf_nan=False)
    height: int | None = Field(None, ge=1, le=8192)
    width: int | None = Field(None, ge=1, le=8192)

    @field_validator("prompts")
    @classmethod
    def _prompts(cls, v: list[str]) -> list[str]:
        for p in v:
            _text(p, "prompts")
            if len(p) > MAX_PROMPT_CHARS:
                raise ValueError(f"prompts must have at most {MAX_PROMPT_CHARS} characters")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(not 0 <= s <= MAX_SEED for s in v):
            raise ValueError(f"seeds must be in [0, {MAX_SEED}]")
        return v


class ImagesResponse(BaseModel):
    images: list[str] = Field(..., description="base64-encoded PNGs")
    seeds: list[int] = Field(..., description="the seed of each image: send it back to redraw that image")
    width: int
    height: int
    steps: int
    sampler: str
    guidance_scale: float
    batch_size: int = Field(..., description="images in the sampler call this request was drawn in")
    seconds: float


class ModelInfo(BaseModel):
    model: str
    conditioning: Literal["text", "class"]
    num_classes: int
    default_size: list[int]
    sampling: dict
    limits: dict
    samplers: list[str]
    examples: list[str]
    batching: dict
