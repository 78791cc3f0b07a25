"""Training configuration without torch: the denoiser's ``TrainConfig`` with its named recipes
and objectives, and the autoencoder's ``AEConfig`` with its presets. The command line builds its
flags from these, so ``latentdit --help`` and argument errors do not load torch; ``train`` and
``train_ae`` hold the training itself."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from .config import (
    DiffusionConfig,
    MixedPrecision,
    ModelConfig,
    SamplingConfig,
    check_mixed_precision,
    from_dict,
    model_preset,
    to_dict,
)

DEFAULT_PREVIEW_PROMPTS = (
    "a large red circle in the center", "a small blue square in the top left",
    "a green triangle to the left of a yellow star", "three purple hearts",
)


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.99
    warmup_steps: int = 200
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1


@dataclass
class TrainConfig:
    data: str = ""  # a shard folder written by ``latentdit preprocess``
    out: str = "runs/latentdit"
    steps: int = 1000
    batch_size: int = 64  # per process and micro-step
    seed: int = 0
    mixed_precision: MixedPrecision = "auto"
    cond_dropout: float = 0.1
    # > 0: the loss weighs each latent cell by 1 + object_weight * (its distance from the image's
    # median cell, relative to the farthest), so cells holding objects count more than background
    object_weight: float = 0.0
    object_weight_fade: bool = False  # the extra weight fades linearly to none as t goes to 1 (noise)
    # > 0: add this times the grounding loss (latentdit.grounding): each object's caption words are
    # to be read by cross-attention where that object is; needs shards preprocessed with --grounding
    grounding_weight: float = 0.0
    # samples noised to t below this add no grounding loss: there the objects' colours show in the
    # noisy latents, so attention can find each object's words by its colour instead of the caption's order
    grounding_min_t: float = 0.0
    # the weight of the layout planner's loss (grounding.layout_loss), for models with model.layout_planner;
    # only the planner learns from it, so the weight sets its share of the clipped gradient norm (its
    # cross-entropy starts near 4, a denoising loss near 0.05)
    layout_weight: float = 0.01
    ema_decay: float = 0.999
    ema_warmup: bool = True
    log_every: int = 50
    preview_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    max_bad_steps: int = 10
    preview_prompts: tuple[str, ...] = DEFAULT_PREVIEW_PROMPTS
    init_from: str | None = None  # fine-tune: start from this model folder's weights
    # fine-tune only the parameters these name patterns match (fnmatch; "text" = every weight that
    # reads the text condition); empty: all of them
    train_only: tuple[str, ...] = ()
    # > 0: fine-tune low-rank adapters of this rank on the lora_targets layers (the base weights stay
    # frozen; train_only may name more weights to train beside them); the exported model stores each
    # update as two factors, so a delta of it is small. Needs init_from.
    lora_rank: int = 0
    lora_alpha: float = 0.0  # the update's scale is lora_alpha / lora_rank; 0: the rank (scale 1)
    # module-name suffixes of the adapted linear layers, or a set: "attention", "attention+mlp"
    lora_targets: tuple[str, ...] = ("attention",)
    model: ModelConfig = field(default_factory=lambda: model_preset("small"))
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        check_mixed_precision(self.mixed_precision)
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ValueError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")
        if not 0.0 <= self.object_weight <= 100.0:
            raise ValueError(f"object_weight must be in [0, 100], got {self.object_weight}")
        if not 0.0 <= self.grounding_weight <= 100.0:
            raise ValueError(f"grounding_weight must be in [0, 100], got {self.grounding_weight}")
        if not 0.0 <= self.grounding_min_t < 1.0:
            raise ValueError(f"grounding_min_t must be in [0, 1), got {self.grounding_min_t}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.train_only and not self.init_from:
            raise ValueError("train_only keeps every other weight as it is, so it needs init_from "
                             "(the model whose weights it keeps)")
        if isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int) or self.lora_rank < 0:
            raise ValueError(f"lora_rank must be a whole number >= 0 (0: no adapters), got {self.lora_rank!r}")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha >= 0):
            raise ValueError(f"lora_alpha must be >= 0 (0: the rank), got {self.lora_alpha}")
        if self.lora_rank and not self.init_from:
            raise ValueError("lora_rank adapts a trained model's layers, so it needs init_from (that model)")
        if self.lora_rank and not self.lora_targets:
            raise ValueError("lora_targets must name at least one layer (or 'attention', 'attention+mlp')")


# Objectives: (diffusion fields, model fields). "tld" is the original Transformer Latent Diffusion
# recipe: x0 prediction on the linear path, t ~ Beta(1, 2.5), pooled text + noise level as two
# cross-attention tokens, no adaLN.
OBJECTIVES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "flow": ({"path": "flow", "time_density": "logit-normal(0, 1)"}, {"prediction": "flow"}),
    "tld": ({"path": "flow", "time_density": "beta(1, 2.5)"},
            {"prediction": "x0", "modulation": "none", "text_dim": 0}),
    "dit": ({"path": "vp-linear", "time_density": "uniform"}, {"prediction": "eps"}),
}

# Named recipes: a model preset plus training fields, overridable from the CLI.
_SHAPES_MODEL = {"max_text_len": 24, "qk_norm": "rms", "cross_norm": True}  # as the packaged model
# Guidance on t in [0.3, 0.9] only: it follows held-out prompts better than guidance on every step,
# and runs fewer rows; 2700 steps fit the first cycle's time budget (docs/shapes-model.md).
_SHAPES_TRAIN = {"steps": 2700, "batch_size": 64, "ema_decay": 0.998, "checkpoint_every": 50,
                 "keep_checkpoints": 2, "optim": {"lr": 1e-3, "warmup_steps": 150},
                 "sampling": {"guidance_interval": [0.3, 0.9]}}
RECIPES: dict[str, dict[str, Any]] = {
    "tiny": {"preset": "tiny", "objective": "flow", "model": {}, "train": {"steps": 200, "batch_size": 16}},
    # The packaged shapes model: MiniLM text (24 tokens), 16x16x4 latents of the shapes autoencoder,
    # QK RMS-norm (what the packaged weights were trained with).
    # A tenth of the times drawn uniformly keeps t near 1 trained (few-step inversion ends there).
    "shapes-small": {"preset": "small", "objective": "flow", "model": _SHAPES_MODEL, "train": _SHAPES_TRAIN,
                     "diffusion": {"time_density": "0.9*logit-normal(0, 1) + 0.1*uniform"}},
    "shapes-tld": {"preset": "small", "objective": "tld", "model": _SHAPES_MODEL, "train": _SHAPES_TRAIN},
}


def recipe_dict(name: str, objective: str | None = None) -> dict[str, Any]:
    """The TrainConfig dict of a named recipe, optionally with another objective."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe '{name}'; choose one of {', '.join(RECIPES)}")
    recipe = RECIPES[name]
    objective = objective or recipe["objective"]
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective '{objective}'; choose one of {', '.join(OBJECTIVES)}")
    diffusion, model_fields = OBJECTIVES[objective]
    if objective == recipe["objective"]:  # the recipe's own tuning of its objective
        diffusion = {**diffusion, **recipe.get("diffusion", {})}
    model = to_dict(model_preset(recipe["preset"], **{**recipe["model"], **model_fields}))
    return merge_config({"model": model, "diffusion": dict(diffusion)}, recipe["train"])


def merge_config(base: dict[str, Any], *overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with each override merged in, section by section; later values win."""
    out = dict(base)
    for over in overrides:
        for k, v in over.items():
            out[k] = merge_config(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_train_config(preset: str, objective: str | None = None, *overrides: dict[str, Any]) -> TrainConfig:
    """The one way a training config is assembled: the named recipe (with another objective if
    asked), then each override (a config file's dict, command-line fields) in order."""
    return make_config(merge_config(recipe_dict(preset, objective), *overrides))


def make_config(data: dict[str, Any]) -> TrainConfig:
    return from_dict(TrainConfig, data)


# -- the autoencoder ------------------------------------------------------------------------


@dataclass
class AEConfig:
    """`block_out_channels` has one width per resolution level: downsample 4 needs 3, 8 needs 4.
    `kl_weight` has LDM's meaning (KL summed over latent elements vs. reconstruction summed over
    pixels). `data`: "shapes", a digit set ("fashion-mnist", "mnist" or their folders: their held-out
    split is evaluated) or an image folder (its last images are held out for evaluation)."""

    image_size: int = 64
    latent_channels: int = 4
    downsample: Literal[4, 8] = 4
    block_out_channels: tuple[int, ...] = (32, 64, 128)
    layers_per_block: int = 1
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    kl_weight: float = 1e-6
    loss: Literal["l1", "l2"] = "l1"
    object_weight: float = 0.0  # extra loss weight on pixels unlike the image's border colour
    grad_clip: float = 1.0
    mixed_precision: MixedPrecision = "auto"
    seed: int = 0
    eval_every: int = 500
    log_every: int = 50
    checkpoint_every: int = 250
    eval_images: int = 16
    scale_batches: int = 16  # latent statistics: a mean from 32 images was off by 0.2 std
    center_latents: bool = True
    data: str = "shapes"
    # start from this autoencoder (its folder, or a model folder or packaged name whose autoencoder
    # to take) instead of random weights; the architecture fields above must match it
    init_from: str | None = None
    # train the decoder only: the encoder, and so the latent space a denoiser was trained in, stays
    # exactly as init_from's (its latent statistics are kept), so the denoiser reads it unchanged
    decoder_only: bool = False

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        if self.downsample not in (4, 8):
            raise ValueError(f"downsample must be 4 or 8, got {self.downsample!r}")
        levels = int(math.log2(self.downsample)) + 1
        if len(self.block_out_channels) != levels:
            raise ValueError(
                f"downsample {self.downsample} needs {levels} block_out_channels (one per resolution "
                f"level), got {len(self.block_out_channels)}: {self.block_out_channels}")
        if self.image_size < 1 or self.image_size % self.downsample:
            raise ValueError(f"image_size {self.image_size} must be a positive multiple of the "
                             f"downsample factor {self.downsample}")
        if self.data == "shapes" and self.image_size % 8:
            raise ValueError(f"the shapes dataset draws canvases that are multiples of 8, got "
                             f"image_size {self.image_size}")
        self._check_ranges()

    def _check_ranges(self) -> None:
        positive = ("latent_channels", "layers_per_block", "steps", "batch_size", "eval_every",
                    "log_every", "checkpoint_every", "eval_images", "scale_batches")
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if min(self.block_out_channels) < 1:
            raise ValueError(f"block_out_channels must be positive, got {self.block_out_channels}")
        if not self.lr > 0 or self.warmup_steps < 0 or self.kl_weight < 0 or not self.grad_clip > 0:
            raise ValueError("need lr > 0, warmup_steps >= 0, kl_weight >= 0 and grad_clip > 0")
        if self.object_weight < 0:
            raise ValueError(f"object_weight must be >= 0, got {self.object_weight}")
        if self.decoder_only and not self.init_from:
            raise ValueError("decoder_only trains the decoder of an existing autoencoder: name it "
                             "with init_from (an autoencoder folder, or a model folder or name)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.loss not in ("l1", "l2"):
            raise ValueError(f"loss must be 'l1' or 'l2', got {self.loss!r}")
        check_mixed_precision(self.mixed_precision)


AE_PRESETS: dict[str, dict[str, Any]] = {
    # The packaged model's autoencoder. `--object_weight 4` keeps small stars and triangles better
    # but is not the default: the denoiser trained on it lost on single objects (docs/training.md).
    "shapes-fast": dict(block_out_channels=(16, 32, 64), batch_size=8, lr=2e-3, loss="l2", steps=3600,
                        warmup_steps=50, eval_every=250),
}


def ae_preset(name: str, **overrides: Any) -> AEConfig:
    """A named recipe with field overrides, e.g. `ae_preset("shapes-fast", steps=5000)`."""
    if name not in AE_PRESETS:
        raise ValueError(f"unknown autoencoder preset {name!r}; choose one of {', '.join(AE_PRESETS)}")
    return from_dict(AEConfig, {**AE_PRESETS[name], **overrides})
