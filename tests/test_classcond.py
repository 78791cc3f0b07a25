"""Class-conditional training end to end: labels in the shards, class dropout to the null class,
generation by class id or name, and a grid with one row per class."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import NoText

from latentdit.data import preprocess
from latentdit.shards import ShardReader
from latentdit.sources import open_source
from latentdit.train import diffusion_loss, train
from latentdit.train_config import make_config, recipe_dict
from latentdit.vae import load_autoencoder

SIZE = 16
COLORS = {"blue": (30, 40, 220), "green": (30, 200, 40), "red": (220, 30, 30)}  # sorted: ids 0, 1, 2


@pytest.fixture(scope="module")
def class_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("colors")
    rng = np.random.default_rng(0)
    for name, rgb in COLORS.items():
        (root / name).mkdir()
        for i in range(16):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 12, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:02d}.png")
    out = root / "shards"
    preprocess(open_source(root, labels=True), out, autoencoder=load_autoencoder("identity"),
               text_encoder=NoText(), shard_size=16, progress=False, labels=True)
    return out


def _config(shards, out, **over):
    base = recipe_dict("tiny")
    base["model"].update(in_channels=3, text_dim=0, pooled_dim=0, num_classes=3, base_size=SIZE, patch_size=4)
    return make_config({**base, "data": str(shards), "out": str(out), "steps": 40, "batch_size": 12,
                        "log_every": 10, "preview_every": 0, "checkpoint_every": 40, "ema_decay": 0.8,
                        "optim": {"lr": 3e-3, "warmup_steps": 5}, **over})


def test_class_dropout_feeds_the_null_class(class_shards, tmp_path):
    from latentdit.model import Denoiser
    from latentdit.schedules import NoisePath

    cfg = _config(class_shards, tmp_path, cond_dropout=0.5)
    batch = next(ShardReader(class_shards).batches(48, seed=0))
    model, seen = Denoiser(cfg.model), []
    model.register_forward_pre_hook(lambda m, args, kw: seen.append(kw["labels"]), with_kwargs=True)
    diffusion_loss(model, batch, NoisePath("flow"), cfg, torch.Generator().manual_seed(0))
    dropped = seen[0] == 3
    assert 5 < int(dropped.sum()) < 43  # about half, never all or none
    assert torch.equal(seen[0][~dropped], batch.labels[~dropped])
    assert sorted(set(batch.labels.tolist())) == [0, 1, 2]


def test_a_class_model_refuses_shards_without_labels(tmp_path):
    from latentdit.sources import shapes_source

    preprocess(shapes_source(4, size=SIZE), tmp_path / "s", autoencoder=load_autoencoder("identity"),
               text_encoder=NoText(), progress=False)
    with pytest.raises(ValueError, match="no class labels; preprocess with --labels"):
        train(_config(tmp_path / "s", tmp_path / "run"), progress=False)


def test_train_then_generate_by_class(class_shards, tmp_path, capsys):
    from latentdit.cli import main

    result = train(_config(class_shards, tmp_path / "run", preview_every=40), progress=False)
    model = result["model"]
    preview = Image.open(tmp_path / "run" / "previews" / "step-0000040.png")
    assert preview.size == (4 * SIZE, 3 * SIZE)  # one row of 4 per class
    means = {}
    for name in COLORS:  # by class name, as the class folders named them
        out = tmp_path / f"{name}.png"
        assert main(["generate", "--model", model, "--class", name, "--steps", "10", "--out", str(out)]) == 0
        means[name] = np.asarray(Image.open(out).convert("RGB"), dtype=float).mean((0, 1))
    for name, rgb in COLORS.items():  # each class comes out in its own colour
        assert int(np.argmax(means[name])) == int(np.argmax(rgb)), means
    assert main(["generate", "--model", model, "--class", "all", "--num-images", "2", "--steps", "4",
                 "--out", str(tmp_path / "grid.png")]) == 0
    assert Image.open(tmp_path / "grid.png").size == (2 * SIZE, 3 * SIZE)
    assert main(["generate", "--model", model, "--class", "1", "--steps", "4", "--out", str(tmp_path / "1.png")]) == 0
    assert main(["generate", "--model", model, "--class", "cat", "--out", str(tmp_path / "x.png")]) == 2
    assert "not a class id in [0, 2] or a class name" in capsys.readouterr().err


def _unet_baseline():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / "unet_baseline.py"
    spec = importlib.util.spec_from_file_location("unet_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_unet_baseline_trains_on_class_shards_and_samples_by_class(class_shards, tmp_path):
    pytest.importorskip("diffusers")
    from latentdit.evaluate.fid import generated_statistics

    ub = _unet_baseline()
    result = ub.train(class_shards, tmp_path / "unet", steps=3, batch_size=4, log_every=1)
    assert result["steps"] == 3 and [row["step"] for row in result["log"]] == [1, 2, 3]
    assert all(np.isfinite(row["loss"]) for row in result["log"])
    assert ub.train(class_shards, tmp_path / "timed", seconds=0.0, batch_size=4)["steps"] == 1  # the time budget
    pipe = ub.UNetPipeline(tmp_path / "unet", steps=4)
    a, b, c = pipe([0, 2], seed=[5, 6]), pipe([0, 2], seed=[5, 6]), pipe([1, 2], seed=[5, 6])
    assert [im.size for im in a] == [(SIZE, SIZE)] * 2
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))  # seeded
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))  # the class changes the sample
    assert np.array_equal(np.asarray(a[1]), np.asarray(c[1]))  # and only where it changed
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 3\)"):
        pipe([3])
    dpm = ub.UNetPipeline(tmp_path / "unet", steps=4, sampler="dpm")([0, 2], seed=[5, 6])
    assert [im.size for im in dpm] == [(SIZE, SIZE)] * 2
    assert not np.array_equal(np.asarray(dpm[0]), np.asarray(a[0]))  # another sampler, another image
    with pytest.raises(ValueError, match="sampler must be one of"):
        ub.UNetPipeline(tmp_path / "unet", sampler="euler")
    # evaluate.fid can score it as it scores our pipeline: classes in turn, one feature row per image
    stats = generated_statistics(pipe, 5, lambda x: x.float().mean(dim=(2, 3)), batch_size=2)
    assert stats.features.shape == (5, 3)
    assert ub.class_grid(pipe, per_class=2).size == (2 * SIZE, 3 * SIZE)


def test_the_unet_baseline_refuses_shards_without_labels(tmp_path):
    pytest.importorskip("diffusers")
    from latentdit.sources import shapes_source

    preprocess(shapes_source(4, size=SIZE), tmp_path / "s", autoencoder=load_autoencoder("identity"),
               text_encoder=NoText(), progress=False)
    assert _unet_baseline().main(["train", "--data", str(tmp_path / "s"), "--out", str(tmp_path / "u"),
                                  "--steps", "1"]) == 2
    with pytest.raises(ValueError, match="no class labels; preprocess with --labels"):
        _unet_baseline().train(tmp_path / "s", tmp_path / "u", steps=1)
