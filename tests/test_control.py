"""The structure-conditioned (control) variant: maps derived from images, the zero-initialised
variant, control scale, training on shards with maps, the pipeline, CLI and server."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import tiny_pipeline

from latentdit.config import ModelConfig, SamplingConfig, from_dict, model_preset, to_dict
from latentdit.control import (
    control_channels,
    control_input,
    control_map,
    control_maps,
    load_control_map,
    silhouette,
    to_control,
)
from latentdit.datasets.shapes import ShapesDataset, shape_coverage
from latentdit.model import Denoiser
from latentdit.pipeline import Text2Image

SIZE = 16  # tiny pipeline: 16x16 images, KL autoencoder downsample 2 -> 8x8 latents, maps factor 2


@pytest.fixture(scope="module")
def base(tiny_clip, tiny_vae) -> Text2Image:
    return tiny_pipeline(tiny_clip, tiny_vae, sampling=SamplingConfig(steps=3))


def _pipe(base: Text2Image, model: Denoiser) -> Text2Image:
    return Text2Image(model, base.autoencoder, base.text_encoder, base.path, base.sampling)


@pytest.fixture(scope="module")
def trained(base) -> Text2Image:
    """A control variant whose map weights are not zero, as after fine-tuning."""
    model = to_control(base.model, "silhouette", factor=2)
    with torch.no_grad():
        model.patch.weight[:, 4:] = torch.randn_like(model.patch.weight[:, 4:]) * 0.5
    return _pipe(base, model)


def _square_map(size: int = SIZE) -> torch.Tensor:
    m = torch.zeros(1, 1, size, size)
    m[..., size // 4: size // 2, size // 4: 3 * size // 4] = 1
    return m


# -------------------------------------------------------------------------------- maps
def _truth(attributes: dict, size: int = 64) -> np.ndarray:
    """Pixels the generator covers at least half, from its own coverage function."""
    out = np.zeros((size, size), dtype=bool)
    for obj in attributes["objects"]:
        out |= shape_coverage(obj["shape"], size, size, tuple(obj["bbox"])) >= 0.5
    return out


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


def test_silhouette_of_rendered_scenes_matches_the_generators_objects():
    from latentdit.evaluate.checker import _as_rgb, _background, _object_masks

    data = ShapesDataset(seed=3)
    truth_iou, checker_iou = [], []
    for i in range(40):
        sample = data[i]
        sil = silhouette(sample.image)
        truth_iou.append(_iou(sil, _truth(sample.attributes)))
        rgb = _as_rgb(sample.image)
        name, bg = _background(rgb)
        found = np.zeros_like(sil)
        for mask in _object_masks(rgb, bg, name):
            found |= mask
        checker_iou.append(_iou(sil, found))
    assert np.mean(truth_iou) > 0.96 and min(truth_iou) > 0.8
    assert np.mean(checker_iou) > 0.99  # the evaluation compares the map with the checker's objects


def test_edges_are_the_silhouettes_outline_and_a_blank_image_has_no_map():
    image = ShapesDataset(seed=1)[0].image
    sil, edges = control_map(image, "silhouette"), control_map(image, "edges")
    assert edges.any() and not (edges & ~sil).any() and edges.sum() < sil.sum() / 2
    interior = sil & ~edges
    assert interior.any()  # the outline leaves the inside out
    blank = Image.new("RGB", (32, 32), (128, 128, 128))
    assert not control_map(blank).any() and not control_map(blank, "edges").any()
    with pytest.raises(ValueError, match="unknown control kind 'depth'"):
        control_map(image, "depth")


def test_maps_travel_losslessly_as_latent_channels():
    maps = (torch.rand(2, 1, 16, 16) > 0.5).float()
    ch = control_channels(maps, 4)
    assert ch.shape == (2, 16, 4, 4) and set(ch.unique().tolist()) == {-1.0, 1.0}
    back = (torch.nn.functional.pixel_shuffle(ch, 4) + 1) / 2
    assert torch.equal(back, maps)
    assert torch.equal(control_channels(maps, 4, 0.0), torch.zeros_like(ch))


def test_map_inputs_files_and_arrays(tmp_path):
    img = Image.new("L", (8, 8), 0)
    img.putpixel((2, 3), 255)
    img.save(tmp_path / "m.png")
    m = load_control_map(tmp_path / "m.png")
    assert m.shape == (1, 1, 8, 8) and m.sum() == 1 and m[0, 0, 3, 2] == 1
    assert torch.equal(load_control_map(np.asarray(img) / 255.0), m)
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(ValueError, match="is not an image"):
        load_control_map(tmp_path / "bad.png")
    with pytest.raises(ValueError, match="not found"):
        load_control_map(tmp_path / "missing.png")
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        load_control_map(torch.full((8, 8), 2.0))


# -------------------------------------------------------------------------------- config
def test_the_variant_kind_is_explicit_and_old_configs_load():
    from latentdit.inpainting import is_inpainting

    old = {k: v for k, v in to_dict(model_preset("tiny")).items() if k != "control"}
    assert from_dict(ModelConfig, old).control is None
    cfg = from_dict(ModelConfig, {**old, "control": "silhouette", "extra_in_channels": 16})
    assert cfg.control_factor == 4 and not is_inpainting(cfg)
    # 5 extra channels with 4 latent channels used to mean inpainting; with a kind it is refused
    with pytest.raises(ValueError, match="factor\\*\\*2 extra channels"):
        from_dict(ModelConfig, {**old, "control": "edges", "extra_in_channels": 5})
    with pytest.raises(ValueError, match="is not one of"):
        from_dict(ModelConfig, {**old, "control": "depth", "extra_in_channels": 16})


# -------------------------------------------------------------------------------- the variant
def test_zero_initialised_variant_gives_the_base_models_output(base):
    variant = to_control(base.model, "silhouette", factor=2)
    assert variant.config.extra_in_channels == 4 and variant.config.control == "silhouette"
    assert float(variant.patch.weight.detach()[:, 4:].abs().max()) == 0.0
    cond, _ = base.encode(["a red circle"])
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([0.7, 0.3])
    with torch.no_grad():
        want = base.model(x, t, **cond.repeat(2).kwargs())
        maps = control_channels(_square_map().repeat(2, 1, 1, 1), 2)
        got = variant(x, t, **cond.repeat(2).kwargs(), mask_latent=maps)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="already takes"):
        to_control(variant)


def test_control_scale_zero_is_the_base_model_and_one_follows_the_map(base, trained):
    kw = dict(steps=3, seed=5, output_type="latent", progress=False)
    want = base("a red circle", **kw)
    off = trained("a red circle", control=_square_map(), control_scale=0.0, **kw)
    torch.testing.assert_close(off, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trained("a red circle", **kw), want, atol=1e-5, rtol=1e-5)  # no map: no control
    on = trained("a red circle", control=_square_map(), **kw)
    half = trained("a red circle", control=_square_map(), control_scale=0.5, **kw)
    assert (on - want).abs().mean() > 10 * (off - want).abs().mean() + 1e-3
    assert 0 < (half - want).abs().mean() < (on - want).abs().mean()


def test_bad_control_input_gives_one_clear_error(base, trained):
    with pytest.raises(ValueError, match="is 8x8 .* need a map of that size"):
        trained("a red circle", control=torch.zeros(8, 8), steps=1, progress=False)
    with pytest.raises(ValueError, match="not a control model"):
        base("a red circle", control=_square_map(), steps=1, progress=False)
    with pytest.raises(ValueError, match=r"control scale must be a number in \[0, 1\]"):
        trained("a red circle", control=_square_map(), control_scale=1.5, steps=1, progress=False)
    with pytest.raises(ValueError, match="3 control maps for 2 images"):
        control_input(trained.model.config, torch.zeros(3, 1, 16, 16), 2, (8, 8))


def test_one_map_per_image(trained):
    maps = torch.cat([_square_map(), torch.zeros(1, 1, SIZE, SIZE)])
    both = trained(["a red circle"] * 2, control=maps, seed=[1, 1], steps=2, output_type="latent", progress=False)
    first = trained("a red circle", control=maps[:1], seed=1, steps=2, output_type="latent", progress=False)
    torch.testing.assert_close(both[:1], first, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(both[0], both[1], atol=1e-3)


# -------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def control_shards(tmp_path_factory):
    from latentdit.data import preprocess
    from latentdit.sources import shapes_source
    from latentdit.text import load_text_encoder
    from latentdit.vae import load_autoencoder

    out = tmp_path_factory.mktemp("control-shards")
    preprocess(shapes_source(48, size=SIZE), out, autoencoder=load_autoencoder("identity"),
               text_encoder=load_text_encoder("minilm", max_length=24), n=48, shard_size=32, progress=False,
               control="silhouette")
    return out


def _train_config(shards, out, **over):
    from latentdit.train_config import make_config, recipe_dict

    base = recipe_dict("tiny")
    base["model"].update(in_channels=3, text_dim=384, pooled_dim=384, max_text_len=24, base_size=SIZE, patch_size=4)
    return make_config({**base, "data": str(shards), "out": str(out), "steps": 2, "batch_size": 8, "log_every": 1,
                        "preview_every": 0, "checkpoint_every": 10, "optim": {"lr": 2e-3, "warmup_steps": 1},
                        **over})


def test_shards_store_the_map_of_every_image(control_shards):
    from latentdit.shards import ShardReader
    from latentdit.sources import shapes_source

    reader = ShardReader(control_shards)
    assert reader.control == "silhouette"
    batch = next(reader.batches(6, seed=0))
    assert batch.control.shape == (6, 1, SIZE, SIZE) and batch.control.dtype == torch.uint8
    source = list(shapes_source(48, size=SIZE))
    want = control_maps([source[int(i)].image for i in batch.index], "silhouette")
    assert torch.equal(batch.control, want) and batch.control.sum() > 0


def test_preprocess_refuses_to_mix_maps_into_shards_without_them(control_shards, tmp_path):
    from latentdit.data import preprocess
    from latentdit.sources import shapes_source
    from latentdit.text import load_text_encoder
    from latentdit.vae import load_autoencoder

    with pytest.raises(ValueError, match="holds shards with control maps 'silhouette'"):
        preprocess(shapes_source(64, size=SIZE), control_shards, autoencoder=load_autoencoder("identity"),
                   text_encoder=load_text_encoder("minilm", max_length=24), n=64, shard_size=32,
                   progress=False, control="edges")


def test_control_variant_fine_tunes_from_the_base_and_learns_the_map_weights(control_shards, tmp_path):
    from safetensors.torch import load_file

    from latentdit.train import train

    base = train(_train_config(control_shards, tmp_path / "base"), progress=False)
    cfg = _train_config(control_shards, tmp_path / "ctl", init_from=base["model"],
                        model={**to_dict(_train_config(control_shards, tmp_path).model),
                               "control": "silhouette", "extra_in_channels": 1})
    result = train(cfg, progress=False)
    start = load_file(f"{base['model']}/model.safetensors")["patch.weight"]
    weights = load_file(f"{result['model']}/model.safetensors")["patch.weight"]
    assert weights.shape[1] == start.shape[1] + 1 and weights[:, 3:].abs().sum() > 0
    pipe = Text2Image.from_pretrained(result["model"])
    assert pipe.model.config.control == "silhouette"
    img = pipe("a red circle", control=_square_map(), steps=2, output_type="tensor", progress=False)
    assert img.shape == (1, 3, SIZE, SIZE) and torch.isfinite(img).all()


def test_training_a_control_model_on_shards_without_maps_is_refused(tmp_path):
    from latentdit.data import preprocess
    from latentdit.sources import shapes_source
    from latentdit.text import load_text_encoder
    from latentdit.train import train
    from latentdit.vae import load_autoencoder

    plain = tmp_path / "plain"
    preprocess(shapes_source(8, size=SIZE), plain, autoencoder=load_autoencoder("identity"),
               text_encoder=load_text_encoder("minilm", max_length=24), n=8, progress=False)
    cfg = _train_config(plain, tmp_path / "run")
    cfg.model.control, cfg.model.extra_in_channels = "silhouette", 1
    with pytest.raises(ValueError, match="no control maps; preprocess with --control silhouette"):
        train(cfg, progress=False)


# -------------------------------------------------------------------------------- CLI
@pytest.fixture
def cli(base, trained, monkeypatch):
    from latentdit import cli_control
    from latentdit.cli import main

    monkeypatch.setattr(cli_control, "_pipeline", lambda name, **_: base if name == "plain" else trained)
    return lambda *argv: main([str(a) for a in argv])


def test_cli_control_writes_images_from_a_map_or_an_image(cli, tmp_path):
    Image.fromarray((_square_map()[0, 0].numpy() * 255).astype(np.uint8)).save(tmp_path / "map.png")
    assert cli("control", "a red circle", "--control", tmp_path / "map.png", "--steps", 2, "--num-images", 2,
               "--out", tmp_path / "a.png") == 0
    for name in ("a_0.png", "a_1.png"):
        with Image.open(tmp_path / name) as im:
            assert im.size == (SIZE, SIZE)
    scene = ShapesDataset(size=SIZE, seed=2)[0].image
    scene.save(tmp_path / "scene.png")
    assert cli("control", "a red circle", "--control-from", tmp_path / "scene.png", "--steps", 2,
               "--save-map", tmp_path / "used.png", "--out", tmp_path / "b.png") == 0
    with Image.open(tmp_path / "used.png") as used:
        assert np.array_equal(np.asarray(used) > 127, control_map(scene))
    assert (tmp_path / "b.png").is_file()


def test_cli_control_bad_input_is_one_line(cli, tmp_path, capsys):
    (tmp_path / "bad.png").write_text("no")
    assert cli("control", "x", "--control", tmp_path / "bad.png", "--out", tmp_path / "o.png") == 2
    assert "is not an image" in capsys.readouterr().err
    Image.new("L", (SIZE, SIZE), 255).save(tmp_path / "m.png")
    assert cli("control", "x", "--control", tmp_path / "m.png", "--model", "plain", "--out", tmp_path / "o.png") == 2
    assert "plain is not a control model" in capsys.readouterr().err
    assert cli("control", "x", "--control", tmp_path / "m.png", "--control-scale", 2, "--out", tmp_path / "o.png") == 2
    assert "--control-scale must be in [0, 1]" in capsys.readouterr().err
    Image.new("L", (10, 10), 255).save(tmp_path / "odd.png")
    assert cli("control", "x", "--control", tmp_path / "odd.png", "--out", tmp_path / "o.png") == 2
    assert "multiples of" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


# -------------------------------------------------------------------------------- server
def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_server_control_endpoint(base, trained):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from latentdit.serve.app import create_app

    square = Image.fromarray((_square_map()[0, 0].numpy() * 255).astype(np.uint8))
    form = {"prompt": "a red circle", "steps": "2", "seed": "3"}
    with TestClient(create_app(trained, name="tiny-control")) as c:
        r = c.post("/v1/control", data=form, files={"control": ("m.png", _png(square), "image/png")})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["width"] == SIZE and out["seeds"] == [3] and len(out["images"]) == 1
        direct = trained("a red circle", control=square, steps=2, seed=3, progress=False)[0]
        got = Image.open(io.BytesIO(__import__("base64").b64decode(out["images"][0]))).convert("RGB")
        assert np.array_equal(np.asarray(got), np.asarray(direct))
        scene = ShapesDataset(size=SIZE, seed=2)[0].image
        r = c.post("/v1/control", data=form, files={"image": ("s.png", _png(scene), "image/png")})
        assert r.status_code == 200, r.text
        r = c.post("/v1/control", data=form)
        assert r.status_code == 422 and "exactly one of control" in r.text
        r = c.post("/v1/control", data=form, files={"control": ("m.png", b"junk", "image/png")})
        assert r.status_code == 422 and "not a readable image" in r.text
        r = c.post("/v1/control", data={**form, "control_scale": "3"},
                   files={"control": ("m.png", _png(square), "image/png")})
        assert r.status_code == 422
    with TestClient(create_app(base, name="tiny")) as c:  # a plain model serves no control endpoint
        assert c.post("/v1/control", data=form).status_code == 404


# -------------------------------------------------------------------------------- packaged weights
@pytest.mark.weights
def test_packaged_control_model_follows_the_map_of_held_out_scenes():
    """Thresholds measured on the fine-tuned silhouette model (docs/control.md); skipped where
    its weights are not installed."""
    from latentdit.checkpoint import PACKAGED
    from latentdit.datasets.shapes import prompt_set, render_scene
    from latentdit.evaluate.checker import _as_rgb, _background, _object_masks

    if not (PACKAGED["shapes-control"] / "config.json").exists():
        pytest.skip("the shapes-control weights are not installed (recipes/control.sh makes them)")
    pipe = Text2Image.from_pretrained("shapes-control", device="cpu")
    items = prompt_set("heldout", 8)
    scenes = [render_scene(it["attributes"], 64) for it in items]
    maps = torch.from_numpy(np.stack([silhouette(s) for s in scenes])[:, None].astype(np.float32))
    prompts, seeds = [it["prompt"] for it in items], list(range(len(items)))

    def mean_iou(images) -> float:
        ious = []
        for image, m in zip(images, maps[:, 0].bool().numpy()):
            rgb = _as_rgb(image)
            name, bg = _background(rgb)
            found = np.zeros_like(m)
            for mask in _object_masks(rgb, bg, name):
                found |= mask
            ious.append(_iou(found, m))
        return float(np.mean(ious))

    followed = mean_iou(pipe(prompts, control=maps, seed=seeds, progress=False))
    ignored = mean_iou(pipe(prompts, control=maps, control_scale=0.0, seed=seeds, progress=False))
    assert followed > 0.7 and followed > ignored + 0.4
