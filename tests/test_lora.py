"""Low-rank adapters: exact no-op at init, merge/unmerge, save/load, refusal of a foreign base."""

from __future__ import annotations

import json

import pytest
import torch

from latentdit.config import model_preset
from latentdit.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MLP_TARGETS,
    LoRAConfig,
    LoRALinear,
    adapters_of,
    add_lora,
    load_adapter,
    merge_lora,
    remove_lora,
    save_adapter,
    unmerge_lora,
)
from latentdit.model import Denoiser


def _model(seed: int = 0, **overrides) -> Denoiser:
    torch.manual_seed(seed)
    model = Denoiser(model_preset("tiny", **overrides))
    for p in model.parameters():  # DiT zero-inits gates and output: make every layer matter
        if p.dim() >= 1 and not p.any():
            torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def _inputs(model: Denoiser, n: int = 3):
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, cfg.in_channels, 8, 8, generator=g)
    t = torch.rand(n, generator=g)
    text = torch.randn(n, 5, cfg.text_dim, generator=g)
    mask = torch.ones(n, 5, dtype=torch.bool)
    pooled = torch.randn(n, cfg.pooled_dim, generator=g)
    return x, t, text, mask, pooled


def _randomise(model: Denoiser) -> None:
    with torch.no_grad():
        for m in adapters_of(model).values():
            m.lora_B.normal_(std=0.1)


def test_a_fresh_adapter_leaves_the_output_exactly_unchanged():
    model = _model()
    inputs = _inputs(model)
    with torch.no_grad():
        before = model(*inputs)
        wrapped = add_lora(model, LoRAConfig(rank=4, alpha=8))
        after = model(*inputs)
    assert len(wrapped) == 2 * 5  # two blocks x (qkv, out, cross q, cross kv, cross out)
    assert torch.equal(before, after)


def test_a_layout_planners_attention_is_never_adapted():
    model = _model(layout_planner=True)
    assert isinstance(model.get_submodule("planner.attn.qkv"), torch.nn.Linear)
    wrapped = add_lora(model, LoRAConfig(rank=2))
    assert len(wrapped) == 2 * 5 and not any(n.startswith("planner.") for n in wrapped)
    with pytest.raises(ValueError, match="match no linear layer"):
        add_lora(_model(layout_planner=True), LoRAConfig(rank=2, targets=("planner.attn.qkv",)))


def test_only_the_adapter_weights_train():
    model = _model()
    add_lora(model, LoRAConfig(rank=2, targets=("attn.qkv", *MLP_TARGETS)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert {n.rsplit(".", 2)[-2] for n in trainable} == {"qkv", "fc1", "fc2"}


def test_merge_then_unmerge_restores_the_weights_and_merging_keeps_the_output():
    model = _model()
    add_lora(model, LoRAConfig(rank=4))
    _randomise(model)
    inputs = _inputs(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        unmerged = model(*inputs)
        merge_lora(model)
        changed = [n for n, p in model.named_parameters() if not torch.equal(p, weights[n])]
        merged = model(*inputs)
        unmerge_lora(model)
    assert changed and all(n.endswith("base.weight") for n in changed)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, weights[n], atol=1e-6, rtol=0)


def test_remove_lora_gives_back_a_plain_model_with_or_without_the_update():
    model = _model()
    inputs = _inputs(model)
    with torch.no_grad():
        base = model(*inputs)
        add_lora(model, LoRAConfig(rank=4))
        _randomise(model)
        adapted = model(*inputs)
        remove_lora(model, merge=True)
        assert not adapters_of(model) and "blocks.0.attn.qkv.weight" in model.state_dict()
        torch.testing.assert_close(model(*inputs), adapted, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(adapted, base)


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    model = _model()
    add_lora(model, LoRAConfig(rank=3, alpha=6, targets=("cross.kv", "mlp.fc2")))
    _randomise(model)
    inputs = _inputs(model)
    with torch.no_grad():
        want = model(*inputs)
    save_adapter(model, tmp_path / "adapter", LoRAConfig(rank=3, alpha=6, targets=("cross.kv", "mlp.fc2")),
                 "tiny-test", model.config)
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {ADAPTER_CONFIG, ADAPTER_WEIGHTS}
    fresh = _model()
    info = load_adapter(fresh, tmp_path / "adapter", merge=False)
    assert info.lora.rank == 3 and info.base_model == "tiny-test"
    with torch.no_grad():
        assert torch.equal(fresh(*inputs), want)
        merge_lora(fresh)
        torch.testing.assert_close(fresh(*inputs), want, atol=1e-5, rtol=1e-5)


def test_a_float16_adapter_is_half_the_file_and_loads_close(tmp_path):
    model = _model()
    add_lora(model, LoRAConfig(rank=4))
    _randomise(model)
    inputs = _inputs(model)
    with torch.no_grad():
        want = model(*inputs)
    for name, dtype in (("a32", torch.float32), ("a16", torch.float16)):
        save_adapter(model, tmp_path / name, LoRAConfig(rank=4), "tiny-test", model.config, dtype=dtype)
    size = {n: (tmp_path / n / ADAPTER_WEIGHTS).stat().st_size for n in ("a32", "a16")}
    assert size["a16"] < 0.6 * size["a32"]
    fresh = _model()
    load_adapter(fresh, tmp_path / "a16", merge=False)
    with torch.no_grad():
        got = fresh(*inputs)
    assert not torch.equal(got, want)  # rounded to float16: close, not identical
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        save_adapter(model, tmp_path / "a8", LoRAConfig(rank=4), "tiny-test", model.config, dtype=torch.float64)


def test_loading_onto_a_mismatched_base_fails_clearly(tmp_path):
    model = _model()
    add_lora(model, LoRAConfig(rank=2))
    save_adapter(model, tmp_path / "a", LoRAConfig(rank=2), "tiny-test", model.config)
    with pytest.raises(ValueError, match="different base model.*depth"):
        load_adapter(_model(depth=3), tmp_path / "a")
    other = _model(seed=5)
    with pytest.raises(ValueError, match="other weights than this base"):
        load_adapter(other, tmp_path / "a")
    assert not adapters_of(other)  # a refused adapter leaves the model as it was
    load_adapter(other, tmp_path / "a", check_base=False)  # the caller may insist
    assert adapters_of(other)


def test_an_adapter_written_before_a_config_field_existed_still_loads(tmp_path):
    model = _model()
    add_lora(model, LoRAConfig(rank=2))
    save_adapter(model, tmp_path / "a", LoRAConfig(rank=2), "tiny-test", model.config)
    file = tmp_path / "a" / ADAPTER_CONFIG
    data = json.loads(file.read_text())
    del data["base_config"]["gelu"]  # as if written before the field existed: its default applies
    file.write_text(json.dumps(data))
    load_adapter(_model(), tmp_path / "a")
    data["base_config"]["width_typo"] = 3
    file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="base model config is not one this latentdit reads"):
        load_adapter(_model(), tmp_path / "a")


def test_bad_adapter_folders_and_configs_are_refused(tmp_path):
    model = _model()
    with pytest.raises(ValueError, match="not an adapter folder"):
        load_adapter(model, tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="full model folder.*--model"):
        load_adapter(model, tmp_path / "full")
    add_lora(model, LoRAConfig(rank=2))
    save_adapter(model, tmp_path / "a", LoRAConfig(rank=2), "tiny-test", model.config)
    (tmp_path / "a" / ADAPTER_WEIGHTS).write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="unreadable or truncated"):
        load_adapter(_model(), tmp_path / "a")
    (tmp_path / "a" / ADAPTER_CONFIG).write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a latentdit LoRA"):
        load_adapter(_model(), tmp_path / "a")
    with pytest.raises(ValueError, match="already carries"):
        add_lora(model, LoRAConfig(rank=2))
    with pytest.raises(ValueError, match=r"\['attn.nope'\] match no linear layer"):
        add_lora(_model(), LoRAConfig(targets=("attn.qkv", "attn.nope")))
    for bad in (dict(rank=0), dict(alpha=-1.0), dict(targets=())):
        with pytest.raises(ValueError, match="LoRA"):
            LoRAConfig(**bad)


def test_adapter_runs_under_bf16_autocast():
    model = _model()
    add_lora(model, LoRAConfig(rank=2))
    _randomise(model)
    x, t, text, mask, pooled = _inputs(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, text, mask, pooled)
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())
    assert isinstance(model.blocks[0].attn.qkv, LoRALinear)


def test_pipeline_loads_and_unloads_an_adapter(tiny_clip, tiny_vae, tmp_path):
    import numpy as np

    from latentdit.config import SamplingConfig
    from latentdit.pipeline import Text2Image

    pipe = Text2Image(_model(), tiny_vae, tiny_clip, sampling=SamplingConfig(steps=3))
    kw = dict(seed=0, progress=False, output_type="tensor")
    base = pipe("a red circle", **kw)
    trained = _model()
    add_lora(trained, LoRAConfig(rank=2))
    _randomise(trained)
    save_adapter(trained, tmp_path / "a", LoRAConfig(rank=2), "tiny-test", trained.config)
    pipe.load_adapter(tmp_path / "a")
    adapted = pipe("a red circle", **kw)
    assert not torch.allclose(adapted, base, atol=1e-3)
    with pytest.raises(ValueError, match="already carries"):
        pipe.load_adapter(tmp_path / "a")
    pipe.unload_adapter()
    assert np.allclose(pipe("a red circle", **kw).numpy(), base.numpy(), atol=1e-5)
