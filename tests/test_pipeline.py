"""The whole pipeline with tiny random components built locally: no downloads, seconds."""

import shutil

import numpy as np
import pytest
import torch
from tiny import tiny_pipeline

from latentdit.checkpoint import CheckpointConfig, save_pretrained
from latentdit.config import DiffusionConfig, SamplingConfig, model_preset
from latentdit.model import Denoiser
from latentdit.pipeline import Text2Image
from latentdit.samplers import get_sampler
from latentdit.schedules import NoisePath


def _pipe(tiny_clip, tiny_vae, path="flow", prediction="flow"):
    return tiny_pipeline(tiny_clip, tiny_vae, seed=1, path=path, prediction=prediction)


def _arr(img):
    return np.asarray(img, dtype=np.int16)


def test_same_seed_same_image_different_seeds_differ(tiny_clip, tiny_vae):
    pipe = _pipe(tiny_clip, tiny_vae)
    a = pipe("a red circle", seed=3, progress=False)[0]
    b = pipe("a red circle", seed=3, progress=False)[0]
    c = pipe("a red circle", seed=4, progress=False)[0]
    assert a.size == (16, 16)
    assert np.array_equal(_arr(a), _arr(b))
    assert not np.array_equal(_arr(a), _arr(c))


def test_prompt_and_negative_prompt_matter(tiny_clip, tiny_vae):
    pipe = _pipe(tiny_clip, tiny_vae)
    kw = dict(seed=0, output_type="latent", progress=False)
    a = pipe("a red circle", **kw)
    assert not torch.allclose(a, pipe("a blue square at the bottom", **kw))
    assert not torch.allclose(a, pipe("a red circle", negative_prompt="a green star", **kw))


def test_guidance_one_is_the_conditional_prediction(tiny_clip, tiny_vae):
    pipe = _pipe(tiny_clip, tiny_vae)
    out = pipe("a red circle", guidance_scale=1.0, seed=5, output_type="latent", progress=False)
    cond, _ = pipe.encode(["a red circle"])
    x = pipe.noise([5], pipe.latent_shape(None, None))
    manual = get_sampler("dpmpp_2m")(pipe.denoiser(cond, None, 1.0), x, pipe.grid(4), pipe.path)
    torch.testing.assert_close(out, manual)


@pytest.mark.parametrize("path,prediction", [("flow", "flow"), ("vp-linear", "eps"), ("vp-cosine", "v")])
def test_batched_guidance_equals_separate_passes(tiny_clip, tiny_vae, path, prediction):
    from latentdit.schedules import to_x0

    pipe = _pipe(tiny_clip, tiny_vae, path, prediction)
    cond, uncond = pipe.encode(["a red circle", "two blue hearts"])
    x, t = torch.randn(2, 4, 8, 8), torch.full((2,), 0.6)
    guided = pipe.denoiser(cond, uncond, 3.0, dtype=None)(x, t)
    with torch.no_grad():
        x0_c = to_x0(pipe.model(x, t, **cond.kwargs()), x, t, pipe.path, prediction)
        x0_u = to_x0(pipe.model(x, t, **uncond.kwargs()), x, t, pipe.path, prediction)
    torch.testing.assert_close(guided, x0_u + 3.0 * (x0_c - x0_u), atol=1e-5, rtol=1e-5)


def test_guidance_interval_guides_inside_and_runs_one_conditional_pass_outside(tiny_clip, tiny_vae):
    pipe = _pipe(tiny_clip, tiny_vae)
    cond, uncond = pipe.encode(["a red circle"])
    x = torch.randn(1, 4, 8, 8)
    batches = []
    hook = pipe.model.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        interval = pipe.denoiser(cond, uncond, 3.0, dtype=None, guidance_interval=(0.3, 0.7))
        always = pipe.denoiser(cond, uncond, 3.0, dtype=None)
        plain = pipe.denoiser(cond, None, 1.0, dtype=None)
        for tv in (0.3, 0.5, 0.7):  # inside, ends included: full guidance
            t = torch.full((1,), tv)
            batches.clear()
            inside = interval(x, t)
            assert sum(batches) == 2  # [conditional, unconditional] (split by rows across threads)
            torch.testing.assert_close(inside, always(x, t))
        for tv in (0.1, 0.29, 0.9, 1.0):  # outside: the conditional prediction, one row
            t = torch.full((1,), tv)
            batches.clear()
            out = interval(x, t)
            assert batches == [1]
            torch.testing.assert_close(out, plain(x, t))
            assert not torch.allclose(out, always(x, t))
    finally:
        hook.remove()
    whole = pipe("a red circle", seed=2, output_type="latent", progress=False)
    late = pipe("a red circle", seed=2, output_type="latent", progress=False, guidance_interval=(0.5, 1.0))
    assert not torch.allclose(whole, late)
    torch.testing.assert_close(pipe("a red circle", seed=2, output_type="latent", progress=False,
                                    guidance_interval=(0.0, 1.0)), whole)
    for bad in [(0.5, 0.5), (-0.1, 1.0), (0.2, 1.5), (1,), "x"]:
        with pytest.raises(ValueError, match="guidance_interval"):
            pipe("a red circle", guidance_interval=bad, progress=False)
    with pytest.raises(ValueError, match="guidance_interval"):
        SamplingConfig(guidance_interval=(0.8, 0.2))


@pytest.mark.parametrize("sampler,eta", [("dpmpp_2m", None), ("ddpm", None), ("ddim", 0.5), ("dpmpp_2m_sde", None)])
def test_batch_does_not_change_an_image(tiny_clip, tiny_vae, sampler, eta):
    """Stochastic samplers too: each image's added noise comes from its own seed."""
    pipe = _pipe(tiny_clip, tiny_vae)
    kw = dict(output_type="latent", progress=False, dtype=None, sampler=sampler, eta=eta, steps=4)
    batch = pipe(["a red circle", "a green cross"], num_images_per_prompt=2, seed=[7, 8, 9, 10], **kw)
    alone = pipe("a green cross", seed=9, **kw)
    assert batch.shape[0] == 4
    torch.testing.assert_close(batch[2:3], alone, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(batch[0:1], pipe("a red circle", seed=7, **kw), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sampler", ["euler", "heun", "ddim", "ddpm", "dpmpp_2m", "dpmpp_2m_sde"])
def test_every_sampler_runs_and_sizes(tiny_clip, tiny_vae, sampler):
    pipe = _pipe(tiny_clip, tiny_vae)
    images = pipe("a red circle", sampler=sampler, steps=3, height=16, width=32, progress=False)
    assert images[0].size == (32, 16)


def test_bad_arguments_are_clear(tiny_clip, tiny_vae):
    pipe = _pipe(tiny_clip, tiny_vae)
    with pytest.raises(ValueError, match="multiples of 4"):
        pipe("x", height=18)
    with pytest.raises(ValueError, match="seeds"):
        pipe("x", seed=[1, 2])
    with pytest.raises(ValueError, match="negative prompts"):
        pipe(["a", "b"], negative_prompt=["c"])
    with pytest.raises(ValueError, match="steps"):
        pipe("x", steps=0)
    with pytest.raises(ValueError, match="unknown sampler|sampler"):
        pipe("x", sampler="plms")
    for g in (float("nan"), float("inf")):  # would give NaN latents, a black image
        with pytest.raises(ValueError, match="guidance scale must be a finite number"):
            pipe("x", guidance_scale=g, steps=1)
    with pytest.raises(ValueError, match="positive multiples"):
        pipe("x", height=0)  # not silently the default size
    for prompts in (None, 3.5, {"a": 1}):
        with pytest.raises(ValueError, match="prompts must be a string, a class id or a list"):
            pipe(prompts)
    for seed in (1.5, "3", [1.5], [2**70]):
        with pytest.raises(ValueError, match="seed"):
            pipe("x", seed=seed, steps=1)
    # A prompt or negative prompt the text encoder would read as unknown tokens is refused before
    # any sampling: never an image drawn from a prompt that was silently dropped.
    with pytest.raises(ValueError, match=r"cannot read '🟦'.*large blue square"):
        pipe("a red circle above a 🟦", steps=1)
    with pytest.raises(ValueError, match=r"cannot read '圆'"):
        pipe("a red circle", negative_prompt="圆", steps=1)


def test_integer_like_seeds_are_accepted(tiny_clip, tiny_vae):
    import numpy as np

    pipe = _pipe(tiny_clip, tiny_vae)
    kw = dict(steps=2, progress=False, output_type="latent", num_images_per_prompt=2)
    plain = pipe("x", seed=3, **kw)
    assert torch.equal(pipe("x", seed=np.int64(3), **kw), plain)
    assert torch.equal(pipe("x", seed=torch.tensor([3, 4]), **kw), plain)


def test_save_then_from_pretrained_gives_identical_images(tiny_clip, tiny_vae, tmp_path):
    pipe = _pipe(tiny_clip, tiny_vae, "vp-linear", "eps")
    tiny_vae.vae.save_pretrained(tmp_path / "ae")
    config = CheckpointConfig(model=pipe.model.config, diffusion=DiffusionConfig(path="vp-linear"),
                              sampling=SamplingConfig(steps=4, sampler="ddim"),
                              text_encoder=tiny_clip.describe(),
                              autoencoder={**tiny_vae.describe(), "path": "vae"})
    save_pretrained(pipe.model, tmp_path / "model", config, extra_dirs={"vae": tmp_path / "ae"})
    loaded = Text2Image.from_pretrained(tmp_path / "model", text_encoder=tiny_clip)
    assert loaded.path == NoisePath("vp-linear") and loaded.sampling.sampler == "ddim"
    kw = dict(seed=2, progress=False, sampler="ddim")
    assert np.array_equal(_arr(pipe("a star", **kw)[0]), _arr(loaded("a star", **kw)[0]))
    shutil.rmtree(tmp_path / "model" / "vae")  # named in config.json, gone from the folder: no hub lookup
    with pytest.raises(ValueError, match="names a component at 'vae', which is missing from the folder"):
        Text2Image.from_pretrained(tmp_path / "model", text_encoder=tiny_clip)


def test_class_conditional_pipeline(tiny_vae):
    model = Denoiser(model_preset("tiny", text_dim=0, pooled_dim=0, num_classes=5))
    pipe = Text2Image(model, tiny_vae, None, NoisePath("flow"), SamplingConfig(steps=2))
    assert len(pipe([0, 4], progress=False)) == 2
    kw = dict(steps=2, progress=False, output_type="latent")
    assert torch.equal(pipe(torch.tensor([0, 4]), **kw), pipe([0, 4], **kw))  # an array of ids works too
    with pytest.raises(ValueError, match="class ids"):
        pipe([7], progress=False)


def test_bf16_inference_copy_equals_autocast_and_follows_weight_changes(tiny_clip, tiny_vae):
    """Sampling uses a copy with bf16 linear/conv weights: it must give exactly what autocast
    gives on the fp32 model, and be rebuilt when the model's weights change."""
    pipe = _pipe(tiny_clip, tiny_vae)
    cond, _ = pipe.encode(["a red circle"])
    x, t = torch.randn(1, 4, 8, 8), torch.full((1,), 0.4)

    def reference():
        from latentdit.schedules import to_x0

        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            pred = pipe.model(x, t, **cond.kwargs()).float()
        return to_x0(pred, x, t, pipe.path, "flow")

    fast = pipe.denoiser(cond, None, 1.0, dtype=torch.bfloat16)
    torch.testing.assert_close(fast(x, t), reference(), atol=0, rtol=0)
    assert pipe.inference_model(torch.bfloat16) is pipe.inference_model(torch.bfloat16)
    assert pipe.inference_model(None) is pipe.model
    with torch.no_grad():
        pipe.model.final.bias.add_(0.5)
    refreshed = pipe.denoiser(cond, None, 1.0, dtype=torch.bfloat16)
    torch.testing.assert_close(refreshed(x, t), reference(), atol=0, rtol=0)
    assert not torch.equal(refreshed(x, t), fast(x, t))


def test_call_is_the_composition_of_the_public_steps(tiny_clip, tiny_vae):
    """The recipe in ``Text2Image``'s docstring, step by step, gives exactly what ``pipe(...)``
    gives: what a server or a new editing tool builds on."""
    from latentdit.plan import seed_list

    pipe = _pipe(tiny_clip, tiny_vae)
    pipe.sampling = SamplingConfig(steps=3, guidance_scale=4.0, guidance_interval=(0.3, 0.9))
    plan = pipe.prepare()
    assert (plan.steps, plan.sampler, plan.guidance_scale, plan.guidance_interval) == (3, "dpmpp_2m", 4.0, (0.3, 0.9))
    seeds = seed_list(7, 2)
    cond, uncond = pipe.encode(["a red circle", "a blue square"], ["a star", "a star"])
    x = pipe.noise(seeds, pipe.latent_shape(16, 16))
    denoise = pipe.denoiser(cond, uncond, plan.guidance_scale, None, guidance_interval=plan.guidance_interval)
    latents = pipe.sample(x, denoise, plan, seed=seeds, progress=False)
    out = pipe(["a red circle", "a blue square"], negative_prompt="a star", seed=7, dtype=None, progress=False,
               output_type="latent")
    assert torch.equal(latents, out)
    assert torch.equal(pipe.decode(latents, "tensor"), pipe.autoencoder.decode(latents))


def test_prepare_resolves_every_default_and_the_grid_of_a_partial_run(tiny_clip, tiny_vae):
    pipe = _pipe(tiny_clip, tiny_vae)
    pipe.sampling = SamplingConfig(steps=10, sampler="ddim", eta=0.3, guidance_scale=2.5, shift=2.0)
    plan = pipe.prepare()
    assert plan.options == {"eta": 0.3} and plan.guidance_interval == (0.0, 1.0)
    torch.testing.assert_close(plan.ts, pipe.grid(10))
    assert pipe.prepare(sampler="euler", eta=0.9).options == {}  # eta is DDIM's alone
    assert pipe.prepare(sampler="ddim", eta=0.9).options == {"eta": 0.9}
    part = pipe.prepare(strength=0.45, guidance_scale=1.0, guidance_interval=(0.2, 0.8))
    assert part.steps == 4 and len(part.ts) == 5 and part.t_start == pytest.approx(0.45) and float(part.ts[-1]) == 0
    assert (part.guidance_scale, part.guidance_interval) == (1.0, (0.2, 0.8))
    assert pipe.prepare(steps=3, strength=0.01).steps == 1  # at least one step
    back = part.with_grid(pipe.grid(6))
    assert back.steps == 6 and back.sampler == "ddim" and back.options == {"eta": 0.3}
    for kw, match in [(dict(strength=0.0), "strength > 0"), (dict(strength=1.5), r"strength must be in \[0, 1\]"),
                      (dict(sampler="plms"), "sampler"), (dict(steps=0), "steps must be >= 1"),
                      (dict(guidance_scale=float("nan")), "guidance scale must be a finite number"),
                      (dict(guidance_interval=(0.9, 0.1)), "guidance_interval")]:
        with pytest.raises(ValueError, match=match):
            pipe.prepare(**kw)


def test_add_noise_and_null_conditions(tiny_clip, tiny_vae):
    pipe = _pipe(tiny_clip, tiny_vae)
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.equal(pipe.add_noise(x0, noise, 1.0), noise)  # flow: pure noise at t = 1
    torch.testing.assert_close(pipe.add_noise(x0, noise, 0.25), 0.75 * x0 + 0.25 * noise)
    cond, uncond = pipe.encode(["a red circle", "two blue hearts at the bottom"])
    null = pipe.null_condition(cond)
    for a, b in ((null.text, uncond.text), (null.mask, uncond.mask), (null.pooled, uncond.pooled)):
        assert torch.equal(a, b)
    assert null.text.shape == cond.text.shape and int(null.mask.sum()) == 2  # one learned token per row
    empty = pipe.unconditional(3)
    assert empty.text.shape[0] == 3 and torch.equal(empty.text[0, 0], null.text[0, 0])
    with pytest.raises(ValueError, match="multiples of 4"):
        pipe.encode_image(torch.zeros(1, 3, 18, 16))


def test_a_stochastic_samplers_noise_follows_its_seed_argument_not_the_global_stream(tiny_clip, tiny_vae):
    """``sample(seed=...)`` alone sets a stochastic sampler's noise: the same seed twice gives the
    same latents whatever the global RNG did in between, another seed other latents."""
    pipe = tiny_pipeline(tiny_clip, tiny_vae)
    plan = pipe.prepare(4, sampler="ddpm")
    cond, uncond = pipe.encode(["a red circle"])
    denoise = pipe.denoiser(cond, uncond, 3.0, dtype=None)
    x = pipe.noise([0], pipe.latent_shape(None, None))
    a = pipe.sample(x, denoise, plan, seed=5, progress=False)
    torch.manual_seed(123)
    b = pipe.sample(x, denoise, plan, seed=5, progress=False)
    c = pipe.sample(x, denoise, plan, seed=6, progress=False)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_the_noise_a_stochastic_sampler_adds_is_not_the_noise_it_started_from(tiny_clip, tiny_vae):
    """On the flow path DDPM's first step from t = 1 is x = alpha x0 + sigma z: with z drawn again
    from the generator that drew the starting noise it would equal the deterministic DDIM step."""
    pipe = tiny_pipeline(tiny_clip, tiny_vae)
    cond, uncond = pipe.encode(["a red circle"])
    denoise = pipe.denoiser(cond, uncond, 3.0, dtype=None)
    x = pipe.noise([5], pipe.latent_shape(None, None))
    first, plan = {}, pipe.prepare(4, sampler="ddpm")
    for sampler in ("ddpm", "ddim"):
        pipe.sample(x, denoise, pipe.prepare(4, sampler=sampler), seed=5, progress=False,
                    on_step=lambda i, t, x_next, x0, s=sampler: first.setdefault(s, x_next.clone()))
    sigma = float(pipe.path.alpha_sigma(plan.ts[1:2].double())[1])
    z = (first["ddpm"] - first["ddim"]) / sigma + x  # eps = x at t = 1: the added noise itself
    assert 0.7 < float(z.std()) < 1.3
    assert abs(float(torch.corrcoef(torch.stack([z.flatten(), x.flatten()]))[0, 1])) < 0.3


def test_condition_from_text_keeps_what_the_model_takes():
    from latentdit.condition import Condition
    from latentdit.config import ModelConfig
    from latentdit.text import TextEmbeddings

    emb = TextEmbeddings(torch.randn(2, 6, 8), torch.ones(2, 6, dtype=torch.bool), torch.randn(2, 5))
    both = Condition.from_text(emb, ModelConfig(text_dim=8, pooled_dim=5, max_text_len=4))
    assert both.text.shape == (2, 4, 8) and both.mask.shape == (2, 4) and torch.equal(both.pooled, emb.pooled)
    assert torch.equal(both.text, emb.tokens[:, :4])
    pooled_only = Condition.from_text(emb, ModelConfig(text_dim=0, pooled_dim=5), labels=torch.tensor([1, 2]))
    assert pooled_only.text is None and pooled_only.mask is None and pooled_only.labels.tolist() == [1, 2]
    assert Condition.from_text(emb, ModelConfig(text_dim=8, pooled_dim=0)).pooled is None
