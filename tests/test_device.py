"""--device on every command that runs a model: resolved once, and a missing device is one line."""

import argparse

import pytest
import torch

from latentdit.cli import build_parser, main
from latentdit.device import resolve_device

# Commands that run a model (a denoiser, an encoder or an autoencoder) on some device.
MODEL_COMMANDS = {"generate", "eval", "img2img", "inpaint", "outpaint", "invert", "edit", "interpolate",
                  "pan", "preprocess", "train", "train-ae", "serve"}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_model_command_accepts_device_with_auto_default():
    subs = _subparsers(build_parser())
    assert MODEL_COMMANDS <= set(subs), MODEL_COMMANDS - set(subs)
    for name in sorted(MODEL_COMMANDS):
        flags = {a.dest: a for a in subs[name]._actions}
        assert "device" in flags, f"`latentdit {name}` has no --device"
        assert flags["device"].default == "auto", name


def test_auto_is_the_cpu_on_a_machine_without_accelerator():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    mps = getattr(torch.backends, "mps", None)
    expected = "mps" if mps is not None and mps.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device(None).type == expected
    assert resolve_device("CPU") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("spec, match", [("cuda", "no CUDA device"), ("cuda:3", "no CUDA device"),
                                         ("gpu", "unknown device 'gpu'"), ("tpu:0", "device")])
def test_missing_or_unknown_device_is_a_value_error(spec, match):
    if torch.cuda.is_available() and spec.startswith("cuda"):
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match=match) as e:
        resolve_device(spec)
    assert "\n" not in str(e.value)


def test_missing_cuda_index_names_the_devices_there(monkeypatch):
    """The branch a multi-GPU machine reaches when cuda:N is out of range."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ValueError, match="2 CUDA device.*cuda:0 to cuda:1"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("argv", [
    ["generate", "a red circle", "--random-tiny", "--device", "cuda:7"],
    ["eval", "alignment", "--device", "nonsense"],
    ["train", "--preset", "tiny", "--data", "nowhere", "--device", "cuda"],
    ["preprocess", "--n", "4", "--out", "{tmp}/x", "--device", "mps:9"],
    ["train-ae", "--out", "{tmp}/ae", "--steps", "1", "--device", "cuda:0"],
])
def test_cli_bad_device_is_one_line_and_nonzero(argv, tmp_path, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    from latentdit import cli_base

    def no_model(*_, **__):
        raise AssertionError("a model was loaded before the device was checked")

    monkeypatch.setattr(cli_base, "load_pipeline", no_model)
    monkeypatch.setattr("latentdit.cli.load_pipeline", no_model)
    monkeypatch.setattr("latentdit.cli._random_tiny_pipeline", no_model)
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "device" in lines[0] and "Traceback" not in err, err


def test_generate_runs_on_the_resolved_device(tmp_path, capsys):
    out = tmp_path / "pic.png"
    assert main(["generate", "a red circle", "--random-tiny", "--steps", "1", "--device", "cpu",
                 "--out", str(out)]) == 0
    assert out.exists()


# -- the compute precision: bf16 only where the device computes it natively --------------------
def test_native_bf16_follows_torch_and_the_override(monkeypatch):
    from latentdit.device import native_bf16

    monkeypatch.delenv("LATENTDIT_BF16", raising=False)
    assert native_bf16("cpu") == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    monkeypatch.setenv("LATENTDIT_BF16", "1")
    assert native_bf16("cpu") is True
    monkeypatch.setenv("LATENTDIT_BF16", "0")
    assert native_bf16(torch.device("cpu")) is False
    monkeypatch.setenv("LATENTDIT_BF16", "yes")
    with pytest.raises(ValueError, match="LATENTDIT_BF16='yes'.*1.*0"):
        native_bf16("cpu")


def test_a_cpu_without_bf16_hardware_computes_in_fp32(monkeypatch):
    from latentdit.device import compute_dtype

    monkeypatch.delenv("LATENTDIT_BF16", raising=False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert compute_dtype("cpu") is None and compute_dtype("cpu", "auto") is None
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert compute_dtype("cpu") is torch.bfloat16
    # an explicit dtype is kept whatever the hardware
    assert compute_dtype("cpu", None) is None and compute_dtype("cpu", torch.float16) is torch.float16
    with pytest.raises(ValueError, match="unknown compute dtype 'bf16'"):
        compute_dtype("cpu", "bf16")


@pytest.mark.parametrize("forced, expected", [("1", torch.bfloat16), ("0", None)])
def test_the_pipeline_samples_auto_in_the_precision_the_device_gets(forced, expected, tiny_clip, tiny_vae,
                                                                    monkeypatch):
    from tiny import tiny_pipeline

    pipe = tiny_pipeline(tiny_clip, tiny_vae)
    kw = dict(steps=2, seed=3, output_type="latent", progress=False)
    monkeypatch.setenv("LATENTDIT_BF16", forced)
    default = pipe("a red circle", **kw)  # no dtype: "auto"
    assert torch.equal(default, pipe("a red circle", dtype=expected, **kw))
    other = torch.bfloat16 if expected is None else None
    assert not torch.equal(default, pipe("a red circle", dtype=other, **kw))  # the two do differ


@pytest.mark.parametrize("mixed, forced, on", [("auto", "1", True), ("auto", "0", False), ("bf16", "0", True),
                                               ("no", "1", False)])
def test_training_autocasts_as_mixed_precision_and_the_device_say(mixed, forced, on, monkeypatch):
    from latentdit.train_state import autocast_for

    monkeypatch.setenv("LATENTDIT_BF16", forced)
    with autocast_for(torch.device("cpu"), mixed):
        assert torch.is_autocast_enabled("cpu") is on
        assert (torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16) is on


def test_training_configs_default_to_auto_and_name_a_bad_precision():
    from latentdit.concept import ConceptConfig
    from latentdit.train_config import AEConfig, TrainConfig

    assert TrainConfig().mixed_precision == AEConfig().mixed_precision == ConceptConfig().mixed_precision == "auto"
    for make in (TrainConfig, AEConfig):
        with pytest.raises(ValueError, match="mixed_precision must be 'no', 'bf16' or 'auto'.*'fp16'"):
            make(mixed_precision="fp16")
