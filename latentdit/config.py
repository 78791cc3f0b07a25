"""Typed, JSON round-tripping configuration dataclasses and named presets.

Every config is a frozen-free dataclass so the CLI can build ``--section.key value`` overrides from
the fields, and ``from_dict`` rejects unknown keys with the nearest valid name instead of silently
ignoring a typo.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

PathKind = Literal["flow", "vp-linear", "vp-cosine"]
Prediction = Literal["eps", "v", "x0", "flow"]
SamplerName = Literal["euler", "heun", "ddim", "ddpm", "dpmpp_2m", "dpmpp_2m_sde"]
GridName = Literal["uniform", "shifted", "karras"]
QKNorm = Literal["layer", "rms", "none"]
ControlKind = Literal["silhouette", "edges"]
# a training run's autocast: fp32, bf16, or bf16 where the device computes it natively
# (``latentdit.device.mixed_bf16``)
MixedPrecision = Literal["no", "bf16", "auto"]

T = TypeVar("T")


def _nearest(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.0)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_literal(cls_name: str, key: str, value: Any, hint: Any) -> None:
    if typing.get_origin(hint) is Literal and value not in typing.get_args(hint):
        allowed = ", ".join(repr(a) for a in typing.get_args(hint))
        raise ValueError(f"{cls_name}.{key} = {value!r} is not one of {allowed}")


_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _coerce(cls_name: str, key: str, value: Any, hint: Any) -> Any:
    """Turn JSON values (lists, strings from the CLI) into the field's declared type."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or isinstance(value, str) and value.lower() == "none":
            return None
        return _coerce(cls_name, key, value, args[0])
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        inner = typing.get_args(hint)[0]
        return tuple(_coerce(cls_name, key, v, inner) for v in value)
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return from_dict(hint, value)
    if hint is bool and isinstance(value, str):
        if value.lower() not in _BOOL_WORDS:
            raise ValueError(f"{cls_name}.{key} expects true/false, got {value!r}")
        return _BOOL_WORDS[value.lower()]
    if hint in (int, float) and not isinstance(value, bool):
        try:
            return hint(value)
        except (TypeError, ValueError):
            raise ValueError(f"{cls_name}.{key} expects {hint.__name__}, got {value!r}") from None
    _check_literal(cls_name, key, value, hint)
    return value


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys raise a ValueError naming the nearest key."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__} expects a JSON object, got {type(data).__name__}")
    upgrade = getattr(cls, "upgrade", None)
    data = upgrade(data) if callable(upgrade) else data
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ValueError(f"unknown key '{key}' in {cls.__name__}{_nearest(key, names)}")
    kwargs = {k: _coerce(cls.__name__, k, v, hints[k]) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """A JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


_DENSITY = re.compile(r"^(uniform|logit-normal|beta)(?:\(([^)]*)\))?$")


def parse_density(spec: str) -> tuple[str, tuple[float, ...]]:
    """``"logit-normal(0, 1)"`` -> ("logit-normal", (0.0, 1.0)); validates names and arities."""
    m = _DENSITY.match(spec.replace(" ", ""))
    if not m:
        raise ValueError(
            f"time density {spec!r} must be 'uniform', 'logit-normal(m, s)' or 'beta(a, b)'"
        )
    name, args = m.group(1), m.group(2)
    try:
        params = tuple(float(a) for a in args.split(",")) if args else ()
    except ValueError:
        raise ValueError(f"time density {spec!r}: parameters must be numbers") from None
    defaults = {"uniform": (), "logit-normal": (0.0, 1.0), "beta": (1.0, 1.0)}
    params = params or defaults[name]
    if len(params) != len(defaults[name]):
        raise ValueError(f"time density {spec!r} takes {len(defaults[name])} parameters")
    if name == "beta" and min(params) <= 0 or name == "logit-normal" and params[1] <= 0:
        raise ValueError(f"time density {spec!r}: scale parameters must be positive")
    return name, params


def parse_time_density(spec: str) -> list[tuple[float, str, tuple[float, ...]]]:
    """A density or a weighted mixture of them, as (weight, name, params) terms.

    ``"logit-normal(0, 1)"`` is one term of weight 1; ``"0.9*logit-normal(0, 1) + 0.1*uniform"``
    is a mixture (weights positive, summing to 1). Mixing in some uniform keeps the ends of the
    path trained: logit-normal(0, 1) puts 0.03% of its draws above t = 0.97, where inversion's
    last step and sampling's first one evaluate the model.
    """
    terms = []
    for part in spec.replace(" ", "").split("+"):
        weight_text, star, density = part.rpartition("*")
        try:
            weight = float(weight_text) if star else 1.0
        except ValueError:
            raise ValueError(f"time density {spec!r}: mixture weight {weight_text!r} is not a number") from None
        if not weight > 0:
            raise ValueError(f"time density {spec!r}: mixture weights must be positive")
        terms.append((weight, *parse_density(density)))
    if len(terms) > 1 and abs(sum(w for w, _, _ in terms) - 1) > 1e-6:
        raise ValueError(f"time density {spec!r}: mixture weights must sum to 1")
    if len(terms) == 1 and terms[0][0] != 1.0:
        raise ValueError(f"time density {spec!r}: a single density takes no weight")
    return terms


@dataclass
class ModelConfig:
    """The denoiser's architecture. ``text_dim``: per-token text width (0 = no cross-attention to
    text, e.g. pooled-only like the original TLD); ``num_classes > 0`` (and no text) makes a
    class-conditional model; ``modulation="none"`` feeds t and the pooled vector to the blocks as
    cross-attention tokens instead of adaLN."""

    in_channels: int = 4
    extra_in_channels: int = 0  # e.g. masked latent + mask for inpainting; zero-initialised
    patch_size: int = 2
    width: int = 384
    depth: int = 12
    heads: int = 6
    mlp_ratio: float = 4.0
    mlp: Literal["gelu", "dwconv"] = "gelu"
    modulation: Literal["adaln-single", "none"] = "adaln-single"  # "none": t and pooled as tokens
    text_dim: int = 384
    pooled_dim: int = 384
    max_text_len: int = 32
    num_classes: int = 0
    base_size: int = 16  # latent side the position-embedding grid is defined on
    qk_norm: QKNorm = "layer"  # per-head norm of queries and keys; JSON true/false = "rms"/"none"
    # A LayerNorm before cross-attention and qk_norm inside it. PixArt has neither (its text tokens
    # are normed by the caption projection); checkpoint format 1 always had both.
    cross_norm: bool = False
    # The MLP's GELU: "exact" (erf) or "tanh" (PixArt's approximation, within ~5e-4 of it). On CPU
    # in bf16 the tanh kernel is ~4x slower; checkpoint format 1 always used it.
    gelu: Literal["exact", "tanh"] = "exact"
    prediction: Prediction = "flow"
    # A structure-conditioned variant: the kind of control map its extra input channels carry
    # (latentdit/control.py); None for a plain model or the inpainting variant.
    control: ControlKind | None = None
    # Transformer blocks that re-read the projected text tokens (self-attention among them, with a
    # learned position per token) before any image block attends to them; 0 = none. Zero-initialised,
    # so a model grown from one without them starts as that model (``--init_from``).
    text_refiner: int = 0
    # A layout planner (model.LayoutPlanner): predicts from the text where each word's object goes and
    # biases cross-attention toward it, by a learned per-head gain. A new planner places no word, so a
    # model grown with it starts as the base. Trained on grounding boxes: preprocess with --grounding.
    layout_planner: bool = False
    # What the planner's per-head gains start at (1: the plan at face value). A planner trained alone
    # (--train_only 'planner.*') keeps them there: the planner learns from boxes alone, so this sets
    # only how far the denoiser follows it.
    layout_gain: float = 1.0

    @staticmethod
    def upgrade(data: dict[str, Any]) -> dict[str, Any]:
        """Read configs written before ``qk_norm`` named its kind (a bool meant RMS or nothing)."""
        return {**data, "qk_norm": _qk_norm_kind(data["qk_norm"])} if "qk_norm" in data else data

    def __post_init__(self) -> None:
        self.qk_norm = _qk_norm_kind(self.qk_norm)
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if (self.width // self.heads) % 2:
            raise ValueError("head dimension must be even")
        if self.width % 4:
            raise ValueError("width must be a multiple of 4 (2-D sin-cos position embedding)")
        if min(self.in_channels, self.patch_size, self.depth, self.base_size) < 1:
            raise ValueError("in_channels, patch_size, depth and base_size must be >= 1")
        if self.text_refiner < 0 or (self.text_refiner and self.text_dim == 0):
            raise ValueError("text_refiner counts blocks over the text tokens: it needs text_dim > 0 "
                             f"and cannot be negative (got {self.text_refiner})")
        if self.layout_planner and self.text_dim == 0:
            raise ValueError("layout_planner reads the text tokens: it needs text_dim > 0")
        if not self.layout_gain >= 0:
            raise ValueError(f"layout_gain scales the layout planner's bias: it must be >= 0, got {self.layout_gain}")
        if self.control is not None and self.control_factor ** 2 != self.extra_in_channels:
            raise ValueError(f"a control model carries its map as factor**2 extra channels (pixel unshuffle: "
                             f"16 for latents at 1/4 of the image side), got extra_in_channels "
                             f"{self.extra_in_channels}")
        text = self.text_dim > 0 or self.pooled_dim > 0
        if not text and self.num_classes == 0:
            raise ValueError("the model needs a condition: set text_dim/pooled_dim > 0 or num_classes > 0")
        if text and self.num_classes:
            raise ValueError("choose text conditioning (text_dim/pooled_dim) or classes (num_classes), "
                             "not both")

    @property
    def is_text(self) -> bool:
        return self.text_dim > 0 or self.pooled_dim > 0

    @property
    def control_factor(self) -> int:
        """Image side / latent side of a control model's map (its extra channels are factor**2)."""
        return max(1, math.isqrt(self.extra_in_channels)) if self.control else 0

    @property
    def out_channels(self) -> int:
        return self.in_channels


# Fields added to ModelConfig since checkpoint format 1, with what files written before them meant.
# A stored model dict (checkpoint config.json, a run's state.json) always held every field.
STORED_BEFORE_FORMAT_2 = {"cross_norm": True, "gelu": "tanh"}


def upgrade_stored_model(data: dict[str, Any]) -> dict[str, Any]:
    """A complete ModelConfig dict written before format 2, with the later fields it implied."""
    return {**STORED_BEFORE_FORMAT_2, **data}


def _qk_norm_kind(value: Any) -> Any:
    """A bool (or "true"/"false") as older configs stored qk_norm -> "rms"/"none"; else unchanged."""
    if isinstance(value, str) and value.lower() in _BOOL_WORDS:
        value = _BOOL_WORDS[value.lower()]
    return ("rms" if value else "none") if isinstance(value, bool) else value


@dataclass
class DiffusionConfig:
    """The noise path and how training draws t (what the network predicts is ModelConfig.prediction)."""

    path: PathKind = "flow"
    time_density: str = "logit-normal(0, 1)"
    time_shift: float = 1.0  # resolution shift, SD3 eq. 23: t' = s t / (1 + (s - 1) t)

    def __post_init__(self) -> None:
        parse_time_density(self.time_density)
        if self.time_shift <= 0:
            raise ValueError(f"time_shift must be > 0, got {self.time_shift}")


def check_guidance_interval(interval: Any) -> tuple[float, float]:
    """``(lo, hi)`` with 0 <= lo < hi <= 1, as floats."""
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"guidance_interval must be two numbers (lo, hi), got {interval!r}") from None
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"guidance_interval must satisfy 0 <= lo < hi <= 1, got ({lo}, {hi})")
    return lo, hi


@dataclass
class SamplingConfig:
    """Defaults for generation; every field can be overridden per call."""

    sampler: SamplerName = "dpmpp_2m"
    steps: int = 20
    guidance_scale: float = 4.5
    grid: GridName = "uniform"
    shift: float = 1.0
    eta: float = 0.0
    # Guidance only while lo <= t <= hi (limited-interval guidance, arXiv:2404.07724); elsewhere one
    # conditional pass, half the batch. (0, 1): every step.
    guidance_interval: tuple[float, ...] = (0.0, 1.0)
    # Prompts naming a count are also guided away from themselves with the count one higher, at
    # this scale, on the guided steps (latentdit.counts). 0: off.
    count_contrast: float = 0.0

    def __post_init__(self) -> None:
        self.guidance_interval = check_guidance_interval(self.guidance_interval)
        self.count_contrast = check_count_contrast(self.count_contrast)
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")


def check_count_contrast(value: Any) -> float:
    """A finite scale >= 0 (0: no count contrast)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"count_contrast must be a finite number >= 0, got {value!r}")
    return float(value)


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(width=64, depth=2, heads=2, patch_size=2, text_dim=32, pooled_dim=32,
                 max_text_len=16, base_size=8),
    "small": dict(width=384, depth=8, heads=6, patch_size=2, mlp="dwconv", base_size=16),
    "base": dict(width=768, depth=12, heads=12, patch_size=2, mlp="dwconv", base_size=32),
    "large": dict(width=1152, depth=28, heads=16, patch_size=2, base_size=32),
}


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    """A named architecture (``tiny``, ``small``, ``base``, ``large``) with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset '{name}'{_nearest(name, list(PRESETS))}; "
                         f"choose one of {', '.join(PRESETS)}")
    return from_dict(ModelConfig, {**PRESETS[name], **overrides})


def check_mixed_precision(mixed: str) -> str:
    """A training config's ``mixed_precision``: "no" (fp32), "bf16", or "auto" (bf16 where native)."""
    if mixed not in typing.get_args(MixedPrecision):
        raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'auto' (bf16 where the device "
                         f"computes it natively), got {mixed!r}")
    return mixed


def parse_dtype(dtype: Any) -> Any:
    """``None``, a ``torch.dtype`` or its name ("bfloat16", "torch.float16") -> torch.dtype or None."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    parsed = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(parsed, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32', 'float16' or 'bfloat16'")
    return parsed


def save_json(obj: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(obj if isinstance(obj, dict) else to_dict(obj), indent=2))


def load_json(path: str | Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"config file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"config file {path} is not valid JSON: {e}") from None


__all__ = [
    "DiffusionConfig", "ModelConfig", "SamplingConfig", "PRESETS", "from_dict", "to_dict", "upgrade_stored_model",
    "check_guidance_interval", "model_preset", "parse_density", "parse_time_density", "parse_dtype", "save_json",
    "load_json",
]
