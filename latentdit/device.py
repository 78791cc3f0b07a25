"""Which device a command runs on: ``auto`` (the accelerator when there is one), ``cpu``,
``cuda``, ``cuda:N`` or ``mps``. One function every entry point calls, so a device that is not
there is one clear ``ValueError`` instead of a CUDA traceback from deep inside torch."""

from __future__ import annotations

import torch

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
