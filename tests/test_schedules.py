"""Noise paths, prediction conversions and training-time densities (latentdit.schedules)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from latentdit.schedules import (
    NoisePath,
    add_noise,
    convert,
    expand,
    from_x0_eps,
    sample_time,
    time_shift,
    to_x0,
    to_x0_eps,
)

KINDS = ["flow", "vp-linear", "vp-cosine"]
PREDICTIONS = ["eps", "v", "x0", "flow"]
T_ALL = torch.linspace(0, 1, 2001, dtype=torch.float64)
T_INNER = torch.linspace(0.02, 0.98, 97, dtype=torch.float64)  # alpha, sigma > 0: every conversion defined


@pytest.mark.parametrize("kind", KINDS)
def test_endpoints_and_monotone(kind):
    path = NoisePath(kind)
    alpha, sigma = path.alpha_sigma(T_ALL)
    assert alpha[0] == 1.0 and sigma[0] == 0.0
    assert (alpha.diff() < 0).all() and (sigma.diff() > 0).all()
    assert sigma[-1] > 0.99 and alpha[-1] < 0.01
    assert (path.log_snr(T_ALL).diff() < 0).all()
    assert path.log_snr(torch.tensor(0.0)) == math.inf


def test_flow_is_linear_and_vp_preserves_variance():
    alpha, sigma = NoisePath("flow").alpha_sigma(T_ALL)
    assert torch.allclose(alpha + sigma, torch.ones_like(T_ALL), atol=1e-15)
    assert torch.equal(alpha, 1 - T_ALL)
    for kind in ("vp-linear", "vp-cosine"):
        alpha, sigma = NoisePath(kind).alpha_sigma(T_ALL)
        assert torch.allclose(alpha**2 + sigma**2, torch.ones_like(T_ALL), atol=1e-12), kind


def test_float32_times_give_float32_coefficients():
    alpha, sigma = NoisePath("vp-linear").alpha_sigma(torch.tensor([0.25, 0.5]))
    assert alpha.dtype == sigma.dtype == torch.float32


@pytest.mark.parametrize("kind", KINDS)
def test_derivatives_match_finite_differences(kind):
    path = NoisePath(kind)
    # vp-linear interpolates log(alpha_bar) linearly between the 1000 DDPM steps, so its slope jumps
    # at t = k/1000: probe midway between knots.
    t = (torch.arange(10, 1000, 37, dtype=torch.float64) + 0.5) / 1000
    h = 1e-7
    d_alpha, d_sigma = path.derivatives(t)
    (a_hi, s_hi), (a_lo, s_lo) = path.alpha_sigma(t + h), path.alpha_sigma(t - h)
    torch.testing.assert_close(d_alpha, (a_hi - a_lo) / (2 * h), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(d_sigma, (s_hi - s_lo) / (2 * h), rtol=1e-6, atol=1e-8)


def test_vp_linear_matches_diffusers_ddpm():
    diffusers = pytest.importorskip("diffusers")
    alphas_cumprod = diffusers.DDPMScheduler().alphas_cumprod.double()  # linspace(1e-4, 0.02, 1000)
    t = (torch.arange(1000, dtype=torch.float64) + 1) / 1000  # our t = (n + 1)/1000 is timestep n
    ours = NoisePath("vp-linear").alpha(t) ** 2
    assert (ours - alphas_cumprod).abs().max() < 1e-6
    assert ((ours - alphas_cumprod) / alphas_cumprod).abs().max() < 1e-6  # also where alpha_bar ~ 4e-5


@pytest.mark.parametrize("kind", KINDS)
def test_log_snr_inverts(kind):
    path = NoisePath(kind)
    t = torch.linspace(0.001, 0.999, 101, dtype=torch.float64)
    torch.testing.assert_close(path.t_from_log_snr(path.log_snr(t)), t, rtol=0, atol=1e-9)
    lo, hi = path.log_snr(torch.tensor([0.999, 0.001], dtype=torch.float64)).tolist()
    lam = torch.linspace(lo, hi, 31, dtype=torch.float64)
    torch.testing.assert_close(path.log_snr(path.t_from_log_snr(lam)), lam, rtol=0, atol=1e-7)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("source,target", list(itertools.product(PREDICTIONS, PREDICTIONS)))
def test_prediction_conversions_round_trip(kind, source, target):
    path = NoisePath(kind)
    g = torch.Generator().manual_seed(0)
    n = T_INNER.numel()
    x0 = torch.randn(n, 3, 2, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 3, 2, 2, generator=g, dtype=torch.float64)
    x_t = add_noise(x0, eps, T_INNER, path)
    pred = from_x0_eps(x0, eps, T_INNER, path, source)
    converted = convert(pred, x_t, T_INNER, path, source, target)
    torch.testing.assert_close(converted, from_x0_eps(x0, eps, T_INNER, path, target), rtol=0, atol=1e-5)
    back = convert(converted, x_t, T_INNER, path, target, source)
    torch.testing.assert_close(back, pred, rtol=0, atol=1e-5)
    rec_x0, rec_eps = to_x0_eps(pred, x_t, T_INNER, path, source)
    torch.testing.assert_close(rec_x0, x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(rec_eps, eps, rtol=0, atol=1e-5)
    torch.testing.assert_close(to_x0(pred, x_t, T_INNER, path, source), x0, rtol=0, atol=1e-5)


def test_flow_target_is_eps_minus_x0_on_flow_path():
    x0, eps, t = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2), torch.rand(4)
    torch.testing.assert_close(from_x0_eps(x0, eps, t, NoisePath("flow"), "flow"), eps - x0)


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="path"):
        NoisePath("ve")
    x = torch.zeros(1, 1, 1, 1)
    with pytest.raises(ValueError, match="prediction"):
        to_x0(x, x, torch.tensor([0.5]), NoisePath(), "score")
    with pytest.raises(ValueError, match="prediction"):
        from_x0_eps(x, x, torch.tensor([0.5]), NoisePath(), "score")


def test_expand_broadcasts_per_sample_values():
    x = torch.zeros(3, 2, 4, 4, dtype=torch.float64)
    assert expand(torch.tensor([1.0, 2.0, 3.0]), x).shape == (3, 1, 1, 1)
    assert expand(torch.tensor([1.0, 2.0, 3.0]), x).dtype == torch.float64
    assert expand(torch.tensor(0.5), x).shape == ()


N_DRAWS = 100_000  # standard error of a mean <= 0.29/sqrt(N) ~ 1e-3, of a quantile ~ 2e-3


def _beta_quantile(p: float, b: float) -> float:
    return 1 - (1 - p) ** (1 / b)  # Beta(1, b) has CDF 1 - (1 - x)^b


@pytest.mark.parametrize("density,mean,quantiles", [
    ("uniform", 0.5, {0.1: 0.1, 0.5: 0.5, 0.9: 0.9}),
    # logit-normal(0, 1): t = sigmoid(z); quantiles are sigmoid of the normal's; mean 0.5 by symmetry
    ("logit-normal(0, 1)", 0.5, {0.1: 1 / (1 + math.exp(1.2815516)), 0.5: 0.5,
                                 0.9: 1 / (1 + math.exp(-1.2815516))}),
    ("beta(1, 2.5)", 1 / 3.5, {p: _beta_quantile(p, 2.5) for p in (0.1, 0.5, 0.9)}),
])
def test_time_densities(density, mean, quantiles):
    t = sample_time(N_DRAWS, density, generator=torch.Generator().manual_seed(0))
    assert t.shape == (N_DRAWS,) and 0 < t.min() and t.max() < 1
    assert abs(t.mean().item() - mean) < 5e-3
    for p, q in quantiles.items():
        assert abs(torch.quantile(t, p).item() - q) < 1e-2, (density, p)
    again = sample_time(N_DRAWS, density, generator=torch.Generator().manual_seed(0))
    other = sample_time(N_DRAWS, density, generator=torch.Generator().manual_seed(1))
    assert torch.equal(t, again) and not torch.equal(t, other)


@pytest.mark.parametrize("m,s", [(0.0, 1.0), (0.5, 0.6), (-0.3, 1.8)])
def test_logit_normal_has_its_location_and_scale(m, s):
    """logit-normal(m, s) means logit(t) ~ N(m, s^2), both parameters: the scale sets how much
    training time the middle noise levels get (SD3, arXiv:2403.03206, eq. 19)."""
    t = sample_time(N_DRAWS, f"logit-normal({m}, {s})", generator=torch.Generator().manual_seed(3)).double()
    z = torch.log(t / (1 - t))
    assert abs(z.mean().item() - m) < 0.03 and abs(z.std().item() - s) < 0.03, (z.mean().item(), z.std().item())
    mixed = sample_time(N_DRAWS, f"0.5*logit-normal({m}, {s}) + 0.5*uniform",
                        generator=torch.Generator().manual_seed(4)).double()
    assert abs((mixed < 0.5).double().mean().item() - 0.5 * (0.5 + 0.5 * math.erf(-m / (s * math.sqrt(2))))
               - 0.25) < 0.01


def test_time_shift():
    t = torch.linspace(0, 1, 11)
    assert torch.equal(time_shift(t, 1.0), t)
    shifted = time_shift(t, 3.0)
    assert shifted[0] == 0 and shifted[-1] == 1
    assert (shifted[1:-1] > t[1:-1]).all() and (shifted.diff() > 0).all()
    assert (time_shift(t[1:-1], 0.5) < t[1:-1]).all()
    drawn = sample_time(20_000, "uniform", shift=3.0, generator=torch.Generator().manual_seed(0))
    assert drawn.mean() > 0.6  # E[3u/(1+2u)] = 1.5 - 0.75 ln 3 ~ 0.676


def test_time_density_mixture_draws_each_term_with_its_weight():
    """0.8 logit-normal(0, 1) + 0.2 uniform: P(t < 0.1) = 0.8 * Phi(logit 0.1) + 0.2 * 0.1 = 0.0312
    and P(t > 0.97) = 0.8 * 0.00025 + 0.2 * 0.03 = 0.0062, ten times logit-normal's own tail."""
    spec = "0.8*logit-normal(0, 1) + 0.2*uniform"
    t = sample_time(N_DRAWS, spec, generator=torch.Generator().manual_seed(0))
    assert t.shape == (N_DRAWS,) and 0 < t.min() and t.max() < 1
    assert abs((t < 0.1).float().mean().item() - 0.0312) < 3e-3
    assert abs((t > 0.97).float().mean().item() - 0.0062) < 1.5e-3
    assert abs(t.mean().item() - 0.5) < 5e-3
    mixed = sample_time(N_DRAWS, "0.5*beta(1, 2.5) + 0.5*uniform", generator=torch.Generator().manual_seed(0))
    assert abs(mixed.mean().item() - (0.5 / 3.5 + 0.25)) < 5e-3
    assert torch.equal(t, sample_time(N_DRAWS, spec, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("bad", ["gauss", "logit-normal(0)", "beta(0, 1)", "logit-normal(0, -1)",
                                 "beta(a, b)", "uniform(1)", ""])
def test_bad_density_strings_raise(bad):
    with pytest.raises(ValueError):
        sample_time(10, bad)


@pytest.mark.parametrize("shift", [0.5, 2.0, 3.0])
def test_time_shift_is_its_formula_for_every_shift(shift):
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(time_shift(t, shift), shift * t / (1 + (shift - 1) * t))


def test_beta_density_below_one_and_saturating_draws_stay_inside_the_unit_interval():
    """beta(0.5, 0.5) is the arcsine law, quantile sin^2(pi p / 2): it takes the k < 1 branch of the
    Gamma sampler. A logit-normal with a huge scale saturates float32 to 0 and 1, which the clamp
    keeps strictly inside (0, 1) (t = 0 or 1 would make some paths' targets infinite)."""
    t = sample_time(N_DRAWS, "beta(0.5, 0.5)", generator=torch.Generator().manual_seed(5))
    for p in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert abs(torch.quantile(t, p).item() - math.sin(math.pi * p / 2) ** 2) < 1e-2, p
    small = sample_time(N_DRAWS, "beta(0.3, 0.6)", generator=torch.Generator().manual_seed(7)).double()
    assert abs(small.mean().item() - 1 / 3) < 5e-3  # a / (a + b)
    assert abs(small.var().item() - 0.18 / (0.81 * 1.9)) < 5e-3  # ab / ((a + b)^2 (a + b + 1))
    wide = sample_time(10_000, "logit-normal(0, 40)", generator=torch.Generator().manual_seed(6))
    assert (wide == 1e-5).any() and (wide == torch.tensor(1 - 1e-5)).any()
    assert wide.min() >= 1e-5 and wide.max() <= torch.tensor(1 - 1e-5)
