import json

import pytest
import torch
from tiny import tiny_denoiser

from latentdit import checkpoint as ckpt
from latentdit.checkpoint import CheckpointConfig, load_config, load_denoiser, save_pretrained
from latentdit.config import DiffusionConfig, model_preset
from latentdit.model import Denoiser


def _model() -> Denoiser:
    return tiny_denoiser(None, mlp="dwconv").eval()


def _config(model: Denoiser) -> CheckpointConfig:
    return CheckpointConfig(model=model.config, diffusion=DiffusionConfig(path="vp-linear"),
                            text_encoder={"name": "minilm"}, autoencoder={"kind": "identity"})


def _inputs():
    return (torch.randn(2, 4, 16, 16), torch.rand(2), torch.randn(2, 5, 32),
            torch.ones(2, 5, dtype=torch.bool), torch.randn(2, 32))


def test_save_load_is_bit_identical(tmp_path):
    model = _model()
    save_pretrained(model, tmp_path / "m", _config(model))
    loaded, config, folder = load_denoiser(tmp_path / "m")
    args = _inputs()
    assert torch.equal(model(*args), loaded(*args))
    assert config.diffusion.path == "vp-linear" and config.text_encoder == {"name": "minilm"}
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


def test_fp16_save_loads_close(tmp_path):
    model = _model()
    save_pretrained(model, tmp_path / "m", _config(model), dtype=torch.float16)
    loaded, _, _ = load_denoiser(tmp_path / "m")
    args = _inputs()
    assert (model(*args) - loaded(*args)).abs().max() < 1e-2
    assert next(loaded.parameters()).dtype == torch.float32


def test_overwrite_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    model = _model()
    save_pretrained(model, tmp_path / "m", _config(model))
    before = (tmp_path / "m" / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_pretrained(_model(), tmp_path / "m", _config(model))
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp folders left behind


def test_truncated_weights_give_clear_error(tmp_path):
    model = _model()
    save_pretrained(model, tmp_path / "m", _config(model))
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ValueError, match="unreadable or truncated"):
        load_denoiser(tmp_path / "m")


def test_mismatched_config_gives_clear_error(tmp_path):
    model = _model()
    save_pretrained(model, tmp_path / "m", _config(model))
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["model"]["depth"] = 3
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match"):
        load_denoiser(tmp_path / "m")
    cfg["model"]["dept"] = 2
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="did you mean 'depth'"):
        load_config(tmp_path / "m")


def test_weights_of_another_shape_are_named(tmp_path):
    model = _model()
    save_pretrained(model, tmp_path / "m", _config(model))
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["model"]["patch_size"] = 2 * cfg["model"]["patch_size"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    wrong = r"do not match config.json \(.*patch\.weight is \[64, 4, 2, 2\], config.json expects \[64, 4, 4, 4\]"
    with pytest.raises(ValueError, match=wrong):
        load_denoiser(tmp_path / "m")


@pytest.mark.parametrize("data", [[1, 2], {"format_version": 2}, {"model": "small"}])
def test_config_without_a_model_section_is_refused(tmp_path, data):
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="config.json: a model's config.json must be a JSON object with a 'model'"):
        load_config(tmp_path)


def test_newer_format_is_refused(tmp_path):
    model = _model()
    save_pretrained(model, tmp_path / "m", _config(model))
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["format_version"] = 99
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="upgrade latentdit"):
        load_config(tmp_path / "m")


def test_format_1_configs_load_with_normed_cross_attention(tmp_path):
    model = Denoiser(model_preset("tiny", cross_norm=True))
    save_pretrained(model, tmp_path / "m", _config(model))
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["format_version"] == 2 and cfg["model"]["cross_norm"] is True
    del cfg["model"]["cross_norm"], cfg["model"]["gelu"]
    (tmp_path / "m" / "config.json").write_text(json.dumps({**cfg, "format_version": 1}))
    loaded, config, _ = load_denoiser(tmp_path / "m")  # weights with norm_x load into a format-1 config
    assert (config.model.cross_norm, config.model.gelu, config.format_version) == (True, "tanh", 2)
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))  # format 2: absent means the default
    assert (load_config(tmp_path / "m").model.cross_norm, load_config(tmp_path / "m").model.gelu) == (False, "exact")


def test_missing_folder_and_offline_hub_id(tmp_path):
    with pytest.raises(ValueError, match="neither a folder nor a hub id"):
        load_denoiser(tmp_path / "nope")
    with pytest.raises(ValueError, match="could not fetch model 'someone/missing-model'"):
        load_denoiser("someone/missing-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json is missing"):
        load_denoiser(tmp_path / "empty")


def test_loader_never_unpickles():
    import inspect

    source = inspect.getsource(ckpt)
    assert "torch.load(" not in source and "import pickle" not in source


def test_written_files_are_readable_by_others(tmp_path):
    import os
    import stat

    from latentdit.checkpoint import atomic_write_bytes

    old = os.umask(0o022)
    try:
        model = _model()
        save_pretrained(model, tmp_path / "m", _config(model))
        atomic_write_bytes(tmp_path / "f.json", b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "m" / "model.safetensors").stat().st_mode) == 0o644


@pytest.mark.parametrize("name", [None, "", 3])
def test_resolve_names_a_missing_model_argument(name):
    from latentdit.checkpoint import resolve

    with pytest.raises(ValueError, match="a model is a folder, a packaged name"):
        resolve(name)


# ----------------------------------------------------------------------------- averaging


def _folder(tmp_path, name, seed, *, vae_bytes=b"vae weights", dtype=None, config=None):
    torch.manual_seed(seed)
    model = _model()
    cfg = config or CheckpointConfig(model=model.config, text_encoder={"name": "minilm"},
                                     autoencoder={"kind": "kl", "path": "vae"})
    vae = tmp_path / f"{name}-vae-src"
    vae.mkdir()
    (vae / "model.safetensors").write_bytes(vae_bytes)
    return save_pretrained(model, tmp_path / name, cfg, dtype=dtype, extra_dirs={"vae": vae}), model


def test_average_is_the_weighted_mean_of_every_weight(tmp_path):
    a, ma = _folder(tmp_path, "a", 0)
    b, mb = _folder(tmp_path, "b", 1)
    out = ckpt.average_models([a, b], tmp_path / "soup", weights=[3, 1])
    loaded, config, folder = load_denoiser(out)
    sa, sb, s = ma.state_dict(), mb.state_dict(), loaded.state_dict()
    for k in sa:
        assert torch.allclose(s[k], 0.75 * sa[k] + 0.25 * sb[k], atol=1e-6), k
    assert not torch.equal(s["blocks.0.attn.qkv.weight"], sa["blocks.0.attn.qkv.weight"])
    assert (folder / "vae" / "model.safetensors").read_bytes() == b"vae weights"
    assert config.autoencoder["path"] == "vae"
    assert config.extra["average"]["weights"] == [0.75, 0.25]
    # equal weights by default, and the first model's dtype is kept
    a16, _ = _folder(tmp_path, "a16", 0, dtype=torch.float16)
    b16, _ = _folder(tmp_path, "b16", 1, dtype=torch.float16)
    half = ckpt.load_weights(ckpt.average_models([a16, b16], tmp_path / "soup16"), dtype=None)
    wa, wb = ckpt.load_weights(a16), ckpt.load_weights(b16)
    assert all(v.dtype == torch.float16 for v in half.values())
    assert torch.allclose(half["blocks.0.attn.qkv.weight"].float(),
                          (wa["blocks.0.attn.qkv.weight"] + wb["blocks.0.attn.qkv.weight"]) / 2, atol=1e-3)


def test_average_refuses_models_that_do_not_share_a_space(tmp_path):
    a, ma = _folder(tmp_path, "a", 0)
    other_vae, _ = _folder(tmp_path, "b", 1, vae_bytes=b"another autoencoder")
    with pytest.raises(ValueError, match="not the same autoencoder"):
        ckpt.average_models([a, other_vae], tmp_path / "out")
    cfg = CheckpointConfig(model=ma.config, text_encoder={"name": "clip"}, autoencoder={"kind": "kl", "path": "vae"})
    other_text, _ = _folder(tmp_path, "c", 1, config=cfg)
    with pytest.raises(ValueError, match="'text_encoder' section"):
        ckpt.average_models([a, other_text], tmp_path / "out")
    # deltas are averaged only onto the base both were made on
    def delta(name, digest):
        cfg = CheckpointConfig(model=ma.config, text_encoder={"name": "minilm"},
                               autoencoder={"kind": "kl", "path": "vae"}, base="shapes", base_digest=digest)
        return _folder(tmp_path, name, 2, config=cfg)[0]

    d1, d2 = delta("d1", "1" * 64), delta("d2", "2" * 64)
    for pair in ([a, d1], [d1, d2]):
        with pytest.raises(ValueError, match="not deltas on one base"):
            ckpt.average_models(pair, tmp_path / "out")
    with pytest.raises(ValueError, match="at least two"):
        ckpt.average_models([a], tmp_path / "out")
    with pytest.raises(ValueError, match="one weight per model"):
        ckpt.average_models([a, a], tmp_path / "out", weights=[1])
    with pytest.raises(ValueError, match="non-negative"):
        ckpt.average_models([a, a], tmp_path / "out", weights=[1, -1])
    assert not (tmp_path / "out").exists()


def test_average_command_writes_a_loadable_model_and_refuses_in_one_line(tmp_path, capsys):
    from latentdit.cli import main

    a, _ = _folder(tmp_path, "a", 0)
    b, _ = _folder(tmp_path, "b", 1)
    assert main(["average", str(a), str(b), "--out", str(tmp_path / "soup")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "soup")
    load_denoiser(tmp_path / "soup")
    assert main(["average", str(a), "--out", str(tmp_path / "one")]) == 2
    err = capsys.readouterr().err.strip()
    assert "at least two" in err and len(err.splitlines()) == 1 and not (tmp_path / "one").exists()


# ----------------------------------------------------------------------------- low-rank updates


def _factors(model: Denoiser, name: str = "blocks.0.attn.qkv.weight", rank: int = 2, seed: int = 5):
    out_f, in_f = model.state_dict()[name].shape
    g = torch.Generator().manual_seed(seed)
    return {f"{name}.lora_A": torch.randn(rank, in_f, generator=g),
            f"{name}.lora_B": torch.randn(out_f, rank, generator=g)}


def test_a_stored_low_rank_update_loads_added_to_its_weight(tmp_path):
    model = _model()
    factors = _factors(model)
    save_pretrained(model, tmp_path / "m", _config(model), low_rank=factors)
    loaded = load_denoiser(tmp_path / "m")[0].state_dict()
    w = model.state_dict()["blocks.0.attn.qkv.weight"]
    update = factors["blocks.0.attn.qkv.weight.lora_B"] @ factors["blocks.0.attn.qkv.weight.lora_A"]
    assert torch.allclose(loaded["blocks.0.attn.qkv.weight"], w + update, atol=1e-5)
    assert all(torch.equal(v, loaded[k]) for k, v in model.state_dict().items() if k != "blocks.0.attn.qkv.weight")
    # the soup of a model with an update and one without averages the updated weight
    other = _model()
    save_pretrained(other, tmp_path / "o", _config(other))
    soup = load_denoiser(ckpt.average_models([tmp_path / "m", tmp_path / "o"], tmp_path / "soup"))[0].state_dict()
    mean = (w + update + other.state_dict()["blocks.0.attn.qkv.weight"]) / 2
    assert torch.allclose(soup["blocks.0.attn.qkv.weight"], mean, atol=1e-5)
    # deltas holding factors: the mean of factors is not the mean of updates, so they are refused
    cfg = _config(model)
    cfg.base, cfg.base_digest = "shapes", "1" * 64
    for name in ("d1", "d2"):
        ckpt._save_state(factors, tmp_path / name, cfg)
    with pytest.raises(ValueError, match="average the whole models instead"):
        ckpt.average_models([tmp_path / "d1", tmp_path / "d2"], tmp_path / "out")


def test_malformed_low_rank_factors_are_refused_by_name(tmp_path):
    model = _model()
    good = _factors(model)
    cases = {
        "without its other half": {"blocks.0.attn.qkv.weight.lora_A": good["blocks.0.attn.qkv.weight.lora_A"]},
        "does not make its shape": {**good, "blocks.0.attn.qkv.weight.lora_A": torch.randn(2, 7)},
        "which the model does not have": {f"nope.weight.{k.rsplit('.', 1)[1]}": v for k, v in good.items()},
    }
    for message, factors in cases.items():
        with pytest.raises(ValueError, match=message):
            save_pretrained(model, tmp_path / "m", _config(model), low_rank=factors)
        assert not (tmp_path / "m").exists()
        # the same damage in a file on disk: named when it loads
        ckpt._save_state({**model.state_dict(), **factors}, tmp_path / "disk", _config(model))
        with pytest.raises(ValueError, match=f"model.safetensors: .*{message}"):
            load_denoiser(tmp_path / "disk")
