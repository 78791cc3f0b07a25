"""The alignment benchmark runner, driven by fake pipelines with known behaviour."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from latentdit.datasets.shapes import prompt_set, render_scene, scene_of
from latentdit.evaluate import load_prompts, run_alignment, score_references


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
    assert good["sampler"] is None and oracle.kwargs["sampler"] is None  # the pipeline's own choice
    euler = run_alignment(oracle, items[:2], samples=1, sampler="euler", progress=False)
    assert euler["sampler"] == "euler" and oracle.kwargs["sampler"] == "euler"


def test_prompts_with_negatives_are_guided_away_from_them_and_all_or_none_have_one(tmp_path):
    items = prompt_set("heldout", 6, seed=1)
    oracle = Oracle(items)
    plain = run_alignment(oracle, items, samples=2, batch_size=4, progress=False)
    assert oracle.kwargs["negative_prompt"] is None and plain["negative_prompts"] is False
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({**it, "negative": f"not {it['prompt']}"}) + "\n" for it in items))
    loaded = load_prompts(f)
    assert [it["negative"] for it in loaded] == [f"not {it['prompt']}" for it in items]
    oracle.calls.clear()
    guided = run_alignment(oracle, loaded, samples=2, batch_size=4, progress=False)
    assert guided["negative_prompts"] is True
    # each call's negatives are its own prompts' (two prompts per call of four images)
    assert [p for p, _ in oracle.calls] == [[it["prompt"] for it in items[i:i + 2]] for i in (0, 2, 4)]
    assert oracle.kwargs["negative_prompt"] == [f"not {it['prompt']}" for it in items[4:]]
    with pytest.raises(ValueError, match="1 of 6 prompts have a negative"):
        run_alignment(oracle, [loaded[0]] + items[1:], samples=1, progress=False)
    f.write_text(json.dumps({"prompt": "a red circle", "expect": {"objects": [{"color": "red"}]}, "negative": 3}))
    with pytest.raises(ValueError, match="'negative', when given, must be a string"):
        load_prompts(f)


def test_order_swapped_exchanges_the_two_objects_of_relation_prompts_only():
    from latentdit.evaluate.alignment import order_swapped

    items = prompt_set("heldout", 60, seed=2)
    swapped = {it["id"]: order_swapped(it) for it in items}
    relations = [it for it in items if it["expect"]["scene"] == "relation"]
    assert relations and all(swapped[it["id"]] is None for it in items if it not in relations)
    for it in relations:
        a, b = (f"{o['color']} {o['shape']}" for o in it["expect"]["objects"])
        s = swapped[it["id"]]
        assert s.index(b) < s.index(a) if it["prompt"].index(a) < it["prompt"].index(b) else s.index(a) < s.index(b)
        assert len(s.split()) == len(it["prompt"].split())
    item = {"prompt": "a red star to the right of an orange cross",
            "expect": {"scene": "relation", "relation": "right of",
                       "objects": [{"color": "red", "shape": "star"}, {"color": "orange", "shape": "cross"}]}}
    assert order_swapped(item) == "an orange cross to the right of a red star"
    colour_only = {**item, "expect": {**item["expect"], "objects": [{"color": "red"}, {"color": "orange"}]}}
    assert order_swapped(colour_only) is None


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


@pytest.mark.parametrize("expect,match", [
    ({"objects": "red"}, "non-empty 'objects' list"),
    ({"objcts": [{"color": "red"}]}, "non-empty 'objects' list"),
    ({"objects": [{"color": "red"}], "colour": "red"}, "unknown key"),
    ({"objects": [{"color": "reddish"}]}, "unknown color 'reddish'"),
    ({"objects": [{"colour": "red"}]}, "unknown key 'colour'"),
    ({"objects": [{"color": "red"}, {"color": "blue"}], "relation": "near"}, "unknown relation"),
    ({"objects": [{"color": "red"}], "count": 0}, "count must be a positive integer"),
    ({"objects": [{"color": "red"}], "background": "teal"}, "unknown background"),
    ({"objects": [{"color": "red"}], "relation": "above"}, "needs two expected objects"),
])
def test_load_prompts_names_bad_expectations_before_any_image_is_made(tmp_path, expect, match):
    """A typo in `expect` would otherwise be scored as a miss (or fail after every image is made)."""
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "fine", "expect": {"objects": [{"color": "red"}]}}\n'
                 + json.dumps({"prompt": "x", "expect": expect}) + "\n")
    with pytest.raises(ValueError, match=f"p.jsonl:2: .*{match}"):
        load_prompts(f)


def test_run_alignment_rejects_no_samples_and_no_prompts():
    items = [{"id": "a", "prompt": "a red circle", "expect": {"objects": [{"color": "red"}]}}]
    with pytest.raises(ValueError, match="samples must be a positive integer"):
        run_alignment(None, items, samples=0)
    with pytest.raises(ValueError, match="no prompts"):
        run_alignment(None, [], samples=1)


def test_score_references_checks_its_prompts_before_rendering():
    """Empty or misspelt prompt lists are named up front, like run_alignment's."""
    with pytest.raises(ValueError, match="no prompts"):
        score_references([])
    bad = [{"id": "a", "prompt": "x", "expect": {"objects": [{"colour": "red"}]}}]
    with pytest.raises(ValueError, match="unknown key 'colour'"):
        score_references(bad)


class PoolAutoencoder:
    """Encodes by averaging ``factor``-pixel blocks and decodes by repeating them; keeps its inputs."""

    def __init__(self, factor: int):
        self.factor, self.downsample, self.seen = factor, factor, []

    def encode(self, x):
        self.seen.append(x.clone())
        return F.avg_pool2d(x, self.factor)

    def decode(self, z):
        return F.interpolate(z, scale_factor=self.factor, mode="nearest")


class AutoencoderOnly:
    """A pipeline stand-in for 64x64 images: the pooling autoencoder and the latent side it implies."""

    device = torch.device("cpu")

    def __init__(self, factor: int):
        self.autoencoder = PoolAutoencoder(factor)
        self.model = SimpleNamespace(config=SimpleNamespace(base_size=64 // factor))


def test_reference_renders_the_prompts_own_scenes_and_the_autoencoder_sets_the_ceiling(tmp_path):
    items = prompt_set("heldout", 24, seed=5)
    renders = score_references(items, out_dir=tmp_path)
    assert renders["reference"] == "renders" and renders["overall"] >= 0.98 and renders["n"] == 24
    assert (tmp_path / "grid.png").exists() and len(json.loads((tmp_path / "report.json").read_text())["rows"]) == 24
    lossless = AutoencoderOnly(1)
    same = score_references(items, lossless, batch_size=10)
    assert same["reference"] == "autoencoder" and same["per_category"] == renders["per_category"]
    # every render went through the autoencoder, drawn from the full scene, not just what is stated
    seen = torch.cat(lossless.autoencoder.seen)
    assert [len(b) for b in lossless.autoencoder.seen] == [10, 10, 4]
    want = np.stack([np.asarray(render_scene(it["attributes"], 64)) for it in items])
    got = ((seen.permute(0, 2, 3, 1) + 1) * 127.5).round().byte().numpy()
    assert np.array_equal(got, want)
    assert any(not np.array_equal(np.asarray(render_scene(it["expect"], 64)), w) for it, w in zip(items, want))
    coarse = score_references(items, AutoencoderOnly(8), out_dir=tmp_path / "coarse")  # shapes lost, backgrounds kept
    assert coarse["per_category"]["shape"] <= renders["per_category"]["shape"] - 0.5
    assert coarse["per_category"]["background"] == 1.0
    # the confusion table agrees with the rows: off its diagonal exactly where a single shape check failed
    rows = json.loads((tmp_path / "coarse" / "report.json").read_text())["rows"]
    pairs = [(r, it["expect"]["objects"][0]["shape"]) for r, it in zip(rows, items)
             if scene_of(it["expect"]) == "single"]
    assert all(r["checks"]["shape"] == (bool(r["read"]["objects"]) and r["read"]["objects"][0]["shape"] == want)
               for r, want in pairs)  # each row records what was read
    single = [r for r, _ in pairs]
    table = coarse["confusion"]["shape"]
    missed = sum(n for want, got in table.items() for read, n in got.items() if read != want)
    assert sum(n for got in table.values() for n in got.values()) == len(single)
    assert missed == sum(not r["checks"]["shape"] for r in single) > 0
    assert all(set(got) == {want} for want, got in renders["confusion"]["shape"].items())  # renders: diagonal
    # the relation table counts every relation image once, and renders place every pair right
    relations = sum(bool(it["expect"].get("relation")) for it in items)
    assert relations > 0 and renders["relation_layout"] == {"right": relations, "swapped": 0, "other axis": 0,
                                                             "objects wrong": 0}
    layout = coarse["relation_layout"]
    assert sum(layout.values()) == relations and layout["objects wrong"] > 0
    # placed right with both objects right implies the relation check passed (which asks less)
    assert layout["right"] <= sum(r["checks"].get("relation", False) for r in rows)
    bad = [{"id": "p7", "prompt": "a red circle", "expect": {"objects": [{"shape": "circle"}]}}]
    with pytest.raises(ValueError, match="prompt p7: no reference render .* unknown color None"):
        score_references(bad)


def test_load_prompts_keeps_optional_attributes(tmp_path):
    f = tmp_path / "p.jsonl"
    scene = {"scene": "single", "objects": [{"color": "red", "shape": "star", "size": "small", "cell": "top left"}],
             "background": "white"}
    f.write_text(json.dumps({"prompt": "a red star", "expect": {"objects": [{"color": "red", "shape": "star"}]},
                             "attributes": scene}) + "\n")
    assert load_prompts(f)[0]["attributes"] == scene
    f.write_text('{"prompt": "x", "expect": {}, "attributes": [1]}\n')
    with pytest.raises(ValueError, match="p.jsonl:1: 'attributes'"):
        load_prompts(f)
