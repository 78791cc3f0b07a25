"""MNIST-format (IDX) files: Fashion-MNIST as the Debian package ships it, as a labelled source."""

import gzip
import struct

import numpy as np
import pytest

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
