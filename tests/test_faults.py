"""Fault injection: damaged bytes in every kind of file latentdit reads or writes, truncated files,
an unwritable folder, a full disk, NaN weights and a diverging run. Each must end in one line on
stderr naming the file (or the step) and a non-zero exit, with nothing lost and no image written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from latentdit import cli
from latentdit.checkpoint import PACKAGED

SIZE = 16


def run(capsys, *argv: str) -> tuple[int, str]:
    """main() in-process: (exit code, the one error line). Fails unless exactly one line says
    ``latentdit CMD: error:`` and no traceback was printed."""
    capsys.readouterr()
    rc = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert "Traceback" not in err, err
    assert len(errors) == 1, err
    return rc, errors[0]


def damage(file: Path, offset: int = 0, length: int = 4096, byte: int = 0xFF) -> None:
    """Overwrite ``length`` bytes from ``offset`` (negative: from the end) with ``byte``."""
    data = bytearray(file.read_bytes())
    start = offset if offset >= 0 else len(data) + offset
    data[start:start + length] = bytes([byte]) * len(data[start:start + length])
    file.write_bytes(bytes(data))


def truncate(file: Path, keep: float = 0.5) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def model_copy(tmp_path_factory) -> Path:
    """A pristine copy of the packaged model; tests copy it again before damaging it."""
    dst = tmp_path_factory.mktemp("pristine") / "shapes"
    shutil.copytree(PACKAGED["shapes"], dst)
    return dst


@pytest.fixture
def model(model_copy, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(model_copy, dst)
    return dst


def _weights_offset(file: Path) -> int:
    """Where the tensor data of a safetensors file starts (after its 8-byte length + JSON header)."""
    return 8 + int.from_bytes(file.read_bytes()[:8], "little")


# -- model folders ------------------------------------------------------------------------------
def test_ff_bytes_in_weights_name_the_file_instead_of_a_black_image(model, tmp_path, capsys):
    weights = model / "model.safetensors"
    damage(weights, offset=_weights_offset(weights) + 4096)
    out = tmp_path / "pic.png"
    rc, line = run(capsys, "generate", "a red circle", "--model", model, "--out", out, "--steps", "2")
    assert rc == 2 and str(weights) in line and "non-finite values" in line
    assert not out.exists()


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_truncated_model_files_are_named(model, tmp_path, capsys, name):
    truncate(model / name)
    rc, line = run(capsys, "generate", "a red circle", "--model", model, "--out", tmp_path / "p.png")
    assert rc == 2 and str(model / name) in line
    assert ("truncated" in line) if name.endswith("safetensors") else ("not valid JSON" in line)


def test_nan_weights_saved_by_torch_are_refused(model, tmp_path, capsys):
    weights = model / "model.safetensors"
    state = load_file(weights)
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("nan")
    save_file(state, weights)
    rc, line = run(capsys, "generate", "a red circle", "--model", model, "--out", tmp_path / "p.png")
    assert rc == 2 and str(weights) in line and name in line


def test_weights_of_another_dtype_are_refused(model, tmp_path, capsys):
    weights = model / "model.safetensors"
    state = load_file(weights)
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name].to(torch.float64)
    save_file(state, weights)
    rc, line = run(capsys, "generate", "a red circle", "--model", model, "--out", tmp_path / "p.png")
    assert rc == 2 and name in line and "float64" in line


@pytest.mark.parametrize("how", ["ff", "truncate"])
def test_damaged_autoencoder_weights_are_named(model, tmp_path, capsys, how):
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    if how == "ff":
        damage(weights, offset=_weights_offset(weights) + 1024)
    else:
        truncate(weights)
    rc, line = run(capsys, "generate", "a red circle", "--model", model, "--out", tmp_path / "p.png")
    assert rc == 2 and str(model / "vae") in line
    assert ("non-finite" in line) if how == "ff" else ("unreadable or truncated" in line)


# -- generation: output checked before it is written, arguments before the model loads -----------
def _tiny_nan_pipeline(bad_call: int):
    """A tiny class-conditional pipeline whose denoiser returns NaN from call ``bad_call`` on."""
    from latentdit.config import model_preset
    from latentdit.model import Denoiser
    from latentdit.pipeline import Text2Image
    from latentdit.vae import load_autoencoder

    model = Denoiser(model_preset("tiny", in_channels=3, text_dim=0, pooled_dim=0, num_classes=4,
                                  base_size=SIZE, patch_size=4))
    forward, calls = model.forward, [0]

    def poisoned(*a, **kw):
        calls[0] += 1
        out = forward(*a, **kw)
        return out * float("nan") if calls[0] >= bad_call else out

    model.forward = poisoned
    return Text2Image(model, load_autoencoder("identity"))


def test_non_finite_sample_names_the_step_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "load_pipeline", lambda name, *_: _tiny_nan_pipeline(bad_call=3))
    out = tmp_path / "pic.png"
    rc, line = run(capsys, "generate", "1", "--out", out, "--steps", "5", "--sampler", "euler",
                   "--guidance", "1", "--height", "64")
    assert rc == 1 and "FloatingPointError" in line and "step 3 of 5" in line
    assert not out.exists()


def _no_load(monkeypatch) -> list[str]:
    asked: list[str] = []
    monkeypatch.setattr(cli, "load_pipeline", lambda name, *_: asked.append(name) or pytest.fail("model loaded"))
    return asked


@pytest.mark.parametrize("argv, message", [
    (["--height", "100000"], "height 100000 is more than 4x the 64 px this model was trained at"),
    (["--width", "70"], "height and width must be positive multiples of 8, got width 70"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--num-images", "0"], "--num-images must be >= 1"),
    (["--guidance", "nan"], "--guidance must be a finite number"),
    (["--threads", "-1"], "--threads must be >= 0"),
])
def test_generate_arguments_are_checked_before_the_model_loads(tmp_path, capsys, monkeypatch, argv, message):
    _no_load(monkeypatch)
    rc, line = run(capsys, "generate", "a red circle", "--out", tmp_path / "p.png", *argv)
    assert rc == 2 and message in line


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder nobody may write into, root included (chmod for users, the immutable flag for root)."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode:
            pytest.skip("root, and no immutable flag on this filesystem: cannot make a folder unwritable")
        yield folder
        subprocess.run(["chattr", "-i", str(folder)])
    else:
        folder.chmod(0o500)
        yield folder
        folder.chmod(0o700)


def test_unwritable_output_folder_fails_before_sampling(readonly_dir, capsys, monkeypatch):
    _no_load(monkeypatch)
    rc, line = run(capsys, "generate", "a red circle", "--out", readonly_dir / "p.png")
    assert rc == 2 and f"cannot write into {readonly_dir}" in line


def test_unwritable_batch_folder_fails_before_sampling(readonly_dir, tmp_path, capsys, monkeypatch):
    _no_load(monkeypatch)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    rc, line = run(capsys, "generate", "--from-file", prompts, "--out", readonly_dir)
    assert rc == 2 and f"cannot write into {readonly_dir}" in line


def test_prompt_file_with_corrupt_bytes_is_named(tmp_path, capsys, monkeypatch):
    _no_load(monkeypatch)
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(b"a red circle\n\xff\xfe\x00garbage\n")
    rc, line = run(capsys, "generate", "--from-file", prompts, "--out", tmp_path / "o")
    assert rc == 2 and str(prompts) in line and "not UTF-8" in line


def test_default_output_lands_in_the_ignored_out_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "load_pipeline", lambda name, *_: _tiny_nan_pipeline(bad_call=10**9))
    assert cli.main(["generate", "2", "--steps", "1", "--height", "64"]) == 0
    assert capsys.readouterr().out.strip() == str(Path("out") / "2.png")
    assert (tmp_path / "out" / "2.png").is_file()
    ignored = (Path(__file__).resolve().parents[1] / ".gitignore").read_text().splitlines()
    assert "/out/" in ignored and "/*.png" in ignored


def test_debug_shows_the_traceback(model, tmp_path, capsys):
    truncate(model / "config.json")
    rc = cli.main(["generate", "a", "--model", str(model), "--out", str(tmp_path / "p.png"), "--debug"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("latentdit generate: error:")


def test_help_shows_defaults_and_the_chosen_presets_values(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 8)" in text and "(default: shapes)" in text and "default: out/<prompt>.png" in text
    assert "uses seed + k) (default: 0)" in text  # a default of 0 is a default too
    with pytest.raises(SystemExit):
        cli.main(["inpaint", "--help"])
    assert "--seed SEED default: 0" in " ".join(capsys.readouterr().out.split())  # option without help text
    with pytest.raises(SystemExit):
        cli.main(["train", "--preset", "tiny", "--help"])
    tiny = capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    small = capsys.readouterr().out
    assert "preset tiny" in tiny and "--model.width (default 64)" in tiny
    assert "preset shapes-small" in small and "--steps (default 2700)" in small


def test_recipe_writes_outside_the_package_by_default():
    script = (Path(__file__).resolve().parents[1] / "recipes" / "shapes.sh").read_text()
    lines = [line for line in script.splitlines() if line.startswith(("RUN=", "DEST="))]
    env = {k: v for k, v in os.environ.items() if k not in ("RUN", "DEST")}
    dest = subprocess.run(["bash", "-c", "\n".join([*lines, 'echo "$DEST"'])], capture_output=True,
                          text=True, env=env).stdout.strip()
    assert dest == "runs/shapes/model"


# -- subprocess: the installed entry point, a full disk ----------------------------------------
def _cli(*args: str, limit_bytes: int | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    def limit():
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "LATENTDIT_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "latentdit", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, preexec_fn=limit if limit_bytes else None)


def _one_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    lines = [line for line in r.stderr.splitlines() if ": error: " in line]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_full_disk_while_writing_shapes_is_one_line(tmp_path):
    r = _cli("shapes", "--n", "4", "--out", str(tmp_path / "s"), limit_bytes=200)
    assert "File too large" in _one_line(r) and r.returncode == 2


# -- training runs: checkpoints, metrics, shards, divergence, export ----------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A 4-step run with checkpoints at steps 2 and 4, and its --config file."""
    from latentdit.config import to_dict
    from latentdit.data import preprocess
    from latentdit.sources import shapes_source
    from latentdit.text import load_text_encoder
    from latentdit.train import train
    from latentdit.train_config import make_config, recipe_dict
    from latentdit.vae import load_autoencoder

    root = tmp_path_factory.mktemp("faultrun")
    preprocess(shapes_source(32, size=SIZE), root / "shards", autoencoder=load_autoencoder("identity"),
               text_encoder=load_text_encoder("minilm", max_length=8), n=32, shard_size=16, progress=False)
    data = recipe_dict("tiny")
    data["model"].update(in_channels=3, text_dim=384, pooled_dim=384, max_text_len=8, base_size=SIZE,
                         patch_size=4, width=32, depth=1)
    data.update(data=str(root / "shards"), out=str(root / "run"), steps=4, batch_size=4, log_every=1,
                preview_every=0, checkpoint_every=2, keep_checkpoints=3, mixed_precision="no")
    cfg = make_config(data)
    (root / "cfg.json").write_text(json.dumps(to_dict(cfg)))
    train(cfg, progress=False)
    return root


@pytest.fixture
def run_copy(run_dir, tmp_path) -> Path:
    """A copy of the run whose config points at the copy's own folders; cfg.json beside it."""
    shutil.copytree(run_dir, tmp_path, dirs_exist_ok=True)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg.update(data=str(tmp_path / "shards"), out=str(tmp_path / "run"), steps=6)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    return tmp_path


def _strict_rows(file: Path) -> list[dict]:
    def no_constant(name):
        raise AssertionError(f"{file} holds {name}, which is not JSON")

    return [json.loads(line, parse_constant=no_constant) for line in file.read_text().splitlines()]


@pytest.mark.parametrize("damaged", ["state.json", "model.safetensors", "ema.safetensors", "optimizer.safetensors"])
def test_resume_latest_skips_a_damaged_checkpoint(run_copy, capsys, damaged):
    newest = run_copy / "run" / "checkpoints" / "step-0000004"
    if damaged == "state.json":
        damage(newest / damaged, offset=1, length=8, byte=ord("}"))
    elif damaged == "model.safetensors":
        damage(newest / damaged, offset=_weights_offset(newest / damaged) + 64, length=64)
    else:
        truncate(newest / damaged)
    capsys.readouterr()
    assert cli.main(["train", "--config", str(run_copy / "cfg.json"), "--resume", "latest", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert f"warning: skipping damaged checkpoint {newest}: " in captured.err and str(newest / damaged) in captured.err
    assert "step-0000002 at step 2" in captured.out
    rows = _strict_rows(run_copy / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # steps 3, 4 were replayed, logged once


def test_every_checkpoint_damaged_is_one_line(run_copy, capsys):
    for folder in (run_copy / "run" / "checkpoints").iterdir():
        truncate(folder / "ema.safetensors")
    rc, line = run(capsys, "train", "--config", run_copy / "cfg.json", "--resume", "latest", "--no-progress")
    assert rc == 2 and "every checkpoint in" in line and "is damaged" in line


def test_metrics_after_a_crash_and_resume_hold_each_step_once(run_copy, capsys, monkeypatch):
    """A crash after step 5 (checkpoint at 4) replays step 5 on resume; the log keeps one row."""
    import latentdit.train as T

    original = T._periodic

    def crash(cfg, acc, model, ema, opt, state, *rest):
        original(cfg, acc, model, ema, opt, state, *rest)
        if state.step == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(T, "_periodic", crash)
    assert cli.main(["train", "--config", str(run_copy / "cfg.json"), "--resume", "latest", "--no-progress"]) == 130
    with (run_copy / "run" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "lo')  # a line the kill cut short
    monkeypatch.setattr(T, "_periodic", original)
    assert cli.main(["train", "--config", str(run_copy / "cfg.json"), "--resume", "latest", "--no-progress"]) == 0
    assert [r["step"] for r in _strict_rows(run_copy / "run" / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_divergence_is_one_line_and_metrics_stay_strict_json(run_copy, capsys, monkeypatch):
    import latentdit.train as T

    original = T._batches

    def nan_batches(*a):
        for batch in original(*a):
            batch.latents = batch.latents * float("nan")
            yield batch

    monkeypatch.setattr(T, "_batches", nan_batches)
    cfg = json.loads((run_copy / "cfg.json").read_text())
    cfg.update(max_bad_steps=2, out=str(run_copy / "fresh"))
    (run_copy / "cfg.json").write_text(json.dumps(cfg))
    rc, line = run(capsys, "train", "--config", run_copy / "cfg.json", "--no-progress")
    assert rc == 1 and line.startswith("latentdit train: error: TrainingDiverged: 2 non-finite steps in a row")
    rows = _strict_rows(run_copy / "fresh" / "metrics.jsonl")
    assert rows and all(r["loss"] is None and r["grad_norm"] is None for r in rows)


@pytest.mark.parametrize("how", ["truncate", "ff"])
def test_export_from_a_damaged_ema_names_it_and_falls_back(run_copy, capsys, how):
    ema = run_copy / "run" / "checkpoints" / "step-0000004" / "ema.safetensors"
    truncate(ema) if how == "truncate" else damage(ema, offset=_weights_offset(ema), length=256)
    out = run_copy / "exported"
    rc, line = run(capsys, "export", "--run", run_copy / "run", "--out", out, "--checkpoint",
                   str(ema.parent), "--fp16")
    assert rc == 2 and str(ema) in line and not out.exists()
    assert cli.main(["export", "--run", str(run_copy / "run"), "--out", str(out)]) == 0
    assert f"skipping damaged checkpoint {ema.parent}" in capsys.readouterr().err
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("target", ["manifest.json", "shard-00000.safetensors", "shard-00000.jsonl",
])
def test_damaged_shards_are_named(run_copy, capsys, target):
    file = run_copy / "shards" / target
    damage(file, offset=-64 if target.endswith(".safetensors") else 0, length=16)
    cfg = json.loads((run_copy / "cfg.json").read_text())
    cfg.update(out=str(run_copy / "fresh"))
    (run_copy / "cfg.json").write_text(json.dumps(cfg))
    rc, line = run(capsys, "train", "--config", run_copy / "cfg.json", "--no-progress")
    assert rc == 2 and target in line and ("corrupt" in line or "not valid JSON" in line or "truncated" in line)


def test_corrupt_training_config_file_is_named(tmp_path, capsys):
    bad = tmp_path / "cfg.json"
    bad.write_bytes(b'{"steps": \xff\xff}')
    rc, line = run(capsys, "train", "--config", bad, "--data", tmp_path)
    assert rc == 2 and str(bad) in line


def test_damaged_autoencoder_checkpoint_is_named(tmp_path, capsys):
    out = tmp_path / "ae"
    assert cli.main(["train-ae", "--out", str(out), "--steps", "1", "--batch_size", "2", "--image_size", "16",
                     "--no-progress"]) == 0
    ckpt = out / "checkpoints" / "step-0000001" / "model.safetensors"
    truncate(ckpt)
    capsys.readouterr()
    rc = cli.main(["train-ae", "--out", str(out), "--steps", "2", "--batch_size", "2", "--image_size", "16",
                   "--no-progress"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert rc == 2 and "Traceback" not in err and len(errors) == 1
    assert str(out / "checkpoints") in errors[0] and "damaged" in errors[0]
    assert f"warning: skipping damaged checkpoint {ckpt.parent}: checkpoint file {ckpt}" in err


def test_corrupt_captions_index_is_named(tmp_path, capsys):
    src = tmp_path / "images"
    src.mkdir()
    (src / "captions.jsonl").write_bytes(b'{"file": "a.png", "caption": "x"}\n\xff\xfe\n')
    rc, line = run(capsys, "preprocess", "--source", src, "--out", tmp_path / "shards")
    assert rc == 2 and str(src / "captions.jsonl") in line


def test_corrupt_eval_prompts_are_named_before_the_model_loads(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b'{"prompt": "a red circle", "expect": {}}\n\xff\n')
    rc, line = run(capsys, "eval", "alignment", "--prompts", prompts, "--model", tmp_path / "missing")
    assert rc == 2 and str(prompts) in line and "not UTF-8" in line


def test_damaged_inversion_file_is_named(tmp_path):
    from latentdit.edit import Inversion

    file = tmp_path / "inv.safetensors"
    Inversion(torch.zeros(1, 4, 2, 2), torch.linspace(0, 1, 3), "a", "ddim").save(file)
    truncate(file)
    with pytest.raises(ValueError, match=f"{file} is not a readable inversion file"):
        Inversion.load(file)
