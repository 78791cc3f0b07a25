import json

import pytest

from latentdit.config import (
    DiffusionConfig,
    ModelConfig,
    SamplingConfig,
    from_dict,
    model_preset,
    parse_density,
    parse_time_density,
    to_dict,
)


@pytest.mark.parametrize("cls", [ModelConfig, DiffusionConfig, SamplingConfig])
def test_configs_round_trip_json(cls):
    cfg = cls()
    assert from_dict(cls, json.loads(json.dumps(to_dict(cfg)))) == cfg


def test_preset_round_trip_and_overrides():
    cfg = model_preset("small", depth=3, mlp="gelu")
    assert cfg.depth == 3 and cfg.mlp == "gelu" and cfg.width == 384
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg


def test_unknown_key_names_nearest():
    with pytest.raises(ValueError, match="did you mean 'depth'"):
        from_dict(ModelConfig, {"deph": 3})


def test_unknown_preset_is_clear():
    with pytest.raises(ValueError, match="unknown preset 'smal'.*did you mean 'small'"):
        model_preset("smal")


def test_literal_and_type_checks():
    with pytest.raises(ValueError, match="mlp"):
        from_dict(ModelConfig, {"mlp": "relu"})
    with pytest.raises(ValueError, match="expects int"):
        from_dict(ModelConfig, {"depth": "three"})
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(width=100, heads=3)
    with pytest.raises(ValueError, match="condition"):
        ModelConfig(text_dim=0, pooled_dim=0, num_classes=0)


def test_cli_strings_are_coerced():
    cfg = from_dict(SamplingConfig, {"steps": "12", "guidance_scale": "3.5"})
    assert cfg.steps == 12 and cfg.guidance_scale == 3.5
    assert from_dict(ModelConfig, {"qk_norm": "false"}).qk_norm == "none"


def test_qk_norm_reads_configs_that_stored_a_bool():
    """Checkpoints written when qk_norm was a bool (true meant RMS) keep loading as RMS."""
    assert from_dict(ModelConfig, {"qk_norm": True}).qk_norm == "rms"
    assert from_dict(ModelConfig, {"qk_norm": False}).qk_norm == "none"
    assert ModelConfig(qk_norm=True).qk_norm == "rms"
    assert from_dict(ModelConfig, {"qk_norm": "layer"}).qk_norm == "layer"
    with pytest.raises(ValueError, match="qk_norm"):
        from_dict(ModelConfig, {"qk_norm": "batch"})


@pytest.mark.parametrize("spec,expected", [
    ("uniform", ("uniform", ())),
    ("logit-normal(0.5, 2)", ("logit-normal", (0.5, 2.0))),
    ("beta(1,2.5)", ("beta", (1.0, 2.5))),
    ("logit-normal", ("logit-normal", (0.0, 1.0))),
])
def test_parse_density(spec, expected):
    assert parse_density(spec) == expected


@pytest.mark.parametrize("bad", ["gauss", "beta(1)", "beta(0, 1)", "logit-normal(0, -1)", "beta(a,b)"])
def test_parse_density_rejects(bad):
    with pytest.raises(ValueError):
        parse_density(bad)


def test_time_density_mixtures():
    assert parse_time_density("beta(1, 2.5)") == [(1.0, "beta", (1.0, 2.5))]
    assert parse_time_density("0.9*logit-normal(0, 1) + 0.1*uniform") == [
        (0.9, "logit-normal", (0.0, 1.0)), (0.1, "uniform", ())]
    assert DiffusionConfig(time_density="0.5*uniform+0.5*beta(1,3)").time_density
    for bad, message in [("0.5*uniform + 0.4*beta(1, 2)", "sum to 1"), ("0.5*uniform", "no weight"),
                         ("x*uniform + 0.5*uniform", "not a number"), ("-1*uniform+2*uniform", "positive"),
                         ("0.5*uniform + 0.5*gauss", "must be 'uniform'")]:
        with pytest.raises(ValueError, match=message):
            DiffusionConfig(time_density=bad)


def test_presets_sizes():
    from latentdit.model import Denoiser

    counts = {name: Denoiser(model_preset(name)).num_params() for name in ("tiny", "small")}
    assert counts["tiny"] < 1_000_000
    assert 10e6 <= counts["small"] <= 30e6
    base = model_preset("base")
    assert (base.width, base.depth) == (768, 12)
    large = model_preset("large")
    assert (large.width, large.depth) == (1152, 28)


def test_resolve_train_config_merges_sections_in_order():
    from latentdit.train_config import merge_config, resolve_train_config

    cfg = resolve_train_config("shapes-small", None, {"optim": {"lr": 5e-4}, "steps": 7},
                               {"optim": {"warmup_steps": 3}, "steps": 9})
    assert cfg.steps == 9  # the later override wins
    assert cfg.optim.lr == 5e-4 and cfg.optim.warmup_steps == 3  # sections merge, not replace
    assert cfg.optim.grad_clip == 1.0 and cfg.model.width == 384  # the recipe's other fields stay
    assert resolve_train_config("shapes-small", "tld").model.prediction == "x0"
    base = {"a": {"b": 1, "c": 2}}
    assert merge_config(base, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}} and base["a"]["c"] == 2
