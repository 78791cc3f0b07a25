"""Grounding: which caption tokens name which image regions, and the auxiliary loss that teaches
cross-attention to read each object's words where that object is.

A region is a phrase of the caption (character spans) and the boxes of the objects it names, as
fractions of the image. Folder datasets give them in a sample's attributes (``"regions": [{"text":
"red circle", "boxes": [[x0, y0, x1, y1], ...]}]``); `shapes` scenes derive them from their objects.
``preprocess --grounding`` stores them per sample as two small tensors: each text token's region id
(0 = none) and up to ``MAX_BOXES`` boxes tagged with their region id.

The loss is TokenCompose's token loss (Wang et al. 2024, arXiv:2312.03626, eq. 3): for each region,
the share of its tokens' cross-attention (summed over its tokens, averaged over heads) that comes
from image tokens outside its boxes. Where plain denoising leaves which of two objects a phrase
names to a loss dominated by noise, this says it directly: the words "red circle" are to be read
where the red circle is.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .text import TextEncoder

MAX_BOXES = 8  # boxes stored per sample; a sample with more keeps the first ones
MAX_REGIONS = 255  # region ids are stored as uint8


def regions_of(caption: str, attributes: Any) -> list[dict]:
    """[{"spans": [(start, end), ...], "boxes": [[x0, y0, x1, y1], ...]}] with boxes as fractions
    of the image, or [] when the sample says nothing about where its words are."""
    if not isinstance(attributes, dict):
        return []
    if "regions" in attributes:
        return [_listed_region(caption, r) for r in attributes["regions"]]
    if "objects" in attributes and "canvas" in attributes:
        from .datasets.shapes import caption_regions

        return caption_regions(attributes, caption)
    return []


def _listed_region(caption: str, region: Any) -> dict:
    if not isinstance(region, dict) or not isinstance(region.get("text"), str) or "boxes" not in region:
        raise ValueError(f"a region must be {{'text': str, 'boxes': [[x0, y0, x1, y1], ...]}}, got {region!r}")
    spans = [m.span() for m in re.finditer(re.escape(region["text"]), caption)]
    if not spans:
        raise ValueError(f"region text {region['text']!r} does not occur in the caption {caption!r}")
    return {"spans": spans, "boxes": [_check_box(b) for b in region["boxes"]]}


def _check_box(box: Any) -> list[float]:
    ok = isinstance(box, Sequence) and len(box) == 4 and all(isinstance(v, int | float) for v in box)
    if not ok or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
        raise ValueError(f"a region box must be [x0, y0, x1, y1] fractions of the image with x0 < x1 "
                         f"and y0 < y1, got {box!r}")
    return [float(v) for v in box]


def grounding_tensors(captions: list[str], attributes: list[Any], encoder: TextEncoder,
                      length: int) -> tuple[Tensor, Tensor, int]:
    """-> (region id per text token (B, length) uint8, boxes (B, MAX_BOXES, 5) float32 as
    [region id, x0, y0, x1, y1] with id 0 for none, number of samples grounded)."""
    ids = torch.zeros(len(captions), length, dtype=torch.uint8)
    boxes = torch.zeros(len(captions), MAX_BOXES, 5)
    grounded = 0
    for i, (caption, attrs) in enumerate(zip(captions, attributes)):
        regions = regions_of(caption, attrs)[:MAX_REGIONS]
        tokens = encoder.token_spans(caption, [r["spans"] for r in regions]) if regions else None
        if not tokens or not all(tokens):  # a phrase the encoder cannot place (or cut off): skip the sample
            continue
        k = 0
        for rid, (region, toks) in enumerate(zip(regions, tokens), start=1):
            ids[i, [t for t in toks if t < length]] = rid
            for box in region["boxes"][: MAX_BOXES - k]:
                boxes[i, k] = torch.tensor([rid, *box])
                k += 1
        grounded += 1
    return ids, boxes, grounded


def box_masks(boxes: Tensor, regions: int, h: int, w: int) -> Tensor:
    """(B, regions, h*w) bool: the image tokens of an h x w grid whose centre lies in a box of
    region 1..regions, edges included on both sides, so that mirrored boxes cover mirrored tokens
    (a box smaller than one token still covers the token under its centre)."""
    rid, x0, y0, x1, y1 = (boxes[..., j, None] for j in range(5))  # (B, K, 1) each
    cols, rows = torch.arange(w, device=boxes.device), torch.arange(h, device=boxes.device)
    in_x = (((cols + 0.5) / w >= x0) & ((cols + 0.5) / w <= x1)) | (cols == ((x0 + x1) / 2 * w).floor())
    in_y = (((rows + 0.5) / h >= y0) & ((rows + 0.5) / h <= y1)) | (rows == ((y0 + y1) / 2 * h).floor())
    inside = in_y[..., :, None] & in_x[..., None, :]  # (B, K, h, w)
    inside = inside.flatten(2)  # (B, K, h*w)
    which = torch.arange(1, regions + 1, device=boxes.device)
    member = rid == which  # (B, K, regions)
    return (member[..., None] & inside[:, :, None]).any(1)  # (B, regions, h*w)


def attention_in_boxes(maps: list[Tensor], token_regions: Tensor, boxes: Tensor,
                       hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """-> (shares (layers, B, R), valid (B, R)): per layer, sample and region, the share of the
    attention its words receive that comes from image tokens inside its boxes; valid marks the
    regions that have both words and boxes.

    maps: per cross-attention layer, (B, h*w, L') head-averaged attention of each image token over
    the context (the text tokens are its last L); token_regions: (B, L) region ids; boxes: (B, K, 5)."""
    length = token_regions.shape[1]
    words, where, valid = _region_words_and_cells(token_regions, boxes, hw)
    shares = []
    for attn in maps:
        # (B, R, T): how much each image token reads the region's words
        read = torch.einsum("btl,brl->brt", attn[..., -length:].float(), words)
        shares.append((read * where).sum(-1) / read.sum(-1).clamp_min(1e-8))
    return torch.stack(shares), valid


def _region_words_and_cells(token_regions: Tensor, boxes: Tensor,
                            hw: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """-> (words (B, R, L), cells (B, R, h*w), valid (B, R)): each region's text tokens and the
    grid cells of its boxes as 0/1 floats, and the regions that have both."""
    regions = max(int(token_regions.max()), 1)
    which = torch.arange(1, regions + 1, device=token_regions.device)
    words = (token_regions.long()[:, None, :] == which[None, :, None]).float()
    cells = box_masks(boxes.float(), regions, *hw).float()
    return words, cells, (words.sum(-1) > 0) & (cells.sum(-1) > 0)


def grounding_loss(maps: list[Tensor], token_regions: Tensor, boxes: Tensor, hw: tuple[int, int],
                   keep: Tensor) -> Tensor:
    """TokenCompose's token loss: one minus the share of each region's attention read inside its
    boxes (``attention_in_boxes``), averaged over layers, regions and samples; keep: (B,) bool, the
    samples that saw their caption (not dropped for guidance)."""
    if not maps:
        return torch.zeros(())
    shares, valid = attention_in_boxes(maps, token_regions, boxes, hw)
    valid = valid & keep[:, None]
    if not valid.any():
        return shares.new_zeros(())
    return (1 - shares[:, valid]).mean()


def layout_targets(token_regions: Tensor, boxes: Tensor, grid: int) -> Tensor:
    """(B, L, grid*grid + 1) what the layout planner should say of each text token: a word of a
    region is spread evenly over the cells of its boxes, any other word is "nowhere in particular"
    (the last class)."""
    b, length = token_regions.shape
    regions = max(int(token_regions.max()), 1)
    where = box_masks(boxes.float(), regions, grid, grid).float()  # (B, R, G*G)
    where = torch.cat([where.new_zeros(b, 1, grid * grid), where], 1)  # region 0 has no cells
    cells = where.gather(1, token_regions.long()[..., None].expand(-1, -1, grid * grid))  # (B, L, G*G)
    total = cells.sum(-1, keepdim=True)
    placed = cells / total.clamp_min(1)
    return torch.cat([placed, (total == 0).float()], -1)


def layout_loss(logits: Tensor, token_regions: Tensor, boxes: Tensor, mask: Tensor, keep: Tensor) -> Tensor:
    """Cross-entropy of the layout planner's logits (B, L, G*G + 1) against ``layout_targets``,
    averaged over the real text tokens (mask: (B, L) bool); keep: (B,) bool, the samples that saw
    their caption (a dropped one's null prompt names nothing, so all its words are "nowhere")."""
    grid = math.isqrt(logits.shape[-1] - 1)
    regions = torch.where(keep[:, None], token_regions.long(), 0)
    target = layout_targets(regions, boxes, grid)
    real = mask.bool().float()
    ce = -(target * logits.float().log_softmax(-1)).sum(-1)  # (B, L)
    return (ce * real).sum() / real.sum().clamp_min(1)


def placed_targets(token_regions: Tensor, boxes: Tensor, mask: Tensor, keep: Tensor, grid: int) -> Tensor:
    """(P, grid*grid): the layout target of every real text token that names a placed object, in
    the samples that saw their caption (``layout_loss``'s arguments): what the planner's
    reference (``LayoutPlanner.observe``) averages."""
    target = layout_targets(token_regions, boxes, grid)
    placed = mask.bool() & keep[:, None] & (target[..., -1] == 0)
    return target[..., :-1][placed]


def plan_in_boxes(logits: Tensor, token_regions: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """-> (shares (B, R), valid (B, R)): for each region, the layout planner's probability that its
    words' object is inside its boxes (averaged over its words); valid as in ``attention_in_boxes``.
    logits: (B, L, G*G + 1) as ``layout_loss`` takes them."""
    grid = math.isqrt(logits.shape[-1] - 1)
    words, where, valid = _region_words_and_cells(token_regions, boxes, (grid, grid))
    probs = logits.float().softmax(-1)[..., :-1]  # (B, L, G*G)
    per_word = torch.einsum("blc,brc->brl", probs, where)  # (B, R, L)
    return (per_word * words).sum(-1) / words.sum(-1).clamp_min(1), valid
