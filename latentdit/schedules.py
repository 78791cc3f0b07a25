"""Noise paths x_t = alpha(t) * x0 + sigma(t) * noise, prediction conversions and time densities.

Time runs from t = 0 (data) to t = 1 (noise) for every path, so samplers, training and editing
share one convention. A path is plain data; nothing here knows about networks.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .config import Prediction, parse_time_density

VP_TRAIN_STEPS = 1000
_COSINE_S = 0.008
_COSINE_MIN_ALPHA = 1e-3  # keeps eps -> x0 finite at t = 1 (Nichol & Dhariwal clip beta similarly)


def expand(v: Tensor, x: Tensor) -> Tensor:
    """View a per-sample (N,) or scalar time quantity so it broadcasts against x (N, C, H, W)."""
    v = v.to(dtype=x.dtype, device=x.device)
    return v.reshape(-1, *([1] * (x.dim() - 1))) if v.dim() == 1 else v


@functools.cache
def _vp_linear_table() -> Tensor:
    """log(alpha_bar) at t = k/1000, k = 0..1000, for DDPM's betas linspace(1e-4, 0.02, 1000).

    Entry k is log prod_{i<k}(1 - beta_i), so t = (n + 1)/1000 is exactly diffusers' timestep n and
    linear interpolation in between makes the path continuous (Ho et al. 2020, arXiv:2006.11239).
    """
    betas = torch.linspace(1e-4, 0.02, VP_TRAIN_STEPS, dtype=torch.float64)
    return torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(torch.log1p(-betas), 0)])


def _interp_table(t: Tensor) -> tuple[Tensor, Tensor]:
    """Piecewise-linear log(alpha_bar)(t) and its slope, in float64."""
    table = _vp_linear_table()
    u = t.double().clamp(0, 1) * VP_TRAIN_STEPS
    k = u.floor().clamp(max=VP_TRAIN_STEPS - 1).long()
    slope = table[k + 1] - table[k]
    return table[k] + (u - k) * slope, slope * VP_TRAIN_STEPS


@functools.cache
def _cosine_tmax() -> float:
    """Stretch of t so that alpha(1) = _COSINE_MIN_ALPHA instead of exactly 0."""
    c0 = math.cos(math.pi / 2 * _COSINE_S / (1 + _COSINE_S))
    return (math.acos(_COSINE_MIN_ALPHA * c0) * 2 / math.pi * (1 + _COSINE_S) - _COSINE_S)


@dataclass(frozen=True)
class NoisePath:
    """A noise path. ``flow``: rectified flow (Liu et al. 2022, arXiv:2209.03003); ``vp-linear``:
    DDPM's linear betas; ``vp-cosine``: Nichol & Dhariwal 2021 (arXiv:2102.09672)."""

    kind: Literal["flow", "vp-linear", "vp-cosine"] = "flow"

    def __post_init__(self) -> None:
        if self.kind not in ("flow", "vp-linear", "vp-cosine"):
            raise ValueError(f"unknown path '{self.kind}'; use flow, vp-linear or vp-cosine")

    def alpha(self, t: Tensor) -> Tensor:
        return self.alpha_sigma(t)[0]

    def sigma(self, t: Tensor) -> Tensor:
        return self.alpha_sigma(t)[1]

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        t = torch.as_tensor(t)
        dtype = t.dtype if t.is_floating_point() else torch.float32
        if self.kind == "flow":
            return (1 - t).to(dtype), t.to(dtype)
        alpha = self._vp_alpha(t)
        sigma = (1 - alpha**2).clamp(min=0).sqrt()
        return alpha.to(dtype), sigma.to(dtype)

    def derivatives(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(d alpha/dt, d sigma/dt), for the probability-flow ODE dx/dt = a' x0 + s' eps."""
        t = torch.as_tensor(t)
        dtype = t.dtype if t.is_floating_point() else torch.float32
        if self.kind == "flow":
            return -torch.ones_like(t, dtype=dtype), torch.ones_like(t, dtype=dtype)
        alpha = self._vp_alpha(t)
        d_alpha = self._vp_dalpha(t, alpha)
        sigma = (1 - alpha**2).clamp(min=1e-20).sqrt()
        return d_alpha.to(dtype), (-alpha * d_alpha / sigma).to(dtype)

    def log_snr(self, t: Tensor) -> Tensor:
        """lambda(t) = log(alpha / sigma), decreasing in t; +inf at t = 0."""
        alpha, sigma = self.alpha_sigma(torch.as_tensor(t).double())
        return (alpha.log() - sigma.log()).to(torch.as_tensor(t).dtype)

    def t_from_log_snr(self, lam: Tensor, iters: int = 64) -> Tensor:
        """Invert lambda(t) by bisection (every path has a monotone lambda)."""
        lam = torch.as_tensor(lam, dtype=torch.float64)
        lo, hi = torch.zeros_like(lam), torch.ones_like(lam)
        for _ in range(iters):
            mid = (lo + hi) / 2
            above = self.log_snr(mid) > lam  # still too little noise: go later
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return (lo + hi) / 2

    def _vp_alpha(self, t: Tensor) -> Tensor:
        t = t.double()
        if self.kind == "vp-linear":
            return (0.5 * _interp_table(t)[0]).exp()
        u = (t.clamp(0, 1) * _cosine_tmax() + _COSINE_S) / (1 + _COSINE_S)
        c0 = math.cos(math.pi / 2 * _COSINE_S / (1 + _COSINE_S))
        return torch.cos(math.pi / 2 * u) / c0

    def _vp_dalpha(self, t: Tensor, alpha: Tensor) -> Tensor:
        t = t.double()
        if self.kind == "vp-linear":
            return 0.5 * alpha * _interp_table(t)[1]
        u = (t.clamp(0, 1) * _cosine_tmax() + _COSINE_S) / (1 + _COSINE_S)
        c0 = math.cos(math.pi / 2 * _COSINE_S / (1 + _COSINE_S))
        return -torch.sin(math.pi / 2 * u) * (math.pi / 2) * _cosine_tmax() / (1 + _COSINE_S) / c0


def to_x0_eps(pred: Tensor, x_t: Tensor, t: Tensor, path: NoisePath,
              prediction: Prediction) -> tuple[Tensor, Tensor]:
    """Recover (x0, eps) from a network prediction; exact for every path and prediction.

    ``v`` is Salimans & Ho's alpha*eps - sigma*x0 (arXiv:2202.00512); ``flow`` is the path velocity
    alpha'*x0 + sigma'*eps (the rectified-flow / SD3 target, eps - x0 on the flow path).
    """
    a, s = (expand(v, x_t) for v in path.alpha_sigma(t))
    if prediction == "x0":
        return pred, (x_t - a * pred) / s.clamp(min=1e-12)
    if prediction == "eps":
        return (x_t - s * pred) / a.clamp(min=1e-12), pred
    if prediction == "v":
        norm = a**2 + s**2
        return (a * x_t - s * pred) / norm, (s * x_t + a * pred) / norm
    if prediction == "flow":
        da, ds = (expand(v, x_t) for v in path.derivatives(t))
        det = a * ds - s * da  # > 0: alpha falls while sigma rises
        return (ds * x_t - s * pred) / det, (a * pred - da * x_t) / det
    raise ValueError(f"unknown prediction '{prediction}'; use eps, v, x0 or flow")


def to_x0(pred: Tensor, x_t: Tensor, t: Tensor, path: NoisePath, prediction: Prediction) -> Tensor:
    """The clean-sample estimate implied by ``pred``."""
    return to_x0_eps(pred, x_t, t, path, prediction)[0]


def from_x0_eps(x0: Tensor, eps: Tensor, t: Tensor, path: NoisePath, prediction: Prediction) -> Tensor:
    """The prediction target for clean sample x0 and noise eps (training uses this)."""
    if prediction == "x0":
        return x0
    if prediction == "eps":
        return eps
    a, s = (expand(v, x0) for v in path.alpha_sigma(t))
    if prediction == "v":
        return a * eps - s * x0
    if prediction == "flow":
        da, ds = (expand(v, x0) for v in path.derivatives(t))
        return da * x0 + ds * eps
    raise ValueError(f"unknown prediction '{prediction}'; use eps, v, x0 or flow")


def convert(pred: Tensor, x_t: Tensor, t: Tensor, path: NoisePath,
            source: Prediction, target: Prediction) -> Tensor:
    """Re-express a prediction of kind ``source`` as kind ``target``."""
    x0, eps = to_x0_eps(pred, x_t, t, path, source)
    return from_x0_eps(x0, eps, t, path, target)


def add_noise(x0: Tensor, eps: Tensor, t: Tensor, path: NoisePath) -> Tensor:
    a, s = (expand(v, x0) for v in path.alpha_sigma(t))
    return a * x0 + s * eps


def time_shift(t: Tensor, shift: float) -> Tensor:
    """Move time toward noise for larger images: t' = s t / (1 + (s - 1) t) (SD3, arXiv:2403.03206,
    eq. 23); shift = sqrt(tokens / base_tokens) keeps the per-token SNR of the training size."""
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def sample_time(n: int, density: str, *, shift: float = 1.0,
                generator: torch.Generator | None = None, device: str | torch.device = "cpu") -> Tensor:
    """Draw n training times from ``uniform``, ``logit-normal(m, s)`` (SD3), ``beta(a, b)`` or a
    weighted mixture of them (``"0.9*logit-normal(0, 1) + 0.1*uniform"``)."""
    terms = parse_time_density(density)
    t = _sample_one(n, terms[0][1], terms[0][2], generator, device)
    if len(terms) > 1:
        weights = torch.tensor([w for w, _, _ in terms], device=device)
        pick = torch.multinomial(weights, n, replacement=True, generator=generator)
        for k, (_, name, params) in enumerate(terms[1:], start=1):
            t = torch.where(pick == k, _sample_one(n, name, params, generator, device), t)
    return time_shift(t.clamp(1e-5, 1 - 1e-5), shift)


def _sample_one(n: int, name: str, params: tuple[float, ...], generator: torch.Generator | None,
                device: str | torch.device) -> Tensor:
    if name == "uniform":
        return torch.rand(n, generator=generator, device=device)
    if name == "logit-normal":
        return torch.sigmoid(params[0] + params[1] * torch.randn(n, generator=generator, device=device))
    return _sample_beta(n, *params, generator=generator, device=device)


def _sample_beta(n: int, a: float, b: float, *, generator: torch.Generator | None,
                 device: str | torch.device) -> Tensor:
    """Beta(a, b) through two Gamma draws, reproducible with a generator (torch's Beta is not)."""
    ga = _sample_gamma(n, a, generator, device)
    gb = _sample_gamma(n, b, generator, device)
    return ga / (ga + gb)


def _sample_gamma(n: int, k: float, generator: torch.Generator | None,
                  device: str | torch.device) -> Tensor:
    """Marsaglia & Tsang (2000) with the k < 1 boost; vectorised rejection sampling."""
    boost = k < 1
    d = (k + 1 if boost else k) - 1 / 3
    c = 1 / math.sqrt(9 * d)
    out = torch.empty(0, device=device)
    while out.numel() < n:
        z = torch.randn(2 * n, generator=generator, device=device)
        u = torch.rand(2 * n, generator=generator, device=device)
        v = (1 + c * z) ** 3
        ok = (v > 0) & (u.log() < 0.5 * z**2 + d - d * v + d * v.clamp(min=1e-12).log())
        out = torch.cat([out, (d * v)[ok]])
    out = out[:n]
    if boost:
        out = out * torch.rand(n, generator=generator, device=device) ** (1 / k)
    return out
