"""Which device a command runs on: ``auto`` (the accelerator when there is one), ``cpu``,
``cuda``, ``cuda:N`` or ``mps``. One function every entry point calls, so a device that is not
there is one clear ``ValueError`` instead of a CUDA traceback from deep inside torch.

And in which precision it computes: bf16 autocast only where the device does bf16 arithmetic in
its own hardware. A CPU without it (AVX2 alone, as many AMD and older Intel servers) runs bf16
matmuls through slow reference kernels, far slower than fp32 (docs/performance.md)."""

from __future__ import annotations

import os
from typing import Literal

import torch

from .config import check_mixed_precision

# A compute dtype as the API takes it: "auto" (bf16 where native, else fp32), a torch dtype, or
# None (fp32, no autocast).
DType = torch.dtype | Literal["auto"] | None
BF16_ENV = "LATENTDIT_BF16"  # "1": bf16 wherever "auto" decides; "0": fp32 wherever it does

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DEVICE_HELP = "auto (the accelerator when there is one: cuda, then mps, then cpu), cpu, cuda, cuda:N or mps"


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` -> cuda, then mps, then cpu; anything else must name a device that is present."""
    if isinstance(device, torch.device):
        device = str(device)
    spec = "auto" if device is None else str(device).strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ValueError(f"unknown device {device!r}; use {DEVICE_HELP}") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device!r} asked for, but this machine has no CUDA device "
                             f"(torch {torch.__version__}); use --device cpu or auto")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {device!r} asked for, but this machine has {count} CUDA "
                             f"device(s): cuda:0 to cuda:{count - 1}")
        return dev
    if dev.type == "mps":
        if not _mps_available():
            raise ValueError(f"device {device!r} asked for, but MPS is not available on this machine; "
                             "use --device cpu or auto")
        return dev
    raise ValueError(f"unsupported device {device!r}; use {DEVICE_HELP}")


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels (timing needs it); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def native_bf16(device: torch.device | str) -> bool:
    """Whether ``device`` computes bf16 matmuls in hardware: a CUDA GPU that supports bf16, or a
    CPU whose oneDNN has a bf16 path (AVX-512 or AMX on x86, the BF16 extension on Arm), as torch
    itself decides. ``LATENTDIT_BF16=1`` / ``=0`` overrides the answer."""
    forced = os.environ.get(BF16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise ValueError(f"{BF16_ENV}={forced!r}: use 1 (bf16) or 0 (fp32), or leave it unset")
    kind = torch.device(device).type
    if kind == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if kind == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a torch built without oneDNN
            return False
    return False


def compute_dtype(device: torch.device | str, dtype: DType = "auto") -> torch.dtype | None:
    """The autocast dtype to run ``device`` under: ``"auto"`` -> bf16 where ``native_bf16``,
    else None (fp32); a torch dtype or None is returned as given."""
    if isinstance(dtype, str):
        if dtype != "auto":
            raise ValueError(f"unknown compute dtype {dtype!r}; use 'auto', a torch dtype or None (fp32)")
        return torch.bfloat16 if native_bf16(device) else None
    return dtype


def mixed_bf16(device: torch.device | str, mixed: str) -> bool:
    """Whether a training run's ``mixed_precision`` autocasts to bf16 on ``device``."""
    return check_mixed_precision(mixed) == "bf16" or (mixed == "auto" and native_bf16(device))
