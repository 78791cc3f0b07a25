"""Count contrast: the prompt one count higher, and the guidance term it adds (tiny components)."""

import dataclasses
import json

import pytest
import torch
from tiny import tiny_pipeline

from latentdit.checkpoint import CheckpointConfig
from latentdit.config import SamplingConfig, model_preset
from latentdit.counts import contrast_prompts, count_up


@pytest.mark.parametrize("prompt, higher", [
    ("three red stars", "four red stars"),
    ("a group of two blue hearts", "a group of three blue hearts"),
    ("Three red stars", "Four red stars"),
    ("FOUR crosses", "FIVE crosses"),
    ("2 purple circles on a gray background", "3 purple circles on a gray background"),
    ("nine dots", "ten dots"),
    ("two stars and three circles", "three stars and three circles"),  # the first count only
    ("三个红色的星形", "四个红色的星形"),
    ("两个图形：一个红色的圆形在一个蓝色的正方形的上方", "三个图形：一个红色的圆形在一个蓝色的正方形的上方"),
    ("一组四个蓝色的心形", "一组五个蓝色的心形"),
    ("3个红色星形", "4个红色星形"),
    ("九个点", "十个点"),
    ("three 三个", "four 三个"),  # the first count, whichever language
    ("三个 and two", "四个 and two"),
])
def test_count_up_raises_the_first_count_by_one(prompt, higher):
    assert count_up(prompt) == higher


@pytest.mark.parametrize("prompt", ["a red star left of a blue square", "someone drew a bone", "often",
                                    "ten red stars", "10 stars", "", "a 3d cube",
                                    "一个红色的三角形", "红色三角形", "一组红色的心形", "13个点"])
def test_count_up_leaves_prompts_without_a_count(prompt):
    assert count_up(prompt) is None


def test_contrast_prompts_picks_the_counted_prompts_of_a_mixed_batch():
    rows, higher = contrast_prompts(["三个红色的星形", "a red star", "一个红色的星形", "two hearts"])
    assert rows == [0, 3] and higher == ["四个红色的星形", "three hearts"]


def _pipe(tiny_clip, tiny_vae, contrast=0.0):
    pipe = tiny_pipeline(tiny_clip, tiny_vae, seed=1)
    pipe.sampling = dataclasses.replace(pipe.sampling, count_contrast=contrast)
    return pipe


def test_the_denoiser_adds_the_contrast_term_on_the_guided_steps_only(tiny_clip, tiny_vae):
    pipe = _pipe(tiny_clip, tiny_vae)
    prompts = ["three red circles", "a red circle", "two blue squares"]
    cond, uncond, contrast = pipe.encode_with_contrast(prompts, None, 2.0)
    assert contrast.rows.tolist() == [0, 2] and contrast.scale == 2.0
    higher, _ = pipe.encode(["four red circles", "three blue squares"])
    torch.testing.assert_close(contrast.cond.text[:, :higher.text.shape[1]], higher.text)
    x = torch.randn(3, 4, 8, 8)
    g = 3.0
    with_term = pipe.denoiser(cond, uncond, g, dtype=None, guidance_interval=(0.3, 0.7), contrast=contrast)
    plain_cfg = pipe.denoiser(cond, uncond, g, dtype=None, guidance_interval=(0.3, 0.7))
    conditional = pipe.denoiser(cond, None, 1.0, dtype=None)
    away = pipe.denoiser(contrast.cond, None, 1.0, dtype=None)
    t = torch.full((1,), 0.5)
    expected = plain_cfg(x, t).clone()
    expected[[0, 2]] += 2.0 * (conditional(x, t)[[0, 2]] - away(x[[0, 2]], t))
    got = with_term(x, t)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[[0, 2]], plain_cfg(x, t)[[0, 2]])
    torch.testing.assert_close(got[1], plain_cfg(x, t)[1], atol=1e-5, rtol=1e-5)  # no count: plain CFG
    t = torch.full((1,), 0.9)  # outside the interval: the conditional prediction alone
    torch.testing.assert_close(with_term(x, t), conditional(x, t))


def test_generation_changes_only_the_images_of_prompts_that_name_a_count(tiny_clip, tiny_vae):
    pipe = _pipe(tiny_clip, tiny_vae)
    prompts = ["three red circles", "a red circle"]
    kw = dict(seed=4, output_type="latent", progress=False, num_images_per_prompt=2)
    off = pipe(prompts, **kw)
    on = pipe(prompts, count_contrast=1.5, **kw)
    assert not torch.allclose(on[:2], off[:2])  # both images of the counted prompt move
    assert not torch.allclose(on[0], on[1])
    torch.testing.assert_close(on[2:], off[2:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_pipe(tiny_clip, tiny_vae, contrast=1.5)(prompts, **kw), on)  # the config's
    torch.testing.assert_close(pipe(prompts, count_contrast=0.0, **kw), off)
    # with a negative prompt the counted prompt's extra row is guided from the same negative
    neg = pipe(prompts, negative_prompt="a green star", count_contrast=1.5, **kw)
    assert not torch.allclose(neg[:2], on[:2])
    torch.testing.assert_close(neg[2:], pipe(prompts, negative_prompt="a green star", **kw)[2:],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf"), "1", True])
def test_a_bad_count_contrast_is_refused_by_name(tiny_clip, tiny_vae, bad):
    with pytest.raises(ValueError, match="count_contrast"):
        SamplingConfig(count_contrast=bad)
    with pytest.raises(ValueError, match="count_contrast"):
        _pipe(tiny_clip, tiny_vae)("three red circles", count_contrast=bad, progress=False)


def test_a_config_written_before_count_contrast_loads_with_it_off():
    data = CheckpointConfig(model=model_preset("tiny"), sampling=SamplingConfig(count_contrast=1.0)).to_json()
    assert data["sampling"]["count_contrast"] == 1.0
    assert CheckpointConfig.from_json(json.loads(json.dumps(data))).sampling.count_contrast == 1.0
    del data["sampling"]["count_contrast"]
    assert CheckpointConfig.from_json(data).sampling.count_contrast == 0.0
