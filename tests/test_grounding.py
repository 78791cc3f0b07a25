"""Grounding: caption words tagged with the boxes they name, stored by preprocess, and the
cross-attention loss that trains on them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from latentdit.datasets.shapes import ShapesDataset, caption_regions
from latentdit.grounding import box_masks, grounding_loss, grounding_tensors, regions_of
from latentdit.model import Denoiser

SIZE = 16  # identity autoencoder: 16x16 images are 3x16x16 latents


def _words(caption: str, region: dict) -> list[str]:
    return [caption[a:b] for a, b in region["spans"]]


# -------------------------------------------------------------------------------- regions
def test_relation_captions_name_each_object_at_its_own_box():
    dataset = ShapesDataset(scenes=("relation",))
    for i in range(40):
        attrs, caption, _ = dataset.draw(i)
        regions = caption_regions(attrs, caption)
        a, b = attrs["objects"]
        if (a["color"], a["shape"]) == (b["color"], b["shape"]):
            assert len(regions) == 1 and len(regions[0]["boxes"]) == 2
            continue
        assert len(regions) == 2
        for obj, region in zip((a, b), regions):
            (words,) = _words(caption, region)
            assert words.endswith(f"{obj['color']} {obj['shape']}")
            assert region["boxes"] == [[v / 64 for v in obj["bbox"]]]


def test_count_captions_give_one_region_with_every_copy():
    attrs = {"scene": "count", "canvas": 64, "objects": [
        {"color": "red", "shape": "cross", "bbox": [0, 0, 8, 8]},
        {"color": "red", "shape": "cross", "bbox": [32, 32, 48, 48]},
        {"color": "red", "shape": "cross", "bbox": [48, 0, 64, 16]}], "count": 3}
    (region,) = caption_regions(attrs, "three small red crosses")
    assert _words("three small red crosses", region) == ["small red crosses"]
    assert region["boxes"] == [[0, 0, 0.125, 0.125], [0.5, 0.5, 0.75, 0.75], [0.75, 0, 1, 0.25]]


def test_captions_that_do_not_name_the_objects_give_no_regions():
    attrs, caption, _ = ShapesDataset(lang="zh").draw(0)
    assert caption_regions(attrs, caption) == []
    attrs, _, _ = ShapesDataset().draw(0)
    assert caption_regions(attrs, "something else entirely") == []
    assert regions_of("a red circle", None) == [] and regions_of("a red circle", {"label": 3}) == []


def test_listed_regions_are_checked():
    attrs = {"regions": [{"text": "dog", "boxes": [[0.1, 0.2, 0.5, 0.9]]}]}
    assert regions_of("a dog and a dog", attrs) == [{"spans": [(2, 5), (12, 15)], "boxes": [[0.1, 0.2, 0.5, 0.9]]}]
    with pytest.raises(ValueError, match="'cat' does not occur in the caption"):
        regions_of("a dog", {"regions": [{"text": "cat", "boxes": [[0, 0, 1, 1]]}]})
    with pytest.raises(ValueError, match="x0 < x1"):
        regions_of("a dog", {"regions": [{"text": "dog", "boxes": [[0.5, 0, 0.2, 1]]}]})
    with pytest.raises(ValueError, match="a region must be"):
        regions_of("a dog", {"regions": ["dog"]})


def test_token_positions_are_the_phrases_tokens():
    from latentdit.text import load_text_encoder

    te = load_text_encoder("minilm", max_length=24)
    caption = "a blue square with a small red circle left of it"
    attrs = {"canvas": 64, "objects": [{"color": "red", "shape": "circle", "bbox": [0, 0, 16, 16]},
                                       {"color": "blue", "shape": "square", "bbox": [32, 0, 64, 32]}]}
    ids, boxes, grounded = grounding_tensors([caption, "一个红色的圆"], [attrs, attrs], te, 24)
    tokens = te.tokenizer.convert_ids_to_tokens(te.tokenizer(caption)["input_ids"])
    assert grounded == 1 and ids.shape == (2, 24) and not ids[1].any() and not boxes[1].any()
    assert [tokens[i] for i in torch.nonzero(ids[0] == 1).flatten()] == ["small", "red", "circle"]
    assert [tokens[i] for i in torch.nonzero(ids[0] == 2).flatten()] == ["blue", "square"]
    assert boxes[0, :3].tolist() == [[1, 0, 0, 0.25, 0.25], [2, 0.5, 0, 1, 0.5], [0, 0, 0, 0, 0]]


# -------------------------------------------------------------------------------- the loss
def test_box_masks_cover_the_tokens_whose_centres_are_inside():
    boxes = torch.tensor([[[1, 0.0, 0.0, 0.5, 0.5], [2, 0.6, 0.6, 0.65, 0.65], [0, 0, 0, 0, 0]]])
    masks = box_masks(boxes, 2, 4, 4)  # (1, 2, 16)
    assert torch.nonzero(masks[0, 0]).flatten().tolist() == [0, 1, 4, 5]
    assert torch.nonzero(masks[0, 1]).flatten().tolist() == [10]  # smaller than a token: the one under its centre


def test_mirrored_boxes_cover_mirrored_tokens():
    # a box from the left margin to a token centre and its mirror image from that centre to the
    # right margin: with the right edge left open, the mirrored box lost its edge token
    boxes = torch.tensor([[[1, 0.0625, 0.0625, 0.375, 0.375], [2, 0.625, 0.625, 0.9375, 0.9375]]])
    masks = box_masks(boxes, 2, 8, 8).view(2, 8, 8)
    assert masks[0].sum() == 9 and torch.equal(masks[1], masks[0].flip(0, 1))


def test_the_loss_is_the_share_of_attention_read_outside_the_box():
    regions = torch.tensor([[0, 1, 1, 2]])  # tokens 1-2 name region 1, token 3 region 2
    boxes = torch.tensor([[[1, 0.0, 0.0, 0.5, 1.0], [2, 0.5, 0.0, 1.0, 1.0]]])  # left half, right half
    inside = torch.zeros(1, 4, 4)  # a 2x2 grid: tokens 0 and 2 are the left half
    inside[0, [0, 2], 1] = 1.0
    inside[0, [1, 3], 3] = 1.0
    keep = torch.tensor([True])
    assert grounding_loss([inside], regions, boxes, (2, 2), keep).item() == pytest.approx(0.0)
    swapped = torch.zeros(1, 4, 4)
    swapped[0, [1, 3], 1] = 1.0
    swapped[0, [0, 2], 3] = 1.0
    assert grounding_loss([swapped], regions, boxes, (2, 2), keep).item() == pytest.approx(1.0)
    assert grounding_loss([inside, swapped], regions, boxes, (2, 2), keep).item() == pytest.approx(0.5)
    # the context's leading tokens (noise level, pooled text in the TLD layout) are not text
    padded = torch.cat([torch.zeros(1, 4, 2), swapped], dim=-1)
    assert grounding_loss([padded], regions, boxes, (2, 2), keep).item() == pytest.approx(1.0)
    # a sample whose caption was dropped for guidance is not held to it
    assert grounding_loss([swapped], regions, boxes, (2, 2), ~keep).item() == 0.0


def test_the_model_hands_out_its_cross_attention_and_its_output_does_not_change():
    model = Denoiser(_tiny_model_config())
    x, t = torch.randn(2, 3, SIZE, SIZE), torch.tensor([0.3, 0.8])
    text, mask = torch.randn(2, 24, 384), torch.ones(2, 24, dtype=torch.bool)
    mask[1, 10:] = False
    pooled, maps = torch.randn(2, 384), []
    with torch.no_grad():
        plain = model(x, t, text, mask, pooled)
        kept = model(x, t, text, mask, pooled, attention_maps=maps)
    assert torch.allclose(plain, kept, atol=1e-5)
    assert len(maps) == model.config.depth and maps[0].shape == (2, (SIZE // 4) ** 2, 24)
    assert torch.allclose(maps[0].sum(-1), torch.ones(2, 16), atol=1e-5)
    assert maps[0][1, :, 10:].abs().max() == 0  # masked tokens are not read


# -------------------------------------------------------------------------------- preprocess + train
def _tiny_model_config():
    from latentdit.config import model_preset

    return model_preset("tiny", in_channels=3, text_dim=384, pooled_dim=384, max_text_len=24, base_size=SIZE,
                        patch_size=4)


@pytest.fixture(scope="module")
def grounded_shards(tmp_path_factory):
    from latentdit.data import preprocess
    from latentdit.sources import shapes_source
    from latentdit.text import load_text_encoder
    from latentdit.vae import load_autoencoder

    out = tmp_path_factory.mktemp("grounded")
    manifest = preprocess(shapes_source(64, size=SIZE), out, autoencoder=load_autoencoder("identity"),
                          text_encoder=load_text_encoder("minilm", max_length=24), n=64, shard_size=32,
                          progress=False, grounding=True)
    assert manifest["grounding"] == {"grounded": 64}
    return out


def test_shards_carry_each_samples_grounding(grounded_shards):
    from latentdit.shards import ShardReader

    reader = ShardReader(grounded_shards)
    batch = next(reader.batches(8, seed=0))
    ids, boxes = batch.grounding
    assert reader.grounding and ids.shape == (8, 24) and boxes.shape[0] == 8 and boxes.shape[2] == 5
    rows = [row for k in range(len(reader.manifest["shards"])) for row in reader.rows(k)]
    for i, index in enumerate(batch.index.tolist()):
        attrs = rows[index]["attributes"]
        named = {(o["color"], o["shape"]) for o in attrs["objects"]}
        assert int(ids[i].max()) == len(named)  # one region per distinct object
        assert int((boxes[i, :, 0] > 0).sum()) == len(attrs["objects"])  # one box per object


def test_preprocess_refuses_to_add_grounding_to_shards_without_it(grounded_shards):
    from latentdit.data import preprocess
    from latentdit.sources import shapes_source
    from latentdit.text import load_text_encoder
    from latentdit.vae import load_autoencoder

    with pytest.raises(ValueError, match="holds shards with grounding"):
        preprocess(shapes_source(96, size=SIZE), grounded_shards, autoencoder=load_autoencoder("identity"),
                   text_encoder=load_text_encoder("minilm", max_length=24), n=96, shard_size=32, progress=False)


def _train_config(shards, out, **over):
    from latentdit.train_config import make_config, recipe_dict

    base = recipe_dict("tiny")
    base["model"].update(in_channels=3, text_dim=384, pooled_dim=384, max_text_len=24, base_size=SIZE, patch_size=4)
    return make_config({**base, "data": str(shards), "out": str(out), "steps": 2, "batch_size": 8, "log_every": 1,
                        "preview_every": 0, "checkpoint_every": 10, "optim": {"lr": 2e-3, "warmup_steps": 1},
                        **over})


def _train_steps(model, cfg, reader, steps: int) -> None:
    """Adam on the training loss, batches of 16 from the shards' seeded stream."""
    from latentdit.schedules import NoisePath
    from latentdit.train import diffusion_loss

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _, batch in zip(range(steps), reader.batches(16, seed=0)):
        opt.zero_grad()
        diffusion_loss(model, batch, NoisePath("flow"), cfg, gen).backward()
        opt.step()


def test_the_grounding_loss_teaches_attention_where_each_object_is(grounded_shards, tmp_path):
    from latentdit.shards import ShardReader

    reader = ShardReader(grounded_shards)
    probe = next(reader.batches(32, seed=99))

    def trained_loss(weight: float) -> float:
        torch.manual_seed(0)
        cfg = _train_config(grounded_shards, tmp_path, grounding_weight=weight, cond_dropout=0.0)
        model = Denoiser(cfg.model)
        _train_steps(model, cfg, reader, 40)
        maps: list[torch.Tensor] = []
        with torch.no_grad():
            x = probe.latents + 0.5 * torch.randn_like(probe.latents)
            model(x, torch.full((32,), 0.5), probe.text.tokens, probe.text.mask, probe.text.pooled,
                  attention_maps=maps)
        return grounding_loss(maps, *probe.grounding, (4, 4), torch.ones(32, dtype=torch.bool)).item()

    plain, grounded = trained_loss(0.0), trained_loss(2.0)
    assert grounded < plain - 0.1, (plain, grounded)


def test_train_runs_with_grounding_and_refuses_shards_without_it(grounded_shards, tmp_path):
    from latentdit.data import preprocess
    from latentdit.sources import shapes_source
    from latentdit.text import load_text_encoder
    from latentdit.train import train
    from latentdit.vae import load_autoencoder

    result = train(_train_config(grounded_shards, tmp_path / "run", grounding_weight=0.5), progress=False)
    assert (tmp_path / "run").is_dir() and result["model"]
    plain = tmp_path / "plain"
    preprocess(shapes_source(8, size=SIZE), plain, autoencoder=load_autoencoder("identity"),
               text_encoder=load_text_encoder("minilm", max_length=24), n=8, progress=False)
    with pytest.raises(ValueError, match="hold no grounding; preprocess with --grounding"):
        train(_train_config(plain, tmp_path / "run2", grounding_weight=0.5), progress=False)
    with pytest.raises(ValueError, match="grounding_weight must be in"):
        _train_config(plain, tmp_path / "run3", grounding_weight=-1)


def test_an_image_folder_gives_its_regions_in_the_attributes(tmp_path):
    import json

    from PIL import Image

    from latentdit.data import preprocess
    from latentdit.shards import ShardReader
    from latentdit.sources import folder_source
    from latentdit.text import load_text_encoder
    from latentdit.vae import load_autoencoder

    folder = tmp_path / "photos"
    folder.mkdir()
    rows = [{"file": "0.png", "caption": "a dog beside a red ball",
             "attributes": {"regions": [{"text": "dog", "boxes": [[0.0, 0.0, 0.5, 1.0]]},
                                        {"text": "red ball", "boxes": [[0.5, 0.5, 1.0, 1.0]]}]}},
            {"file": "1.png", "caption": "a plain picture"}]
    for row in rows:
        Image.new("RGB", (SIZE, SIZE), (90, 30, 30)).save(folder / row["file"])
    (folder / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    manifest = preprocess(folder_source(folder), tmp_path / "shards", autoencoder=load_autoencoder("identity"),
                          text_encoder=load_text_encoder("minilm", max_length=24), progress=False, grounding=True)
    assert manifest["grounding"] == {"grounded": 1}
    reader = ShardReader(tmp_path / "shards")
    batch = next(reader.batches(2, seed=0))
    order = batch.index.argsort()
    ids, boxes = (g[order] for g in batch.grounding)
    assert torch.nonzero(ids[0]).flatten().tolist() == [2, 5, 6]  # [CLS] a dog beside a red ball
    assert ids[0, 2] == 1 and ids[0, 5] == ids[0, 6] == 2 and not ids[1].any()
    assert boxes[0, :2].tolist() == [[1, 0, 0, 0.5, 1], [2, 0.5, 0.5, 1, 1]]


def test_samples_below_the_minimum_noise_level_add_no_grounding_loss(grounded_shards, tmp_path):
    from latentdit.schedules import NoisePath
    from latentdit.shards import ShardReader
    from latentdit.train import diffusion_loss

    batch = next(ShardReader(grounded_shards).batches(16, seed=0))
    model = Denoiser(_tiny_model_config())

    def loss(**over) -> float:
        cfg = _train_config(grounded_shards, tmp_path, cond_dropout=0.0, **over)
        with torch.no_grad():
            return diffusion_loss(model, batch, NoisePath("flow"), cfg, torch.Generator().manual_seed(0)).item()

    plain = loss()
    assert loss(grounding_weight=1.0) > plain + 0.1  # an untrained model reads words everywhere
    assert loss(grounding_weight=1.0, grounding_min_t=0.999) == pytest.approx(plain, abs=1e-6)
    with pytest.raises(ValueError, match="grounding_min_t must be in"):
        _train_config(grounded_shards, tmp_path, grounding_min_t=1.0)


# -------------------------------------------------------------------------------- the layout planner
def test_layout_targets_spread_each_regions_words_over_its_boxes():
    from latentdit.grounding import layout_targets

    regions = torch.tensor([[0, 1, 1, 2, 0]])
    # region 1: the left column of a 2x2 grid; region 2: the bottom-right cell
    boxes = torch.tensor([[[1, 0.0, 0.0, 0.5, 1.0], [2, 0.5, 0.5, 1.0, 1.0], [0, 0, 0, 0, 0]]])
    target = layout_targets(regions, boxes, 2)
    assert target.shape == (1, 5, 5)
    assert torch.equal(target[0, 1], torch.tensor([0.5, 0, 0.5, 0, 0]))  # cells 0 and 2, row-major
    assert torch.equal(target[0, 2], target[0, 1])
    assert torch.equal(target[0, 3], torch.tensor([0, 0, 0, 1.0, 0]))
    assert torch.equal(target[0, 0], torch.tensor([0, 0, 0, 0, 1.0]))  # no region: "nowhere"
    assert torch.equal(target[0, 4], target[0, 0])


def test_the_layout_loss_is_lowest_for_the_planner_that_says_where_and_skips_dropped_captions():
    from latentdit.grounding import layout_loss, layout_targets

    regions = torch.tensor([[1, 0, 2]])
    boxes = torch.tensor([[[1, 0.0, 0.0, 0.5, 0.5], [2, 0.5, 0.5, 1.0, 1.0]]])
    mask, keep = torch.ones(1, 3, dtype=torch.bool), torch.ones(1, dtype=torch.bool)
    right = layout_targets(regions, boxes, 2).clamp_min(1e-6).log() * 1.0
    swapped = right[:, [2, 1, 0]]
    assert layout_loss(right, regions, boxes, mask, keep) < 1e-4
    assert layout_loss(swapped, regions, boxes, mask, keep) > 5
    # masked tokens count for nothing; a dropped caption only asks for "nowhere" everywhere
    assert layout_loss(swapped, regions, boxes, torch.tensor([[False, True, False]]), keep) < 1e-4
    nowhere = torch.tensor([[[-20.0, -20, -20, -20, 0]] * 3])
    assert layout_loss(nowhere, regions, boxes, mask, ~keep) < 1e-6
    assert layout_loss(nowhere, regions, boxes, mask, keep) > 5


def test_plan_in_boxes_is_the_planners_probability_inside_each_regions_boxes():
    from latentdit.grounding import plan_in_boxes

    regions = torch.tensor([[1, 1, 0, 2]])
    boxes = torch.tensor([[[1, 0.0, 0.0, 0.5, 0.5], [2, 0.5, 0.5, 1.0, 1.0]]])
    logits = torch.full((1, 4, 5), -30.0)
    logits[0, 0, 0] = 0  # region 1's first word: its own cell
    logits[0, 1, 3] = 0  # its second word: region 2's cell
    logits[0, 3, [0, 3]] = 0  # region 2's word: half in its cell, half in region 1's
    shares, valid = plan_in_boxes(logits, regions, boxes)
    assert valid.tolist() == [[True, True]]
    assert shares[0].tolist() == pytest.approx([0.5, 0.5], abs=1e-6)


def test_the_layout_prior_is_zero_for_nowhere_and_log_odds_for_a_place():
    from latentdit.model import layout_prior

    logits = torch.full((1, 2, 5), -30.0)
    logits[0, 0, -1] = 0  # token 0: nowhere in particular
    logits[0, 1, 3] = 0  # token 1: surely the bottom-right cell of a 2x2 grid
    prior = layout_prior(logits, 2, 2)
    assert prior.shape == (1, 4, 2)
    assert prior[0, :, 0].abs().max() < 1e-6
    assert prior[0, 3, 1].item() == pytest.approx(torch.log(torch.tensor(4.0)).item(), abs=1e-5)
    assert torch.equal(prior[0, :3, 1], torch.full((3,), -8.0))  # the floor
    # on a 4x4 grid the place resamples to the bottom-right quarter, and "nowhere" stays zero
    big = layout_prior(logits, 4, 4)
    assert big[0, :, 0].abs().max() < 1e-6
    cells = big[0, :, 1].view(4, 4)
    assert cells[3, 3] > 1.0 and cells[0, 0] == -8.0 and cells[2:, 2:].min() > cells[:2, :2].max()


def test_the_layout_prior_is_taken_against_the_reference_plan():
    from latentdit.model import layout_prior

    g = 4
    reference = torch.full((g * g,), 1.0)
    reference[[5, 6, 9, 10]] = 20.0  # placed objects usually sit in the middle four cells
    reference = reference / reference.sum()
    logits = torch.full((1, 3, g * g + 1), -30.0)
    logits[0, 0, :-1] = reference.log()  # token 0's plan says no more than the usual
    logits[0, 1, 5] = 0.0  # token 1: surely cell 5, one of the usual four
    logits[0, 2, -1] = 0.0  # token 2: nowhere in particular
    prior = layout_prior(logits, g, g, reference)
    assert prior[0, :, 0].abs().max() < 1e-5 and prior[0, :, 2].abs().max() < 1e-5
    assert prior[0, 5, 1].item() == pytest.approx(-reference[5].log().item(), abs=1e-4)
    assert prior[0, 5, 1] < layout_prior(logits, g, g)[0, 5, 1]  # less than against an even spread
    # without a reference (or with an even one) the prior is against an even spread
    even = layout_prior(logits, g, g, torch.full((g * g,), 1.0 / g**2))
    assert torch.allclose(even, layout_prior(logits, g, g), atol=1e-5)
    # a cell where the reference never saw an object keeps the ratio bounded
    rare = torch.full((g * g,), 1.0 / (g * g - 1))
    rare[0] = 0.0
    sure0 = torch.full((1, 1, g * g + 1), -30.0)
    sure0[0, 0, 0] = 0.0
    assert torch.isfinite(layout_prior(sure0, g, g, rare)).all() and layout_prior(sure0, g, g, rare).max() < 8
    # on a finer grid the reference resamples with the plan: a plan that repeats it still biases nothing
    assert layout_prior(logits, 2 * g, 2 * g, reference)[0, :, 0].abs().max() < 0.05


def test_the_reference_is_the_running_mean_of_where_placed_words_are():
    import dataclasses

    from latentdit.grounding import placed_targets

    regions = torch.tensor([[1, 0, 2], [0, 1, 0]])
    boxes = torch.tensor([[[1, 0.0, 0.0, 0.5, 0.5], [2, 0.5, 0.5, 1.0, 1.0]],
                          [[1, 0.0, 0.5, 1.0, 1.0], [0, 0, 0, 0, 0]]])
    mask, keep = torch.ones(2, 3, dtype=torch.bool), torch.ones(2, dtype=torch.bool)
    cells = placed_targets(regions, boxes, mask, keep, 2)  # placed words: cell 0; cell 3; cells 2 and 3
    assert cells.tolist() == [[1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0.5, 0.5]]
    assert placed_targets(regions, boxes, mask, torch.tensor([True, False]), 2).shape == (2, 4)  # dropped
    assert placed_targets(regions, boxes, torch.tensor([[True, True, False]] * 2), keep, 2).shape == (2, 4)
    planner = Denoiser(dataclasses.replace(_tiny_model_config(), layout_planner=True)).planner
    grid = planner.grid
    assert torch.equal(planner.reference, torch.full((grid**2,), 1.0 / grid**2))  # even until it has seen any
    seen = torch.zeros(3, grid**2)
    seen[[0, 1, 2], [0, 1, 0]] = 1.0  # two words in cell 0, one in cell 1
    for _ in range(2000):
        planner.observe(seen)
        planner.observe(seen[:0])  # a batch with no placed word changes nothing
    assert planner.reference[:2].tolist() == pytest.approx([2 / 3, 1 / 3], abs=1e-4)
    assert "reference" not in dict(planner.named_parameters())  # no optimiser step moves it


def test_layout_gain_sets_where_the_gains_start():
    import dataclasses

    cfg = dataclasses.replace(_tiny_model_config(), layout_planner=True, layout_gain=1.5)
    from latentdit.model import LAYOUT_GAIN_RATE

    model = Denoiser(cfg)
    assert all(torch.allclose(b.layout_gain * LAYOUT_GAIN_RATE, torch.full((cfg.heads,), 1.5)) for b in model.blocks)
    with pytest.raises(ValueError, match="layout_gain"):
        dataclasses.replace(cfg, layout_gain=-1.0)


def test_a_planner_saved_without_a_reference_loads_and_plans_against_an_even_spread():
    import dataclasses

    model = Denoiser(dataclasses.replace(_tiny_model_config(), layout_planner=True))
    model.planner.observe(torch.eye(model.planner.grid ** 2)[:1])
    old = {k: v for k, v in model.state_dict().items() if k != "planner.reference"}
    again = Denoiser(model.config)
    again.load_state_dict(model.state_dict())
    assert torch.equal(again.planner.reference, model.planner.reference)
    again.load_state_dict(old)  # strict: the missing reference is filled in, nothing else may be
    g2 = again.planner.grid ** 2
    assert torch.equal(again.planner.reference, torch.full((g2,), 1.0 / g2))
    with pytest.raises(RuntimeError, match="Missing key"):
        again.load_state_dict({k: v for k, v in old.items() if k != "planner.head.bias"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_bias_matches_between_the_explicit_product_and_sdpa(dtype):
    import torch.nn.functional as F

    from latentdit.model import attend

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8, dtype=dtype) for _ in range(3))
    mask = torch.ones(2, 1, 1, 16, dtype=torch.bool)
    mask[1, ..., 12:] = False
    bias = torch.randn(2, 3, 16, 16) * 2
    got = attend(q, k, v, mask, None, bias)
    explicit = attend(q, k, v, mask, [], bias)  # the maps force the explicit fp32 product
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                          attn_mask=bias.masked_fill(~mask, float("-inf")))
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert torch.allclose(got.float(), want, atol=tol) and torch.allclose(explicit.float(), want, atol=tol)
    assert not torch.allclose(got.float(), attend(q, k, v, mask).float(), atol=tol)  # the bias acts


def test_a_model_grown_with_a_planner_starts_as_its_base_and_follows_what_it_learns_to_plan():
    import dataclasses

    from latentdit.model import LAYOUT_GAIN_RATE

    base = Denoiser(_tiny_model_config())
    with torch.no_grad():  # a trained model's output is not zero, nor are its blocks' gates
        for p in base.parameters():
            p.add_(0.05 * torch.randn_like(p))
    planned = Denoiser(dataclasses.replace(base.config, layout_planner=True))
    missing, unexpected = planned.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(n.startswith("planner.") or n.endswith("layout_gain") for n in missing)
    x, t = torch.randn(2, 3, SIZE, SIZE), torch.tensor([0.9, 0.5])
    text, mask, pooled = torch.randn(2, 24, 384), torch.ones(2, 24, dtype=torch.bool), torch.randn(2, 384)
    layouts: list[torch.Tensor] = []
    with torch.no_grad():
        want = base(x, t, text, mask, pooled)
        assert torch.allclose(planned(x, t, text, mask, pooled, layouts=layouts), want, atol=1e-6)
        assert layouts[0].shape == (2, 24, (SIZE // 4) ** 2 + 1)
        planned.planner.head.weight.normal_()  # a planner that has learned to place words
        assert not torch.allclose(planned(x, t, text, mask, pooled), want, atol=1e-3)
        for block in planned.blocks:  # heads that do not follow it
            block.layout_gain.zero_()
        assert torch.allclose(planned(x, t, text, mask, pooled), want, atol=1e-5)
        # a planner that places no word anywhere in particular biases nothing, whatever the gains
        planned.planner.head.weight.zero_()
        planned.planner.head.bias.copy_(torch.tensor([-30.0] * (SIZE // 4) ** 2 + [0.0]))
        assert torch.allclose(planned(x, t, text, mask, pooled), want, atol=1e-5)
        # a plan is taken against the planner's reference, where placed objects usually are
        for block in planned.blocks:
            block.layout_gain.fill_(1.0 / LAYOUT_GAIN_RATE)
        planned.planner.head.weight.normal_()
        even = planned(x, t, text, mask, pooled)
        usual = torch.rand((SIZE // 4) ** 2) ** 4 + 0.01
        planned.planner.reference.copy_(usual / usual.sum())
        assert not torch.allclose(planned(x, t, text, mask, pooled), even, atol=1e-3)
    # the plan's loss trains the planner alone: the text projection the denoiser reads is left as it is
    layouts.clear()
    planned(x, t, text, mask, pooled, layouts=layouts)
    layouts[0].logsumexp(-1).sum().backward()
    assert planned.text_proj[0].weight.grad is None and planned.planner.head.weight.grad.abs().sum() > 0


def test_training_teaches_the_planner_where_each_object_goes(grounded_shards, tmp_path):
    from latentdit.grounding import layout_loss
    from latentdit.model import LAYOUT_GAIN_RATE
    from latentdit.shards import ShardReader

    reader = ShardReader(grounded_shards)
    probe = next(reader.batches(32, seed=99))
    torch.manual_seed(0)
    cfg = _train_config(grounded_shards, tmp_path, cond_dropout=0.0)
    cfg.model.layout_planner = True
    model = Denoiser(cfg.model)

    def planner_loss() -> float:
        layouts: list[torch.Tensor] = []
        with torch.no_grad():
            model(probe.latents, torch.full((32,), 0.5), probe.text.tokens, probe.text.mask, probe.text.pooled,
                  layouts=layouts)
        return layout_loss(layouts[0], *probe.grounding, probe.text.mask, torch.ones(32, dtype=torch.bool)).item()

    before = planner_loss()
    _train_steps(model, cfg, reader, 40)
    after = planner_loss()
    assert after < 0.6 * before, (before, after)
    even = torch.full_like(model.planner.reference, 1.0 / model.planner.grid ** 2)
    assert (model.planner.reference - even).abs().max() > 1e-3  # the reference saw where the boxes are
    start = 1.0 / LAYOUT_GAIN_RATE  # the denoiser learns how far to follow the plan
    assert any((block.layout_gain.detach() - start).abs().max() > 1e-3 for block in model.blocks)


def test_train_with_a_planner_refuses_shards_without_grounding(grounded_shards, tmp_path):
    from latentdit.checkpoint import load_config
    from latentdit.data import preprocess
    from latentdit.model import LAYOUT_GAIN_RATE
    from latentdit.sources import shapes_source
    from latentdit.text import load_text_encoder
    from latentdit.train import load_init_weights, train
    from latentdit.vae import load_autoencoder

    result = train(_train_config(grounded_shards, tmp_path / "run"), progress=False)
    grown = _train_config(grounded_shards, tmp_path / "grown", init_from=result["model"])
    grown.model.layout_planner = True
    model = Denoiser(grown.model)
    load_init_weights(model, result["model"])  # a planner may grow on a model without one
    assert all(torch.equal(b.layout_gain.detach() * LAYOUT_GAIN_RATE, torch.ones(2)) for b in model.blocks)
    trained = train(grown, progress=False)
    again = Denoiser(grown.model)
    load_init_weights(again, trained["model"])  # the planner and its gains are saved and read back
    assert not torch.equal(again.planner.head.weight, model.planner.head.weight)
    g2 = again.planner.grid ** 2  # the exported reference is the one training kept, not an even one
    assert (again.planner.reference - 1.0 / g2).abs().max() > 1e-4
    # a planner saved before planners had a reference still starts a fine-tune, with an even one
    from safetensors.torch import load_file, save_file

    weights = Path(trained["model"]) / "model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if k != "planner.reference"}, weights)
    fresh = Denoiser(grown.model)
    load_init_weights(fresh, trained["model"])
    assert torch.equal(fresh.planner.head.weight, again.planner.head.weight)
    assert torch.equal(fresh.planner.reference, torch.full((g2,), 1.0 / g2))
    assert load_config(trained["model"]).model.layout_planner
    plain = tmp_path / "plain"
    preprocess(shapes_source(8, size=SIZE), plain, autoencoder=load_autoencoder("identity"),
               text_encoder=load_text_encoder("minilm", max_length=24), n=8, progress=False)
    no_boxes = _train_config(plain, tmp_path / "run2")
    no_boxes.model.layout_planner = True
    with pytest.raises(ValueError, match="layout_planner learns from grounding boxes"):
        train(no_boxes, progress=False)


def test_a_frozen_planner_stays_as_it_was_while_the_denoiser_trains_without_boxes(grounded_shards, tmp_path):
    from safetensors.torch import load_file

    from latentdit.data import preprocess
    from latentdit.sources import shapes_source
    from latentdit.text import load_text_encoder
    from latentdit.train import train
    from latentdit.vae import load_autoencoder

    base = train(_train_config(grounded_shards, tmp_path / "base"), progress=False)["model"]
    grown = _train_config(grounded_shards, tmp_path / "grown", init_from=base, train_only=("planner.*",), steps=3)
    grown.model.layout_planner = True
    planned = train(grown, progress=False)["model"]
    plain = tmp_path / "plain"
    preprocess(shapes_source(16, size=SIZE, scene_weights=(0, 0, 1)), plain, autoencoder=load_autoencoder("identity"),
               text_encoder=load_text_encoder("minilm", max_length=24), n=16, progress=False)
    before = load_file(Path(planned) / "model.safetensors")
    for shards in (grounded_shards, plain):  # with boxes it could learn from, and with none
        tuned = _train_config(shards, tmp_path / f"tuned-{shards.name}", init_from=planned,
                              train_only=("blocks.*.bias",), steps=3)
        tuned.model.layout_planner = True
        after = load_file(Path(train(tuned, progress=False)["model"]) / "model.safetensors")
        planner = [k for k in before if k.startswith("planner.")]
        assert "planner.reference" in planner and all(torch.equal(before[k], after[k]) for k in planner)
        tuned_biases = [k for k in before if k.startswith("blocks.") and k.endswith(".bias")]
        assert any(not torch.equal(before[k], after[k]) for k in tuned_biases)
    # low-rank adapters go on the denoiser's attention, not the planner's (which has its own)
    adapted = _train_config(plain, tmp_path / "adapted", init_from=planned, lora_rank=2, steps=3)
    adapted.model.layout_planner = True
    after = load_file(Path(train(adapted, progress=False)["model"]) / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    factors = {k for k in after if k not in before}
    assert "blocks.0.attn.qkv.weight.lora_B" in factors and not any(k.startswith("planner.") for k in factors)


def test_a_planner_grown_and_trained_alone_ships_as_a_small_delta_on_its_base(grounded_shards, tmp_path):
    from pathlib import Path

    from safetensors.torch import load_file

    from latentdit.checkpoint import write_delta
    from latentdit.pipeline import Text2Image
    from latentdit.train import train

    base = train(_train_config(grounded_shards, tmp_path / "base"), progress=False)["model"]
    grown = _train_config(grounded_shards, tmp_path / "grown", init_from=base, train_only=("planner.*",), steps=3)
    grown.model.layout_planner = True
    whole = train(grown, progress=False)["model"]
    before, after = load_file(Path(base) / "model.safetensors"), load_file(Path(whole) / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base's weights are kept exactly
    delta = write_delta(whole, str(Path(base).resolve()), tmp_path / "delta")
    held = set(load_file(delta / "model.safetensors"))
    assert held == set(after) - set(before) and any(k.startswith("planner.") for k in held)
    kw = dict(seed=1, steps=2, output_type="latent", progress=False)
    split = Text2Image.from_pretrained(delta)
    assert split.model.config.layout_planner
    assert torch.equal(Text2Image.from_pretrained(whole)("a red circle left of a blue square", **kw),
                       split("a red circle left of a blue square", **kw))
