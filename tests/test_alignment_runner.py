"""The alignment benchmark runner, driven by fake pipelines with known behaviour."""

import json

import pytest
from PIL import Image

from latentdit.datasets.shapes import prompt_set, render_scene
from latentdit.evaluate import load_prompts, run_alignment


class Oracle:
    """Renders exactly what each prompt asks for (the best possible model)."""

    def __init__(self, items):
        self.expect = {it["prompt"]: it["expect"] for it in items}
        self.calls = []

    def __call__(self, prompts, num_images_per_prompt, seed, **kw):
        self.calls.append((list(prompts), list(seed)))
        self.kwargs = kw
        return [render_scene(self.expect[p]) for p in prompts for _ in range(num_images_per_prompt)]


class Blank:
    def __call__(self, prompts, num_images_per_prompt, **kw):
        return [Image.new("RGB", (64, 64), (245, 245, 245)) for _ in range(len(prompts) * num_images_per_prompt)]


def test_oracle_scores_high_blank_scores_low(tmp_path):
    items = prompt_set("heldout", 12, seed=3)
    oracle = Oracle(items)
    good = run_alignment(oracle, items, samples=2, out_dir=tmp_path, progress=False)
    bad = run_alignment(Blank(), items, samples=2, progress=False)
    assert good["overall"] >= 0.95 and good["heldout_pairs"] >= 0.95
    assert bad["overall"] <= 0.2
    assert good["n"] == 24 and good["prompts"] == 12
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["rows"]) == 24 and (tmp_path / "grid.png").exists()
    # every image got its own seed, and no seed repeats
    seeds = [s for _, batch in oracle.calls for s in batch]
    assert len(seeds) == 24 and len(set(seeds)) == 24
    assert good["guidance_interval"] is None  # a pipeline without a sampling config
    limited = run_alignment(oracle, items[:2], samples=1, guidance_interval=(0.3, 0.9), progress=False)
    assert limited["guidance_interval"] == [0.3, 0.9] and oracle.kwargs["guidance_interval"] == (0.3, 0.9)


def test_load_prompts_validates(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"id": "a", "prompt": "a red circle", "expect": {"objects": [{"color": "red"}]}}\n\n')
    assert load_prompts(f) == [{"id": "a", "prompt": "a red circle", "expect": {"objects": [{"color": "red"}]}}]
    f.write_text('{"prompt": "x"}\n')
    with pytest.raises(ValueError, match="p.jsonl:1 needs"):
        load_prompts(f)
    f.write_text("{oops\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_prompts(f)
