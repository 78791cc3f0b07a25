"""Autoencoder training (latentdit.train_ae): tiny configs, CPU, seconds."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

pytest.importorskip("diffusers")

from latentdit.config import from_dict, to_dict  # noqa: E402
from latentdit.pixels import psnr  # noqa: E402
from latentdit.sources import make_source, train_batch  # noqa: E402
from latentdit.train_ae import (  # noqa: E402
    AEConfig,
    learning_rate,
    norm_groups,
    train_autoencoder,
)

TINY = dict(image_size=32, block_out_channels=(8, 16, 32), batch_size=4, warmup_steps=5, lr=2e-3,
            eval_images=8, scale_batches=2, log_every=1)


def tiny(**kw) -> AEConfig:
    return AEConfig(**{**TINY, **kw})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One 30-step bf16 run shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("ae")
    metrics = train_autoencoder(tiny(steps=30, eval_every=10), out, progress=False)
    return out, metrics


# ----------------------------------------------------------------------------- training


def test_loss_decreases_over_30_steps(run):
    _, metrics = run
    rec = [row["rec"] for row in metrics["log"]]
    assert len(rec) == 30 and all(math.isfinite(r) for r in rec)
    assert sum(rec[-5:]) / 5 < 0.95 * sum(rec[:5]) / 5
    evals = [e["psnr"] for e in metrics["evals"]]
    assert [e["step"] for e in metrics["evals"]] == [10, 20, 30]
    assert evals[-1] > evals[0]


def test_outputs_written(run):
    from PIL import Image

    out, metrics = run
    saved = json.loads((out / "metrics.json").read_text())
    for key in ("psnr", "scaling_factor", "shift_factor", "steps", "seconds"):
        assert saved[key] == pytest.approx(metrics[key])
    assert saved["steps"] == 30 and saved["scaling_factor"] > 0
    with Image.open(out / "reconstructions.png") as grid:  # 8 held-out images: originals, recons
        assert grid.size == (8 * 32, 2 * 32)
    assert (out / "tb").is_dir()
    folder = out / "checkpoints" / "step-0000030"
    assert json.loads((folder / "state.json").read_text())["step"] == 30
    assert (folder / "model.safetensors").exists() and (folder / "optimizer.safetensors").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in metrics["log"]] and rows
    assert all(math.isfinite(r["loss"]) and r["lr"] > 0 for r in rows)


def test_export_loads_in_diffusers_and_latentdit(run):
    from diffusers import AutoencoderKL

    from latentdit.vae import load_autoencoder

    out, metrics = run
    vae = AutoencoderKL.from_pretrained(out / "autoencoder")
    assert vae.config.scaling_factor == pytest.approx(metrics["scaling_factor"])
    assert vae.config.shift_factor == pytest.approx(metrics["shift_factor"])
    ae = load_autoencoder("kl", str(out / "autoencoder"), latent_channels=4, downsample=4)
    assert float(ae.scale) == pytest.approx(metrics["scaling_factor"])
    assert float(ae.shift) == pytest.approx(metrics["shift_factor"])

    cfg = tiny(steps=30)
    source = make_source(cfg)
    x = torch.cat([train_batch(source, k, cfg.batch_size) for k in range(cfg.scale_batches)])
    z = ae.encode(x)  # the statistics were measured on exactly these batches
    assert z.shape == (8, 4, 8, 8)
    assert float(z.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(z.std()) == pytest.approx(1.0, abs=1e-4)

    held = train_batch_heldout(cfg)
    assert float(psnr(ae.decode(ae.encode(held)), held).mean()) == pytest.approx(metrics["psnr"], abs=0.05)


def train_batch_heldout(cfg: AEConfig) -> torch.Tensor:
    from latentdit.pixels import from_pil

    return from_pil(make_source(cfg).heldout)


def test_resume_is_exact(tmp_path):
    """10 steps, 'crash', resume 10 more == 20 steps straight (fp32, so bit-for-bit up to 1e-6)."""
    from safetensors.torch import load_file

    cfg = tiny(steps=20, mixed_precision="no", eval_every=5, checkpoint_every=100)
    first = train_autoencoder(cfg, tmp_path / "a", progress=False, stop_after=10)
    assert first["steps"] == 10 and "psnr" not in first
    assert not (tmp_path / "a" / "autoencoder").exists()
    resumed = train_autoencoder(cfg, tmp_path / "a", progress=False)
    straight = train_autoencoder(cfg, tmp_path / "b", progress=False)
    assert resumed["steps"] == straight["steps"] == 20

    for name in ("model", "optimizer"):
        a, b = (load_file(tmp_path / r / "checkpoints" / "step-0000020" / f"{name}.safetensors") for r in "ab")
        assert a.keys() == b.keys() and a
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    rows = [json.loads(line)["step"] for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert rows == sorted(set(rows))  # each logged step once across the resume
    assert resumed["psnr"] == pytest.approx(straight["psnr"], abs=1e-4)

    with pytest.raises(ValueError, match="different run"):  # a changed recipe must not resume
        train_autoencoder(dataclasses.replace(cfg, lr=1e-2), tmp_path / "a", progress=False)


def test_resume_skips_a_damaged_checkpoint_and_reads_the_old_single_file(tmp_path, capsys):
    """The newest checkpoint truncated: named on stderr, the previous one resumed from, and the
    result is the straight run's. A run saved by earlier versions (one checkpoint.safetensors)
    resumes too, and is replaced by a checkpoint folder."""
    from safetensors.torch import load_file, save_file

    cfg = tiny(steps=12, mixed_precision="no", eval_every=100, checkpoint_every=4)
    straight = train_autoencoder(cfg, tmp_path / "b", progress=False)
    train_autoencoder(cfg, tmp_path / "a", progress=False, stop_after=8)
    newest = tmp_path / "a" / "checkpoints" / "step-0000008" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])
    resumed = train_autoencoder(cfg, tmp_path / "a", progress=False)
    assert str(newest) in capsys.readouterr().err
    assert resumed["psnr"] == pytest.approx(straight["psnr"], abs=1e-4)

    old = tmp_path / "c"
    train_autoencoder(cfg, old, progress=False, stop_after=4)
    folder = old / "checkpoints" / "step-0000004"
    tensors = {f"model.{k}": v for k, v in load_file(folder / "model.safetensors").items()}
    tensors |= {f"optim.{k}": v for k, v in load_file(folder / "optimizer.safetensors").items()}
    state = json.loads((folder / "state.json").read_text())
    save_file(tensors, old / "checkpoint.safetensors", metadata={"state": json.dumps(state)})
    for f in folder.iterdir():
        f.unlink()
    folder.rmdir()
    legacy = train_autoencoder(cfg, old, progress=False)
    assert legacy["psnr"] == pytest.approx(straight["psnr"], abs=1e-4)
    assert not (old / "checkpoint.safetensors").exists() and (old / "checkpoints" / "step-0000012").is_dir()


# ----------------------------------------------------------------------------- decoder fine-tune


def test_decoder_only_fine_tune_keeps_the_latent_space(run, tmp_path):
    """init_from + decoder_only: every encoder weight and the latent statistics stay init_from's
    to the bit (a denoiser trained on its latents reads them unchanged); every decoder weight moves."""
    from diffusers import AutoencoderKL

    out, _ = run
    cfg = tiny(steps=6, eval_every=6, init_from=str(out / "autoencoder"), decoder_only=True, object_weight=4.0,
               seed=3)  # other batches: statistics measured again would differ
    metrics = train_autoencoder(cfg, tmp_path / "d", progress=False)
    before = AutoencoderKL.from_pretrained(out / "autoencoder")
    after = AutoencoderKL.from_pretrained(tmp_path / "d" / "autoencoder")
    old, new = before.state_dict(), after.state_dict()
    assert old.keys() == new.keys()
    for name in old:
        if name.startswith(("decoder.", "post_quant_conv.")):
            assert not torch.equal(old[name], new[name]), f"{name} did not train"
        else:
            assert torch.equal(old[name], new[name]), f"{name} changed"
    assert after.config.scaling_factor == before.config.scaling_factor == metrics["scaling_factor"]
    assert after.config.shift_factor == before.config.shift_factor == metrics["shift_factor"]
    assert all(row["kl"] == 0 for row in metrics["log"])  # no encoder term to train
    saved = json.loads((tmp_path / "d" / "autoencoder" / "config.json").read_text())
    assert "_name_or_path" not in saved  # where init_from lay on this machine is not part of the model


def test_decoder_only_resumes_exactly(run, tmp_path):
    from safetensors.torch import load_file

    out, _ = run
    cfg = tiny(steps=6, mixed_precision="no", eval_every=100, checkpoint_every=100,
               init_from=str(out / "autoencoder"), decoder_only=True)
    train_autoencoder(cfg, tmp_path / "a", progress=False, stop_after=3)
    train_autoencoder(cfg, tmp_path / "a", progress=False)
    train_autoencoder(cfg, tmp_path / "b", progress=False)
    a, b = (load_file(tmp_path / r / "checkpoints" / "step-0000006" / "model.safetensors") for r in "ab")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
    with pytest.raises(ValueError, match="different run"):  # a full run must not resume a decoder one
        train_autoencoder(dataclasses.replace(cfg, decoder_only=False), tmp_path / "a", progress=False)


def test_init_from_names_a_model_or_its_autoencoder(run, tmp_path):
    from latentdit.checkpoint import resolve
    from latentdit.train_ae import autoencoder_folder

    out, _ = run
    assert autoencoder_folder(str(out / "autoencoder")) == str(out / "autoencoder")
    packaged = resolve("shapes") / "vae"
    assert autoencoder_folder("shapes") == str(packaged)
    assert autoencoder_folder("shapes-layout") == str(packaged)  # a delta: its base's autoencoder
    with pytest.raises(ValueError, match="decoder_only trains the decoder of an existing autoencoder"):
        tiny(decoder_only=True)
    with pytest.raises(ValueError, match=r"block_out_channels \(8, 16, 32\) \(config \(16, 32, 64\)\)"):
        train_autoencoder(tiny(block_out_channels=(16, 32, 64), init_from=str(out / "autoencoder")),
                          tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="config.json is missing"):  # neither an autoencoder nor a model
        autoencoder_folder(str(tmp_path))
    with pytest.raises(ValueError, match="image_size 32"):
        train_autoencoder(tiny(image_size=64, init_from=str(out / "autoencoder")), tmp_path / "y", progress=False)


# ----------------------------------------------------------------------------- config and helpers


def test_bad_configs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="needs 4 block_out_channels"):
        AEConfig(downsample=8, block_out_channels=(32, 64, 128))
    with pytest.raises(ValueError, match="needs 3 block_out_channels"):
        AEConfig(downsample=4, block_out_channels=(32, 64, 128, 128))
    with pytest.raises(ValueError, match="multiple of the downsample factor 8"):
        AEConfig(image_size=60, downsample=8, block_out_channels=(8, 8, 8, 8))
    with pytest.raises(ValueError, match="multiples of 8"):
        AEConfig(image_size=36)
    with pytest.raises(ValueError, match="downsample must be 4 or 8"):
        AEConfig(downsample=2, block_out_channels=(8, 16))
    with pytest.raises(ValueError, match="batch_size"):
        AEConfig(batch_size=0)
    with pytest.raises(ValueError, match="not one of"):
        from_dict(AEConfig, {"loss": "l3"})
    with pytest.raises(ValueError, match="unknown key"):
        from_dict(AEConfig, {"downsampel": 8})
    with pytest.raises(ValueError, match="stop_after"):
        train_autoencoder(tiny(), tmp_path, progress=False, stop_after=0)


def test_presets():
    from latentdit.train_ae import ae_preset

    cfg = ae_preset("shapes-fast", steps=10)
    assert cfg.block_out_channels == (16, 32, 64) and cfg.loss == "l2" and cfg.steps == 10
    with pytest.raises(ValueError, match="unknown autoencoder preset"):
        ae_preset("shapes-slow")


def test_config_json_round_trip():
    cfg = AEConfig(downsample=8, block_out_channels=(16, 32, 64, 64), loss="l2", mixed_precision="no")
    data = json.loads(json.dumps(to_dict(cfg)))
    assert from_dict(AEConfig, data) == cfg


def test_psnr_known_values():
    x = torch.zeros(2, 3, 4, 4)
    y = torch.full_like(x, 0.1)  # MSE 0.01 on a range of 2 (images in [-1, 1]): 10 log10(4 / 0.01)
    assert psnr(x, y).tolist() == pytest.approx([10 * math.log10(400)] * 2, abs=1e-4)
    assert float(psnr(x / 2 + 0.5, y / 2 + 0.5, data_range=1.0)[0]) == pytest.approx(26.0206, abs=1e-3)
    y[1] = 1.0  # per-image: MSE 1 -> 10 log10(4) = 6.02 dB
    assert psnr(x, y)[1].item() == pytest.approx(6.0206, abs=1e-3)
    assert torch.isfinite(psnr(x, x)).all()
    with pytest.raises(ValueError, match="same shape|one shape"):
        psnr(x, x[:1])


def test_learning_rate_and_norm_groups():
    cfg = AEConfig(steps=1000, warmup_steps=100, lr=1e-3, min_lr_ratio=0.1)
    assert learning_rate(0, cfg) == pytest.approx(1e-5)
    assert learning_rate(99, cfg) == pytest.approx(1e-3)
    assert learning_rate(1000, cfg) == pytest.approx(1e-4)
    assert norm_groups((32, 64, 128)) == 32 and norm_groups((8, 16, 32)) == 8 and norm_groups((24, 36)) == 12


def test_autoencoder_and_denoiser_follow_one_schedule():
    """Both trainers take their learning rate from the toolkit's warmup_cosine: same settings,
    same rate at every step (warm-up, the middle of the cosine, the floor)."""
    from latentdit import train
    from latentdit.train_config import OptimConfig, TrainConfig

    ae = AEConfig(steps=400, warmup_steps=40, lr=3e-4, min_lr_ratio=0.2)
    den = TrainConfig(steps=400, optim=OptimConfig(lr=3e-4, warmup_steps=40, min_lr_ratio=0.2))
    steps = (0, 20, 39, 40, 150, 220, 399, 400, 500)
    assert [learning_rate(s, ae) for s in steps] == [train.learning_rate(s, den) for s in steps]
    assert learning_rate(220, ae) == pytest.approx(3e-4 * (0.2 + 0.8 * 0.5))  # half-way: the mean


def test_batches_are_a_function_of_the_step():
    cfg = tiny()
    source = make_source(cfg)
    a, b = train_batch(source, 3, 4), train_batch(source, 3, 4)
    assert a.shape == (4, 3, 32, 32) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(train_batch(source, 1, 4)[2:], train_batch(source, 0, 8)[6:])


def test_image_folder_source_holds_out_the_last_images(tmp_path):
    from PIL import Image

    for i in range(12):
        Image.new("RGB", (48, 40), (20 * i, 0, 0)).save(tmp_path / f"{i:02d}.png")
    source = make_source(tiny(data=str(tmp_path), eval_images=4))
    assert source.length == 11 and len(source.heldout) == 1  # a tenth, at least one
    assert source.heldout[0].size == (32, 32) and source.heldout[0].getpixel((5, 5))[0] == 220
    assert source.image(11).getpixel((0, 0)) == source.image(0).getpixel((0, 0))  # wraps, skips held-out
    with pytest.raises(ValueError, match="is none of them"):
        make_source(tiny(data=str(tmp_path / "missing")))


# ----------------------------------------------------------------------------- object weighting


def test_object_mask_marks_the_object_and_its_edge():
    from latentdit.train_ae import object_mask

    x = torch.full((2, 3, 16, 16), 0.8)  # plain light backgrounds
    x[0, :, 5:8, 6:10] = torch.tensor([0.8, -0.9, -0.9])[:, None, None]  # a red block: 3 x 4 pixels
    x[1] = -0.5
    x[1, 2, 12, 3] = 0.9  # one blue pixel on a dark background
    m = object_mask(x)
    assert m.shape == (2, 1, 16, 16)
    expected = torch.zeros(16, 16)
    expected[4:9, 5:11] = 1  # the block grown by one pixel
    assert torch.equal(m[0, 0], expected)
    assert m[1, 0].sum() == 9 and m[1, 0, 11:14, 2:5].sum() == 9
    assert object_mask(torch.full((1, 3, 8, 8), 0.3)).sum() == 0  # no object: no weight


def test_object_weight_weights_only_object_pixels():
    from latentdit.train_ae import ae_losses, build_autoencoder

    torch.manual_seed(0)
    cfg = tiny(mixed_precision="no", loss="l2")
    vae = build_autoencoder(cfg).eval()
    weighted_cfg = dataclasses.replace(cfg, object_weight=9.0)

    def rec(x, c):  # the reconstruction loss, with the same posterior noise every time
        return ae_losses(vae, x, c, torch.Generator().manual_seed(0))[0]

    x = torch.full((1, 3, 32, 32), -1.0)
    assert torch.allclose(rec(x, cfg), rec(x, weighted_cfg))  # a blank image has no object pixels to weight
    x[..., 10:20, 10:20] = 1.0
    assert rec(x, weighted_cfg) > 1.5 * rec(x, cfg)
    with pytest.raises(ValueError, match="object_weight"):
        tiny(object_weight=-1)
