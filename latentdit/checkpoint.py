"""Model folders: ``config.json`` + ``model.safetensors`` (diffusers/hub style), written atomically.

The config records everything needed to rebuild a working pipeline: the architecture, the noise
path, sampling defaults, and which text encoder and autoencoder the model was trained with.
Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import DiffusionConfig, ModelConfig, SamplingConfig, from_dict, to_dict, upgrade_stored_model
from .lines import first_line

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 2  # 2: ModelConfig.cross_norm and .gelu (format 1: normed cross-attention, tanh GELU)
PACKAGED = {name: Path(__file__).parent / "weights" / name
            for name in ("shapes", "shapes-layout", "shapes-multilingual", "shapes-control")}
# Largest image side, as a multiple of the side the model was trained at: positional embeddings
# and attention cost (quadratic in tokens) are sized for the training canvas; 4x is 16x the tokens.
MAX_SIZE_MULTIPLE = 4


@dataclass
class CheckpointConfig:
    """What ``config.json`` holds. ``text_encoder``/``autoencoder`` are the encoders' ``describe()``
    dicts; a relative ``path`` inside them is resolved against the model folder."""

    model: ModelConfig
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    text_encoder: dict[str, Any] | None = None
    autoencoder: dict[str, Any] | None = None
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)
    # A delta folder (`write_delta`): the model this folder's weights are changes to (a packaged
    # name, or a folder, relative to this one or absolute); weights and components it lacks come
    # from there. None: the folder holds every weight.
    base: str | None = None
    # `weights_digest` of the base weights a delta does not replace, when it was written: a base
    # that has changed since (a new release of a packaged model) is refused instead of mixed in.
    base_digest: str | None = None

    def to_json(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CheckpointConfig:
        if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
            raise ValueError("a model's config.json must be a JSON object with a 'model' section")
        data = dict(data)
        version = data.get("format_version", FORMAT_VERSION)
        if version > FORMAT_VERSION:
            raise ValueError(f"checkpoint format {version} is newer than this latentdit "
                             f"understands ({FORMAT_VERSION}); upgrade latentdit")
        if version < 2 and isinstance(data.get("model"), dict):
            data["model"] = upgrade_stored_model(data["model"])
        data["format_version"] = FORMAT_VERSION
        return from_dict(cls, data)


def _umask_mode(mode: int) -> int:
    """``mode`` less the process umask: what open() would have given (mkstemp/mkdtemp use 0600/0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write via a temporary file in the same folder and rename: a crash leaves the old file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: str | Path,
                        metadata: dict[str, str] | None = None) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata)
        os.chmod(tmp, _umask_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_pretrained(model: torch.nn.Module, directory: str | Path, config: CheckpointConfig,
                    *, dtype: torch.dtype | None = None, extra_dirs: dict[str, Path] | None = None,
                    low_rank: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a model folder atomically: everything goes to a sibling temp folder, then one rename.

    ``extra_dirs`` copies folders in (e.g. ``{"vae": ae_dir}``) so the folder is self-contained.
    ``low_rank``: updates stored as factors beside the weights they change (``merge_low_rank``).
    """
    weights = model.state_dict()
    state = {**weights, **check_low_rank(weights, low_rank or {}, "low_rank")}
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in state.items()}
    return _save_state(state, directory, config, extra_dirs)


# A weight ``W`` may come with a low-rank update, stored as ``W.lora_A`` (rank, in) and ``W.lora_B``
# (out, rank), its scale folded into B: the model's weight is ``W + B @ A``. A fine-tune that trained
# adapters (``train --lora_rank``) is stored so; as a delta it holds the factors, not whole matrices.
LOW_RANK = (".lora_A", ".lora_B")


def is_low_rank_factor(name: str) -> bool:
    return name.endswith(LOW_RANK)


def check_low_rank(weights: dict[str, torch.Tensor], factors: dict[str, torch.Tensor],
                   where: str | Path) -> dict[str, torch.Tensor]:
    """``factors`` (the low-rank keys of a file), checked against the ``weights`` they update:
    both halves present, floating, and shaped to give that weight's shape. A ValueError names the
    first problem and ``where`` the file."""
    for name in factors:
        if not is_low_rank_factor(name):
            raise ValueError(f"{where}: {name} is not a low-rank factor (names end in .lora_A or .lora_B)")
        weight = name.rsplit(".", 1)[0]
        a, b = factors.get(weight + ".lora_A"), factors.get(weight + ".lora_B")
        if a is None or b is None:
            raise ValueError(f"{where}: {name} comes without its other half ({weight}.lora_A and .lora_B go together)")
        w = weights.get(weight)
        if w is None:
            raise ValueError(f"{where}: {name} updates {weight}, which the model does not have")
        if not (a.is_floating_point() and b.is_floating_point()) or a.dim() != 2 or b.dim() != 2 \
                or a.shape[0] != b.shape[1] or (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise ValueError(f"{where}: the factors of {weight} are {tuple(b.shape)} @ {tuple(a.shape)}, "
                             f"which does not make its shape {tuple(w.shape)}")
    return factors


def merge_low_rank(state: dict[str, torch.Tensor], where: str | Path = "weights") -> dict[str, torch.Tensor]:
    """``state`` with every stored low-rank update added into its weight (in float32, then cast to
    the weight's dtype) and the factors dropped; a state without factors comes back as it is."""
    factors = {k: v for k, v in state.items() if is_low_rank_factor(k)}
    if not factors:
        return state
    merged = {k: v for k, v in state.items() if k not in factors}
    check_low_rank(merged, factors, where)
    for name in {k.rsplit(".", 1)[0] for k in factors}:
        w = merged[name]
        update = factors[name + ".lora_B"].float() @ factors[name + ".lora_A"].float()
        merged[name] = (w.float() + update).to(w.dtype)
    return merged


def _save_state(state: dict[str, torch.Tensor], directory: str | Path, config: CheckpointConfig,
                extra_dirs: dict[str, Path] | None = None) -> Path:
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp / WEIGHTS_NAME)
        (tmp / CONFIG_NAME).write_text(json.dumps(config.to_json(), indent=2))
        for name, src in (extra_dirs or {}).items():
            shutil.copytree(src, tmp / name)
        for f in (tmp / WEIGHTS_NAME, tmp / CONFIG_NAME):
            os.chmod(f, _umask_mode(0o666))
        os.chmod(tmp, _umask_mode(0o777))
        _swap_into_place(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _swap_into_place(tmp: Path, directory: Path) -> None:
    old = None
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def resolve(name_or_path: str | Path) -> Path:
    """A local folder, a packaged model name (``shapes``) or a hub id -> a local folder."""
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise ValueError(f"a model is a folder, a packaged name (e.g. 'shapes') or a hub id, got {name_or_path!r}")
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if str(name_or_path) in PACKAGED:
        packaged = PACKAGED[str(name_or_path)]
        if (packaged / CONFIG_NAME).exists():
            return packaged
        raise ValueError(f"the packaged model '{name_or_path}' is not installed in {packaged}")
    return _from_hub(str(name_or_path))


def _is_hub_id(name: str) -> bool:
    """``owner/name``: one slash, not a relative or absolute path."""
    return name.count("/") == 1 and not name.startswith((".", "/"))


def _from_hub(repo_id: str) -> Path:
    if not _is_hub_id(repo_id):
        raise ValueError(f"model '{repo_id}' is neither a folder nor a hub id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"]))
    except ImportError:
        raise ValueError(f"'{repo_id}' looks like a hub id; install huggingface_hub to download "
                         "it, or pass a local folder") from None
    except Exception as e:  # offline, missing repo, auth: one clear message
        raise ValueError(f"could not fetch model '{repo_id}' from the hub ({type(e).__name__}); "
                         "download it elsewhere and pass the folder path instead") from None


def load_config(directory: str | Path) -> CheckpointConfig:
    file = Path(directory) / CONFIG_NAME
    if not file.exists():
        raise ValueError(f"{directory} is not a latentdit model folder: {CONFIG_NAME} is missing")
    try:
        data = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file} is not valid JSON: {e}") from None
    try:
        return CheckpointConfig.from_json(data)
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None


def load_weights(directory: str | Path, dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
    file = Path(directory) / WEIGHTS_NAME
    if not file.exists():
        raise ValueError(f"{directory} has no {WEIGHTS_NAME}")
    try:
        state = load_file(file)
    except Exception as e:
        raise ValueError(f"{file} is unreadable or truncated ({first_line(e)})") from None
    check_finite(state, file)
    return {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in state.items()}


WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_finite(tensors: dict[str, torch.Tensor], file: str | Path) -> None:
    """Damaged weight bytes read as NaN or inf (0xFF bytes are NaN): refuse them by name rather
    than sample black images. Also refuses floating dtypes no latentdit model is stored in."""
    for name, v in tensors.items():
        if v.is_floating_point() and v.dtype not in WEIGHT_DTYPES:
            raise ValueError(f"{file}: {name} is stored as {v.dtype}; expected float32, float16 or bfloat16")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise ValueError(f"{file} is damaged: {name} holds {bad} non-finite values (NaN or inf)")


def base_folder(directory: Path, config: CheckpointConfig) -> Path | None:
    """The folder of a delta model's base (None for a whole model); it must be a whole model of
    the same architecture."""
    if not config.base:
        return None
    local = directory / config.base
    base = local if local.is_dir() else resolve(config.base)
    base_config = load_config(base)
    if base_config.base:
        raise ValueError(f"{directory}: its base {config.base!r} is itself a delta model; "
                         "a base must hold every weight")
    ours, theirs = to_dict(config.model), to_dict(base_config.model)
    # max_text_len is the one field no weight depends on, unless a text refiner gives each place a weight
    free = set() if ours.get("text_refiner") else {"max_text_len"}
    # a layout planner grown on the base adds weights and changes none of the base's shapes
    if ours.get("layout_planner") and not theirs.get("layout_planner"):
        free |= {"layout_planner", "layout_gain"}
    differ = sorted(k for k in ours if k not in free and ours[k] != theirs.get(k))
    if differ:
        raise ValueError(f"{directory}: its base {config.base!r} has another architecture "
                         f"(config.json 'model' differs in {', '.join(differ)})")
    return base


def weights_digest(state: dict[str, torch.Tensor], skip: Any = ()) -> str:
    """One hash over the weights' names, dtypes, shapes and values in name order, less those named
    in ``skip``: equal weights give equal digests however the file stores them."""
    h = hashlib.sha256()
    for name in sorted(k for k in state if k not in skip):
        v = state[name].detach().cpu().contiguous()
        h.update(f"{name}\0{v.dtype}\0{tuple(v.shape)}\0".encode())
        h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_state(directory: Path, config: CheckpointConfig) -> dict[str, torch.Tensor]:
    """Every weight of a model folder in float32, low-rank updates merged in; a delta's over its
    base's, once the base is found to hold the weights the delta was made on."""
    state = load_weights(directory)
    where = Path(directory) / WEIGHTS_NAME
    base = base_folder(directory, config)
    if base is None:
        return merge_low_rank(state, where)
    theirs = load_weights(base, dtype=None)
    if config.base_digest and weights_digest(theirs, skip=state) != config.base_digest:
        raise ValueError(f"{directory} is a delta on {config.base!r}, but {base} now holds other weights "
                         "than those it was made on; remake it on this base (latentdit delta) or "
                         "install the base it was made on")
    # merged once the delta's weights are in: an update applies to whichever weight the model ends up with
    return merge_low_rank({**{k: v.float() if v.is_floating_point() else v for k, v in theirs.items()}, **state},
                          where)


def load_denoiser(name_or_path: str | Path, device: str | torch.device = "cpu"):
    """(Denoiser with weights, CheckpointConfig, folder) from a folder, packaged name or hub id."""
    from .model import Denoiser

    directory = resolve(name_or_path)
    config = load_config(directory)
    model = Denoiser(config.model)
    state = load_state(directory, config)
    expected = model.state_dict()
    wrong = [f"{k} is {list(v.shape)}, config.json expects {list(expected[k].shape)}"
             for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    wrong += [f"{k} is {v.dtype}, the model needs {expected[k].dtype}" for k, v in state.items()
              if k in expected and v.is_floating_point() != expected[k].is_floating_point()]
    if wrong:
        raise ValueError(f"{directory}: weights do not match config.json ({'; '.join(wrong[:3])})")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{directory}: weights do not match config.json "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.to(device).eval(), config, directory


def component_path(directory: Path, desc: dict[str, Any] | None, base: Path | None = None) -> dict[str, Any] | None:
    """Resolve a component's relative ``path`` against the model folder, then its base's."""
    if not desc:
        return desc
    desc = dict(desc)
    path = desc.get("path")
    if path and (directory / path).exists():
        desc["path"] = str(directory / path)
    elif path and base is not None and (base / path).exists():
        desc["path"] = str(base / path)
    elif isinstance(path, str) and not _is_hub_id(path) and not Path(path).exists():
        # not a hub id either: a component folder the model folder lacks
        raise ValueError(f"{directory} names a component at {path!r}, which is missing from the folder")
    return desc


def check_image_size(height: int | None, width: int | None, *, base: int, step: int,
                     multiple: int = MAX_SIZE_MULTIPLE) -> tuple[int, int]:
    """(height, width) in pixels, ``base`` (the training side) where None: positive multiples of
    ``step`` and at most ``multiple * base``, else a ValueError naming the allowed range."""
    height, width = base if height is None else height, base if width is None else width
    largest = multiple * base
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0 or v % step:
            raise ValueError(f"height and width must be positive multiples of {step}, got {name} {v!r}")
        if v > largest:
            raise ValueError(f"{name} {v} is more than {multiple}x the {base} px this model was trained at; "
                             f"the largest is {largest}")
    return height, width


def size_limits(config: CheckpointConfig) -> tuple[int, int]:
    """(trained side, side step) in pixels of a model folder's config, read without its weights."""
    down = int((config.autoencoder or {}).get("downsample", 1))
    return config.model.base_size * down, config.model.patch_size * down


def _folder_digest(folder: Path) -> str:
    """One hash over every file's relative name and bytes: equal folders, equal digests."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def average_models(folders: list[str | Path], out: str | Path, weights: list[float] | None = None) -> Path:
    """A weighted average of model folders' weights (a model soup), written as a new model folder.

    The folders must be one architecture trained with one text encoder and one autoencoder (fine-
    tunes of a common model, say): config sections and weight names and shapes must agree, and a
    packaged autoencoder folder must be the same bytes in each. Weights are averaged in float32
    and stored in the first model's dtype; its sampling defaults are kept.
    """
    if len(folders) < 2:
        raise ValueError(f"averaging needs at least two models, got {len(folders)}")
    weights = [1.0] * len(folders) if weights is None else [float(w) for w in weights]
    if len(weights) != len(folders):
        raise ValueError(f"{len(weights)} weights for {len(folders)} models; give one weight per model")
    if not all(w >= 0 and math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {weights}")
    dirs = [resolve(f) for f in folders]
    configs = [load_config(d) for d in dirs]
    first = configs[0].to_json()
    for d, c in zip(dirs[1:], configs[1:]):
        other = c.to_json()
        for section in ("model", "diffusion", "text_encoder", "autoencoder"):
            if other[section] != first[section]:
                raise ValueError(f"{d} and {dirs[0]} differ in config.json's '{section}' section; "
                                 "only models of one architecture and encoders can be averaged")
        if (c.base, c.base_digest) != (configs[0].base, configs[0].base_digest):
            raise ValueError(f"{d} and {dirs[0]} are not deltas on one base (config.json 'base' "
                             f"{c.base!r} and {configs[0].base!r}, or their base digests, differ); "
                             "only deltas of one base, or whole models, can be averaged")
    ae = configs[0].autoencoder or {}
    ae_dir = ae.get("path") if isinstance(ae.get("path"), str) else None
    extra = {}
    if ae_dir and (dirs[0] / ae_dir).is_dir():
        digest = _folder_digest(dirs[0] / ae_dir)
        for d in dirs[1:]:
            if not (d / ae_dir).is_dir() or _folder_digest(d / ae_dir) != digest:
                raise ValueError(f"{d}/{ae_dir} is not the same autoencoder as {dirs[0]}/{ae_dir}; "
                                 "only models trained in one latent space can be averaged")
        extra[ae_dir] = dirs[0] / ae_dir
    states = [load_weights(d, dtype=None) for d in dirs]
    if any(is_low_rank_factor(k) for s in states for k in s) and configs[0].base:
        raise ValueError("these deltas hold low-rank updates of their base's weights, and the average of "
                         "the factors is not the average of the updates; average the whole models instead")
    states = [merge_low_rank(s, d / WEIGHTS_NAME) for d, s in zip(dirs, states)]  # average the updates
    for d, s in zip(dirs[1:], states[1:]):
        if s.keys() != states[0].keys() or any(s[k].shape != v.shape for k, v in states[0].items()):
            raise ValueError(f"{d}/{WEIGHTS_NAME} does not hold the same weights as {dirs[0]}/{WEIGHTS_NAME}")
    total = sum(weights)
    avg = {}
    for k, v in states[0].items():
        if v.is_floating_point():
            mixed = sum(w / total * s[k].float() for w, s in zip(weights, states))
            avg[k] = mixed.to(v.dtype)
        else:  # integer buffers (none today) cannot be averaged: they must agree
            if any(not torch.equal(s[k], v) for s in states[1:]):
                raise ValueError(f"the models' integer weight {k} differs; it cannot be averaged")
            avg[k] = v
    config = configs[0]
    config.extra = {**config.extra, "average": {"models": [str(d) for d in dirs],
                                                "weights": [w / total for w in weights]}}
    return _save_state(avg, out, config, extra)


def write_delta(model: str | Path, base: str, out: str | Path) -> Path:
    """Write `model` as a delta on `base`: only the weights that differ from the base's, and the
    autoencoder only if it is not the base's. For a fine-tune that changed a few layers (a text
    encoder swapped with ``train_only: text``, a layout planner grown and trained with
    ``train_only: planner.*``, adapters trained with ``lora_rank``, stored as their factors)
    this is a fraction of the size, and loads as the
    whole model with ``from_pretrained`` while the base is installed."""
    mdir = resolve(model)
    mconf = load_config(mdir)
    if mconf.base:
        raise ValueError(f"{mdir} is already a delta model (on {mconf.base!r})")
    mconf.base = base
    bdir = base_folder(Path(out), mconf)
    assert bdir is not None
    mine, theirs = load_weights(mdir, dtype=None), load_weights(bdir, dtype=None)
    from .model import is_planner_weight

    grown = {k for k in mine.keys() - theirs.keys() if is_planner_weight(k) or is_low_rank_factor(k)}
    if mine.keys() - grown != theirs.keys() or any(v.shape != theirs[k].shape for k, v in mine.items()
                                                   if k not in grown):
        raise ValueError(f"{mdir}/{WEIGHTS_NAME} and {bdir}/{WEIGHTS_NAME} do not hold the same weights")
    changed = {k: v for k, v in mine.items() if k in grown or not torch.equal(v, theirs[k].to(v.dtype))}
    if not changed:
        raise ValueError(f"{mdir} holds the same weights as {base!r}; there is no delta to write")
    mconf.base_digest = weights_digest(theirs, skip=changed)
    extra = {}
    ae = mconf.autoencoder or {}
    ae_dir = ae.get("path") if isinstance(ae.get("path"), str) else None
    if ae_dir and (mdir / ae_dir).is_dir():
        same = (bdir / ae_dir).is_dir() and _folder_digest(bdir / ae_dir) == _folder_digest(mdir / ae_dir)
        if not same:
            extra[ae_dir] = mdir / ae_dir
    return _save_state(changed, out, mconf, extra)
