"""The pixel-only alignment checker: reads `shapes` renders, survives degradation, rejects swaps."""

import copy
import io
import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from latentdit.datasets.shapes import COLORS, POSITIONS, SHAPES, ShapesDataset, prompt_set, render_scene
from latentdit.evaluate import evaluate_images, read_attributes, score

N_PER_SPLIT = 150


@pytest.fixture(scope="module")
def samples() -> list:
    """150 ground-truth samples from each split (all three scene types)."""
    datasets = [ShapesDataset(split=split, seed=21) for split in ("train", "heldout")]
    return [dataset[i] for dataset in datasets for i in range(N_PER_SPLIT)]


def _degrade(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """What a generator's output may look like: soft, JPEG-compressed and noisy."""
    image = image.filter(ImageFilter.GaussianBlur(1))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=60)
    pixels = np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32)
    pixels += rng.normal(0.0, 8.0, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))


def test_reads_ground_truth_renders(samples):
    result = evaluate_images([(s.image, s.attributes) for s in samples])
    assert result["n"] == 2 * N_PER_SPLIT
    assert result["overall"] >= 0.98, result
    assert set(result["per_category"]) == {"color", "shape", "position", "size", "single_all", "relation",
                                           "count", "background"}
    assert min(result["per_category"].values()) >= 0.95, result


def test_reads_degraded_renders(samples):
    rng = np.random.default_rng(0)
    result = evaluate_images([(_degrade(s.image, rng), s.attributes) for s in samples])
    assert result["overall"] >= 0.90, result
    assert result["per_category"]["count"] >= 0.95 and result["per_category"]["color"] >= 0.95, result


def _swapped(attributes: dict, key: str, rng: random.Random) -> dict | None:
    """The same scene with the first object's (all objects' in count scenes) `key` changed to a
    value no object in the scene has, so the checker cannot find the expected one elsewhere."""
    changed = copy.deepcopy(attributes)
    targets = changed["objects"] if attributes["scene"] == "count" else changed["objects"][:1]
    used = {o[key] for o in attributes["objects"]}
    if key == "color":
        choices = [c for c in COLORS if c not in used and c != attributes["background"]]
    elif key == "shape":
        choices = [s for s in SHAPES if s not in used]
    else:
        if attributes["scene"] != "single":
            return None  # moving one of several objects may make them collide
        choices = [c for c in POSITIONS if c not in used]
    new = rng.choice(choices)
    for obj in targets:
        obj[key] = new
        if key == "cell":
            del obj["center"], obj["bbox"]
    return changed


@pytest.mark.parametrize(("key", "category"), [("color", "color"), ("shape", "shape"), ("cell", "position")])
def test_rejects_swapped_attributes(samples, key, category):
    rng = random.Random(1)
    rejected = []
    for sample in samples[::2] if key != "cell" else samples:
        changed = _swapped(sample.attributes, key, rng)
        if changed is not None:
            rejected.append(not score(render_scene(changed, 64), sample.attributes)[category])
    assert len(rejected) >= 90
    assert np.mean(rejected) >= 0.95, np.mean(rejected)


def test_reads_a_known_scene_exactly():
    scene = {"scene": "relation", "background": "gray", "relation": "left of", "objects": [
        {"color": "red", "shape": "circle", "size": "large", "cell": "top left"},
        {"color": "blue", "shape": "cross", "size": "small", "cell": "bottom right"}]}
    image = render_scene(scene, 64)
    read = read_attributes(image)
    assert read["background"] == "gray" and read["count"] == 2
    found = [{k: o[k] for k in ("color", "shape", "size", "cell")} for o in read["objects"]]
    assert found == scene["objects"]  # largest first
    x0, y0, x1, y1 = read["objects"][0]["bbox"]
    assert x1 - x0 == pytest.approx(64 / 3, abs=1.0) and y1 - y0 == pytest.approx(64 / 3, abs=1.0)
    pixels = np.asarray(image)
    assert read_attributes(pixels)["objects"] == read["objects"]
    assert read_attributes(pixels / 255.0)["objects"] == read["objects"]


def test_touching_objects_of_different_colours_are_not_merged():
    side = 64 / 3
    scene = {"background": "white", "objects": [
        {"color": "red", "shape": "square", "size": "large", "center": [32 - side / 2, 32]},
        {"color": "blue", "shape": "square", "size": "large", "center": [32 + side / 2, 32]}]}
    read = read_attributes(render_scene(scene, 64))
    found = sorted((o["color"], o["shape"]) for o in read["objects"])
    assert found == [("blue", "square"), ("red", "square")]


def test_specks_are_ignored():
    scene = {"scene": "single", "background": "white",
             "objects": [{"color": "green", "shape": "heart", "size": "small", "cell": "center"}]}
    pixels = np.array(render_scene(scene, 64))
    for y, x in [(3, 50), (55, 8), (40, 58)]:
        pixels[y:y + 2, x:x + 2] = COLORS["black"]
    assert score(Image.fromarray(pixels), {**scene, "count": 1}) == {
        "color": True, "shape": True, "size": True, "position": True, "single_all": True, "count": True,
        "background": True}


def test_relation_is_judged_from_geometry():
    a, b = {"color": "yellow", "shape": "star"}, {"color": "pink", "shape": "square"}
    image = render_scene({"scene": "relation", "objects": [a, b], "relation": "left of",
                          "background": "black"})
    assert score(image, {"scene": "relation", "objects": [a, b], "relation": "left of"})["relation"]
    assert not score(image, {"scene": "relation", "objects": [a, b], "relation": "right of"})["relation"]
    assert score(image, {"scene": "relation", "objects": [b, a], "relation": "right of"})["relation"]
    assert not score(image, {"scene": "relation", "objects": [b, a], "relation": "above"})["relation"]


def test_relation_outcome_tells_a_swap_from_the_wrong_axis_and_from_wrong_objects():
    from latentdit.evaluate import relation_outcome

    a, b = {"color": "yellow", "shape": "star"}, {"color": "pink", "shape": "square"}
    found = read_attributes(render_scene({"scene": "relation", "objects": [a, b], "relation": "left of",
                                          "background": "black"}))["objects"]
    ask = {"scene": "relation", "objects": [a, b]}
    assert relation_outcome(found, {**ask, "relation": "left of"}) == "right"
    assert relation_outcome(found, {**ask, "relation": "right of"}) == "swapped"
    assert relation_outcome(found, {**ask, "objects": [b, a], "relation": "left of"}) == "swapped"
    assert relation_outcome(found, {**ask, "relation": "above"}) == "other axis"
    assert relation_outcome(found, {**ask, "relation": "below"}) == "other axis"
    blue = {"color": "blue", "shape": "star"}
    assert relation_outcome(found, {**ask, "objects": [blue, b], "relation": "left of"}) == "objects wrong"
    assert relation_outcome(found[:1], {**ask, "relation": "left of"}) == "objects wrong"
    # only what the prompt states is held to: a colour-only prompt's objects are right by colour
    assert relation_outcome(found, {**ask, "objects": [{"color": "yellow"}, {"color": "pink"}],
                                    "relation": "left of"}) == "right"


def test_count_is_checked_against_what_is_drawn():
    want = {"scene": "count", "objects": [{"color": "cyan", "shape": "triangle"}], "count": 3}
    three = render_scene(want, 64)
    assert score(three, want) == {"color": True, "shape": True, "count": True}
    assert score(render_scene({**want, "count": 4}, 64), want)["count"] is False
    hearts = render_scene({**want, "objects": [{"color": "cyan", "shape": "heart"}]}, 64)
    assert score(hearts, want) == {"color": True, "shape": False, "count": True}


def test_score_checks_only_what_the_prompt_states():
    orange = {"color": "orange", "shape": "circle", "size": "small", "cell": "top"}
    image = render_scene({"objects": [orange]})
    assert score(image, {"objects": [{"color": "orange"}]}) == {"color": True}
    assert score(image, {"objects": [{"color": "orange", "shape": "circle", "cell": "bottom"}]}) == {
        "color": True, "shape": True, "position": False, "single_all": False}


def test_evaluate_images_aggregates_per_category_and_overall():
    right = {"scene": "single", "objects": [{"color": "red", "shape": "square"}], "background": "white"}
    wrong = {"scene": "single", "objects": [{"color": "blue", "shape": "square"}], "background": "white"}
    image = render_scene(right, 64)
    result = evaluate_images([(image, right), (image, wrong)])
    assert result["n"] == 2 and result["checks"] == {"color": 2, "shape": 2, "background": 2}
    assert result["per_category"] == {"color": 0.5, "shape": 1.0, "background": 1.0}
    assert result["overall"] == pytest.approx(5 / 6) and result["image_accuracy"] == 0.5


def test_renders_of_prompts_pass_their_own_checks():
    prompts = prompt_set("heldout", 40, seed=3) + prompt_set("train", 40, seed=3)
    result = evaluate_images([(render_scene(p["expect"], 64), p["expect"]) for p in prompts])
    assert result["overall"] >= 0.98, result


def test_bad_inputs_raise_value_errors():
    image = render_scene({"objects": [{"color": "red", "shape": "circle"}]})
    with pytest.raises(ValueError, match="objects"):
        score(image, {"scene": "single"})
    with pytest.raises(ValueError, match="scene"):
        score(image, {"scene": "crowd", "objects": [{"color": "red"}]})
    with pytest.raises(ValueError, match="image"):
        read_attributes(np.zeros((64, 64)))
    with pytest.raises(ValueError, match="at least one"):
        evaluate_images([])
