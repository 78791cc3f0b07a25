"""Training: loss goes down, resume is exact, NaNs are skipped, multi-process agrees, end to end."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny import in_corners_only

from latentdit.config import to_dict
from latentdit.train import train
from latentdit.train_config import TrainConfig, make_config, recipe_dict

SIZE = 16  # shapes canvas; identity autoencoder -> 3x16x16 latents


@pytest.fixture(scope="module")
def minilm():
    from latentdit.text import load_text_encoder

    return load_text_encoder("minilm", max_length=24)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, minilm):
    from latentdit.data import preprocess
    from latentdit.sources import shapes_source
    from latentdit.vae import load_autoencoder

    out = tmp_path_factory.mktemp("shards")
    preprocess(shapes_source(192, size=SIZE), out, autoencoder=load_autoencoder("identity"),
               text_encoder=minilm, n=192, shard_size=64, progress=False)
    return out


def _config(shards, out, **over) -> TrainConfig:
    base = recipe_dict("tiny")
    base["model"].update(in_channels=3, text_dim=384, pooled_dim=384, max_text_len=24, base_size=SIZE,
                         patch_size=4)
    data = {**base, "data": str(shards), "out": str(out), "steps": 30, "batch_size": 8,
            "log_every": 1, "preview_every": 0, "checkpoint_every": 10, "ema_decay": 0.9,
            "optim": {"lr": 2e-3, "warmup_steps": 5}, **over}
    return make_config(data)


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_short_training_lowers_loss_and_ema_differs(shards, tmp_path):
    result = train(_config(shards, tmp_path), progress=False)
    losses = [row["loss"] for row in result["history"]]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    ckpt = tmp_path / "checkpoints" / "step-0000030"
    raw, ema = load_file(ckpt / "model.safetensors"), load_file(ckpt / "ema.safetensors")
    assert any(not torch.allclose(raw[k], ema[k]) for k in ema)
    exported = load_file(Path(result["model"]) / "model.safetensors")
    assert all(torch.equal(exported[k], ema[k]) for k in ema)


def test_resume_is_exact(shards, tmp_path):
    kw = dict(steps=12, mixed_precision="no", checkpoint_every=100, keep_checkpoints=2)
    full = tmp_path / "full"
    train(_config(shards, full, **kw), progress=False)
    part = tmp_path / "part"
    first = train(_config(shards, part, **kw), progress=False, stop_after=5)
    assert first["step"] == 5 and not (part / "model").exists()
    train(_config(shards, part, **kw), resume="latest", progress=False)
    assert _losses(part) == _losses(full)  # bit-exact: the generator state is in the checkpoint
    a = load_file(full / "checkpoints" / "step-0000012" / "model.safetensors")
    b = load_file(part / "checkpoints" / "step-0000012" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ea = load_file(full / "model" / "model.safetensors")
    eb = load_file(part / "model" / "model.safetensors")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    from safetensors import safe_open

    with safe_open(str(part / "checkpoints" / "step-0000005" / "rng-rank0.safetensors"), "pt") as f:
        assert f.metadata() == {"device": "cpu"}  # the generator's device: its state fits only there
    # retention: only the newest checkpoints are kept
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["step-0000005", "step-0000012"]


def test_sync_free_loop_resumes_exactly_and_still_skips_and_stops(shards, tmp_path, monkeypatch):
    """The accelerator loop (checks kept on the device, skip inside the fused optimiser, gated
    EMA, counters read at log time), run on the CPU: exactly resumable, and a non-finite batch
    is skipped while an endless run of them stops the run at a logging step."""
    import latentdit.train as T

    monkeypatch.setattr(T, "_sync_free", lambda acc: True)
    kw = dict(steps=8, mixed_precision="no", checkpoint_every=100, log_every=1)
    full, part = tmp_path / "full", tmp_path / "part"
    train(_config(shards, full, **kw), progress=False)
    train(_config(shards, part, **kw), progress=False, stop_after=3)
    train(_config(shards, part, **kw), resume="latest", progress=False)
    assert _losses(part) == _losses(full)
    a = load_file(full / "model" / "model.safetensors")
    b = load_file(part / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    _poison(monkeypatch, {3})
    result = train(_config(shards, tmp_path / "nan", **kw), progress=False)
    assert result["skipped_steps"] == 1
    assert all(torch.isfinite(w).all() for w in load_file(Path(result["model"]) / "model.safetensors").values())
    _poison(monkeypatch, set(range(100)))
    with pytest.raises(RuntimeError, match="4 non-finite steps in a row by step 4"):  # read every 2 steps
        train(_config(shards, tmp_path / "div", **{**kw, "max_bad_steps": 3, "log_every": 2}), progress=False)


def test_resume_with_another_architecture_is_refused_clearly(shards, tmp_path):
    kw = dict(steps=6, mixed_precision="no", checkpoint_every=100)
    train(_config(shards, tmp_path, **kw), progress=False, stop_after=3)
    other = _config(shards, tmp_path, **kw)
    other.model.cross_norm = True
    with pytest.raises(ValueError, match="different architecture.*options the run started with"):
        train(other, resume="latest", progress=False)


def test_export_reads_a_run_state_written_before_cross_norm_and_gelu(shards, tmp_path):
    """A state.json from before format 2 has no cross_norm/gelu: they meant True and "tanh"."""
    kw = dict(steps=3, mixed_precision="no", checkpoint_every=100)
    cfg = _config(shards, tmp_path / "run", **kw)
    cfg.model.cross_norm, cfg.model.gelu = True, "tanh"
    train(cfg, progress=False)
    state = tmp_path / "run" / "checkpoints" / "step-0000003" / "state.json"
    info = json.loads(state.read_text())
    for key in ("cross_norm", "gelu"):
        del info["config"]["model"][key]
    state.write_text(json.dumps(info))
    r = _cli("export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "exported"))
    assert r.returncode == 0, r.stderr
    model = json.loads((tmp_path / "exported" / "config.json").read_text())["model"]
    assert (model["cross_norm"], model["gelu"]) == (True, "tanh")


def _poison(monkeypatch, bad_steps):
    import latentdit.train as T

    original = T._batches

    def batches(reader, cfg, acc, step):
        for i, batch in enumerate(original(reader, cfg, acc, step), start=step):
            if i in bad_steps:
                batch.latents = batch.latents.clone()
                batch.latents[0, 0, 0, 0] = float("nan")
            yield batch

    monkeypatch.setattr(T, "_batches", batches)


def test_nan_batch_is_skipped_and_counted(shards, tmp_path, monkeypatch):
    _poison(monkeypatch, {3})
    result = train(_config(shards, tmp_path, steps=8), progress=False)
    assert result["step"] == 8 and result["skipped_steps"] == 1
    weights = load_file(Path(result["model"]) / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_diverging_run_stops_with_clear_message(shards, tmp_path, monkeypatch):
    _poison(monkeypatch, set(range(100)))
    with pytest.raises(RuntimeError, match="non-finite steps in a row"):
        train(_config(shards, tmp_path, steps=8, max_bad_steps=3), progress=False)


def test_wrong_text_width_is_a_clear_error(shards, tmp_path):
    cfg = _config(shards, tmp_path)
    cfg.model.text_dim = 32
    with pytest.raises(ValueError, match="text_dim = 32"):
        train(cfg, progress=False)


def test_objectives_train(shards, tmp_path):
    from latentdit.train_config import OBJECTIVES

    for objective in ("tld", "dit"):
        diffusion, model_fields = OBJECTIVES[objective]
        model = {**to_dict(_config(shards, tmp_path).model), **model_fields}
        cfg = _config(shards, tmp_path / objective, steps=3, diffusion=diffusion, model=model)
        assert train(cfg, progress=False)["step"] == 3


def test_recipe_density_applies_to_its_own_objective_only():
    """shapes-small mixes uniform times into logit-normal; asking it for the TLD objective (the
    equal-compute comparison) must give TLD's own Beta(1, 2.5), and shapes-tld likewise."""
    assert recipe_dict("shapes-small")["diffusion"]["time_density"] == "0.9*logit-normal(0, 1) + 0.1*uniform"
    assert recipe_dict("shapes-small", "tld")["diffusion"]["time_density"] == "beta(1, 2.5)"
    assert recipe_dict("shapes-tld")["diffusion"]["time_density"] == "beta(1, 2.5)"
    assert recipe_dict("tiny")["diffusion"]["time_density"] == "logit-normal(0, 1)"
    assert make_config({**recipe_dict("shapes-small"), "data": "d", "out": "o"}).diffusion.path == "flow"


def _cli(*args, cwd=None, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "latentdit", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=600)


def test_preprocess_train_export_generate_end_to_end(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    r = _cli("preprocess", "--source", "shapes", "--n", "64", "--size", str(SIZE), "--out", str(data),
             "--max-length", "24", "--shard-size", "32", "--no-progress")
    assert r.returncode == 0, r.stderr
    r = _cli("train", "--preset", "tiny", "--data", str(data), "--out", str(run), "--steps", "4",
             "--batch_size", "8", "--model.in_channels", "3", "--model.text_dim", "384",
             "--model.pooled_dim", "384", "--model.base_size", str(SIZE), "--preview_every", "2",
             "--no-progress")
    assert r.returncode == 0, r.stderr
    assert (run / "previews" / "step-0000002.png").exists()
    r = _cli("export", "--run", str(run), "--out", str(tmp_path / "exported"), "--fp16")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "img.png"
    r = _cli("generate", "a red circle", "--model", str(tmp_path / "exported"), "--out", str(out),
             "--steps", "3", "--num-images", "2")
    assert r.returncode == 0, r.stderr
    for k in range(2):
        img = Image.open(tmp_path / f"img_{k}.png")
        assert img.size == (SIZE, SIZE) and img.mode == "RGB"
    (tmp_path / "p.jsonl").write_text('{"id": "red", "prompt": "a red circle"}\n\n{"prompt": "two blue stars"}\n')
    (tmp_path / "p.txt").write_text("a red circle\n\nthree green hearts\n")
    for name, expected in (("p.jsonl", {"red_0.png", "red_1.png", "3_0.png", "3_1.png"}),
                           ("p.txt", {"1_0.png", "1_1.png", "3_0.png", "3_1.png"})):
        r = _cli("generate", "--from-file", str(tmp_path / name), "--model", str(tmp_path / "exported"),
                 "--out", str(tmp_path / name.replace(".", "_")), "--steps", "2", "--num-images", "2")
        assert r.returncode == 0, r.stderr
        assert {p.name for p in (tmp_path / name.replace(".", "_")).iterdir()} == expected


def test_cli_override_typo_names_nearest_key(tmp_path):
    r = _cli("train", "--preset", "tiny", "--data", "x", "--model.deph", "3", "--print-config")
    assert r.returncode == 2 and "did you mean 'depth'" in r.stderr
    r = _cli("train", "--preset", "tiny", "--optim.lr", "1e-4", "--print-config")
    assert r.returncode == 0 and json.loads(r.stdout)["optim"]["lr"] == 1e-4


@pytest.mark.parametrize("cmd", ["info", "generate", "shapes", "preprocess", "train", "train-ae", "export"])
def test_every_subcommand_help(cmd):
    from latentdit.cli import main

    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0


def test_two_process_data_parallel_training_agrees(shards, tmp_path):
    pytest.importorskip("accelerate")
    cfg = _config(shards, tmp_path / "ddp", steps=4, mixed_precision="no", checkpoint_every=4)
    (tmp_path / "cfg.json").write_text(json.dumps(to_dict(cfg)))
    runner = tmp_path / "run.py"
    runner.write_text(
        "import json, sys\n"
        "import torch\n"
        "from accelerate import PartialState\n"
        "from safetensors.torch import save_file\n"
        "import latentdit.train as T\n"
        "from latentdit.train_config import make_config\n"
        "captured = {}\n"
        "original = T._finish\n"
        "def finish(cfg, acc, model, ema, reader, state, log):\n"
        "    captured.update({k: v.detach().clone() for k, v in T._unwrap(model).state_dict().items()})\n"
        "    return original(cfg, acc, model, ema, reader, state, log)\n"
        "T._finish = finish\n"
        "cfg = make_config(json.load(open(sys.argv[1])))\n"
        "T.train(cfg, progress=False)\n"
        "save_file(captured, sys.argv[2] + f'/rank{PartialState().process_index}.safetensors')\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        str(runner), str(tmp_path / "cfg.json"), str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    start = load_file(tmp_path / "ddp" / "checkpoints" / "step-0000004" / "model.safetensors")
    assert all(torch.equal(start[k], a[k]) for k in a)


def test_accelerate_launch_module_entry_point(shards, tmp_path):
    """`accelerate launch -m latentdit train ...` runs the CLI on every rank and exports once."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                        "-m", "latentdit", "train", "--preset", "tiny", "--data", str(shards),
                        "--out", str(tmp_path / "run"), "--steps", "2", "--batch_size", "4",
                        "--model.in_channels", "3", "--model.text_dim", "384", "--model.pooled_dim", "384",
                        "--model.max_text_len", "24", "--model.base_size", str(SIZE), "--model.patch_size", "4",
                        "--preview_every", "0", "--no-progress"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "run" / "model" / "model.safetensors").exists()
    assert (tmp_path / "run" / "checkpoints" / "step-0000002" / "rng-rank1.safetensors").exists()


def test_inpainting_variant_trains_from_the_base_weights(shards, tmp_path):
    """A variant fine-tuned from a base model: starts from its weights, learns (the mask channels
    leave zero), and samples from nothing with the pipeline."""
    from latentdit.inpainting import masked_condition
    from latentdit.pipeline import Text2Image

    base = train(_config(shards, tmp_path / "base", steps=10), progress=False)
    cfg = _config(shards, tmp_path / "inpaint", steps=10, init_from=base["model"])
    cfg.model.extra_in_channels = cfg.model.in_channels + 1
    result = train(cfg, progress=False)
    pipe = Text2Image.from_pretrained(result["model"])
    extra = pipe.model.patch.weight[:, cfg.model.in_channels:]
    assert extra.abs().sum() > 0  # the mask channels were trained
    image = pipe("a red circle", steps=2, output_type="tensor", progress=False)
    assert image.shape == (1, 3, SIZE, SIZE) and torch.isfinite(image).all()
    x = torch.randn(1, 3, SIZE, SIZE)
    box = torch.zeros(1, 1, SIZE, SIZE)
    box[..., 4:12, 4:12] = 1
    cond = masked_condition(x, box)
    assert torch.equal(cond[:, :3], x * (1 - box)) and torch.equal(cond[:, 3:], box)


def test_unknown_extra_channels_are_refused(shards, tmp_path):
    cfg = _config(shards, tmp_path, steps=2)
    cfg.model.extra_in_channels = 2
    with pytest.raises(ValueError, match="inpainting"):
        train(cfg, progress=False)


def test_fine_tuning_from_another_architecture_names_the_difference(shards, tmp_path):
    """No trained weight is silently dropped: a different option (here the cross-attention norm,
    whose weights the new model would not have) is refused with the flag that fixes it."""
    base = train(_config(shards, tmp_path / "base", steps=2), progress=False)
    cfg = _config(shards, tmp_path / "ft", steps=2, init_from=base["model"])
    cfg.model.cross_norm = not cfg.model.cross_norm
    with pytest.raises(ValueError, match=r"cannot fine-tune .*--model\.cross_norm"):
        train(cfg, progress=False)
    cfg.model.cross_norm = not cfg.model.cross_norm
    train(cfg, progress=False)  # the same architecture starts from the base weights


def test_a_text_refiner_grown_from_a_base_starts_as_the_base_and_trains(shards, tmp_path):
    """--model.text_refiner on a base without one: the base weights are copied, the new blocks start
    as identities (same predictions as the base), and training moves them. Shrinking is refused."""
    from latentdit.checkpoint import load_denoiser
    from latentdit.model import Denoiser
    from latentdit.train import load_init_weights

    base = train(_config(shards, tmp_path / "base", steps=2), progress=False)
    cfg = _config(shards, tmp_path / "ft", steps=3, init_from=base["model"])
    cfg.model.text_refiner = 2
    grown = Denoiser(cfg.model)
    load_init_weights(grown, base["model"])
    plain = load_denoiser(base["model"])[0].float().eval()
    x, t = torch.randn(2, 3, SIZE, SIZE), torch.rand(2)
    text, mask, pooled = torch.randn(2, 24, 384), torch.ones(2, 24, dtype=torch.bool), torch.randn(2, 384)
    mask[1, 5:] = False
    with torch.no_grad():
        torch.testing.assert_close(grown.eval()(x, t, text, mask, pooled), plain(x, t, text, mask, pooled))
    result = train(cfg, progress=False)
    trained = load_denoiser(result["model"])[0]
    assert trained.config.text_refiner == 2
    assert trained.text_pos.abs().sum() > 0 and trained.text_refiner[1].mlp.fc2.weight.abs().sum() > 0
    # the refiner reads the text, so swapping a text encoder (train_only text) relearns it
    again = train(_config(shards, tmp_path / "text", steps=2, init_from=result["model"], train_only=("text",),
                          model={**dataclasses.asdict(cfg.model)}), progress=False)
    before = load_file(Path(result["model"]) / "model.safetensors")
    after = load_file(Path(again["model"]) / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {"text_pos", "text_refiner.0.attn.qkv.weight"} <= changed
    assert not any(k.startswith("blocks.") and ".cross." not in k for k in changed)
    back = _config(shards, tmp_path / "back", steps=2, init_from=result["model"])
    with pytest.raises(ValueError, match="text_refiner.* is not in the new model"):
        train(back, progress=False)


@pytest.mark.slow
def test_shapes_recipe_script_runs_every_stage(tmp_path):
    """recipes/shapes.sh at toy sizes: every stage's flags still parse, the exported model loads
    for evaluation, each stage reports its time, and a second run resumes instead of redoing."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RUN": str(tmp_path / "run"), "N": "64", "AE_STEPS": "2",
           "STEPS": "2", "CYCLES": "2:48:0 2:40:1+2:1.5", "DECODER_CYCLES": "2:5e-4:7 2:2.5e-4:8", "EVAL_N": "2",
           "DEST": str(tmp_path / "model"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    r = subprocess.run(["bash", str(root / "recipes" / "shapes.sh")], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    stages = [line.split(":")[0] for line in r.stdout.splitlines() if line.startswith("[recipe]")]
    assert stages == [f"[recipe] {s}" for s in ("autoencoder", "preprocess", "denoiser", "export", "preprocess2",
                                                "cycle2", "export2", "preprocess3-1", "preprocess3-2", "cycle3",
                                                "export3", "decoder1", "decoder2", "swap-decoder", "eval")]
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    assert report["prompts"] == 2 and report["samples_per_prompt"] == 4
    trained = json.loads((tmp_path / "model" / "config.json").read_text())
    assert trained["diffusion"]["time_density"] == "0.9*logit-normal(0, 1) + 0.1*uniform"
    assert trained["sampling"]["guidance_interval"] == [0.3, 0.9]
    # The last cycle is two fine-tunes side by side (fresh scenes of seeds 1 and 2, with its object
    # weight) from the second cycle's model, which came from the first's; the model is their mean.
    assert trained["extra"]["train"]["data"].endswith("shards3-1")
    assert [Path(m).name for m in trained["extra"]["average"]["models"]] == ["cycle3-1", "cycle3-2"]
    def run_config(name):
        state = tmp_path / "run" / name / "checkpoints" / "step-0000002" / "state.json"
        return json.loads(state.read_text())["config"]

    assert run_config("train2")["object_weight"] == 0
    for tag in ("3-1", "3-2"):
        assert run_config(f"train{tag}")["object_weight"] == 1.5
        assert run_config(f"train{tag}")["init_from"] == str(tmp_path / "run" / "cycle2")
    assert all((tmp_path / "run" / f"cycle{k}" / "config.json").exists() for k in (1, 2))
    # the model's autoencoder: the recipe's encoder (which made every shard) and the decoder of the
    # last decoder cycle, which went on from the first's
    packaged, first, tuned = (load_file(p / "diffusion_pytorch_model.safetensors") for p in
                              (tmp_path / "model" / "vae", tmp_path / "run" / "ae" / "autoencoder",
                               tmp_path / "run" / "decoder2" / "autoencoder"))
    decoder_run = [json.loads((tmp_path / "run" / f"decoder{d}" / "checkpoints" / "step-0000002" / "state.json")
                              .read_text())["config"] for d in (1, 2)]
    assert [(c["init_from"], c["lr"], c["seed"]) for c in decoder_run] == [
        (str(tmp_path / "run" / "ae" / "autoencoder"), 5e-4, 7),
        (str(tmp_path / "run" / "decoder1" / "autoencoder"), 2.5e-4, 8)]
    assert all(torch.equal(packaged[k], (tuned if k.startswith(("decoder.", "post_quant_conv.")) else first)[k])
               for k in packaged)
    assert not torch.equal(packaged["decoder.conv_out.weight"], first["decoder.conv_out.weight"])
    def captions(tag):
        shard = tmp_path / "run" / f"shards{tag}" / "shard-00000.jsonl"
        return [json.loads(line)["caption"] for line in shard.open()]

    assert len(captions("3-1")) == 40 and len({tuple(captions(t)[:40]) for t in ("2", "3-1", "3-2")}) == 3
    weights = (tmp_path / "run" / "train" / "checkpoints" / "step-0000002" / "model.safetensors").read_bytes()
    r = subprocess.run(["bash", str(root / "recipes" / "shapes.sh")], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step-0000003" not in os.listdir(tmp_path / "run" / "train" / "checkpoints")
    assert (tmp_path / "run" / "train" / "checkpoints" / "step-0000002" / "model.safetensors").read_bytes() == weights


@pytest.mark.parametrize("sync_free", [False, True])
def test_a_skipped_step_leaves_weights_and_ema_exactly_as_they_were(shards, tmp_path, monkeypatch, sync_free):
    """The batch of step 3 is non-finite: checkpoint 3 holds the same weights and EMA as
    checkpoint 2, in the host-checked loop and in the accelerator's sync-free one."""
    import latentdit.train as T

    monkeypatch.setattr(T, "_sync_free", lambda acc: sync_free)
    _poison(monkeypatch, {2})
    result = train(_config(shards, tmp_path, steps=4, mixed_precision="no", checkpoint_every=1,
                           keep_checkpoints=10), progress=False)
    assert result["skipped_steps"] == 1
    root = tmp_path / "checkpoints"
    for name in ("model", "ema"):
        before, after, later = (load_file(root / f"step-000000{k}" / f"{name}.safetensors") for k in (2, 3, 4))
        assert all(torch.equal(before[k], after[k]) for k in before), name
        assert not all(torch.equal(after[k], later[k]) for k in after), name  # step 4 trained again


def test_object_weights_favour_cells_that_differ_from_the_background():
    from latentdit.train import object_weights

    x0 = torch.full((2, 4, 8, 8), 0.3)
    x0[0, :, 2:4, 5:7] = torch.tensor([2.0, -1.0, 0.5, 1.0])[:, None, None]  # one object in image 0
    w = object_weights(x0, 3.0)
    assert w.shape == (2, 1, 8, 8)
    assert w.mean().item() == pytest.approx(1.0)
    obj, bg = w[0, 0, 2:4, 5:7], w[0, 0].clone()
    bg[2:4, 5:7] = float("nan")
    assert torch.allclose(obj, obj[0, 0]) and obj[0, 0] / bg.nanmean() == pytest.approx(4.0)
    assert torch.allclose(w[1], w[1, 0, 0, 0].expand_as(w[1]))  # a uniform image: every cell alike
    assert torch.allclose(w[1, 0, 0, 0], bg.nanmean())  # and weighed as background
    both = torch.stack([x0[0], x0[0]])  # the same image at no noise (fade 1) and at pure noise (fade 0)
    faded = object_weights(both, 3.0, torch.tensor([1.0, 0.0]).view(2, 1, 1, 1))
    assert torch.allclose(faded[1], faded[1, 0, 0, 0].expand_as(faded[1]))  # at pure noise: no extra weight
    assert faded[0, 0, 2, 5] / faded[0, 0, 0, 0] == pytest.approx(4.0)


def test_object_weight_changes_the_loss_only_where_objects_are(shards, tmp_path):
    from latentdit.model import Denoiser
    from latentdit.schedules import NoisePath
    from latentdit.shards import ShardReader
    from latentdit.train import diffusion_loss

    batch = next(ShardReader(shards).batches(8, seed=0))
    cfg0, cfg3 = _config(shards, tmp_path), _config(shards, tmp_path, object_weight=3.0)
    model = Denoiser(cfg0.model)

    @torch.no_grad()
    def loss(cfg, b):
        return float(diffusion_loss(model, b, NoisePath("flow"), cfg, torch.Generator().manual_seed(0)))

    assert loss(cfg3, batch) != pytest.approx(loss(cfg0, batch), rel=1e-3)
    faded = _config(shards, tmp_path, object_weight=3.0, object_weight_fade=True)
    assert loss(faded, batch) != pytest.approx(loss(cfg3, batch), rel=1e-4)
    assert loss(faded, batch) != pytest.approx(loss(cfg0, batch), rel=1e-4)
    flat = dataclasses.replace(batch, latents=torch.full_like(batch.latents, 0.2))
    assert loss(cfg3, flat) == pytest.approx(loss(cfg0, flat), rel=1e-6)  # nothing to favour
    with pytest.raises(ValueError, match="object_weight"):
        _config(shards, tmp_path, object_weight=-1.0)


def test_train_only_text_relearns_just_the_text_reading_weights_and_ships_as_a_delta(shards, tmp_path):
    """Swapping a text encoder: only the weights that read the text move; the rest is the base's.
    The result written as a delta holds exactly those weights and loads as the whole model."""
    import fnmatch

    from latentdit.checkpoint import load_config, write_delta
    from latentdit.pipeline import Text2Image
    from latentdit.train import PARAM_GROUPS

    base = train(_config(shards, tmp_path / "base", steps=2), progress=False)["model"]
    result = train(_config(shards, tmp_path / "ft", steps=4, init_from=base, train_only=("text",)),
                   progress=False)["model"]
    before = load_file(Path(base) / "model.safetensors")
    after = load_file(Path(result) / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    reads_text = {k for k in before if any(fnmatch.fnmatchcase(k, p) for p in PARAM_GROUPS["text"])}
    assert changed <= reads_text
    assert {"text_proj.0.weight", "pooled_proj.0.weight", "blocks.0.cross.kv.weight"} <= changed

    delta = write_delta(result, str(Path(base).resolve()), tmp_path / "delta")
    assert set(load_file(delta / "model.safetensors")) == changed
    assert load_config(delta).base == str(Path(base).resolve())
    kw = dict(seed=1, steps=2, output_type="latent", progress=False)
    whole, split = Text2Image.from_pretrained(result), Text2Image.from_pretrained(delta)
    assert torch.equal(whole("a red circle", **kw), split("a red circle", **kw))
    again = train(_config(shards, tmp_path / "again", steps=2, init_from=str(delta), train_only=("text",)),
                  progress=False)["model"]  # a delta is a whole model to fine-tune from
    assert set(load_file(Path(again) / "model.safetensors")) == set(before)
    with pytest.raises(ValueError, match="no delta to write"):
        write_delta(base, str(Path(base).resolve()), tmp_path / "same")
    with pytest.raises(ValueError, match="already a delta"):
        write_delta(delta, str(Path(base).resolve()), tmp_path / "twice")
    with pytest.raises(ValueError, match=r"match no parameter"):
        train(_config(shards, tmp_path / "bad", steps=2, init_from=base, train_only=("nope.*",)), progress=False)
    with pytest.raises(ValueError, match="train_only .* needs init_from"):
        _config(shards, tmp_path / "bad", steps=2, train_only=("text",))


def test_lora_fine_tune_stores_its_updates_as_factors_and_resumes_exactly(shards, tmp_path):
    """lora_rank: the base weights stay init_from's (but those train_only names, which train beside
    the adapters); the export stores each update as two factors beside its weight and loads as
    W + B @ A; a delta of it holds only the factors and the tuned weights; resume is exact."""
    import fnmatch

    from latentdit.checkpoint import load_denoiser, write_delta
    from latentdit.lora import ATTENTION_TARGETS
    from latentdit.pipeline import Text2Image

    base = train(_config(shards, tmp_path / "base", steps=2), progress=False)["model"]
    kw = dict(steps=4, init_from=base, lora_rank=2, lora_alpha=4.0, train_only=("blocks.*.bias",),
              mixed_precision="no", checkpoint_every=100)
    result = train(_config(shards, tmp_path / "ft", **kw), progress=False)["model"]
    before = load_file(Path(base) / "model.safetensors")
    after = load_file(Path(result) / "model.safetensors")
    factors = {k for k in after if k.endswith((".lora_A", ".lora_B"))}
    depth = 1 + max(int(k.split(".")[1]) for k in before if k.startswith("blocks."))
    assert factors == {f"blocks.{i}.{t}.weight.lora_{x}" for i in range(depth) for t in ATTENTION_TARGETS
                       for x in "AB"}
    assert set(after) - factors == set(before)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    tuned = {k for k in before if fnmatch.fnmatchcase(k, "blocks.*.bias")}
    assert changed and changed <= tuned and "blocks.0.attn.qkv.bias" in changed  # an adapted layer's bias too
    a, b = after["blocks.0.attn.qkv.weight.lora_A"], after["blocks.0.attn.qkv.weight.lora_B"]
    assert a.shape == (2, before["blocks.0.attn.qkv.weight"].shape[1]) and b.abs().sum() > 0
    loaded = load_denoiser(result)[0].state_dict()["blocks.0.attn.qkv.weight"]
    assert torch.allclose(loaded, after["blocks.0.attn.qkv.weight"] + b @ a, atol=1e-6)
    assert not torch.allclose(loaded, after["blocks.0.attn.qkv.weight"], atol=1e-6)

    delta = write_delta(result, str(Path(base).resolve()), tmp_path / "delta")
    assert set(load_file(delta / "model.safetensors")) == factors | changed
    gen = dict(seed=1, steps=2, output_type="latent", progress=False)
    whole, split = Text2Image.from_pretrained(result), Text2Image.from_pretrained(delta)
    assert torch.equal(whole("a red circle", **gen), split("a red circle", **gen))
    again = train(_config(shards, tmp_path / "again", steps=2, init_from=str(delta), train_only=("final.*",)),
                  progress=False)["model"]  # fine-tuning from it starts at the merged weights
    assert set(load_file(Path(again) / "model.safetensors")) == set(before)

    part = tmp_path / "part"
    train(_config(shards, part, **kw), progress=False, stop_after=2)
    train(_config(shards, part, **kw), resume="latest", progress=False)
    resumed = load_file(part / "model" / "model.safetensors")
    assert set(resumed) == set(after) and all(torch.equal(resumed[k], after[k]) for k in after)
    with pytest.raises(ValueError, match="lora_rank .* needs init_from"):
        _config(shards, tmp_path / "bad", lora_rank=2)
    with pytest.raises(ValueError, match="lora_rank must be"):
        _config(shards, tmp_path / "bad", init_from=base, lora_rank=-1)
    with pytest.raises(ValueError, match="match no linear layer"):
        train(_config(shards, tmp_path / "bad", steps=2, init_from=base, lora_rank=2, lora_targets=("nope",)),
              progress=False)


def test_a_delta_on_another_architecture_or_a_missing_base_is_refused(shards, tmp_path):
    from latentdit.checkpoint import write_delta
    from latentdit.pipeline import Text2Image

    base = train(_config(shards, tmp_path / "base", steps=2), progress=False)["model"]
    ft = train(_config(shards, tmp_path / "ft", steps=2, init_from=base, train_only=("text_proj.*",)),
               progress=False)["model"]
    other_cfg = _config(shards, tmp_path / "other", steps=2)
    other_cfg.model.cross_norm = not other_cfg.model.cross_norm
    other = train(other_cfg, progress=False)["model"]
    with pytest.raises(ValueError, match="another architecture"):
        write_delta(ft, str(Path(other).resolve()), tmp_path / "d1")
    delta = write_delta(ft, str(Path(base).resolve()), tmp_path / "d2")
    Text2Image.from_pretrained(delta)  # its base as it was made on
    import shutil

    keep = tmp_path / "base.safetensors"
    shutil.copy(Path(base) / "model.safetensors", keep)
    weights = load_file(keep)
    weights["final.weight"] = weights["final.weight"] + 1e-3  # a weight the delta does not replace
    save_file(weights, Path(base) / "model.safetensors")
    with pytest.raises(ValueError, match="now holds other weights than those it was made on"):
        Text2Image.from_pretrained(delta)
    weights = load_file(keep)
    weights["text_proj.0.weight"] = weights["text_proj.0.weight"] + 1e-3  # one it does replace
    save_file({k: v.half() for k, v in weights.items()}, Path(base) / "model.safetensors")
    with pytest.raises(ValueError, match="now holds other weights"):  # fp16 is another base too
        Text2Image.from_pretrained(delta)
    save_file(weights, Path(base) / "model.safetensors")
    Text2Image.from_pretrained(delta)
    shutil.rmtree(base)
    with pytest.raises(ValueError, match="neither a folder nor a hub id|does not exist|not a latentdit model"):
        Text2Image.from_pretrained(delta)


def _delta_recipe_stages(root: Path, name: str, tmp_path: Path, **sizes: str) -> list[str]:
    """Run a recipe that makes a delta on the packaged base at toy sizes (more in ``sizes``);
    -> its stages in order."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RUN": str(tmp_path / "run"), "N": "32", "STEPS": "2",
           "EVAL_N": "2", "AE": str(root / "latentdit" / "weights" / "shapes" / "vae"), **sizes,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    r = subprocess.run(["bash", str(root / "recipes" / name)], capture_output=True, text=True,
                       env=env, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return [line.split(":")[0].removeprefix("[recipe] ") for line in r.stdout.splitlines()
            if line.startswith("[recipe]")]


def test_layout_recipe_script_runs_every_stage(tmp_path):
    """recipes/shapes_layout.sh at toy sizes on the packaged base: grounded shards, the planner
    trained alone in two cycles (the second from the first's export), the denoiser's counting
    fine-tune on distinct count layouts under it, a delta holding the planner, its gains and the
    fine-tuned denoiser weights, and alignment."""
    import fnmatch

    from latentdit.checkpoint import load_config, load_weights
    from latentdit.model import LAYOUT_GAIN_RATE, is_planner_weight

    root = Path(__file__).resolve().parents[1]
    stages = _delta_recipe_stages(root, "shapes_layout.sh", tmp_path, LATER="2:5e-4", COUNT="2")
    assert stages == ["preprocess", "planner", "export", "planner2", "export2", "preprocess-count", "counting",
                      "export-count", "delta", "eval"]
    run = tmp_path / "run"

    def train_config(train: str) -> dict:
        return json.loads((run / train / "checkpoints" / "step-0000002" / "state.json").read_text())["config"]

    second, counting = train_config("train2"), train_config("train-count")
    assert second["init_from"] == str(run / "whole") and second["optim"]["lr"] == 5e-4
    assert counting["init_from"] == str(run / "whole2")
    assert counting["train_only"] and not any("planner" in p for p in counting["train_only"])
    rows = [json.loads(line) for f in sorted((run / "count-shards").glob("*.jsonl"))
            for line in f.read_text().splitlines()]
    assert not any(r["attributes"]["scene"] == "count" and in_corners_only(r["attributes"]["objects"]) for r in rows)
    model = run / "model"
    config = load_config(model)
    assert config.base == "shapes" and config.model.layout_planner
    held, planned, tuned = load_weights(model), load_weights(run / "whole2"), load_weights(run / "whole-count")
    planner = [k for k in held if is_planner_weight(k)]
    denoiser = [k for k in held if k not in planner]
    assert planner and all(torch.equal(held[k], planned[k]) for k in planner)  # the counting run kept it
    assert denoiser and all(any(fnmatch.fnmatchcase(k, p) for p in counting["train_only"]) for k in denoiser)
    assert all(torch.equal(held[k], tuned[k]) for k in denoiser)
    # the gains stay where the recipe starts them (the planner learns from boxes alone)
    gains = [v.float() * LAYOUT_GAIN_RATE for k, v in held.items() if k.endswith(".layout_gain")]
    assert config.model.layout_gain == 1.5 and gains
    assert all(torch.allclose(g, torch.full_like(g, 1.5), atol=1e-3) for g in gains)
    assert config.sampling.count_contrast == 1.5  # the packaged sampling: counted prompts guided from one more
    report = json.loads((run / "eval" / "report.json").read_text())
    assert report["prompts"] == 2 and report["count_contrast"] == 1.5


def test_multilingual_recipe_script_runs_every_stage(tmp_path):
    """recipes/multilingual.sh at toy sizes on the packaged base: bilingual shards, a text-only
    fine-tune, a delta that loads on the base, and alignment in both languages."""
    from latentdit.checkpoint import load_config, load_weights

    root = Path(__file__).resolve().parents[1]
    stages = _delta_recipe_stages(root, "multilingual.sh", tmp_path)
    assert stages == ["preprocess", "finetune", "export", "delta", "eval-en", "eval-zh"]
    model = tmp_path / "run" / "model"
    config = load_config(model)
    assert config.base == "shapes" and config.text_encoder["name"] == "multilingual-e5"
    assert config.sampling.count_contrast == 1.5  # the packaged sampling, in both languages
    base = load_weights(root / "latentdit" / "weights" / "shapes")
    assert not (model / "vae").exists() and set(load_weights(model)) < set(base)
    en, zh = (json.loads((tmp_path / "run" / f"eval-{lang}" / "report.json").read_text()) for lang in ("en", "zh"))
    assert en["count_contrast"] == zh["count_contrast"] == 1.5
    assert [row["id"] for row in en["rows"]] == [row["id"] for row in zh["rows"]]
    assert en["rows"][0]["prompt"] != zh["rows"][0]["prompt"]


@pytest.mark.parametrize("forced, bf16", [("0", False), ("1", True)])
def test_the_result_says_whether_auto_precision_trained_in_bf16(shards, tmp_path, monkeypatch, forced, bf16):
    monkeypatch.setenv("LATENTDIT_BF16", forced)
    result = train(_config(shards, tmp_path, steps=1, mixed_precision="auto", checkpoint_every=100), progress=False)
    assert result["bf16"] is bf16
    assert json.loads((tmp_path / "result.json").read_text())["bf16"] is bf16
