"""The order and content margins: the denoising loss on relation scenes under false captions."""

import json

import pytest
from tiny import tiny_pipeline

from latentdit.datasets.shapes import prompt_set
from latentdit.evaluate.alignment import order_swapped
from latentdit.evaluate.binding import TIMES, binding_items, condition_margins, recoloured


def test_recoloured_changes_only_the_first_objects_colour_to_an_unused_one():
    items = prompt_set("heldout", 60, seed=2)
    relations = [it for it in items if order_swapped(it) is not None]
    assert relations and all(recoloured(it) is None for it in items if it not in relations)
    for it in relations:
        first, second = it["expect"]["objects"]
        new = recoloured(it)
        changed = [(a, b) for a, b in zip(it["prompt"].split(), new.split()) if a != b]
        assert len(new.split()) == len(it["prompt"].split())
        colour = next(b for a, b in changed if a == first["color"])
        assert colour not in (first["color"], second["color"], it["attributes"]["background"])
        assert all(a == first["color"] or a in ("a", "an") for a, _ in changed)
        assert f"{colour} {first['shape']}" in new and f"{second['color']} {second['shape']}" in new
        assert recoloured(it) == new  # drawn from the id: the same every run
    item = {"id": "x", "prompt": "a red star to the right of an orange cross",
            "expect": {"scene": "relation", "relation": "right of",
                       "objects": [{"color": "red", "shape": "star"}, {"color": "orange", "shape": "cross"}]}}
    assert recoloured(item).endswith(" star to the right of an orange cross")
    assert recoloured(item).split()[1] not in ("red", "orange")


def test_binding_items_keep_relations_with_their_scene():
    items = prompt_set("train", 40, seed=1)
    kept = binding_items(items)
    assert kept and len(kept) == sum(order_swapped(it) is not None for it in items)
    assert all(it["swapped"] == order_swapped(it) and it["recoloured"] == recoloured(it) for it in kept)
    assert binding_items([{k: v for k, v in it.items() if k != "attributes"} for it in items]) == []


def test_margins_are_zero_when_the_model_cannot_tell_the_captions_apart(tiny_clip, tiny_vae, monkeypatch):
    """Same noise, same scenes, same condition: any margin would be the measurement's own error."""
    pipe = tiny_pipeline(tiny_clip, tiny_vae)
    encode = pipe.encode
    monkeypatch.setattr(pipe, "encode", lambda prompts, negative=None: encode(["a red circle"] * len(prompts)))
    report = condition_margins(pipe, prompt_set("heldout", 24, seed=0), times=(0.5, 1.0))
    assert report["scenes"] == len(binding_items(prompt_set("heldout", 24, seed=0))) > 0
    assert [r["t"] for r in report["per_time"]] == [0.5, 1.0]
    for row in report["per_time"]:
        assert row["loss"] > 0
        for variant in ("swapped", "recoloured"):
            assert (row[variant]["margin"], row[variant]["wins"]) == (0.0, 0.0)
    assert report["order_margin"] == report["content_margin"] == 0.0


def test_margins_read_the_caption_and_do_not_depend_on_the_batch(tiny_clip, tiny_vae):
    pipe = tiny_pipeline(tiny_clip, tiny_vae)
    items = prompt_set("heldout", 30, seed=0)
    big = condition_margins(pipe, items, times=(0.3, 0.9), batch_size=32, dtype=None)
    small = condition_margins(pipe, items, times=(0.3, 0.9), batch_size=3, dtype=None)
    for a, b in zip(big["per_time"], small["per_time"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["recoloured"]["margin"] == pytest.approx(b["recoloured"]["margin"], abs=1e-4)
        assert a["swapped"]["wins"] == b["swapped"]["wins"]
        assert 0 < a["attention_in_boxes"] < 1  # where the objects' words are read
        assert a["attention_in_boxes"] == pytest.approx(b["attention_in_boxes"], abs=1e-4)
        assert 0 < a["swapped"]["attention_in_boxes"] < 1
    assert any(r["recoloured"]["margin"] != 0 for r in big["per_time"])  # the false captions change the loss
    assert any(r["swapped"]["margin"] != 0 for r in big["per_time"])
    other = condition_margins(pipe, items, times=(0.3, 0.9), seed=1, dtype=None)
    assert other["per_time"][0]["loss"] != big["per_time"][0]["loss"]  # the seed draws other noise


def test_a_model_with_a_layout_planner_reports_where_it_plans_each_object(tiny_clip, tiny_vae):
    import torch

    items = prompt_set("heldout", 30, seed=0)
    plain = condition_margins(tiny_pipeline(tiny_clip, tiny_vae), items, times=(0.5,), dtype=None)
    assert "plan_in_boxes" not in plain
    pipe = tiny_pipeline(tiny_clip, tiny_vae, layout_planner=True)
    with torch.no_grad():  # a new planner places no word: give it a plan that depends on the words
        pipe.model.planner.head.weight.normal_()
    report = condition_margins(pipe, items, times=(0.5,), dtype=None)
    assert 0 < report["plan_in_boxes"] < 1 and 0 < report["plan_in_boxes_swapped"] < 1
    assert report["plan_in_boxes"] != report["plan_in_boxes_swapped"]  # the plan reads the caption
    with torch.no_grad():  # a planner that says "nowhere in particular" for every word plans nothing
        pipe.model.planner.head.weight.zero_()
        pipe.model.planner.head.bias.fill_(-30.0)[-1] = 0.0
    nowhere = condition_margins(pipe, items, times=(0.5,), dtype=None)
    assert nowhere["plan_in_boxes"] == nowhere["plan_in_boxes_swapped"] == 0.0


def test_margins_refuse_what_they_cannot_measure(tiny_clip, tiny_vae):
    pipe = tiny_pipeline(tiny_clip, tiny_vae)
    singles = [it for it in prompt_set("heldout", 20, seed=0) if it["expect"]["scene"] != "relation"]
    with pytest.raises(ValueError, match="no prompt states a relation"):
        condition_margins(pipe, singles)
    with pytest.raises(ValueError, match="times must be noise levels"):
        condition_margins(pipe, prompt_set("heldout", 20, seed=0), times=(0.0, 0.5))
    class_model = tiny_pipeline(tiny_clip, tiny_vae, num_classes=3, text_dim=0, pooled_dim=0)
    with pytest.raises(ValueError, match="text-conditioned"):
        condition_margins(class_model, prompt_set("heldout", 20, seed=0))


def test_eval_binding_command_writes_its_report(tmp_path, tiny_clip, tiny_vae, monkeypatch, capsys):
    import latentdit.pipeline
    from latentdit.cli import main

    pipe = tiny_pipeline(tiny_clip, tiny_vae)
    monkeypatch.setattr(latentdit.pipeline.Text2Image, "from_pretrained", staticmethod(lambda *a, **k: pipe))
    assert main(["eval", "binding", "--n", "30", "--split", "train", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "binding.json").read_text())
    assert report["scenes"] == len(binding_items(prompt_set("train", 30, seed=0)))
    assert [r["t"] for r in report["per_time"]] == list(TIMES)
    assert json.loads(capsys.readouterr().out)["order_margin"] == report["order_margin"]
    assert main(["eval", "binding", "--n", "0"]) == 2
    assert "--n must be >= 1" in capsys.readouterr().err
