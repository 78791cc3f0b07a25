"""Samplers: pure functions that integrate a noise path from noise to data (or back, for inversion).

One signature, k-diffusion style: ``sample_x(denoise, x, ts, path, *, generator=None, on_step=None)``.
A stochastic sampler's ``generator`` is one ``torch.Generator`` for the whole batch or one per row
(``row_generators``: each image's noise then depends only on its own seed, not on its batch).
``denoise(x_t, t)`` returns the x0 estimate (the pipeline owns guidance and prediction-type
conversion); every sampler derives eps = (x_t - alpha x0) / sigma from it, so one implementation
serves every ``NoisePath``. ``ts`` lists the times visited: decreasing to sample (``ts[0] < 1`` is
img2img), increasing to invert. Step coefficients are computed in float64 from ``ts``; the tensors
keep ``x``'s dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor

from .schedules import NoisePath, time_shift

Denoise = Callable[[Tensor, Tensor], Tensor]  # (x_t (N,C,H,W), t (N,)) -> x0, shape of x_t
OnStep = Callable[[int, Tensor, Tensor, Tensor], Tensor | None]  # (i, t_next, x_next, x0) -> x or None
Generators = torch.Generator | Sequence[torch.Generator] | None  # one for the batch, or one per row
Sampler = Callable[..., Tensor]

_KARRAS_T_MIN = 1e-3  # default last nonzero karras time: DDPM's first training timestep, t = 1/1000
_NOISE_DOMINATED = -math.log(10.0)  # lambda_i + lambda_{i+1} below this: x0-form fixed point
_KARRAS_MAX_RATIO = 1e3  # sigma/alpha cap: flow's is infinite at t = 1 (vp-cosine's is 1e3 there)


class _Grid:
    """The visited times as python floats (float64) with alpha, sigma and their t-derivatives."""

    def __init__(self, ts: Tensor | Sequence[float], path: NoisePath, *, stochastic: bool = False):
        t = torch.as_tensor(ts).detach().to("cpu", torch.float64)
        if t.dim() != 1 or t.numel() < 2:
            raise ValueError(f"ts must be a 1-D grid of at least 2 times, got shape {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()) or t.min() < 0 or t.max() > 1:
            raise ValueError("ts must lie in [0, 1]")
        diff = t.diff()
        if not (bool((diff < 0).all()) or bool((diff > 0).all())):
            raise ValueError("ts must be strictly decreasing (sampling) or strictly increasing (inversion)")
        self.increasing = bool(diff[0] > 0)
        if stochastic and self.increasing:
            raise ValueError("a stochastic sampler cannot run on an increasing (inversion) grid")
        alpha, sigma = path.alpha_sigma(t)
        d_alpha, d_sigma = path.derivatives(t)
        self.t, self.alpha, self.sigma = t.tolist(), alpha.tolist(), sigma.tolist()
        self.d_alpha, self.d_sigma = d_alpha.tolist(), d_sigma.tolist()
        self.lam = [_log_snr(a, s) for a, s in zip(self.alpha, self.sigma)]
        self.tensor = t

    def steps(self) -> range:
        return range(len(self.t) - 1)


def _log_snr(alpha: float, sigma: float) -> float:
    """lambda = log(alpha / sigma), +inf at sigma = 0 (t = 0) and -inf at alpha = 0 (flow's t = 1)."""
    if sigma == 0:
        return math.inf
    return -math.inf if alpha == 0 else math.log(alpha / sigma)


def _denoise(denoise: Denoise, x: Tensor, t: float) -> Tensor:
    """Call the denoiser with t as an (N,) tensor (float32 at least, so bf16 latents keep a precise
    t); its x0 is cast to x's dtype so the sampler's state keeps the caller's dtype."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return denoise(x, torch.full((x.shape[0],), t, dtype=dtype, device=x.device)).to(x.dtype)


def _x0_eps(denoise: Denoise, x: Tensor, g: _Grid, k: int) -> tuple[Tensor, Tensor]:
    """(x0, eps) at grid point k (sigma > 0): eps is whatever noise the denoiser's x0 implies."""
    x0 = _denoise(denoise, x, g.t[k])
    return x0, (x - g.alpha[k] * x0) / g.sigma[k]


def _predict(denoise: Denoise, x: Tensor, g: _Grid, i: int) -> tuple[Tensor, Tensor]:
    """(x0, eps) at the start of step i.

    At sigma = 0 (t = 0, the first step of an inversion) eps = (x - alpha x0)/sigma is undefined.
    There x0 = x exactly, and eps comes from the denoiser at the *next* grid time with the current x:
    the convention of diffusers' DDIMInverseScheduler.
    """
    if g.sigma[i] == 0:
        return x, _x0_eps(denoise, x, g, i + 1)[1]
    return _x0_eps(denoise, x, g, i)


def _ddim_update(g: _Grid, i: int, x0: Tensor, eps: Tensor) -> Tensor:
    """x at t_{i+1} = alpha x0 + sigma eps: the exact solution of the ODE with x0 and eps frozen."""
    return g.alpha[i + 1] * x0 + g.sigma[i + 1] * eps


def _velocity(g: _Grid, k: int, x0: Tensor, eps: Tensor) -> Tensor:
    """Probability-flow ODE dx/dt = alpha'(t) x0 + sigma'(t) eps (eps - x0 on the flow path)."""
    return g.d_alpha[k] * x0 + g.d_sigma[k] * eps


def _after_step(on_step: OnStep | None, g: _Grid, i: int, x: Tensor, x0: Tensor) -> Tensor:
    if on_step is None:
        return x
    out = on_step(i, g.tensor[i + 1], x, x0)
    return x if out is None else out


def _noise_like(x: Tensor, generator: Generators) -> Tensor:
    """Gaussian noise drawn on the generator's device (so CPU seeds reproduce on any device); with
    one generator per row (all on one device), row i from generator i, moved to x's device at once."""
    if generator is None or isinstance(generator, torch.Generator):
        device = generator.device if generator is not None else x.device
        return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)
    if len(generator) != x.shape[0]:
        raise ValueError(f"one generator per row: got {len(generator)} generators for {x.shape[0]} rows")
    rows = [torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype) for g in generator]
    return torch.stack(rows).to(x.device)  # one host-to-device copy a step, not one a row


def _mix(seed: int) -> int:
    """splitmix64's output function (Steele et al. 2014): nearby seeds map to unrelated 64-bit
    values, so also to unrelated low 32 bits, the only ones a CPU generator's seed keeps."""
    z = (int(seed) + 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    return z ^ (z >> 31)


def row_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image for a stochastic sampler's noise, seeded from the image's seed
    but not with it: the pipeline draws an image's starting noise from a generator seeded with
    its seed, and the noise a sampler adds along the way must repeat neither that draw nor another
    image's. CPU generators make the same seed give the same image on any device."""
    return [torch.Generator().manual_seed(_mix(s)) for s in seeds]


def sample_euler(denoise: Denoise, x: Tensor, ts: Tensor, path: NoisePath, *,
                 generator: Generators = None, on_step: OnStep | None = None) -> Tensor:
    """Euler on the probability-flow ODE in t (Song et al. 2021, arXiv:2011.13456, eq. 13;
    Karras et al. 2022, arXiv:2206.00364, Alg. 1 without the correction). Deterministic.

    A step that starts at t = 0 (inversion) uses the DDIM update: sigma'(0) is infinite on VP paths.
    """
    g = _Grid(ts, path)
    for i in g.steps():
        x0, eps = _predict(denoise, x, g, i)
        if g.sigma[i] == 0:
            x = _ddim_update(g, i, x0, eps)
        else:
            x = x + (g.t[i + 1] - g.t[i]) * _velocity(g, i, x0, eps)
        x = _after_step(on_step, g, i, x, x0)
    return x


def sample_heun(denoise: Denoise, x: Tensor, ts: Tensor, path: NoisePath, *,
                generator: Generators = None, on_step: OnStep | None = None) -> Tensor:
    """Heun's 2nd-order method on the probability-flow ODE in t, Karras et al. 2022,
    arXiv:2206.00364, Alg. 1: Euler alone on a step to t = 0, where eps is undefined.

    A step that starts at t = 0 (inversion) uses the DDIM update, as in ``sample_euler``.
    """
    g = _Grid(ts, path)
    for i in g.steps():
        x0, eps = _predict(denoise, x, g, i)
        if g.sigma[i] == 0:
            x_next = _ddim_update(g, i, x0, eps)
        else:
            dt, d = g.t[i + 1] - g.t[i], _velocity(g, i, x0, eps)
            x_next = x + dt * d
            if g.sigma[i + 1] != 0:
                x0_2, eps_2 = _x0_eps(denoise, x_next, g, i + 1)
                x_next = x + dt * (d + _velocity(g, i + 1, x0_2, eps_2)) / 2
        x = _after_step(on_step, g, i, x_next, x0)
    return x


def sample_ddim(denoise: Denoise, x: Tensor, ts: Tensor, path: NoisePath, *, eta: float = 0.0,
                generator: Generators = None, on_step: OnStep | None = None) -> Tensor:
    """DDIM, Song et al. 2020, arXiv:2010.02502, eq. 12; eta = 1 is DDPM ancestral sampling.

    x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z with
    c = eta sigma_s sqrt(1 - (alpha_t sigma_s / (alpha_s sigma_t))^2): the posterior q(x_s | x_t, x0)
    std for any Gaussian path, which is the paper's sigma_t(eta) on VP paths.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    g = _Grid(ts, path, stochastic=eta > 0)
    for i in g.steps():
        x0, eps = _predict(denoise, x, g, i)
        c = 0.0
        if eta > 0:
            ratio = g.alpha[i] * g.sigma[i + 1] / (g.alpha[i + 1] * g.sigma[i])
            c = eta * g.sigma[i + 1] * math.sqrt(max(0.0, 1.0 - ratio**2))
        x = g.alpha[i + 1] * x0 + math.sqrt(max(0.0, g.sigma[i + 1] ** 2 - c**2)) * eps
        if c > 0:
            x = x + c * _noise_like(x, generator)
        x = _after_step(on_step, g, i, x, x0)
    return x


def sample_ddpm(denoise: Denoise, x: Tensor, ts: Tensor, path: NoisePath, *,
                generator: Generators = None, on_step: OnStep | None = None) -> Tensor:
    """DDPM ancestral sampling, Ho et al. 2020, arXiv:2006.11239, Alg. 2 (= DDIM with eta = 1)."""
    return sample_ddim(denoise, x, ts, path, eta=1.0, generator=generator, on_step=on_step)


def sample_dpmpp_2m(denoise: Denoise, x: Tensor, ts: Tensor, path: NoisePath, *,
                    generator: Generators = None, on_step: OnStep | None = None) -> Tensor:
    """DPM-Solver++(2M), Lu et al. 2022, arXiv:2211.01095, Alg. 2, in lambda = log(alpha/sigma).

    First order (= DDIM) on the first step, on a step to t = 0 (diffusers' final_sigmas_type="zero")
    and wherever lambda is infinite (a step from t = 0, or touching flow's t = 1), since the
    multistep correction needs two finite log-SNR intervals.
    """
    g = _Grid(ts, path)
    x0_prev, h_prev = None, math.nan
    for i in g.steps():
        x0, eps = _predict(denoise, x, g, i)
        h = g.lam[i + 1] - g.lam[i]
        x_next = _ddim_update(g, i, x0, eps)  # DPM-Solver++(1)
        if x0_prev is not None and math.isfinite(h) and math.isfinite(h_prev):
            r = h_prev / h
            x_next = x_next - g.alpha[i + 1] * math.expm1(-h) * (x0 - x0_prev) / (2 * r)
        x0_prev, h_prev = x0, h
        x = _after_step(on_step, g, i, x_next, x0)
    return x


def sample_dpmpp_2m_sde(denoise: Denoise, x: Tensor, ts: Tensor, path: NoisePath, *,
                        generator: Generators = None, on_step: OnStep | None = None) -> Tensor:
    """SDE-DPM-Solver++(2M), Lu et al. 2022, arXiv:2211.01095, Sec. 4 (the first-order SDE step
    with the multistep correction of ``sample_dpmpp_2m``, in its midpoint form as in diffusers'
    ``algorithm_type="sde-dpmsolver++"``): with h = lambda_s - lambda_t,

    x_s = (sigma_s / sigma_t) e^-h x_t + alpha_s (1 - e^-2h) x0 + sigma_s sqrt(1 - e^-2h) z,

    the exact solution of the reverse SDE for a constant x0 over the step; the correction adds
    alpha_s (1 - e^-2h) (x0 - x0_prev) / (2r). Fresh noise every step, as DDPM, but second order.
    """
    g = _Grid(ts, path, stochastic=True)
    x0_prev, h_prev = None, math.nan
    for i in g.steps():
        x0, _ = _predict(denoise, x, g, i)
        h = g.lam[i + 1] - g.lam[i]
        decay = math.exp(-h)  # 0 where lambda is infinite: from flow's t = 1 or to t = 0
        keep = g.sigma[i + 1] / g.sigma[i] * decay if decay > 0 else 0.0  # sigma_t > 0: decreasing grid
        x_next = keep * x + g.alpha[i + 1] * (1.0 - decay**2) * x0
        if x0_prev is not None and math.isfinite(h) and math.isfinite(h_prev):
            x_next = x_next + g.alpha[i + 1] * (1.0 - decay**2) * (x0 - x0_prev) / (2 * h_prev / h)
        c = g.sigma[i + 1] * math.sqrt(max(0.0, 1.0 - decay**2))
        if c > 0:
            x_next = x_next + c * _noise_like(x_next, generator)
        x0_prev, h_prev = x0, h
        x = _after_step(on_step, g, i, x_next, x0)
    return x


SAMPLERS: dict[str, Sampler] = {
    "euler": sample_euler,
    "heun": sample_heun,
    "ddim": sample_ddim,
    "ddpm": sample_ddpm,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
}
_DETERMINISTIC = ("euler", "heun", "ddim", "dpmpp_2m")


def get_sampler(name: str) -> Sampler:
    """The sampler function called ``name``."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler '{name}'; choose one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def time_grid(steps: int, path: NoisePath, kind: Literal["uniform", "shifted", "karras"] = "uniform", *,
              shift: float = 1.0, t_max: float = 1.0, t_min: float = 0.0, rho: float = 7.0) -> Tensor:
    """(steps + 1,) float64 times, strictly decreasing from ``t_max`` to exactly 0.

    ``uniform``: linspace. ``shifted``: uniform, then ``time_shift`` (SD3, arXiv:2403.03206, eq. 23),
    with the uniform part ending at time_shift^-1(t_max) so the grid still starts at ``t_max``.
    ``karras``: Karras et al. 2022, arXiv:2206.00364, eq. 5, spacing sigma/alpha = exp(-lambda) with
    ``rho`` from t_max down to ``t_min`` (default 1/1000; sigma/alpha capped at 1e3 where it is
    infinite, flow's t = 1), mapped back through ``path.t_from_log_snr``, then 0.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 < t_max <= 1.0:
        raise ValueError(f"t_max must be in (0, 1], got {t_max}")
    if kind == "uniform":
        ts = torch.linspace(t_max, 0.0, steps + 1, dtype=torch.float64)
    elif kind == "shifted":
        if shift <= 0:
            raise ValueError(f"shift must be > 0, got {shift}")
        u_max = t_max / (shift - (shift - 1) * t_max)  # inverse of time_shift
        ts = time_shift(torch.linspace(u_max, 0.0, steps + 1, dtype=torch.float64), shift)
    elif kind == "karras":
        ts = _karras(steps, path, t_max, t_min or _KARRAS_T_MIN, rho)
    else:
        raise ValueError(f"unknown time grid '{kind}'; choose uniform, shifted or karras")
    ts[0], ts[-1] = t_max, 0.0
    if not bool((ts.diff() < 0).all()):
        raise ValueError(f"time grid {kind} with {steps} steps is not strictly decreasing; "
                         "use fewer steps or a wider [t_min, t_max]")
    return ts


def _karras(steps: int, path: NoisePath, t_max: float, t_min: float, rho: float) -> Tensor:
    """Karras et al. 2022, eq. 5 in the noise-to-signal ratio sigma/alpha, then t = 0 appended."""
    if not 0.0 < t_min < t_max:
        raise ValueError(f"karras needs 0 < t_min < t_max, got t_min={t_min}, t_max={t_max}")
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    lam = path.log_snr(torch.tensor([t_max, t_min], dtype=torch.float64))
    r_max, r_min = (-lam).exp().clamp(max=_KARRAS_MAX_RATIO).tolist()
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    ratio = (r_max ** (1 / rho) + ramp * (r_min ** (1 / rho) - r_max ** (1 / rho))) ** rho
    return torch.cat([path.t_from_log_snr(-ratio.log()), torch.zeros(1, dtype=torch.float64)])


def invert(denoise: Denoise, x0: Tensor, ts: Tensor, path: NoisePath, *, sampler: str = "ddim",
           fixed_point_iters: int = 0, refine_first_step: bool = True) -> Tensor:
    """Map a clean latent to the noise that ``sampler`` on the sampling grid ``ts`` turns back into it.

    Inversion runs the deterministic sampler on the reversed grid (DDIM inversion: Song et al. 2020,
    arXiv:2010.02502, Sec. 4.3; Dhariwal & Nichol 2021, arXiv:2105.05233). Each step of that uses
    the denoiser at the less-noisy end, so sampling back is only approximately the identity.
    ``fixed_point_iters = k > 0`` (DDIM only) refines each inverse step k times so that the forward
    DDIM step lands on its starting point (fixed-point inversion: Pan et al. 2023, arXiv:2309.04907;
    Garibi et al. 2024, ReNoise, arXiv:2403.14602); the error falls geometrically with k.
    ``refine_first_step=False`` leaves the step that leaves the grid's least-noisy end naive.
    """
    if sampler not in _DETERMINISTIC:
        raise ValueError(f"inversion needs a deterministic sampler ({', '.join(_DETERMINISTIC)}), "
                         f"got '{sampler}'")
    if fixed_point_iters < 0:
        raise ValueError(f"fixed_point_iters must be >= 0, got {fixed_point_iters}")
    if fixed_point_iters and sampler != "ddim":
        raise ValueError("fixed_point_iters refines DDIM steps; use sampler='ddim'")
    if _Grid(ts, path).increasing:
        raise ValueError("invert takes the sampling grid (decreasing); it reverses it itself")
    rev = torch.as_tensor(ts).detach().to("cpu", torch.float64).flip(0)
    if not fixed_point_iters:
        return get_sampler(sampler)(denoise, x0, rev, path)
    g = _Grid(rev, path)
    x = x0
    for i in g.steps():
        y = sample_ddim(denoise, x, rev[i:i + 2], path)  # the naive inverse step
        for _ in range(fixed_point_iters if i or refine_first_step else 0):
            y = _fixed_point_update(denoise, x, y, g, i)
        x = y
    return x


def _fixed_point_update(denoise: Denoise, x: Tensor, y: Tensor, g: _Grid, i: int) -> Tensor:
    """One fixed-point iteration for y at t_{i+1} such that the DDIM step y -> t_i returns x.

    That step is x = alpha_i x0(y) + sigma_i eps(y): re-evaluate one of x0, eps at the guess y and
    solve for the other. Holding eps (ReNoise's form) contracts for any Gaussian data, by at most
    1 - exp(-|h|) per iteration, but stalls as alpha_{i+1} -> 0 (it is the identity at flow's t = 1).
    On noise-dominated steps (alpha_i alpha_{i+1} / (sigma_i sigma_{i+1}) < 1/10) hold x0 instead:
    by Tweedie its contraction is at most that ratio times the posterior variance of x0.
    """
    a, s, a_n, s_n = g.alpha[i], g.sigma[i], g.alpha[i + 1], g.sigma[i + 1]
    x0_y = _denoise(denoise, y, g.t[i + 1])
    if g.lam[i] + g.lam[i + 1] < _NOISE_DOMINATED:
        return a_n * x0_y + s_n * (x - a * x0_y) / s
    eps_y = (y - a_n * x0_y) / s_n
    return a_n * (x - s * eps_y) / a + s_n * eps_y


__all__ = [
    "Denoise", "Generators", "OnStep", "SAMPLERS", "get_sampler", "invert", "row_generators", "sample_ddim",
    "sample_ddpm", "sample_dpmpp_2m", "sample_dpmpp_2m_sde", "sample_euler", "sample_heun", "time_grid",
]
