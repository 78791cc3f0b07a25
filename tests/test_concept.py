"""Few-image concept fine-tuning: input checks, the mixed instance + prior training step, the
written adapter or model, the command end to end on a tiny model, and the crescent reader."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import tiny_denoiser, tiny_pipeline

from latentdit.concept import (
    ConceptConfig,
    check_token,
    encode_rows,
    pick,
    prior_latents,
    prior_prompts,
    read_instances,
    train_rows,
)
from latentdit.config import DiffusionConfig, SamplingConfig
from latentdit.evaluate.novel import NEW_SHAPE, hit_rates, read_shape, render_new_shape
from latentdit.lora import LoRAConfig
from latentdit.pipeline import Text2Image
from latentdit.pixels import from_pil
from latentdit.shards import Batch
from latentdit.text import TextEmbeddings
from latentdit.train import diffusion_loss

COLOURS = ("red", "blue", "green", "orange", "purple", "cyan")
CELLS = ("top left", "center", "bottom right", "top", "left", "right")


def _tiny_pipe(tiny_clip, tiny_vae) -> Text2Image:
    return tiny_pipeline(tiny_clip, tiny_vae, seed=1, sampling=SamplingConfig(steps=2))


def _write_images(folder, n: int, size: int = 16, captions: bool = True):
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(n):
        img = render_new_shape(COLOURS[k % 6], CELLS[k % 6], rng=random.Random(k))
        img.resize((size, size), Image.Resampling.LANCZOS).save(folder / f"{k}.png")
        if captions:
            (folder / f"{k}.txt").write_text(f"a {COLOURS[k % 6]} sks shape {CELLS[k % 6]}\n")
    return folder


def _rows(pipe, folder):
    inst = read_instances(folder, "sks", "shape", 16)
    return encode_rows(pipe, pipe.encode_image(from_pil(inst.images)), inst.captions)


def _prior(pipe, n: int = 6):
    prompts = prior_prompts(n)
    return encode_rows(pipe, prior_latents(pipe, prompts, "generated", steps=2), prompts)


# -- input ------------------------------------------------------------------------------------
def test_token_checks():
    check_token("sks", "shape")
    for token, match in (("circle", "already a word"), ("Red", "already a word"), ("two words", "one word"),
                         ("", "one word"), ("shape", "must differ")):
        with pytest.raises(ValueError, match=match):
            check_token(token, "shape")
    with pytest.raises(ValueError, match="already a word"):
        ConceptConfig(token="star")


def test_config_checks():
    for bad, match in ((dict(steps=0), "steps"), (dict(prior_weight=-1.0), "prior_weight"),
                       (dict(prior_images=0), "prior_images > 0"), (dict(lr=0.0), "lr"),
                       (dict(batch_size=True), "batch_size")):
        with pytest.raises(ValueError, match=match):
            ConceptConfig(**bad)
    assert ConceptConfig(prior_images=0, prior_weight=0.0).prior_images == 0
    assert ConceptConfig(lora=None).learning_rate < ConceptConfig().learning_rate


def test_instance_images_captions_and_bad_input(tmp_path):
    folder = _write_images(tmp_path / "ok", 3, size=32, captions=False)
    (folder / "0.txt").write_text("a red sks shape in the top left")
    (folder / "broken.png").write_bytes(b"not a png at all")
    (folder / "notes.md").write_text("ignored: not an image")
    inst = read_instances(folder, "sks", "shape", 16)
    assert inst.files == ["0.png", "1.png", "2.png"] and inst.skipped == ["broken.png"]
    assert inst.captions == ["a red sks shape in the top left", "a sks shape", "a sks shape"]
    assert all(im.size == (16, 16) and im.mode == "RGB" for im in inst.images)

    (folder / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match=r"holds 2 readable images \(2 unreadable skipped.*needs 3-10"):
        read_instances(folder, "sks", "shape", 16)
    with pytest.raises(ValueError, match="holds 11 images.*3-10"):
        read_instances(_write_images(tmp_path / "many", 11, captions=False), "sks", "shape", 16)
    with pytest.raises(ValueError, match="not a folder"):
        read_instances(tmp_path / "missing", "sks", "shape", 16)
    no_token = _write_images(tmp_path / "nt", 3)
    (no_token / "1.txt").write_text("a red circle")
    with pytest.raises(ValueError, match=r"1.txt.*does not contain the token 'sks'"):
        read_instances(no_token, "sks", "shape", 16)


def test_prior_prompts_are_training_captions():
    from latentdit.datasets.shapes import HELDOUT_PAIRS

    prompts = prior_prompts(200)
    assert len(set(prompts)) > 150 and prompts == prior_prompts(200)
    held = [f"{c} {s}" for c, s in HELDOUT_PAIRS]
    assert not [p for p in prompts if any(h in p for h in held)]  # never a held-out pair
    assert any(" above " in p or " below " in p or " left of " in p for p in prompts)  # every scene type


# -- training ---------------------------------------------------------------------------------
def _fixed_loss(pipe, rows: Batch, seed: int = 7) -> float:
    from latentdit.schedules import NoisePath
    from latentdit.train_config import TrainConfig

    cfg = TrainConfig(model=pipe.model.config, cond_dropout=0.0)
    with torch.no_grad():
        return float(diffusion_loss(pipe.model, rows, NoisePath("flow"), cfg, torch.Generator().manual_seed(seed)))


def test_lora_steps_change_only_the_adapters_and_fit_the_instances(tiny_clip, tiny_vae, tmp_path):
    pipe = _tiny_pipe(tiny_clip, tiny_vae)
    rows = _rows(pipe, _write_images(tmp_path / "i", 4))
    prior = _prior(pipe)
    before_w = {n: p.detach().clone() for n, p in pipe.model.state_dict().items()}
    before = _fixed_loss(pipe, rows)
    cfg = ConceptConfig(steps=40, batch_size=4, prior_images=6, lr=3e-2, warmup_steps=2, log_every=10,
                        lora=LoRAConfig(rank=4), mixed_precision="no")
    history = train_rows(pipe, rows, prior, cfg, DiffusionConfig())
    after = _fixed_loss(pipe, rows)
    assert after < 0.8 * before, (before, after)
    state = pipe.model.state_dict()
    adapters = [n for n in state if "lora_" in n]
    assert adapters and all(torch.equal(state[n], before_w[n.replace(".base.", ".")])
                            for n in state if "lora_" not in n)
    assert any(state[n].abs().sum() > 0 for n in adapters if n.endswith("lora_B"))
    assert len(history) == 4 and all(h["prior_loss"] is not None for h in history)


def test_prior_rows_are_mixed_into_every_step(tiny_clip, tiny_vae, tmp_path):
    pipe = _tiny_pipe(tiny_clip, tiny_vae)
    rows, prior = _rows(pipe, _write_images(tmp_path / "i", 3)), _prior(pipe, 5)
    seen = []
    cfg = ConceptConfig(steps=3, batch_size=4, prior_images=5, mixed_precision="no")
    train_rows(pipe, rows, prior, cfg, DiffusionConfig(), progress=False,
               on_step=lambda step, inst, pr: seen.append((inst, pr)))
    assert len(seen) == 3
    for inst, pr in seen:
        assert len(inst) == 4 and set(inst.captions) <= set(rows.captions)
        assert len(pr) == 4 and set(pr.captions) <= set(prior.captions)
    # the prior rows carry the base model's own samples for those captions
    assert torch.equal(seen[0][1].latents[0], prior.latents[int(seen[0][1].index[0])])
    seen.clear()
    train_rows(pipe, rows, prior, ConceptConfig(steps=2, prior_images=0, prior_weight=0.0, mixed_precision="no"),
               DiffusionConfig(), progress=False, on_step=lambda step, inst, pr: seen.append(pr))
    assert seen == [None, None]


def test_the_prior_term_holds_the_model_near_the_base(tiny_clip, tiny_vae, tmp_path):
    """With the prior weighted in, the model's loss on the prior rows moves less than without."""
    drift = {}
    for weight in (0.0, 1.0):
        pipe = _tiny_pipe(tiny_clip, tiny_vae)
        rows, prior = _rows(pipe, _write_images(tmp_path / f"i{weight}", 3)), _prior(pipe, 6)
        base = _fixed_loss(pipe, prior)
        cfg = ConceptConfig(steps=30, batch_size=4, prior_images=6, prior_weight=weight, lr=5e-2, warmup_steps=1,
                            mixed_precision="no")
        train_rows(pipe, rows, prior, cfg, DiffusionConfig(), progress=False)
        drift[weight] = _fixed_loss(pipe, prior) - base
    assert drift[1.0] < drift[0.0], drift


def test_pick_draws_rows_with_replacement():
    text = TextEmbeddings(torch.zeros(3, 2, 4), torch.ones(3, 2, dtype=torch.bool), torch.zeros(3, 4))
    rows = Batch(torch.arange(3.0).view(3, 1, 1, 1), text, ["a", "b", "c"], torch.arange(3))
    got = pick(rows, 8, torch.Generator().manual_seed(0))
    assert len(got) == 8 and set(got.captions) <= {"a", "b", "c"}
    assert [float(v) for v in got.latents.flatten()] == [float(i) for i in got.index]


def test_renders_prior_is_the_autoencoded_ground_truth(tiny_clip, tiny_vae):
    pipe = _tiny_pipe(tiny_clip, tiny_vae)
    latents = prior_latents(pipe, prior_prompts(3), "renders")
    assert latents.shape == (3, 4, 8, 8) and bool(torch.isfinite(latents).all())


# -- the command ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tiny_vae):
    """A complete tiny model folder (MiniLM text, tiny KL autoencoder) that the CLI can load."""
    from latentdit.checkpoint import CheckpointConfig, save_pretrained

    root = tmp_path_factory.mktemp("tiny-model")
    tiny_vae.vae.save_pretrained(root / "ae")
    model = tiny_denoiser(3, text_dim=384, pooled_dim=384)
    config = CheckpointConfig(model=model.config, sampling=SamplingConfig(steps=2),
                              text_encoder={"name": "minilm", "path": None, "dim": 384, "pooled_dim": 384,
                                            "max_length": 16},
                              autoencoder={**tiny_vae.describe(), "path": "vae"})
    return save_pretrained(model, root / "model", config, extra_dirs={"vae": root / "ae"})


def test_cli_end_to_end_on_a_tiny_model(tiny_model_dir, tmp_path, capsys):
    from latentdit.cli import main
    from latentdit.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    images = _write_images(tmp_path / "images", 3)
    out = tmp_path / "adapter"
    common = ["--model", str(tiny_model_dir), "--images", str(images), "--steps", "3", "--batch-size", "2",
              "--prior-images", "2", "--device", "cpu"]
    assert main(["finetune-concept", *common, "--out", str(out), "--lora-rank", "2", "--no-progress"]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "finetune-concept:" not in captured.err  # --no-progress: no bar
    assert f"--adapter {out}" in printed
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS, "concept.json"} <= {p.name for p in out.iterdir()}
    summary = json.loads((out / "concept.json").read_text())
    assert summary["captions"][0] == "a red sks shape top left" and len(summary["history"]) == 1
    info = json.loads((out / ADAPTER_CONFIG).read_text())
    assert info["lora"]["rank"] == 2 and info["extra"]["concept"]["token"] == "sks"

    img = tmp_path / "gen.png"
    assert main(["generate", "a red sks shape", "--model", str(tiny_model_dir), "--adapter", str(out),
                 "--steps", "2", "--out", str(img), "--device", "cpu"]) == 0
    assert Image.open(img).size == (16, 16)
    capsys.readouterr()
    assert main(["eval", "alignment", "--model", str(tiny_model_dir), "--adapter", str(out), "--n", "1",
                 "--samples", "1", "--steps", "1", "--device", "cpu"]) == 0
    report = capsys.readouterr().out
    assert json.loads(report[report.index("{"):])["prompts"] == 1

    full = tmp_path / "full"
    assert main(["finetune-concept", *common, "--out", str(full), "--full", "--prior-weight", "0",
                 "--save-dtype", "float16"]) == 0
    assert "finetune-concept:" in capsys.readouterr().err  # the bar, shown by default
    assert (full / "config.json").exists() and (full / "vae").is_dir()
    from safetensors.torch import load_file

    assert {v.dtype for v in load_file(full / "model.safetensors").values()} == {torch.float16}
    assert main(["generate", "a red sks shape", "--model", str(full), "--steps", "2", "--out",
                 str(tmp_path / "g2.png"), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["generate", "x", "--model", str(tiny_model_dir), "--adapter", str(full), "--out",
                 str(tmp_path / "g3.png")]) == 2
    assert "full model folder" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--token", "circle"], "already a word of the model's captions"),
    (["--images", "FEW"], "holds 2 readable images"),
    (["--prior-weight", "-1"], "prior_weight must be"),
    (["--lora-rank", "0"], "--lora-rank must be >= 1"),
])
def test_cli_bad_input_is_one_line(tiny_model_dir, tmp_path, capsys, argv, message):
    from latentdit.cli import main

    images = _write_images(tmp_path / "images", 3)
    few = _write_images(tmp_path / "few", 2)
    argv = [str(few) if a == "FEW" else a for a in argv]
    base = ["finetune-concept", "--model", str(tiny_model_dir), "--images", str(images), "--out",
            str(tmp_path / "o"), "--device", "cpu"]
    assert main(base + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def _recipe(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_recipes_draw_the_concept_and_measure_a_model(tiny_model_dir, tmp_path, capsys):
    _recipe("concept_images").main([str(tmp_path / "images"), "--n", "5", "--token", "zq"])
    files = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert files == [f"{k:02d}.{ext}" for k in range(5) for ext in ("png", "txt")]
    inst = read_instances(tmp_path / "images", "zq", "shape", 64)
    assert inst.captions[0] == "an orange zq shape in the top right"
    assert all(read_shape(im)["shape"] == NEW_SHAPE for im in inst.images)
    capsys.readouterr()
    picture = tmp_path / "p.png"
    _recipe("concept_eval").main(["--model", str(tiny_model_dir), "--samples", "2", "--images",
                                  str(tmp_path / "images"), "--picture", str(picture)])
    out = capsys.readouterr().out
    report = json.loads(out[: out.rindex("}") + 1])
    assert report["images"] == 8 and len(report["per_prompt"]) == 4 and 0 <= report["overall"]["shape"] <= 1
    assert Image.open(picture).size == (2 * 5 * 64, 2 * 5 * 64)  # 5 columns; the images row + 4 prompt rows


# -- the reader -------------------------------------------------------------------------------
def test_the_reader_tells_the_crescent_from_the_known_shapes():
    from latentdit.datasets.shapes import SHAPES, render_scene

    rng = random.Random(0)
    for color, cell in zip(COLOURS, CELLS):
        for size in ("large", "small"):
            read = read_shape(render_new_shape(color, cell, size=size, background="black", rng=rng))
            assert (read["shape"], read["color"], read["cell"]) == (NEW_SHAPE, color, cell)
    for shape in SHAPES:
        for size in ("large", "small"):
            img = render_scene({"objects": [{"color": "blue", "shape": shape, "size": size, "cell": "right"}]})
            assert read_shape(img)["shape"] == shape
    blank = Image.new("RGB", (64, 64), (245, 245, 245))
    assert read_shape(blank) is None
    rates = hit_rates([render_new_shape("red", "top left"), render_new_shape("red", "center"), blank],
                      color="red", cell="top left")
    assert rates == {"shape": 2 / 3, "all": 1 / 3, "images": 3}
    assert np.asarray(render_new_shape("red", "center")).shape == (64, 64, 3)
    with pytest.raises(ValueError, match="invisible"):
        render_new_shape("white", "center", background="white")


@pytest.mark.weights
def test_the_shipped_demo_adapter_draws_the_crescent_on_the_packaged_model():
    """docs/concept/crescent-adapter (docs/concept.md's run) on the packaged model; the seeds are
    those recipes/concept_eval.py gives its second prompt, which it drew as a crescent 16 of 16 times."""
    from pathlib import Path

    from latentdit.plan import prompt_seeds

    adapter = Path(__file__).resolve().parents[1] / "docs" / "concept" / "crescent-adapter"
    pipe = Text2Image.from_pretrained("shapes", device="cpu", adapter=adapter)
    images = pipe("a green sks shape in the center", num_images_per_prompt=4, seed=prompt_seeds(0, 1, 4),
                  progress=False)
    assert hit_rates(images, "green", "center")["all"] >= 0.75
    pipe.unload_adapter()
    base = pipe("a green sks shape in the center", num_images_per_prompt=4, seed=prompt_seeds(0, 1, 4),
                progress=False)
    assert hit_rates(base)["shape"] <= 0.25
