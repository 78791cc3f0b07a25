"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv:2106.09685) for the denoiser's linear layers.

A wrapped layer computes ``base(x) + (alpha / rank) * B(A(x))`` with ``B`` zero-initialised, so a
freshly adapted model computes exactly what the base computes. Only ``A`` and ``B`` train; they are
saved as a small folder (``adapter_config.json`` + ``adapter.safetensors``, peft style) that names
the base model and fingerprints the weights it was trained on, so loading it onto another base is
refused instead of silently drawing nonsense. For sampling the update is merged into the base
weights (``merge``): no extra cost per step, and ``unmerge`` takes it back out.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from .checkpoint import WEIGHT_DTYPES, atomic_save_tensors, atomic_write_bytes
from .config import ModelConfig, from_dict
from .lines import read_json
from .model import is_planner_weight

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
# Attention projections of every block: self-attention q/k/v and output, cross-attention q, k/v
# (the text side, where a new word has to find its meaning) and output.
ATTENTION_TARGETS = ("attn.qkv", "attn.out", "cross.q", "cross.kv", "cross.out")
MLP_TARGETS = ("mlp.fc1", "mlp.fc2")
TARGET_SETS = {"attention": ATTENTION_TARGETS, "attention+mlp": ATTENTION_TARGETS + MLP_TARGETS}


@dataclass
class LoRAConfig:
    """Rank, scale and which linear layers (module-name suffixes, e.g. ``cross.kv``) are adapted."""

    rank: int = 8
    alpha: float = 8.0
    targets: tuple[str, ...] = ATTENTION_TARGETS

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        if not self.targets:
            raise ValueError("LoRA targets must name at least one layer")
        self.targets = tuple(self.targets)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """``base(x) + scale * (x A^T) B^T``; ``merged``: the update lives in ``base.weight`` instead."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.rank, self.scale = base, rank, alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and peft initialise A
        self.merged = False

    def delta(self) -> Tensor:
        """The weight update scale * B A, (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scale

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.merged:
            return y
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)  # under autocast both run in bf16
        return y + (x @ a.t() @ b.t()) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta().to(self.base.weight.dtype)
            self.merged = False


def target_names(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """Names of the ``nn.Linear`` modules whose name ends with one of ``targets``; every target
    must match at least one layer (a typo or another architecture is an error, not a no-op). A
    layout planner's layers are never targets: it learns from grounding boxes, not from the
    denoising loss an adapter trains on."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not is_planner_weight(n + ".")]
    found = [n for n in linears if any(n == t or n.endswith("." + t) for t in targets)]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in found)]
    if unmatched:
        raise ValueError(f"LoRA targets {unmatched} match no linear layer of this model "
                         f"(it has e.g. {sorted({n.split('.', 2)[-1] for n in linears})[:8]})")
    return found


def add_lora(model: nn.Module, config: LoRAConfig) -> dict[str, LoRALinear]:
    """Wrap the targeted linear layers in place, freeze every base weight and return the adapters
    by module name. Only their ``lora_A``/``lora_B`` require grad afterwards."""
    if adapters_of(model):
        raise ValueError("this model already carries LoRA adapters; remove them first (remove_lora)")
    model.requires_grad_(False)
    wrapped = {}
    for name in target_names(model, config.targets):
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        wrapped[name] = LoRALinear(getattr(owner, child), config.rank, config.alpha)
        setattr(owner, child, wrapped[name])
    return wrapped


def adapters_of(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model: nn.Module) -> None:
    for m in adapters_of(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in adapters_of(model).values():
        m.unmerge()


def remove_lora(model: nn.Module, merge: bool = True) -> None:
    """Put the plain linear layers back, with the update merged into them (``merge``) or not."""
    for name, m in adapters_of(model).items():
        m.merge() if merge else m.unmerge()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, m.base)


def as_stored(state: dict[str, Tensor], scale: float) -> dict[str, Tensor]:
    """A state dict of an adapted model (``{module}.base.weight``, ``{module}.lora_A``, ...) under
    the plain model's names, each adapter's update as stored low-rank factors beside its weight
    (``{module}.weight.lora_A`` and ``.lora_B``, ``scale`` folded into B; ``checkpoint.merge_low_rank``
    adds them in)."""
    adapted = {k.rsplit(".", 1)[0] for k in state if k.endswith(".lora_A")}
    out = {}
    for key, v in state.items():
        module, _, leaf = key.rpartition(".")
        if module in adapted and leaf in ("lora_A", "lora_B"):
            out[f"{module}.weight.{leaf}"] = v * scale if leaf == "lora_B" else v
        elif module.endswith(".base") and module[: -len(".base")] in adapted:
            out[f"{module[: -len('.base')]}.{leaf}"] = v
        else:
            out[key] = v
    return out


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``{module}.lora_A`` / ``{module}.lora_B`` of every adapter, detached on the CPU."""
    return {f"{n}.{k}": getattr(m, k).detach().cpu() for n, m in adapters_of(model).items()
            for k in ("lora_A", "lora_B")}


# -- the base a file belongs to ----------------------------------------------------------------
def base_fingerprint(model: nn.Module, names: Sequence[str]) -> str:
    """sha256 of the base weights of the named linear layers (float32 bytes), taken before any
    merge: an adapter applies to exactly the weights it was trained on."""
    h = hashlib.sha256()
    for name in sorted(names):
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            if module.merged:
                raise ValueError("the base fingerprint is taken from unmerged weights; unmerge first")
            module = module.base
        h.update(name.encode())
        h.update(module.weight.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class AdapterFile:
    """What ``adapter_config.json`` holds."""

    lora: LoRAConfig
    base_model: str
    base_config: dict[str, Any]
    base_fingerprint: str
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = "latentdit-lora"
    version: int = 1


def save_adapter(model: nn.Module, directory: str | Path, config: LoRAConfig, base_model: str,
                 base_config: ModelConfig, *, extra: dict[str, Any] | None = None,
                 dtype: torch.dtype = torch.float32) -> Path:
    """Write ``adapter.safetensors`` (tensors stored as ``dtype``: float16 halves the file) and
    ``adapter_config.json`` into ``directory``."""
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"adapters are stored as float32, float16 or bfloat16, not {dtype}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = list(adapters_of(model))
    if not names:
        raise ValueError("the model carries no LoRA adapters to save")
    info = AdapterFile(config, str(base_model), asdict(base_config), base_fingerprint(model, names), extra or {})
    tensors = {k: v.to(dtype) for k, v in lora_state_dict(model).items()}
    atomic_save_tensors(tensors, directory / ADAPTER_WEIGHTS, {"format": "pt"})
    atomic_write_bytes(directory / ADAPTER_CONFIG, json.dumps(_jsonable(asdict(info)), indent=2).encode())
    return directory


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d))


def read_adapter(directory: str | Path) -> tuple[AdapterFile, dict[str, Tensor]]:
    """The config and tensors of an adapter folder, or a ValueError saying what is wrong with it."""
    directory = Path(directory)
    if (directory / "config.json").exists() and not (directory / ADAPTER_CONFIG).exists():
        raise ValueError(f"{directory} is a full model folder, not an adapter: load it with --model {directory}")
    file = directory / ADAPTER_CONFIG
    if not file.exists():
        raise ValueError(f"{directory} is not an adapter folder: {ADAPTER_CONFIG} is missing")
    data = read_json(file)
    if data.get("format") != "latentdit-lora":
        raise ValueError(f"{file} is not a latentdit LoRA adapter config")
    try:
        info = from_dict(AdapterFile, data)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{file}: {e}") from None
    try:
        tensors = load_file(directory / ADAPTER_WEIGHTS)
    except FileNotFoundError:
        raise ValueError(f"{directory} has no {ADAPTER_WEIGHTS}") from None
    except Exception as e:
        raise ValueError(f"{directory / ADAPTER_WEIGHTS} is unreadable or truncated ({type(e).__name__})") from None
    odd = [k for k, v in tensors.items() if v.dtype not in WEIGHT_DTYPES]
    if odd:
        raise ValueError(f"{directory / ADAPTER_WEIGHTS}: {odd[0]} is stored as {tensors[odd[0]].dtype}; "
                         "expected float32, float16 or bfloat16")
    bad = [k for k, v in tensors.items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{directory / ADAPTER_WEIGHTS} is damaged: {bad[0]} holds non-finite values")
    return info, tensors


def load_adapter(model: nn.Module, directory: str | Path, *, merge: bool = True,
                 check_base: bool = True) -> AdapterFile:
    """Add the adapter in ``directory`` to ``model`` (a plain base denoiser). The base's
    architecture must be the one the adapter names, and (``check_base``) its weights the ones it
    was trained on. ``merge``: fold the update into the weights for sampling."""
    info, tensors = read_adapter(directory)
    if isinstance(getattr(model, "config", None), ModelConfig):
        _check_architecture(model.config, info, directory)
    wrapped = add_lora(model, info.lora)
    try:
        if check_base:
            found = base_fingerprint(model, list(wrapped))
            if found != info.base_fingerprint:
                raise ValueError(f"adapter {directory} was trained on other weights than this base model's "
                                 f"(it names {info.base_model}, fingerprint {info.base_fingerprint}; this "
                                 f"model's is {found}); load it on the base it was trained on")
        _copy_tensors(wrapped, tensors, directory)
    except BaseException:
        remove_lora(model, merge=False)
        raise
    if merge:
        merge_lora(model)
    return info


def _check_architecture(config: ModelConfig, info: AdapterFile, directory: str | Path) -> None:
    """The stored base config, read as a ModelConfig (fields added since take their defaults),
    must equal the model's."""
    try:
        theirs = asdict(from_dict(ModelConfig, info.base_config))
    except (TypeError, ValueError) as e:
        raise ValueError(f"adapter {directory}: its base model config is not one this latentdit reads ({e})") from None
    mine = asdict(config)
    differ = [k for k in mine if theirs.get(k) != mine[k]]
    if differ:
        raise ValueError(f"adapter {directory} was trained on a different base model ({info.base_model}); "
                         f"the architectures differ in {', '.join(differ[:4])}")


def _copy_tensors(wrapped: dict[str, LoRALinear], tensors: dict[str, Tensor], directory: Path | str) -> None:
    want = {f"{n}.{k}": getattr(m, k) for n, m in wrapped.items() for k in ("lora_A", "lora_B")}
    missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or extra:
        raise ValueError(f"{directory / ADAPTER_WEIGHTS} does not match its config "
                         f"(missing {missing[:2]}, unexpected {extra[:2]})")
    for key, param in want.items():
        if tuple(tensors[key].shape) != tuple(param.shape):
            raise ValueError(f"{directory / ADAPTER_WEIGHTS}: {key} is {tuple(tensors[key].shape)}, "
                             f"the model needs {tuple(param.shape)}")
        with torch.no_grad():
            param.copy_(tensors[key])


def is_adapter(directory: str | Path) -> bool:
    return (Path(directory) / ADAPTER_CONFIG).exists()


__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "ATTENTION_TARGETS", "MLP_TARGETS", "TARGET_SETS", "AdapterFile",
    "LoRAConfig", "LoRALinear", "add_lora", "adapters_of", "as_stored", "base_fingerprint", "is_adapter",
    "load_adapter", "lora_state_dict", "merge_lora", "read_adapter", "remove_lora", "save_adapter",
    "target_names", "unmerge_lora",
]
