"""Samplers against closed forms (Gaussian data) and against diffusers' schedulers, step by step."""

from __future__ import annotations

import typing

import pytest
import torch

from latentdit.config import SamplerName
from latentdit.samplers import (
    SAMPLERS,
    get_sampler,
    invert,
    row_generators,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_heun,
    time_grid,
)
from latentdit.schedules import NoisePath, add_noise

KINDS = ["flow", "vp-linear", "vp-cosine"]
DETERMINISTIC = ["euler", "heun", "ddim", "dpmpp_2m"]
MU = torch.tensor([1.0, -0.5, 0.25, 2.0], dtype=torch.float64).view(1, 4, 1, 1)  # per channel
S = 0.5


def gaussian_denoiser(path: NoisePath, mu: torch.Tensor = MU, s: float = S, calls: list | None = None):
    """Exact E[x0 | x_t] for x0 ~ N(mu, s^2 I): mu + alpha s^2 / (alpha^2 s^2 + sigma^2) (x_t - alpha mu)."""

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.shape == (x.shape[0],) and bool((t == t[0]).all())
        if calls is not None:
            calls.append(t)
        a, sg = path.alpha_sigma(t[0].double())
        return mu + a * s**2 / (a**2 * s**2 + sg**2) * (x - a * mu)

    return denoise


def standard_noise(n: int = 4096, seed: int = 0) -> torch.Tensor:
    """N(0, I) draws, standardised per channel. With Gaussian data every deterministic sampler is an
    affine map per channel, so from this noise the output mean/std are exactly the sampler's own
    transported moments: what remains is discretisation error, not sampling error."""
    z = torch.randn(n, 4, 1, 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (z - z.mean((0, 2, 3), keepdim=True)) / z.std((0, 2, 3), keepdim=True)


# Steps and tolerance per sampler. Starting from N(0, I) instead of the true marginal at t = 1
# biases the mean by s alpha(1) |mu| <= 0.0064 (vp-linear; 0.001 vp-cosine, 0 flow). Deterministic:
# tolerance 0.02 = 4% of s bounds the discretisation error at these step counts (measured <= 0.015:
# the first-order samplers converge as 1/steps, heun/dpmpp_2m as 1/steps^2). ddpm adds fresh noise:
# per-channel standard errors are s/sqrt(4096) = 0.008 (mean) and s/sqrt(8192) = 0.0055 (std);
# ~4 of them plus its O(1/steps) variance deficit (it ignores Var[x0 | x_t]; ~0.02 at 200 steps)
# gives 0.05. dpmpp_2m_sde adds fresh noise too, with the same sampling error, but its variance
# deficit is second order: at 40 steps its errors were <= 0.02 on all three paths (0.027 at 20).
MOMENT_CASES = {"euler": (100, 0.02), "ddim": (100, 0.02), "heun": (40, 0.02),
                "dpmpp_2m": (40, 0.02), "ddpm": (200, 0.05), "dpmpp_2m_sde": (40, 0.05)}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(MOMENT_CASES))
def test_gaussian_data_moments(kind, name):
    path = NoisePath(kind)
    steps, tol = MOMENT_CASES[name]
    x = get_sampler(name)(gaussian_denoiser(path), standard_noise(), time_grid(steps, path), path,
                          generator=torch.Generator().manual_seed(1))
    mean_err = (x.mean((0, 2, 3)) - MU.flatten()).abs().max().item()
    std_err = (x.std((0, 2, 3)) - S).abs().max().item()
    assert mean_err < tol and std_err < tol, (mean_err, std_err)


@pytest.mark.parametrize("kind", KINDS)
def test_fixed_point_inversion_is_exact(kind):
    """Naive DDIM inversion (reversed grid) misses visibly; fixed-point iterations shrink the
    round-trip error geometrically (measured errors per iteration count: docs/testing.md)."""
    path = NoisePath(kind)
    ts = time_grid(20, path)
    denoise = gaussian_denoiser(path)
    x0 = MU + S * torch.randn(256, 4, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for k in (0, 1, 2, 3, 10):
        noise = invert(denoise, x0, ts, path, fixed_point_iters=k)
        errors.append((sample_ddim(denoise, noise, ts, path) - x0).abs().max().item())
    assert errors[0] > 0.05  # the naive reversed grid is far from exact
    assert all(b < a / 2 for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-3, errors


def test_inversion_can_leave_the_first_step_naive():
    """``refine_first_step=False`` refines every inverse step but the one from the clean end: on a
    one-step grid that is the naive inversion, on 20 steps the round trip misses by about one
    naive step's error, far less than naive and far more than refining all."""
    path = NoisePath("flow")
    denoise = gaussian_denoiser(path)
    x0 = MU + S * torch.randn(64, 4, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    one = time_grid(1, path)
    assert torch.equal(invert(denoise, x0, one, path, fixed_point_iters=5, refine_first_step=False),
                       invert(denoise, x0, one, path))
    ts = time_grid(20, path)
    errors = [(sample_ddim(denoise, invert(denoise, x0, ts, path, fixed_point_iters=k, refine_first_step=first),
                           ts, path) - x0).abs().max().item()
              for k, first in ((0, True), (10, False), (10, True))]
    assert errors[0] > 30 * errors[1] and errors[1] > 100 * errors[2], errors


def test_inversion_from_partial_grid_and_naive_equals_reversed_sampler():
    path = NoisePath("vp-linear")
    ts = time_grid(10, path, t_max=0.6)  # img2img-style grid
    denoise = gaussian_denoiser(path)
    x0 = MU + S * torch.randn(64, 4, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noise = invert(denoise, x0, ts, path, fixed_point_iters=10)
    assert (sample_ddim(denoise, noise, ts, path) - x0).abs().max() < 1e-3
    naive = invert(denoise, x0, ts, path)
    assert torch.equal(naive, sample_ddim(denoise, x0, ts.flip(0), path))


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_every_deterministic_sampler_inverts(name):
    """Naive inversion with each ODE sampler, 50 steps, vp-linear: measured round trip 2.5e-2 (euler),
    9.2e-3 (heun), 1.4e-1 (ddim), 1.2e-3 (dpmpp_2m)."""
    path = NoisePath("vp-linear")
    ts = time_grid(50, path)
    denoise = gaussian_denoiser(path)
    x0 = MU + S * torch.randn(64, 4, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    noise = invert(denoise, x0, ts, path, sampler=name)
    assert 0.8 < noise.std() < 1.2  # looks like N(0, I)
    assert (get_sampler(name)(denoise, noise, ts, path) - x0).abs().max() < 0.2


def test_invert_rejects_bad_arguments():
    path, x = NoisePath(), torch.zeros(2, 4, 1, 1)
    ts, denoise = time_grid(4, path), gaussian_denoiser(path)
    with pytest.raises(ValueError, match="deterministic"):
        invert(denoise, x, ts, path, sampler="ddpm")
    with pytest.raises(ValueError, match="ddim"):
        invert(denoise, x, ts, path, sampler="euler", fixed_point_iters=2)
    with pytest.raises(ValueError, match=">= 0"):
        invert(denoise, x, ts, path, fixed_point_iters=-1)
    with pytest.raises(ValueError, match="decreasing"):
        invert(denoise, x, ts.flip(0), path)


# ---- agreement with diffusers -------------------------------------------------------------------

def _eps_model(x: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """A nonlinear eps-prediction of (x, alpha_bar): the Gaussian posterior's eps plus a wiggle."""
    a, s, mu, sd = alpha_bar.sqrt(), (1 - alpha_bar).sqrt(), 0.7, 0.5
    x0 = mu + a * sd**2 / (a**2 * sd**2 + s**2) * (x - a * mu)
    return (x - a * x0) / s + 0.1 * torch.sin(3 * x) * a


def _diffusers_trajectory(scheduler, steps: int, x: torch.Tensor):
    scheduler.set_timesteps(steps)
    xs = []
    for n in scheduler.timesteps:
        x = scheduler.step(_eps_model(x, scheduler.alphas_cumprod[int(n)].double()), n, x).prev_sample
        xs.append(x)
    # diffusers' integer timestep n is our t = (n + 1)/1000; the last step goes to alpha_bar = 1, t = 0
    ts = torch.cat([(scheduler.timesteps.double() + 1) / 1000, torch.zeros(1, dtype=torch.float64)])
    return xs, ts


def _our_trajectory(sampler, x: torch.Tensor, ts: torch.Tensor):
    path = NoisePath("vp-linear")

    def denoise(x, t):  # same eps model, seen through x0 = (x - sigma eps) / alpha
        alpha, sigma = path.alpha_sigma(t[0].double())
        return (x - sigma * _eps_model(x, alpha**2)) / alpha

    xs = []
    sampler(denoise, x, ts, path, on_step=lambda i, t_next, x_next, x0: xs.append(x_next))
    return xs


@pytest.mark.parametrize("steps", [10, 20])
def test_ddim_matches_diffusers_step_by_step(steps):
    """Measured max |ours - diffusers| over all steps: 1.2e-6 (10 steps), 5.6e-7 (20): the float32
    rounding of diffusers' alphas_cumprod."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDIMScheduler(beta_schedule="linear", prediction_type="epsilon",
                                        set_alpha_to_one=True, clip_sample=False)
    x_T = torch.randn(8, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref, ts = _diffusers_trajectory(scheduler, steps, x_T)
    ours = _our_trajectory(sample_ddim, x_T, ts)
    assert len(ours) == len(ref) == steps
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert (a - b).abs().max() < 1e-4, i


@pytest.mark.parametrize("steps", [10, 20])
def test_dpmpp_2m_matches_diffusers_step_by_step(steps):
    """Measured max |ours - diffusers| over all steps: 1.0e-6 (10 steps), 1.2e-6 (20); diffusers
    steps in float32. 20 steps covers len(timesteps) >= 15, where lower_order_final alone would not
    apply: the first-order last step comes from final_sigmas_type="zero"."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DPMSolverMultistepScheduler(beta_schedule="linear", prediction_type="epsilon")
    assert scheduler.config.final_sigmas_type == "zero" and scheduler.config.solver_order == 2
    x_T = torch.randn(8, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref, ts = _diffusers_trajectory(scheduler, steps, x_T)
    ours = _our_trajectory(sample_dpmpp_2m, x_T, ts)
    assert len(ours) == len(ref) == steps
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert (a - b).abs().max() < 1e-4, i
    first_order = _our_trajectory(sample_ddim, x_T, ts)  # the comparison can tell 2M from DDIM
    assert (first_order[-1] - ours[-1]).abs().max() > 1e-3


@pytest.mark.parametrize("steps", [10, 20])
def test_dpmpp_2m_sde_matches_diffusers_step_by_step(steps):
    """diffusers' ``algorithm_type="sde-dpmsolver++"`` (midpoint) given, as ``variance_noise``, the
    noise our sampler draws from the same generator; the last step (to sigma = 0) adds none."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DPMSolverMultistepScheduler(beta_schedule="linear", prediction_type="epsilon",
                                                      algorithm_type="sde-dpmsolver++")
    assert scheduler.config.solver_type == "midpoint" and scheduler.config.final_sigmas_type == "zero"
    x_T = torch.randn(8, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    draws = torch.Generator().manual_seed(3)
    noise = [torch.randn(x_T.shape, generator=draws, dtype=torch.float64) for _ in range(steps)]
    scheduler.set_timesteps(steps)
    ref, x = [], x_T
    for n, z in zip(scheduler.timesteps, noise):
        eps = _eps_model(x, scheduler.alphas_cumprod[int(n)].double())
        x = scheduler.step(eps, n, x, variance_noise=z).prev_sample
        ref.append(x)
    ts = torch.cat([(scheduler.timesteps.double() + 1) / 1000, torch.zeros(1, dtype=torch.float64)])
    ours = _our_trajectory(lambda *a, **k: sample_dpmpp_2m_sde(*a, generator=torch.Generator().manual_seed(3), **k),
                           x_T, ts)
    assert len(ours) == len(ref) == steps
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert (a - b).abs().max() < 1e-4, i
    ode = _our_trajectory(sample_dpmpp_2m, x_T, ts)  # the comparison can tell the SDE from the ODE
    assert (ode[-1] - ours[-1]).abs().max() > 1e-2


def test_karras_grid_matches_diffusers_karras_sigmas():
    diffusers = pytest.importorskip("diffusers")
    path = NoisePath("vp-linear")
    scheduler = diffusers.DPMSolverMultistepScheduler(beta_schedule="linear", use_karras_sigmas=True)
    scheduler.set_timesteps(10)
    ts = time_grid(10, path, "karras", t_min=1e-3)  # diffusers spans its sigmas of timesteps 999..0
    ratio = (-path.log_snr(ts)).exp()  # sigma / alpha, diffusers' (Karras') sigma
    torch.testing.assert_close(ratio[:-1], scheduler.sigmas[:-1].double(), rtol=1e-3, atol=0)
    assert ts[-1] == 0 and scheduler.sigmas[-1] == 0


def test_euler_equals_ddim_on_flow():
    path = NoisePath("flow")
    ts = time_grid(12, path, "shifted", shift=3.0)
    denoise, z = gaussian_denoiser(path), standard_noise(256)
    torch.testing.assert_close(sample_euler(denoise, z, ts, path), sample_ddim(denoise, z, ts, path),
                               rtol=0, atol=1e-12)


# ---- interface ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SAMPLERS))
def test_on_step_is_called_every_step(name):
    path = NoisePath("vp-cosine")
    ts, seen = time_grid(6, path), []

    def on_step(i, t_next, x_next, x0):
        assert t_next.dim() == 0 and x_next.shape == x0.shape == (16, 4, 1, 1)
        seen.append((i, t_next.item(), x_next))

    out = get_sampler(name)(gaussian_denoiser(path), standard_noise(16), ts, path, on_step=on_step)
    assert [i for i, _, _ in seen] == list(range(6))
    assert [t for _, t, _ in seen] == ts[1:].tolist()
    assert torch.equal(seen[-1][2], out)


@pytest.mark.parametrize("name", ["euler", "heun", "ddim"])  # one-step methods: no history
def test_on_step_replacement_is_used(name):
    path = NoisePath("flow")
    ts, denoise, z = time_grid(8, path), gaussian_denoiser(path), standard_noise(16)
    sampler = get_sampler(name)
    const = torch.full_like(z, 0.3)
    replaced = sampler(denoise, z, ts, path, on_step=lambda i, t, x, x0: const if i == 0 else None)
    torch.testing.assert_close(replaced, sampler(denoise, const, ts[1:], path), rtol=0, atol=1e-12)
    last = sampler(denoise, z, ts, path, on_step=lambda i, t, x, x0: const if i == 7 else None)
    assert torch.equal(last, const)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_inpainting_via_on_step_keeps_known_region(name):
    path = NoisePath("vp-linear")
    ts, z = time_grid(10, path), torch.randn(8, 4, 4, 4, dtype=torch.float64)
    known, noise = torch.randn_like(z), torch.randn_like(z)
    mask = torch.zeros_like(z, dtype=torch.bool)
    mask[..., :2] = True

    def on_step(i, t_next, x, x0):  # re-impose the known region at the next noise level
        return torch.where(mask, add_noise(known, noise, t_next, path), x)

    out = get_sampler(name)(gaussian_denoiser(path, mu=0.0), z, ts, path, on_step=on_step,
                            generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[mask], known[mask])
    assert not torch.equal(out[~mask], known[~mask])


@pytest.mark.parametrize("sampler", [sample_ddpm, lambda *a, **k: sample_ddim(*a, eta=0.5, **k), sample_dpmpp_2m_sde])
def test_stochastic_samplers_follow_the_generator(sampler):
    path = NoisePath("vp-linear")
    ts, denoise, z = time_grid(10, path), gaussian_denoiser(path), standard_noise(64)
    a = sampler(denoise, z, ts, path, generator=torch.Generator().manual_seed(7))
    b = sampler(denoise, z, ts, path, generator=torch.Generator().manual_seed(7))
    c = sampler(denoise, z, ts, path, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert sampler(denoise, z, ts, path).shape == z.shape  # no generator: global RNG


@pytest.mark.parametrize("sampler", [sample_ddpm, lambda *a, **k: sample_ddim(*a, eta=0.5, **k), sample_dpmpp_2m_sde])
def test_one_generator_per_row_makes_each_row_its_own_seeds(sampler):
    path = NoisePath("flow")
    ts, denoise, z = time_grid(6, path), gaussian_denoiser(path), standard_noise(3)
    batch = sampler(denoise, z, ts, path, generator=row_generators([4, 5, 6]))
    for i, seed in enumerate((4, 5, 6)):
        alone = sampler(denoise, z[i:i + 1], ts, path, generator=row_generators([seed]))
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=0, atol=1e-12)
    assert not torch.allclose(batch[0], sampler(denoise, z[:1], ts, path, generator=row_generators([5]))[0])
    with pytest.raises(ValueError, match="one generator per row: got 2 generators for 3 rows"):
        sampler(denoise, z, ts, path, generator=row_generators([4, 5]))


def test_row_generators_repeat_no_seeds_own_stream():
    """An image's added noise must not be its own starting noise (drawn from a generator seeded
    with its seed) nor a neighbouring seed's: seeds 0..999 against streams 0..999."""
    first = {s: float(torch.randn(1, generator=torch.Generator().manual_seed(s))) for s in range(1000)}
    mixed = {float(torch.randn(1, generator=g)) for g in row_generators(range(1000))}
    assert len(mixed) == 1000 and not mixed & set(first.values())


def test_ddim_eta_zero_ignores_generator_and_eta_one_is_ddpm():
    path = NoisePath("vp-cosine")
    ts, denoise, z = time_grid(10, path), gaussian_denoiser(path), standard_noise(64)
    assert torch.equal(sample_ddim(denoise, z, ts, path, generator=torch.Generator().manual_seed(1)),
                       sample_ddim(denoise, z, ts, path))
    assert torch.equal(sample_ddim(denoise, z, ts, path, eta=1.0, generator=torch.Generator().manual_seed(3)),
                       sample_ddpm(denoise, z, ts, path, generator=torch.Generator().manual_seed(3)))


def test_grid_validation():
    path, z = NoisePath(), torch.zeros(2, 4, 1, 1)
    denoise = gaussian_denoiser(path)
    for name in SAMPLERS:
        with pytest.raises(ValueError, match="monotone|decreasing"):
            get_sampler(name)(denoise, z, torch.tensor([1.0, 0.5, 0.7, 0.0]), path)
        with pytest.raises(ValueError, match="at least 2"):
            get_sampler(name)(denoise, z, torch.tensor([1.0]), path)
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            get_sampler(name)(denoise, z, torch.tensor([1.5, 0.0]), path)
    for stochastic in (sample_ddpm, lambda *a: sample_ddim(*a, eta=0.3), sample_dpmpp_2m_sde):
        with pytest.raises(ValueError, match="stochastic"):
            stochastic(denoise, z, torch.tensor([0.0, 0.5, 1.0]), path)
    with pytest.raises(ValueError, match="eta"):
        sample_ddim(denoise, z, time_grid(3, path), path, eta=1.5)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_run_both_directions(name):
    path = NoisePath("vp-linear")
    x0 = MU + S * standard_noise(64)
    up = get_sampler(name)(gaussian_denoiser(path), x0, time_grid(10, path).flip(0), path)
    assert torch.isfinite(up).all() and 0.7 < up.std() < 1.3  # noise-like at t = 1


def test_dtypes_and_time_argument():
    path, calls = NoisePath("flow"), []
    denoise = gaussian_denoiser(path, mu=torch.zeros(1, 4, 1, 1), calls=calls)
    for dtype in (torch.float32, torch.bfloat16):
        out = sample_dpmpp_2m(denoise, torch.randn(3, 4, 2, 2, dtype=dtype), time_grid(5, path), path)
        assert out.dtype == dtype
        assert all(t.dtype == torch.float32 for t in calls)  # bf16 latents still get a precise t
    calls.clear()
    sample_heun(denoise, torch.randn(3, 4, 2, 2, dtype=torch.float64), time_grid(5, path), path)
    assert len(calls) == 2 * 5 - 1 and calls[0].dtype == torch.float64  # no correction into t = 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("grid", ["uniform", "shifted", "karras"])
@pytest.mark.parametrize("steps", [1, 2, 10, 50])
@pytest.mark.parametrize("t_max", [1.0, 0.6])
def test_time_grid_shape_and_endpoints(kind, grid, steps, t_max):
    ts = time_grid(steps, NoisePath(kind), grid, shift=3.0, t_max=t_max)
    assert ts.shape == (steps + 1,) and ts.dtype == torch.float64
    assert ts[0] == t_max and ts[-1] == 0.0
    assert (ts.diff() < 0).all()


def test_time_grid_kinds():
    path = NoisePath("flow")
    uniform = time_grid(10, path)
    torch.testing.assert_close(uniform, torch.linspace(1, 0, 11, dtype=torch.float64))
    torch.testing.assert_close(time_grid(10, path, "shifted", shift=1.0), uniform)
    assert (time_grid(10, path, "shifted", shift=3.0)[1:-1] > uniform[1:-1]).all()
    karras = time_grid(10, NoisePath("vp-linear"), "karras", t_min=0.01)
    assert karras[-2].item() == pytest.approx(0.01, abs=1e-9)
    for kwargs in (dict(steps=0), dict(kind="cosine"), dict(t_max=0.0), dict(t_max=1.5),
                   dict(kind="karras", t_min=0.9, t_max=0.5), dict(kind="shifted", shift=0.0)):
        with pytest.raises(ValueError):
            time_grid(**{"steps": 4, "path": path, **kwargs})


def test_registry():
    assert set(SAMPLERS) == set(typing.get_args(SamplerName))
    assert get_sampler("dpmpp_2m") is sample_dpmpp_2m
    with pytest.raises(ValueError, match="euler, heun, ddim, ddpm, dpmpp_2m, dpmpp_2m_sde"):
        get_sampler("lms")


def test_inversion_leaves_the_first_inverse_step_naive_unless_asked():
    """``refine_first_step=False`` (what editing uses) must not refine the step from the clean
    latent at all: with one step, the result is exactly naive inversion."""
    path = NoisePath("flow")
    denoise = lambda x, t: 0.5 * x  # noqa: E731
    x0, ts = torch.randn(1, 2, 4, 4, dtype=torch.float64), torch.tensor([0.6, 0.0], dtype=torch.float64)
    naive = invert(denoise, x0, ts, path, fixed_point_iters=0)
    assert torch.equal(invert(denoise, x0, ts, path, fixed_point_iters=3, refine_first_step=False), naive)
    assert not torch.equal(invert(denoise, x0, ts, path, fixed_point_iters=3, refine_first_step=True), naive)


def test_karras_grid_rejects_bad_bounds():
    path = NoisePath("vp-cosine")
    for kw in (dict(t_min=0.5, t_max=0.5), dict(t_min=0.9, t_max=0.5), dict(rho=0.0)):
        with pytest.raises(ValueError, match="t_min|rho"):
            time_grid(4, path, "karras", **kw)
    assert len(time_grid(4, path, "karras", rho=0.5)) == 5  # any rho > 0 is a grid
