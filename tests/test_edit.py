"""Editing: img2img, inpainting/outpainting, inversion and prompt editing, interpolation, panning,
larger sizes and loss guidance. Tiny random components for the mechanics; the packaged shapes
model for what only a trained model can show (round-trip PSNR, edits judged by the checker)."""

import random

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import tiny_pipeline

from latentdit import edit
from latentdit.condition import Condition
from latentdit.config import SamplingConfig, model_preset
from latentdit.datasets.shapes import COLORS, render_scene
from latentdit.evaluate import read_attributes
from latentdit.model import Denoiser
from latentdit.pipeline import Text2Image
from latentdit.pixels import psnr, to_pil
from latentdit.schedules import NoisePath

# -------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny(tiny_clip, tiny_vae):
    """Tiny random text encoder, KL autoencoder (downsample 2) and denoiser: 16x16 images."""
    return tiny_pipeline(tiny_clip, tiny_vae)


@pytest.fixture(scope="module")
def shapes():
    return Text2Image.from_pretrained("shapes")


def _image(seed: int = 0, size: int = 16) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _arr(img) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def _red_circle(seed: int = 0, background: str = "white") -> Image.Image:
    """A large red circle near the centre of a 64x64 canvas, jittered by the seed."""
    rng = random.Random(seed)
    center = (32 + rng.uniform(-4, 4), 32 + rng.uniform(-4, 4))
    return render_scene({"objects": [{"color": "red", "shape": "circle", "cell": "center", "size": "large",
                                      "center": center}], "background": background})


def _largest(img) -> dict | None:
    objects = read_attributes(img)["objects"]
    return objects[0] if objects else None


# -------------------------------------------------------------------------------- img2img


def test_img2img_strength_zero_is_the_autoencoder_round_trip(tiny):
    img = _image(1)
    out = edit.img2img(tiny, img, "a red circle", strength=0.0, output_type="tensor")
    x = edit.load_image(img)
    torch.testing.assert_close(out, tiny.autoencoder.decode(tiny.autoencoder.encode(x)), rtol=0, atol=0)
    assert not torch.allclose(out, x, atol=0.05)  # the round trip of a random AE is not the identity
    assert _arr(edit.img2img(tiny, img, "x", strength=0.0)[0]).shape == (16, 16, 3)


def test_img2img_strength_one_is_the_plain_sample_on_the_flow_path(tiny):
    kw = dict(seed=5, steps=4, output_type="latent")
    full = edit.img2img(tiny, _image(2), "a red circle", strength=1.0, **kw)
    plain = tiny("a red circle", progress=False, **kw)
    assert torch.equal(full, plain)
    half = edit.img2img(tiny, _image(2), "a red circle", strength=0.5, **kw)
    assert not torch.allclose(half, plain, atol=1e-3)


def test_img2img_runs_strength_times_steps_steps(tiny, monkeypatch):
    seen = []
    original = tiny.sample
    monkeypatch.setattr(tiny, "sample",
                        lambda x, d, plan, **kw: seen.append(plan.ts.clone()) or original(x, d, plan, **kw))
    edit.img2img(tiny, _image(0), "x", strength=0.5, steps=10, output_type="latent")
    assert len(seen[0]) == 6 and float(seen[0][0]) == 0.5 and float(seen[0][-1]) == 0.0


@pytest.mark.parametrize("kw,match", [
    (dict(strength=1.5), r"strength must be in \[0, 1\]"),
    (dict(strength=-0.1), r"strength must be in \[0, 1\]"),
    (dict(output_type="png"), "output_type"),
    (dict(num_images=0), "num_images"),
])
def test_img2img_rejects_bad_arguments(tiny, kw, match):
    with pytest.raises(ValueError, match=match):
        edit.img2img(tiny, _image(0), "x", **kw)


def test_img2img_rejects_sizes_the_model_cannot_take(tiny):
    with pytest.raises(ValueError, match="18x18.*multiples of 4"):
        edit.img2img(tiny, _image(0, size=18), "x")


@pytest.mark.weights
def test_low_strength_keeps_the_input_high_strength_follows_the_prompt(shapes):
    src = _red_circle(0)
    # Where the packaged model stops keeping the circle: docs/editing.md, measured section (run with -s).
    low = edit.img2img(shapes, src, "a blue circle in the center", strength=0.15, output_type="tensor")
    high = edit.img2img(shapes, src, "a blue circle in the center", strength=1.0, output_type="tensor")
    x = edit.load_image(src)
    print(f"\nimg2img PSNR to the input: strength 0.15 {_psnr(low, x):.1f} dB, 1.0 {_psnr(high, x):.1f} dB")
    assert _psnr(low, x) > 20 and _psnr(low, x) > _psnr(high, x) + 5
    kept = _largest(to_pil(low)[0])
    assert (kept["color"], kept["cell"]) == ("red", "center")


# -------------------------------------------------------------------------------- inputs


def test_image_and_mask_inputs_agree(tmp_path):
    img = _image(3)
    img.save(tmp_path / "i.png")
    ref = edit.load_image(img)
    assert torch.equal(edit.load_image(tmp_path / "i.png"), ref)
    assert torch.equal(edit.load_image(np.asarray(img)), ref)
    assert torch.equal(edit.load_image(np.asarray(img) / 255.0), ref)
    assert torch.equal(edit.load_image(ref[0]), ref)
    m = np.zeros((16, 16), dtype=bool)
    m[4:12, 2:9] = True
    Image.fromarray(m.astype(np.uint8) * 255).save(tmp_path / "m.png")
    masks = [edit.load_mask(x, (16, 16)) for x in (m, m.astype(np.float32), tmp_path / "m.png",
                                                   Image.open(tmp_path / "m.png"), torch.from_numpy(m))]
    for mask in masks:
        assert mask.shape == (1, 1, 16, 16) and torch.equal(mask, masks[0])
    assert float(masks[0].sum()) == 8 * 7


@pytest.mark.parametrize("mask,match", [
    (np.ones((8, 8), dtype=bool), r"mask size 8x8 does not match the image size 16x16"),
    (np.ones((16, 16), dtype=np.int64), "uint8.*bool.*float"),
    (np.full((16, 16), 2.0), r"\[0, 1\]"),
    ("no/such/mask.png", "mask file not found"),
])
def test_bad_masks_are_named(mask, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        edit.load_mask(mask, (16, 16))


def test_mask_blur_softens_only_the_edge():
    m = np.zeros((32, 32), dtype=bool)
    m[:, 16:] = True
    soft = edit.load_mask(m, (32, 32), blur=2.0)[0, 0]
    assert float(soft[:, 0].max()) == 0.0 and float(soft[:, -1].min()) == 1.0
    assert 0.2 < float(soft[0, 15]) < 0.5 < float(soft[0, 16]) < 0.8


# -------------------------------------------------------------------------------- inpainting


def _left_half_mask(size: int) -> np.ndarray:
    m = np.zeros((size, size), dtype=bool)
    m[:, : size // 2] = True
    return m


def test_inpaint_reimposes_the_known_latents_and_pastes_the_known_pixels(tiny):
    img, m = _image(4), _left_half_mask(16)
    kw = dict(seed=1, num_images=2)
    latents = edit.inpaint(tiny, img, m, "a green star", output_type="latent", **kw)
    known = tiny.autoencoder.encode(edit.load_image(img))
    keep = 1 - edit.latent_mask(tiny, edit.load_mask(m, (16, 16)))
    assert torch.equal(latents * keep, known.expand_as(latents) * keep)  # exactly: t = 0 re-imposes x0
    assert not torch.allclose(latents * (1 - keep), known * (1 - keep), atol=1e-2)
    out = edit.inpaint(tiny, img, m, "a green star", **kw)
    assert len(out) == 2 and not np.array_equal(_arr(out[0]), _arr(out[1]))
    for o in out:
        assert np.array_equal(_arr(o)[:, 8:], _arr(img)[:, 8:])  # unmasked pixels are the input's
        assert not np.array_equal(_arr(o)[:, :8], _arr(img)[:, :8])


@pytest.mark.weights
def test_inpaint_keeps_the_unmasked_region_of_the_input(shapes):
    src, m = _red_circle(0), np.zeros((64, 64), dtype=bool)
    m[:, :16] = True  # repaint the left strip; the circle sits in the kept part
    x = edit.load_image(src)
    pasted = edit.inpaint(shapes, src, m, "a red circle in the center", output_type="tensor")
    assert torch.equal(pasted[..., 16:], x[..., 16:])
    # Without the paste the kept latents are exact, but the decoder's GroupNorm and attention see the
    # whole image, so the kept pixels move by somewhat more than the plain round trip's error.
    raw = edit.inpaint(shapes, src, m, "a red circle in the center", paste=False, output_type="tensor")
    assert torch.equal(pasted[..., :16], raw[..., :16])  # the repainted part is the sample itself
    round_trip = shapes.autoencoder.decode(shapes.autoencoder.encode(x))
    kept = (..., slice(24, None))  # 8 px away from the mask edge
    error, ae_error = (float((y - x)[kept].abs().mean()) * 127.5 for y in (raw, round_trip))
    print(f"\nkept region, mean abs error (0..255): no paste {error:.2f}, autoencoder round trip {ae_error:.2f}")
    assert error <= 2.5 * ae_error + 1


def test_inpaint_rejects_empty_masks_and_zero_strength(tiny):
    with pytest.raises(ValueError, match="all black"):
        edit.inpaint(tiny, _image(0), np.zeros((16, 16), dtype=bool), "x")
    with pytest.raises(ValueError, match="strength > 0"):
        edit.inpaint(tiny, _image(0), _left_half_mask(16), "x", strength=0.0)


def test_outpaint_extends_the_canvas_and_keeps_the_original(tiny):
    img = _image(5)
    out = edit.outpaint(tiny, img, "a blue square", right=8, top=4, seed=2)[0]
    assert out.size == (24, 20)
    assert np.array_equal(_arr(out)[4:, :16], _arr(img))
    canvas, mask = edit.extend_canvas(edit.load_image(img), right=8, top=4)
    assert float(mask.sum()) == 24 * 20 - 16 * 16
    fill = _arr(to_pil(canvas)[0])
    assert np.array_equal(fill[4:, :16], _arr(img))
    assert not np.array_equal(_arr(out)[:4], fill[:4]) and not np.array_equal(_arr(out)[:, 16:], fill[:, 16:])


@pytest.mark.parametrize("sides,match", [
    (dict(), "at least one"),
    (dict(left=-8), "non-negative"),
    (dict(right=6), r"outpaint sizes must be multiples of 4 pixels for this model, got \{'right': 6\} "
                    r"\(the 16x16 image would become 22x16\)"),
])
def test_outpaint_rejects_bad_sizes(tiny, sides, match):
    with pytest.raises(ValueError, match=match):
        edit.outpaint(tiny, _image(0), "x", **sides)


@pytest.mark.parametrize("direction", ["right", "down"])
def test_pan_frames_overlap_exactly(tiny, direction):
    frames = edit.pan(tiny, _image(6), "a red circle", direction=direction, step=4, frames=3)
    assert len(frames) == 3 and all(f.size == (16, 16) for f in frames)
    assert np.array_equal(_arr(frames[0]), _arr(_image(6)))
    for a, b in zip(frames, frames[1:]):
        a, b = _arr(a), _arr(b)
        if direction == "right":
            assert np.array_equal(b[:, :12], a[:, 4:]) and not np.array_equal(b[:, 12:], a[:, :4])
        else:
            assert np.array_equal(b[:12], a[4:])


def test_pan_rejects_unknown_directions(tiny):
    with pytest.raises(ValueError, match="direction"):
        edit.pan(tiny, _image(0), "x", direction="sideways")


# -------------------------------------------------------------------------------- inversion


@pytest.mark.weights
@pytest.mark.slow
@pytest.mark.parametrize("steps,floor,floor_ae", [(20, 28.0, 45.0), (50, 29.0, 45.0)])
def test_inversion_reconstructs_the_input(shapes, steps, floor, floor_ae):
    """Floors under the packaged model's measured PSNRs (docs/editing.md, measured section; the test
    prints them with -s), against the input and against the autoencoder's own round trip."""
    src = _red_circle(0)
    x = edit.load_image(src)
    inv = edit.invert(shapes, src, "a red circle in the center", steps=steps)
    assert inv.t == 1.0 and len(inv.ts) == steps + 1
    rec = edit.reconstruct(shapes, inv, output_type="tensor")
    round_trip = shapes.autoencoder.decode(shapes.autoencoder.encode(x))
    p_input, p_ae = _psnr(rec, x), _psnr(rec, round_trip)
    print(f"\ninversion -> reconstruction, {steps} steps: PSNR {p_input:.2f} dB vs input, "
          f"{p_ae:.2f} dB vs the autoencoder round trip")
    assert p_input > floor and p_ae > floor_ae


@pytest.mark.weights
@pytest.mark.parametrize("background", ["white", "gray"])
def test_fixed_point_refinement_improves_the_round_trip(shapes, background):
    """10-step round trips, packaged model, bf16: refinement must raise the PSNR by more than
    half a dB and reach 29 dB (measured: docs/editing.md, measured section)."""
    src = _red_circle(0, background)
    x = edit.load_image(src)
    scores = [_psnr(edit.reconstruct(shapes, edit.invert(shapes, src, "a red circle in the center", steps=10,
                                                              fixed_point_iters=k), output_type="tensor"), x)
              for k in (0, 3)]
    print(f"\n10-step inversion PSNR, {background}: naive {scores[0]:.1f} dB, 3 fixed-point iterations "
          f"{scores[1]:.1f} dB")
    assert scores[1] > scores[0] + 0.5 and scores[1] > 29


def test_inversion_saves_and_loads(tiny, tmp_path):
    inv = edit.invert(tiny, _image(7), "a star", steps=3, t_stop=0.6)
    inv.save(tmp_path / "inv.safetensors")
    back = edit.Inversion.load(tmp_path / "inv.safetensors")
    assert torch.equal(back.latents, inv.latents) and torch.equal(back.ts, inv.ts)
    assert (back.prompt, back.sampler, back.t) == ("a star", "ddim", 0.6)
    assert torch.equal(edit.reconstruct(tiny, back, output_type="latent"),
                       edit.reconstruct(tiny, inv, output_type="latent"))


def test_edit_mask_marks_whole_latent_cells_where_the_prompts_disagree(tiny):
    m = edit.edit_mask(tiny, _image(3), "a red circle", "a blue square", threshold=0.5, samples=2)
    assert m.shape == (1, 1, 16, 16) and set(m.unique().tolist()) <= {0.0, 1.0}
    assert 0 < m.mean() < 1
    cells = m[0, 0].reshape(8, 2, 8, 2)  # the tiny autoencoder downsamples by 2
    assert torch.equal(cells.amax(dim=(1, 3)), cells.amin(dim=(1, 3)))
    lower = edit.edit_mask(tiny, _image(3), "a red circle", "a blue square", threshold=0.2, samples=2)
    assert bool((lower >= m).all()) and lower.sum() > m.sum()  # a lower threshold only adds cells
    with pytest.raises(ValueError, match="nothing to locate"):
        edit.edit_mask(tiny, _image(3), "a red circle", "a red circle", samples=1)
    with pytest.raises(ValueError, match="threshold must be in"):
        edit.edit_mask(tiny, _image(3), "a", "b", threshold=1.0)


def test_masked_edit_changes_only_the_masked_cells(tiny):
    img, mask = _image(5), _left_half_mask(16)
    kw = dict(strength=0.8, steps=4)
    out = _arr(edit.edit_image(tiny, img, "a red circle", "a blue square", mask=mask, **kw)[0])
    # the edit may grow by one latent cell (2 pixels) past the mask; beyond that the input is kept
    assert np.array_equal(out[:, 10:], _arr(img)[:, 10:])
    free = _arr(edit.edit_image(tiny, img, "a red circle", "a blue square", **kw)[0])
    assert not np.array_equal(free[:, 10:], _arr(img)[:, 10:])
    assert np.abs(out[:, :8] - _arr(img)[:, :8]).mean() > 1
    with pytest.raises(ValueError, match="mask is all black"):
        edit.edit_image(tiny, img, "a", "b", mask=np.zeros((16, 16), bool))


def test_negative_prompt_steers_the_edit(tiny):
    kw = dict(strength=0.8, steps=3, output_type="latent")
    plain = edit.edit_image(tiny, _image(2), "a red circle", "a blue square", **kw)
    negative = edit.edit_image(tiny, _image(2), "a red circle", "a blue square", negative_prompt="a red circle", **kw)
    assert not torch.allclose(plain, negative)


@pytest.mark.weights
@pytest.mark.slow
def test_edit_red_circle_to_blue_keeps_its_position(shapes):
    """The issue's acceptance test, judged by the pixel checker over eight inputs. The prompts
    describe the whole input (background too); the edit is confined to where they disagree
    (``mask="auto"``) and guided away from the source prompt. Measured on the packaged model:
    blue and still in the centre on 5/8 inputs, every white one; of the gray ones, two turn blue
    but move (to the bottom, to the top) and one stays red. The floor of 4/8 leaves one input of
    room for other CPUs' bf16 kernels."""
    results = []
    for seed, background in enumerate(["white", "gray"] * 4):
        src = _red_circle(seed, background)
        before = _largest(src)
        assert (before["color"], before["cell"]) == ("red", "center")
        source = f"a red circle in the center on a {background} background"
        target = f"a blue circle in the center on a {background} background"
        out = edit.edit_image(shapes, src, source, target, strength=0.5, mask="auto", mask_threshold=0.5,
                              negative_prompt=source, guidance_scale=6.0)[0]
        after = _largest(out)
        ok = after is not None and after["color"] == "blue" and after["cell"] == before["cell"]
        results.append(ok)
        print(f"\nedit seed {seed} ({background}): {after and (after['color'], after['shape'], after['cell'])}"
              f" -> {'pass' if ok else 'fail'}")
    assert sum(results) >= 4, f"edit kept position and turned blue in {sum(results)}/8 inputs"


# -------------------------------------------------------------------------------- interpolation


@pytest.mark.parametrize("interval", [False, True])
def test_interpolation_endpoints_are_the_plain_samples(tiny, tiny_clip, tiny_vae, tmp_path, interval):
    if interval:  # sampled as pipe(...) samples: with the model's guidance interval
        tiny = Text2Image(tiny.model, tiny_vae, tiny_clip, NoisePath("flow"),
                          SamplingConfig(steps=4, guidance_interval=(0.3, 0.9)))
    prompts = ("a red circle", "two small blue hearts at the bottom left")  # different token lengths
    frames = edit.interpolate(tiny, prompts, (3, 4), frames=4, steps=3)
    kw = dict(steps=3, progress=False)
    first, last = tiny(prompts[0], seed=3, **kw)[0], tiny(prompts[1], seed=4, **kw)[0]
    assert len(frames) == 4
    assert np.array_equal(_arr(frames[0]), _arr(first)) and np.array_equal(_arr(frames[-1]), _arr(last))
    for f in frames[1:-1]:
        assert not np.array_equal(_arr(f), _arr(first)) and not np.array_equal(_arr(f), _arr(last))
    path = edit.save_animation(frames, tmp_path / "a" / "interp.gif", fps=5)
    with Image.open(path) as gif:
        assert gif.n_frames == 4 and gif.info["duration"] == 200


def test_interpolating_only_seeds_or_only_prompts(tiny):
    by_seed = edit.interpolate(tiny, "a red circle", (0, 1), frames=3, steps=2)
    assert np.array_equal(_arr(by_seed[-1]), _arr(tiny("a red circle", seed=1, steps=2, progress=False)[0]))
    by_prompt = edit.interpolate(tiny, ["a red circle", "a blue square"], 2, frames=3, steps=2)
    assert np.array_equal(_arr(by_prompt[-1]), _arr(tiny("a blue square", seed=2, steps=2, progress=False)[0]))
    with pytest.raises(ValueError, match="two different"):
        edit.interpolate(tiny, "a red circle", 0)
    classes = Text2Image(Denoiser(model_preset("tiny", text_dim=0, pooled_dim=0, num_classes=3)), tiny.autoencoder)
    assert len(edit.interpolate(classes, 2, (0, 1), frames=3, steps=1)) == 3  # seeds only: labels are not mixed
    with pytest.raises(ValueError, match="frames"):
        edit.interpolate(tiny, "a red circle", (0, 1), frames=1)


def test_slerp_keeps_the_norm_and_hits_the_ends():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4000, generator=g), torch.randn(4000, generator=g)
    assert edit.slerp(a, b, 0.0) is a and edit.slerp(a, b, 1.0) is b
    mid = edit.slerp(a, b, 0.5)
    assert abs(float(mid.norm()) / 4000**0.5 - 1) < 0.05  # a straight line shrinks it (1/sqrt(2) for orthogonal ends)
    assert abs(float(torch.lerp(a, b, 0.5).norm()) / 4000**0.5 - 0.71) < 0.05
    torch.testing.assert_close(edit.slerp(a, a * 1.0, 0.3), a)


def test_mix_conditions_pads_and_unions_masks():
    a = Condition(torch.ones(1, 2, 3), torch.tensor([[True, True]]), torch.zeros(1, 3))
    b = Condition(torch.zeros(1, 4, 3), torch.tensor([[True, True, True, False]]), torch.ones(1, 3))
    mid = edit.mix_conditions(a, b, 0.25)
    assert mid.text.shape == (1, 4, 3) and mid.mask.tolist() == [[True, True, True, False]]
    torch.testing.assert_close(mid.text[0, :, 0], torch.tensor([0.75, 0.75, 0.0, 0.0]))
    torch.testing.assert_close(mid.pooled, torch.full((1, 3), 0.25))
    assert edit.mix_conditions(a, b, 0.0) is a and edit.mix_conditions(a, b, 1.0) is b
    with pytest.raises(ValueError, match="class labels"):
        edit.mix_conditions(Condition(labels=torch.tensor([1])), Condition(labels=torch.tensor([2])), 0.5)


def test_animation_paths_are_checked_before_sampling(tmp_path, monkeypatch):
    import sys

    with pytest.raises(ValueError, match=".gif or .mp4"):
        edit.check_animation_path(tmp_path / "a.avi")
    monkeypatch.setitem(sys.modules, "imageio", None)  # as if imageio were not installed
    with pytest.raises(ValueError, match="MP4 needs imageio"):
        edit.save_animation([_image(0)], tmp_path / "a.mp4")


def test_mp4_has_the_frames_written(tmp_path):
    iio = pytest.importorskip("imageio.v3")
    pytest.importorskip("imageio_ffmpeg")
    frames = [Image.new("RGB", (64, 48), c) for c in ("red", "green", "blue", "white")]
    path = edit.save_animation(frames, tmp_path / "a.mp4", fps=4)
    video = iio.imread(path)
    assert video.shape == (4, 48, 64, 3)
    assert video[0, ..., 0].mean() > 200 and video[2, ..., 2].mean() > 200  # red first, blue third


# -------------------------------------------------------------------------------- sizes


@pytest.mark.weights
@pytest.mark.slow
def test_sampling_at_twice_the_training_resolution(shapes):
    images = shapes("a red circle in the center", seed=[0, 1], num_images_per_prompt=2, height=128, width=128,
                    progress=False)
    for img in images:
        assert img.size == (128, 128)
        found = _largest(img)
        print(f"\n128x128: {found and (found['color'], found['shape'], found['cell'])}")
        assert found is not None and found["color"] == "red"


@pytest.mark.weights
def test_sampling_at_a_non_square_size(shapes):
    img = shapes("a large blue square", seed=0, height=64, width=128, progress=False)[0]
    assert img.size == (128, 64)
    found = _largest(img)
    assert found is not None and found["color"] == "blue"


# -------------------------------------------------------------------------------- loss guidance


@pytest.mark.weights
@pytest.mark.slow
def test_color_guidance_moves_the_mean_colour_towards_the_target(shapes):
    target = np.array(COLORS["blue"], dtype=np.float64)
    loss = edit.color_loss("blue")
    # Measured (distance unguided -> guided at 0.3) with the model's guidance interval: seed 1
    # 144 -> 134, seed 2 207 -> 133, seed 3 247 -> 134.
    gains = []
    for seed in (1, 2, 3):
        plain = edit.sample_guided(shapes, "a red circle in the center", loss, scale=0.0, seed=seed)[0]
        guided = edit.sample_guided(shapes, "a red circle in the center", loss, scale=0.3, seed=seed)[0]
        d_plain, d_guided = (float(np.linalg.norm(_arr(i).reshape(-1, 3).mean(0) - target)) for i in (plain, guided))
        print(f"\nseed {seed}: mean colour distance to blue {d_plain:.1f} unguided, {d_guided:.1f} guided")
        assert d_guided < d_plain - 3
        gains.append(d_plain - d_guided)
    assert np.mean(gains) > 25, gains


def test_guidance_scale_zero_is_the_plain_sample_and_latent_guidance_pulls_to_a_target(tiny, tiny_clip, tiny_vae):
    limited = Text2Image(tiny.model, tiny_vae, tiny_clip, NoisePath("flow"),
                         SamplingConfig(steps=4, guidance_interval=(0.3, 0.9)))
    for pipe in (tiny, limited):  # with and without a guidance interval in the sampling config
        plain = pipe("a red circle", seed=3, output_type="latent", progress=False)
        zero = edit.sample_guided(pipe, "a red circle", edit.color_loss((0, 0, 255)), scale=0.0, seed=3,
                                  output_type="latent")
        assert torch.equal(zero, plain)
    assert not torch.equal(plain, tiny("a red circle", seed=3, output_type="latent", progress=False))
    plain = tiny("a red circle", seed=3, output_type="latent", progress=False)
    target = torch.full_like(plain, 0.5)
    to_target = lambda z: ((z - target) ** 2).mean(dim=(1, 2, 3))
    pulled = edit.sample_guided(tiny, "a red circle", to_target, scale=0.25, space="latent", seed=3,
                                output_type="latent")
    assert float(to_target(pulled)) < 0.5 * float(to_target(plain))


@pytest.mark.parametrize("target,match", [("mauve", "unknown colour"), ((1, 2), "three values"),
                                          ((0, 0, 300), "three values")])
def test_color_loss_rejects_bad_colours(target, match):
    with pytest.raises(ValueError, match=match):
        edit.color_loss(target)


def test_color_loss_needs_pixels(tiny):
    with pytest.raises(ValueError, match="space='pixel'"):
        edit.sample_guided(tiny, "x", edit.color_loss("red"), space="latent", steps=1)


# -------------------------------------------------------------------------------- CLI


@pytest.fixture
def cli(shapes, monkeypatch):
    """Run ``latentdit`` with the packaged model loaded once; records which model was asked for."""
    from latentdit import cli_edit
    from latentdit.cli import main

    asked = []
    monkeypatch.setattr(cli_edit, "_pipeline", lambda name, **_: asked.append(name) or shapes)

    def run(*argv):
        return main([str(a) for a in argv]), asked

    return run


@pytest.fixture
def circle_png(tmp_path):
    path = tmp_path / "circle.png"
    _red_circle(0).save(path)
    return path


def test_cli_img2img(cli, circle_png, tmp_path, capsys):
    rc, asked = cli("img2img", circle_png, "a blue circle in the center", "--strength", 0.5, "--steps", 4,
                    "--out", tmp_path / "o.png")
    assert rc == 0 and asked == ["shapes"] and Image.open(tmp_path / "o.png").size == (64, 64)
    rc, asked = cli("img2img", circle_png, "x", "--strength", 1.5)
    assert rc == 2 and "strength must be in [0, 1]" in capsys.readouterr().err and asked == ["shapes"]


def test_cli_inpaint(cli, circle_png, tmp_path, capsys):
    Image.fromarray(_left_half_mask(64).astype(np.uint8) * 255).save(tmp_path / "m.png")
    rc, _ = cli("inpaint", circle_png, tmp_path / "m.png", "a red circle", "--steps", 3, "--out", tmp_path / "o.png")
    out = _arr(Image.open(tmp_path / "o.png"))
    assert rc == 0 and np.array_equal(out[:, 32:], _arr(Image.open(circle_png))[:, 32:])
    Image.new("L", (32, 64)).save(tmp_path / "small.png")
    rc, asked = cli("inpaint", circle_png, tmp_path / "small.png", "x")
    err = capsys.readouterr().err
    assert rc == 2 and "mask size 32x64 does not match the image size 64x64" in err and len(asked) == 1


def test_cli_outpaint(cli, circle_png, tmp_path, capsys):
    rc, _ = cli("outpaint", circle_png, "a red circle", "--right", 32, "--steps", 3, "--out", tmp_path / "o.png")
    out = Image.open(tmp_path / "o.png")
    assert rc == 0 and out.size == (96, 64)
    assert np.array_equal(_arr(out)[:, :64], _arr(Image.open(circle_png)))
    rc, asked = cli("outpaint", circle_png, "x")
    assert rc == 2 and "at least one of left, right, top, bottom" in capsys.readouterr().err and len(asked) == 1


def test_cli_invert(cli, circle_png, tmp_path, capsys):
    rc, _ = cli("invert", circle_png, "--prompt", "a red circle in the center", "--steps", 8,
                "--out", tmp_path / "inv.safetensors", "--reconstruct", tmp_path / "rec.png")
    out = capsys.readouterr().out
    assert rc == 0 and "reconstruction PSNR" in out and Image.open(tmp_path / "rec.png").size == (64, 64)
    assert float(out.split("PSNR")[1].split()[0]) > 20
    inv = edit.Inversion.load(tmp_path / "inv.safetensors")
    assert inv.latents.shape == (1, 4, 16, 16) and inv.prompt == "a red circle in the center"
    rc, asked = cli("invert", tmp_path / "missing.png")
    assert rc == 2 and "image file not found" in capsys.readouterr().err and len(asked) == 1


def test_cli_edit(cli, circle_png, tmp_path, capsys):
    rc, _ = cli("edit", circle_png, "a red circle in the center", "a blue circle in the center", "--steps", 6,
                "--out", tmp_path / "o.png")
    assert rc == 0 and Image.open(tmp_path / "o.png").size == (64, 64)
    rc, asked = cli("edit", circle_png, "a", "b", "--strength", 0)
    assert rc == 2 and "strength > 0" in capsys.readouterr().err and len(asked) == 1


def test_cli_edit_with_an_automatic_mask(cli, circle_png, tmp_path, capsys):
    src = "a red circle in the center"
    rc, _ = cli("edit", circle_png, src, "a blue circle in the center", "--steps", 4, "--mask", "auto",
                "--negative", src, "--save-mask", tmp_path / "m.png", "--out", tmp_path / "o.png")
    mask, out = _arr(Image.open(tmp_path / "m.png").convert("L")), _arr(Image.open(tmp_path / "o.png"))
    assert rc == 0 and set(np.unique(mask).tolist()) <= {0, 255} and 0 < (mask > 0).mean() < 0.9
    far = _arr(Image.open(circle_png))[mask == 0]  # cells far from the mask keep the input's pixels
    assert (out[mask == 0] == far).all(axis=-1).mean() > 0.5
    rc, asked = cli("edit", circle_png, "a", "b", "--mask", "auto", "--mask-threshold", 1.5)
    assert rc == 2 and "--mask-threshold must be in (0, 1)" in capsys.readouterr().err and len(asked) == 1


def test_cli_interpolate(cli, tmp_path, capsys):
    rc, _ = cli("interpolate", "a red circle", "a blue square", "--seeds", 0, 1, "--frames", 3, "--steps", 3,
                "--out", tmp_path / "i.gif")
    assert rc == 0
    with Image.open(tmp_path / "i.gif") as gif:
        assert gif.n_frames == 3 and gif.size == (64, 64)
    rc, asked = cli("interpolate", "a red circle", "--seeds", 5)
    assert rc == 2 and "two different prompts" in capsys.readouterr().err and len(asked) == 1
    rc, asked = cli("interpolate", "a", "b", "--out", tmp_path / "i.avi")
    assert rc == 2 and ".gif or .mp4" in capsys.readouterr().err and len(asked) == 1


def test_cli_pan(cli, circle_png, tmp_path, capsys):
    rc, _ = cli("pan", circle_png, "a red circle", "--frames", 3, "--step", 16, "--steps", 3,
                "--out", tmp_path / "p.gif")
    assert rc == 0
    with Image.open(tmp_path / "p.gif") as gif:
        assert gif.n_frames == 3 and gif.size == (64, 64)
    rc, _ = cli("pan", circle_png, "x", "--step", 12, "--frames", 2, "--steps", 1)
    assert rc == 2 and "multiples of 8" in capsys.readouterr().err


# -------------------------------------------------------------------------------- inpainting variant


def _variant_pipe(tiny, model):
    return Text2Image(model, tiny.autoencoder, tiny.text_encoder, tiny.path, tiny.sampling)


def test_inpainting_variant_starts_as_the_base_model(tiny):
    from latentdit.inpainting import is_inpainting, to_inpainting

    variant = to_inpainting(tiny.model)
    assert is_inpainting(variant.config) and variant.config.extra_in_channels == 5
    assert float(variant.patch.weight.detach()[:, 4:].abs().max()) == 0.0
    cond, _ = tiny.encode(["a red circle"])
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([0.7])
    with torch.no_grad():
        base = tiny.model(x, t, **cond.kwargs())
        wide = variant(x, t, **cond.kwargs(), mask_latent=torch.randn(1, 5, 8, 8))
    torch.testing.assert_close(wide, base, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="already takes"):
        to_inpainting(variant)


def test_inpaint_feeds_an_inpainting_variant_the_masked_latents_and_mask(tiny):
    from latentdit.inpainting import to_inpainting

    variant = to_inpainting(tiny.model)
    seen = []
    handle = variant.register_forward_pre_hook(lambda m, args, kw: seen.append(kw["mask_latent"].clone()),
                                               with_kwargs=True)
    img, m = _image(8), _left_half_mask(16)
    kw = dict(seed=2, steps=3, dtype=None, output_type="latent")
    try:
        out = edit.inpaint(_variant_pipe(tiny, variant), img, m, "a blue star", **kw)
    finally:
        handle.remove()
    known = tiny.autoencoder.encode(edit.load_image(img))
    m_lat = edit.latent_mask(tiny, edit.load_mask(m, (16, 16)))
    rows = torch.cat(seen)  # each step's [cond, uncond] rows, maybe split across threads
    assert rows.shape == (3 * 2, 5, 8, 8)  # 3 steps x 2 rows, C + 1 channels
    expected = torch.cat([known * (1 - m_lat), m_lat], 1)
    torch.testing.assert_close(rows, expected.expand_as(rows))
    base = edit.inpaint(tiny, img, m, "a blue star", **kw)
    torch.testing.assert_close(out, base, atol=1e-4, rtol=1e-4)  # zero-initialised: the base model


def test_inpaint_rejects_other_extra_channels(tiny):
    model = Denoiser(model_preset("tiny", extra_in_channels=2))
    with pytest.raises(ValueError, match="extra input channels"):
        edit.inpaint(_variant_pipe(tiny, model), _image(0), _left_half_mask(16), "x", steps=1)


def test_random_box_masks_for_training():
    from latentdit.inpainting import masked_condition, random_box_masks, training_mask_latent

    g = lambda: torch.Generator().manual_seed(0)
    masks = random_box_masks(400, 16, 16, generator=g())
    assert torch.equal(masks, random_box_masks(400, 16, 16, generator=g()))
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    area = masks.sum(dim=(1, 2, 3))
    full = area == 256
    assert 0.04 < float(full.float().mean()) < 0.18
    assert int(area[~full].min()) >= 2 * 2 and int(area[~full].max()) <= 12 * 12
    x0 = torch.randn(3, 4, 16, 16)
    cond = masked_condition(x0, masks[:3])
    assert cond.shape == (3, 5, 16, 16) and torch.equal(cond[:, 4:], masks[:3])
    assert float((cond[:, :4] * masks[:3]).abs().max()) == 0.0
    assert torch.equal(cond[:, :4] * (1 - masks[:3]), x0 * (1 - masks[:3]))
    assert training_mask_latent(x0, torch.Generator().manual_seed(1)).shape == (3, 5, 16, 16)
    with pytest.raises(ValueError, match="min_side"):
        random_box_masks(1, 8, 8, min_side=0.9, max_side=0.5)


def test_seed_interpolation_frames_are_samples_of_the_slerped_noise(tiny):
    """Every frame, the middle ones included, is the sample of ``slerp(noise_a, noise_b, w)``
    under one prompt: replacing the middle frames by anything else fails here."""
    frames = edit.interpolate(tiny, "a red circle", (3, 8), frames=4, steps=2)
    plan = tiny.prepare(2)
    cond, uncond = tiny.encode(["a red circle"])
    shape = tiny.latent_shape(None, None)
    a, b = tiny.noise([3], shape), tiny.noise([8], shape)
    for k, frame in enumerate(frames):
        w = k / 3
        denoise = tiny.denoiser(cond, uncond, plan.guidance_scale, guidance_interval=plan.guidance_interval)
        latents = tiny.sample(edit.slerp(a, b, w), denoise, plan, seed=8 if k == 3 else 3, progress=False)
        assert np.array_equal(_arr(frame), _arr(tiny.decode(latents)[0])), f"frame {k}"
    mid = edit.slerp(a, b, 0.5)
    assert abs(float(mid.norm() / a.norm()) - 1) < 0.05  # on the sphere, not the shrunken chord


def _psnr(a, b) -> float:
    """PSNR in dB of one image (or of a batch taken as one)."""
    return float(psnr(a.reshape(1, -1), b.reshape(1, -1)))
