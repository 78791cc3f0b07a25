"""The procedural `shapes` dataset: determinism, splits, geometry, captions, files."""

import json
import random
import re

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from tiny import CORNERS, in_corners_only

from latentdit.datasets.shapes import (
    BACKGROUNDS,
    COLORS,
    HELDOUT_PAIRS,
    POSITION_PHRASES,
    POSITIONS,
    RELATION_PHRASES,
    SHAPES,
    SIZE_WORDS,
    SIZES,
    ShapesDataset,
    caption_for,
    prompt_set,
    relation_between,
    render_scene,
    write_samples,
)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _pairs(attributes: dict) -> set[tuple[str, str]]:
    return {(o["color"], o["shape"]) for o in attributes["objects"]}


def test_same_seed_and_index_give_the_same_sample():
    a, b = ShapesDataset(seed=7), ShapesDataset(seed=7)
    for index in (0, 5, 123_456_789):
        x, y = a[index], b[index]
        assert np.array_equal(_pixels(x.image), _pixels(y.image))
        assert (x.caption, x.attributes) == (y.caption, y.attributes)


def test_different_indices_and_seeds_give_different_samples():
    dataset = ShapesDataset(seed=0)
    images = {dataset[i].image.tobytes() for i in range(30)}
    assert len(images) == 30
    assert dataset[3].image.tobytes() != ShapesDataset(seed=1)[3].image.tobytes()
    assert dataset[3].image.tobytes() != ShapesDataset(seed=0, split="heldout")[3].image.tobytes()


def test_train_split_never_contains_a_heldout_pair_and_never_hides_an_object():
    dataset = ShapesDataset(split="train", seed=3)
    for i in range(2000):
        attributes, _, _ = dataset.draw(i)
        assert not _pairs(attributes) & HELDOUT_PAIRS, attributes
        assert all(o["color"] != attributes["background"] for o in attributes["objects"])
        assert json.loads(json.dumps(attributes)) == attributes  # JSON-serialisable as is


def test_heldout_split_always_contains_a_heldout_pair():
    dataset = ShapesDataset(split="heldout", seed=3)
    scenes = set()
    for i in range(1000):
        attributes, _, _ = dataset.draw(i)
        assert _pairs(attributes) & HELDOUT_PAIRS, attributes
        scenes.add(attributes["scene"])
    assert scenes == {"single", "relation", "count"}


def test_object_centres_show_the_attribute_colour_and_the_border_the_background():
    dataset = ShapesDataset(seed=11)
    for i in range(200):
        sample = dataset[i]
        pixels = _pixels(sample.image)
        for obj in sample.attributes["objects"]:
            x, y = (int(v) for v in obj["center"])
            assert np.abs(pixels[y, x] - COLORS[obj["color"]]).max() <= 2, (obj, pixels[y, x])
        assert np.abs(pixels[0, 0] - BACKGROUNDS[sample.attributes["background"]]).max() <= 2


def test_object_geometry_matches_cell_size_and_canvas():
    dataset = ShapesDataset(size=96, seed=2)
    for i in range(500):
        attributes, _, _ = dataset.draw(i)
        for obj in attributes["objects"]:
            x0, y0, x1, y1 = obj["bbox"]
            row, col = POSITIONS[obj["cell"]]
            assert (int(obj["center"][1] * 3 // 96), int(obj["center"][0] * 3 // 96)) == (row, col)
            assert x1 - x0 == pytest.approx(SIZES[obj["size"]] * 96, abs=0.02)
            assert 0 < x0 and 0 < y0 and x1 < 96 and y1 < 96


def test_relation_scenes_place_objects_as_the_relation_says():
    dataset = ShapesDataset(seed=4, scenes=("relation",))
    seen = set()
    for i in range(500):
        attributes, _, _ = dataset.draw(i)
        a, b = attributes["objects"]
        dx, dy = b["center"][0] - a["center"][0], b["center"][1] - a["center"][1]
        relation = attributes["relation"]
        seen.add(relation)
        expected = {"left of": dx > abs(dy), "right of": -dx > abs(dy),
                    "above": dy > abs(dx), "below": -dy > abs(dx)}
        assert expected[relation], attributes
        assert relation_between(a["center"], b["center"]) == relation
        assert (a["color"], a["shape"]) != (b["color"], b["shape"])  # or "A left of A" is ambiguous
    assert seen == {"left of", "right of", "above", "below"}


def _disjoint(a: dict, b: dict) -> bool:
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a["bbox"], b["bbox"]
    return ax1 < bx0 or bx1 < ax0 or ay1 < by0 or by1 < ay0


def test_count_scenes_hold_two_to_four_identical_non_overlapping_objects():
    dataset = ShapesDataset(seed=5, scenes=("count",))
    counts = set()
    for i in range(500):
        attributes, _, _ = dataset.draw(i)
        objects = attributes["objects"]
        counts.add(len(objects))
        assert attributes["count"] == len(objects)
        assert len({(o["color"], o["shape"], o["size"]) for o in objects}) == 1
        assert len({o["cell"] for o in objects}) == len(objects)
        assert all(_disjoint(a, b) for k, a in enumerate(objects) for b in objects[k + 1:]), objects
    assert counts == {2, 3, 4}


def test_a_distinct_count_layout_leaves_the_four_corners_to_four_copies():
    default, distinct = (ShapesDataset(seed=5, scenes=("count",), count_layout=k) for k in ("any", "distinct"))
    cornered = {"any": 0, "distinct": 0}
    for i in range(400):
        plain, moved = default.draw(i)[0], distinct.draw(i)[0]
        for kind, attributes in (("any", plain), ("distinct", moved)):
            objects = attributes["objects"]
            assert all(_disjoint(a, b) for k, a in enumerate(objects) for b in objects[k + 1:]), objects
            cornered[kind] += in_corners_only(objects)
        if len(moved["objects"]) == 4 and moved["objects"][0]["size"] == "large":
            assert {o["cell"] for o in moved["objects"]} == CORNERS  # four large copies fit only there
    assert cornered["distinct"] == 0 and cornered["any"] > 40  # the rule is what changed the layouts
    assert ShapesDataset(seed=5, scenes=("single",), count_layout="distinct").draw(3) == \
        ShapesDataset(seed=5, scenes=("single",)).draw(3)  # other scenes are the same draws
    with pytest.raises(ValueError, match="count layout"):
        ShapesDataset(count_layout="corners")


def test_count_scene_renders_as_separate_blobs():
    attributes = {"scene": "count", "objects": [{"color": "yellow", "shape": "star"}], "count": 3,
                  "background": "black"}
    pixels = _pixels(render_scene(attributes, 64))
    covered = np.linalg.norm(pixels - BACKGROUNDS["black"], axis=2) > 0.5 * np.linalg.norm(
        np.subtract(COLORS["yellow"], BACKGROUNDS["black"]))
    assert ndimage.label(covered, structure=np.ones((3, 3)))[1] == 3


@pytest.mark.parametrize("size", [0, 30, 60, 65, -8])
def test_canvas_size_must_be_a_multiple_of_eight(size):
    with pytest.raises(ValueError, match="multiple of 8"):
        ShapesDataset(size=size)
    with pytest.raises(ValueError, match="multiple of 8"):
        render_scene({"objects": [{"color": "red", "shape": "circle"}]}, size=size)


def test_other_canvas_sizes_render_at_that_size():
    for size in (32, 128):
        sample = ShapesDataset(size=size, seed=1)[0]
        assert sample.image.size == (size, size) and sample.attributes["canvas"] == size


def test_render_scene_reproduces_samples_and_rescales_recorded_positions():
    sample = ShapesDataset(seed=9)[17]
    assert np.array_equal(_pixels(render_scene(sample.attributes, 64)), _pixels(sample.image))
    big = _pixels(render_scene(sample.attributes, 128))
    for obj in sample.attributes["objects"]:
        x, y = (int(2 * v) for v in obj["center"])
        assert np.abs(big[y, x] - COLORS[obj["color"]]).max() <= 2


def test_render_scene_rejects_impossible_scenes():
    red_circle = {"color": "red", "shape": "circle"}
    with pytest.raises(ValueError, match="background"):
        render_scene({"objects": [{"color": "white", "shape": "heart"}], "background": "white"})
    with pytest.raises(ValueError, match="shape"):
        render_scene({"objects": [{"color": "red", "shape": "hexagon"}]})
    with pytest.raises(ValueError, match="objects"):
        render_scene({"objects": []})
    with pytest.raises(ValueError, match="cell"):
        render_scene({"objects": [dict(red_circle, cell="upper left")]})


def test_dataset_length_iteration_and_bad_arguments():
    dataset = ShapesDataset(length=3)
    assert len(dataset) == 3 and len(list(dataset)) == 3
    assert dataset[10_000_000].caption  # infinite: indices past `length` still work
    with pytest.raises(IndexError):
        dataset[-1]
    with pytest.raises(ValueError, match="scene"):
        ShapesDataset(scenes=("single", "crowd"))
    with pytest.raises(ValueError, match="scene_weights"):
        ShapesDataset(scenes=("single", "count"), scene_weights=(1.0,))
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(split="test")


def test_scene_weights_select_scenes():
    dataset = ShapesDataset(scenes=("single", "count"), scene_weights=(0.0, 1.0))
    assert {dataset.draw(i)[0]["scene"] for i in range(50)} == {"count"}


def test_write_samples_writes_pngs_and_jsonl(tmp_path):
    path = write_samples(tmp_path / "out", 5, seed=2)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert path.name == "captions.jsonl" and len(lines) == 5
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [f"{i:06d}.png" for i in range(5)]
    dataset = ShapesDataset(seed=2)
    for i, line in enumerate(lines):
        assert line["file"] == f"{i:06d}.png"
        assert (line["caption"], line["attributes"]) == (dataset[i].caption, dataset[i].attributes)
        image = Image.open(tmp_path / "out" / line["file"])
        assert np.array_equal(_pixels(image), _pixels(dataset[i].image))


# ------------------------------------------------------------------------------------- captions

_NUMBER_WORDS = {"2": "two", "3": "three", "4": "four"}
_INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _vocabulary() -> list[tuple[str, str]]:
    """Phrase -> placeholder, longest first, so a caption reduces to the template that made it."""
    table = [(p, "<pos>") for phrases in POSITION_PHRASES.values() for p in phrases]
    table += [(p, "<rel>") for phrases in RELATION_PHRASES.values() for p in phrases]
    table += [(w, "<size>") for words in SIZE_WORDS.values() for w in words]
    table += [(s + ("es" if s.endswith("s") else "s"), "<shapes>") for s in SHAPES]
    table += [(s, "<shape>") for s in SHAPES]
    table += [(c, "<color>") for c in list(COLORS) + list(BACKGROUNDS)]
    table += [(w, "<n>") for w in _NUMBER_WORDS.values()] + [(d, "<n>") for d in _NUMBER_WORDS]
    return sorted(table, key=lambda item: -len(item[0]))


def _skeleton(caption: str) -> str:
    for phrase, placeholder in _vocabulary():
        caption = re.sub(rf"\b{re.escape(phrase)}\b", placeholder, caption)
    return caption.replace("an <", "a <")


@pytest.mark.parametrize("scene", ["single", "relation", "count"])
def test_each_scene_type_uses_at_least_five_caption_templates(scene):
    dataset = ShapesDataset(seed=6, scenes=(scene,))
    skeletons = {_skeleton(dataset.draw(i)[1]) for i in range(300)}
    assert len(skeletons) >= 5, skeletons
    mentions_background = [("background" in dataset.draw(i)[1]) for i in range(300)]
    assert any(mentions_background) and not all(mentions_background)


def _colour_words(caption: str) -> set[str]:
    return {c for c in list(COLORS) + list(BACKGROUNDS) if re.search(rf"\b{c}\b", caption)}


def _check_caption_is_true(caption: str, attributes: dict, stated: dict) -> None:
    """The caption names what `stated` holds, `stated` agrees with the image, and nothing else."""
    objects = attributes["objects"]
    named = {o["color"] for o in stated["objects"]}
    named |= {stated["background"]} if "background" in stated else set()
    assert _colour_words(caption) == named
    assert ("background" in caption) == ("background" in stated)
    if "background" in stated:
        assert f"{attributes['background']} background" in caption
    for want in stated["objects"]:
        assert any(all(o[k] == v for k, v in want.items()) for o in objects)
        assert re.search(rf"\b{want['shape']}", caption)
        if "size" in want:
            assert any(re.search(rf"\b{w}\b", caption) for w in SIZE_WORDS[want["size"]])
        if "cell" in want:
            assert any(p in caption for p in POSITION_PHRASES[want["cell"]])
    if attributes["scene"] == "relation":
        a, b = (f"{o['color']} {o['shape']}" for o in objects)
        relation = attributes["relation"]
        said = [rf"{a} {p} an? (\w+ )?{b}" for p in RELATION_PHRASES[relation]]  # A left of B
        said += [rf"{b} {p} an? (\w+ )?{a}" for p in RELATION_PHRASES[_INVERSE[relation]]]  # B right of A
        said += [rf"{b} with an? (\w+ )?{a} {p} it" for p in RELATION_PHRASES[relation]]  # B with A ... it
        assert any(re.search(pattern, caption) for pattern in said), caption
        assert stated["relation"] == relation
    if attributes["scene"] == "count":
        n = len(objects)
        assert re.search(rf"\b({n}|{_NUMBER_WORDS[str(n)]})\b", caption) and stated["count"] == n
    if attributes["scene"] == "single" and "cell" not in stated["objects"][0]:
        assert not re.search(r"\b(top|bottom|left|right|center|middle)\b", caption)


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_captions_state_only_true_things(split):
    dataset = ShapesDataset(seed=8, split=split)
    for i in range(600):
        attributes, caption, stated = dataset.draw(i)
        _check_caption_is_true(caption, attributes, stated)


def test_relation_captions_never_flip_the_relation():
    dataset = ShapesDataset(seed=12, scenes=("relation",))
    for i in range(300):
        attributes, caption, _ = dataset.draw(i)
        a, b = (f"{o['color']} {o['shape']}" for o in attributes["objects"])
        relation = attributes["relation"]
        for wrong in RELATION_PHRASES[_INVERSE[relation]]:  # "A <inverse> ... B" would be false
            assert not re.search(rf"{a} {wrong} an? (\w+ )?{b}", caption), caption
        for wrong in RELATION_PHRASES[relation]:  # so would "B <relation> ... A"
            assert not re.search(rf"{b} {wrong} an? (\w+ )?{a}", caption), caption


def test_caption_for_is_deterministic_given_the_rng_and_skips_missing_facts():
    attributes = {"scene": "single", "objects": [{"color": "purple", "shape": "heart"}]}
    captions = {caption_for(attributes, random.Random(k)) for k in range(40)}
    assert captions == {"a purple heart"}  # no size, cell or background known: nothing else to say
    full = ShapesDataset(seed=1).draw(4)[0]
    assert caption_for(full, random.Random(3)) == caption_for(full, random.Random(3))


def test_prompt_set_states_a_subset_of_a_consistent_scene():
    prompts = prompt_set("heldout", 60, seed=1)
    assert len(prompts) == 60 and len({p["id"] for p in prompts}) == 60
    assert prompts == prompt_set("heldout", 60, seed=1)
    for p in prompts:
        expect = p["expect"]
        assert {(o["color"], o["shape"]) for o in expect["objects"]} & HELDOUT_PAIRS
        assert set(expect) <= {"scene", "objects", "relation", "count", "background"}
        render_scene(expect, 64)  # every prompt's scene can be drawn for reference
    train_captions = {ShapesDataset(seed=1).draw(i)[1] for i in range(60)}
    assert [p["prompt"] for p in prompt_set("train", 60, seed=1)] != list(train_captions)


# ----------------------------------------------------------------------------- Chinese captions

def test_the_chinese_vocabulary_covers_the_english_one():
    from latentdit.datasets.shapes import _captions
    from latentdit.datasets.shapes import _captions_zh as zh

    assert zh.COLORS_ZH.keys() == COLORS.keys() and zh.SHAPES_ZH.keys() == set(SHAPES)
    assert zh.BACKGROUNDS_ZH.keys() == BACKGROUNDS.keys() and zh.SIZE_WORDS_ZH.keys() == SIZES.keys()
    assert zh.POSITION_PHRASES_ZH.keys() == POSITIONS.keys()
    assert zh.RELATION_PHRASES_ZH.keys() == RELATION_PHRASES.keys()
    for scene, templates in _captions._TEMPLATES.items():  # index i of one language states what i of the other does
        assert len(zh.TEMPLATES_ZH[scene]) == len(templates)
        for (english, _), chinese in zip(templates, zh.TEMPLATES_ZH[scene]):
            assert set(re.findall(r"{(\w+)}", chinese)) == set(re.findall(r"{(\w+)}", english)) - {"shapes"} | (
                {"shape"} if "{shapes}" in english else set())


def test_chinese_prompts_are_the_english_scenes_and_checks_and_english_is_unchanged():
    en, zh = prompt_set("heldout", 200, seed=0), prompt_set("heldout", 200, seed=0, lang="zh")
    assert [p["prompt"] for p in en[:3]] == [  # the English prompts as they were before Chinese existed
        "a red star to the right of an orange cross", "a group of three orange squares",
        "a cyan heart above an orange square"]
    for a, b in zip(en, zh):
        assert (a["id"], a["expect"], a["attributes"]) == (b["id"], b["expect"], b["attributes"])
        assert not re.search(r"[A-Za-z]", b["prompt"]) and re.search(r"[\u4e00-\u9fff]", b["prompt"])


def _zh_objects(caption: str) -> list[tuple[str, str]]:
    from latentdit.datasets.shapes._captions_zh import COLORS_ZH, SHAPES_ZH

    color = {v: k for k, v in COLORS_ZH.items()}
    shape = {v: k for k, v in SHAPES_ZH.items()}
    found = re.findall(rf"({'|'.join(color)})的?({'|'.join(shape)})", caption)
    return [(color[c], shape[s]) for c, s in found]


def test_chinese_captions_state_only_true_things():
    from latentdit.datasets.shapes._captions_zh import NUMBERS_ZH, RELATION_PHRASES_ZH

    relation_of = {w: r for r, words in RELATION_PHRASES_ZH.items() for w in words}
    dataset = ShapesDataset(seed=8, lang="zh")
    for i in range(600):
        attributes, caption, stated = dataset.draw(i)
        objects = [(o["color"], o["shape"]) for o in stated["objects"]]
        if stated["scene"] == "relation":
            x, y = _zh_objects(caption)  # the first-named object, then the other
            word = re.search(rf"的({'|'.join(relation_of)})$", caption).group(1)
            if "在它的" in caption:  # "B，A在它的REL": A is REL of B
                x, y = y, x
            (a, b), relation = objects, stated["relation"]
            assert (x, y, relation_of[word]) in {(a, b, relation), (b, a, _INVERSE[relation])}, caption
        else:
            assert _zh_objects(caption) == objects[:1], caption
        if stated["scene"] == "count":
            n = stated["count"]
            assert f"{NUMBERS_ZH[n]}个" in caption or f"{n}个" in caption, caption
        if "background" in stated:
            assert caption.count("背景") == 1


def test_bilingual_data_mixes_languages_per_sample_over_the_same_scenes():
    mixed, english = ShapesDataset(seed=5, lang="en+zh"), ShapesDataset(seed=5)
    draws = [mixed.draw(i) for i in range(400)]
    chinese = [bool(re.search(r"[\u4e00-\u9fff]", caption)) for _, caption, _ in draws]
    assert 150 < sum(chinese) < 250
    assert all(attributes == english.draw(i)[0] for i, (attributes, _, _) in enumerate(draws))
    assert [c for _, c, _ in draws] == [ShapesDataset(seed=5, lang="en+zh").draw(i)[1] for i in range(400)]
    with pytest.raises(ValueError, match="unknown caption language 'fr'"):
        ShapesDataset(lang="fr")
