"""Does the denoiser's condition carry which object goes where?

The denoising loss on ground-truth renders of two-object relation scenes, under three captions:
the scene's own, the same caption with its two objects exchanged (false only in the order: "a red
star left of a blue cross" for a scene with the cross on the left), and one with an object
recoloured (false in what is drawn). A model that reads the order pays more under the exchange;
one that reads the caption as a bag of objects pays the same. The recoloured caption is the
control: it shows the model reads the caption at all, at each noise level.

Unlike the sampled benchmark (``run_alignment``) this draws no images: one forward pass per scene,
caption and noise level, each with fixed noise, so it runs in seconds and two models compared on
it differ by their weights alone. It measures what a training change is meant to move, before the
minutes of sampling that show whether the images follow.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..device import DType, compute_dtype
from ..grounding import attention_in_boxes, grounding_tensors, plan_in_boxes
from ..schedules import add_noise, from_x0_eps
from .alignment import fix_articles, order_swapped

TIMES: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8, 0.9, 1.0)
VARIANTS: tuple[str, ...] = ("swapped", "recoloured")
GROUNDED: tuple[str, ...] = ("true", "swapped")  # the captions that name the scene's own objects


def recoloured(item: dict[str, Any]) -> str | None:
    """The prompt of a two-object relation with its first object in a colour that neither object
    nor the background has ("a red star left of a blue cross" -> "a green star left of a blue
    cross"), drawn from the item's id; None where ``order_swapped`` would give None."""
    from ..datasets.shapes import COLORS

    if order_swapped(item) is None:
        return None
    first, second = item["expect"]["objects"]
    background = item.get("attributes", item["expect"]).get("background")
    free = [c for c in COLORS if c not in (first["color"], second["color"], background)]
    colour = random.Random(f"recoloured/{item['id']}").choice(free)
    return fix_articles(item["prompt"].replace(f"{first['color']} {first['shape']}", f"{colour} {first['shape']}"))


def binding_items(items: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The items that state a relation between two objects named by colour and shape and carry the
    full scene (``attributes``) to render, each with its ``swapped`` and ``recoloured`` prompts."""
    return [it | {"swapped": swapped, "recoloured": recoloured(it)} for it in items
            if "attributes" in it and (swapped := order_swapped(it)) is not None]


@torch.no_grad()
def condition_margins(pipe, items: Sequence[dict[str, Any]], *, times: Sequence[float] = TIMES, seed: int = 0,
                      batch_size: int = 32, dtype: DType = "auto") -> dict[str, Any]:
    """The loss under each caption at each noise level, and how much the false captions raise it.

    ``items``: prompts with ``expect`` and full ``attributes`` (``prompt_set`` gives both); the ones
    ``binding_items`` keeps are used. Per noise level the report holds the mean loss under the
    true caption, and per variant its ``margin`` (mean loss increase over the true caption's mean
    loss; 0 when the model cannot tell them apart) and ``wins`` (the share of scenes where the
    true caption's loss is lower; 0.5 is chance). ``order_margin`` and ``content_margin`` average
    the margins over the noise levels. ``attention_in_boxes`` (per noise level, and its mean) is
    where the objects' words are read under the true caption: the share of their cross-attention
    that comes from image tokens inside their boxes (``latentdit.grounding``), absent where the
    text encoder cannot place words. The swapped caption's (``attention_in_boxes_swapped``) holds
    each object's words to that object's own box, now on the side the caption does not say: a
    model that reads the words where the order puts them reads less there; one that finds them by
    what is already drawn reads the same. The loss is the training loss: the mean squared error of
    the model's prediction against its target. Scene i's noise is seeded by ``seed`` and i, so it
    does not depend on the batch size. A model with a layout planner adds ``plan_in_boxes`` and
    ``plan_in_boxes_swapped``: the planner's probability that each object is inside its own box,
    under the true caption and under the swapped one (where reading the order moves it away)."""
    from ..datasets.shapes import render_scene
    from ..pipeline import autocast
    from ..pixels import from_pil

    kept = binding_items(items)
    if not kept:
        raise ValueError("no prompt states a relation between two objects named by colour and shape with its "
                         "full scene ('attributes'); draw prompts with prompt_set or add the scenes")
    if pipe.model.config.num_classes or pipe.text_encoder is None:
        raise ValueError("the order margin needs a text-conditioned model")
    bad = [t for t in times if not 0.0 < float(t) <= 1.0]
    if not times or bad:
        raise ValueError(f"times must be noise levels in (0, 1], got {list(times)}")
    t0 = time.perf_counter()
    channels, h, w = pipe.latent_shape(None, None)
    size = h * pipe.autoencoder.downsample
    dtype = compute_dtype(pipe.device, dtype)  # once, not at every autocast below
    model, prediction = pipe.inference_model(dtype), pipe.model.config.prediction
    losses = {name: [[] for _ in times] for name in ("true", *VARIANTS)}
    # where each object's words are read, under the captions that name the same objects:
    # (sum over regions of the share read inside the region's boxes, regions) per chunk and time
    inside: dict[str, list[list[tuple[float, int]]]] = {name: [[] for _ in times] for name in GROUNDED}
    planned: dict[str, list[tuple[float, int]]] = {name: [] for name in GROUNDED}
    grid = (h // pipe.model.config.patch_size, w // pipe.model.config.patch_size)
    for start in range(0, len(kept), batch_size):
        chunk = kept[start: start + batch_size]
        x0 = pipe.encode_image(from_pil([render_scene(it["attributes"], size) for it in chunk])).float()
        eps = pipe.noise([seed * 1_000_003 + start + i for i in range(len(chunk))], (channels, h, w)).float()
        prompts = {"true": [it["prompt"] for it in chunk], **{v: [it[v] for it in chunk] for v in VARIANTS}}
        conds = {name: pipe.encode(p)[0] for name, p in prompts.items()}
        regions = {name: grounding_tensors(prompts[name], [it["attributes"] for it in chunk], pipe.text_encoder,
                                           conds[name].text.shape[1]) for name in GROUNDED}
        for k, t in enumerate(times):
            tt = torch.full((len(chunk),), float(t), device=x0.device)
            x_t = add_noise(x0, eps, tt, pipe.path)
            target = from_x0_eps(x0, eps, tt, pipe.path, prediction)
            for name, c in conds.items():
                maps: list[torch.Tensor] = []  # kept for every caption, so all run the same arithmetic
                layouts: list[torch.Tensor] | None = [] if pipe.model.config.layout_planner else None
                with autocast(pipe.device, dtype):
                    pred = model(x_t, tt, **c.kwargs(), attention_maps=maps, layouts=layouts).float()
                losses[name][k].append((pred - target).pow(2).mean(dim=(1, 2, 3)).cpu())
                words, boxes, grounded = regions.get(name, (None, None, 0))
                if grounded:
                    words, boxes = words.to(x0.device), boxes.to(x0.device)
                    shares, valid = attention_in_boxes(maps, words, boxes, grid)
                    inside[name][k].append((shares.mean(0)[valid].sum().item(), int(valid.sum())))
                    if layouts and k == 0:  # the plan reads the text alone: one noise level says it
                        shares, valid = plan_in_boxes(layouts[0], words, boxes)
                        planned[name].append((shares[valid].sum().item(), int(valid.sum())))
    per_time = [_row(t, k, losses, inside) for k, t in enumerate(times)]
    report = {"scenes": len(kept), "seed": seed, "per_time": per_time,
              "order_margin": round(sum(r["swapped"]["margin"] for r in per_time) / len(per_time), 5),
              "content_margin": round(sum(r["recoloured"]["margin"] for r in per_time) / len(per_time), 5)}
    if all("attention_in_boxes" in r for r in per_time):
        report["attention_in_boxes"] = round(sum(r["attention_in_boxes"] for r in per_time) / len(per_time), 4)
        report["attention_in_boxes_swapped"] = round(
            sum(r["swapped"]["attention_in_boxes"] for r in per_time) / len(per_time), 4)
    for name, key in (("true", "plan_in_boxes"), ("swapped", "plan_in_boxes_swapped")):
        if planned[name]:
            report[key] = round(sum(v for v, _ in planned[name]) / sum(n for _, n in planned[name]), 4)
    return report | {"seconds": round(time.perf_counter() - t0, 1)}


def _row(t: float, k: int, losses: dict, inside: dict) -> dict[str, Any]:
    true = torch.cat(losses["true"][k]).double()
    row: dict[str, Any] = {"t": float(t), "loss": round(true.mean().item(), 6)}
    for v in VARIANTS:
        other = torch.cat(losses[v][k]).double()
        row[v] = {"margin": round(((other - true).mean() / true.mean()).item(), 5),
                  "wins": round((other > true).double().mean().item(), 4)}
    for name in GROUNDED:
        if inside[name][k]:
            share = round(sum(v for v, _ in inside[name][k]) / sum(n for _, n in inside[name][k]), 4)
            (row if name == "true" else row[name])["attention_in_boxes"] = share
    return row
