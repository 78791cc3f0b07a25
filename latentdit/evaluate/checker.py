"""What a `shapes`-style image shows, read from pixels only (no model): background and objects
with colour, shape, size and cell. ``scoring`` turns a reading into pass/fail per category.

Why a hand-made reader: a learned detector would need data and a GPU and would share the
generator's blind spots; the `shapes` world is simple enough that colour statistics, connected
components and template matching against the dataset's own renderer read it reliably, also on
blurry, noisy or JPEG-compressed generations. GenEval (Ghosh et al. 2023, arXiv:2310.11513) scores
prompts the same way: per category (colour, position, counting, ...) from detected objects.
"""

from __future__ import annotations

import functools

import numpy as np
from PIL import Image
from scipy import ndimage

from ..datasets.shapes import BACKGROUNDS, COLORS, POSITIONS, SHAPES, shape_coverage

_COLOR_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[c] for c in _COLOR_NAMES], dtype=np.float32)  # (K, 3)
_BG_NAMES = tuple(BACKGROUNDS)
_BG_PALETTE = np.array([BACKGROUNDS[b] for b in _BG_NAMES], dtype=np.float32)
_CELL_OF = {rc: name for name, rc in POSITIONS.items()}

_CHROMA_WEIGHT = 0.1  # weight of chroma relative to luma when measuring an object's coverage
_FOREGROUND = 40.0  # RGB distance from the background that counts as "something is here" (noise ~15)
_COVERED = 0.5  # fraction of the way from background to the object colour that is "inside"
_SOLID = 0.75  # pixels at least this covered vote on an object's colour
_MAJOR = 0.2  # share of the solid pixels a second colour needs to split a component
_LARGE = 0.25  # bbox side / canvas side above which an object is large (small ~1/6, large ~1/3)
_HALO = 3  # pixels around the 50% mask whose partial coverage still belongs to the object
_BLURS = (0.0, 0.6, 1.0, 1.3, 1.6, 2.0)  # Gaussian sigmas (pixels) tried when fitting shapes
_EXACT = 0.02  # squared template error per unit of mass below which a fit needs no blur
_YCBCR = np.array([[0.299, 0.587, 0.114], [-0.1687, -0.3313, 0.5], [0.5, -0.4187, -0.0813]])
# Inner product that trusts luma over chroma: JPEG and many decoders keep chroma at half resolution,
# so shape is read mostly from luma where the object differs from the background in brightness.
_LUMA_WEIGHTED = (_YCBCR.T @ np.diag([1.0, _CHROMA_WEIGHT, _CHROMA_WEIGHT]) @ _YCBCR).astype(np.float32)

UNKNOWN_SHAPE = "unknown"  # what the reader calls an object no shape template fits



# ----------------------------------------------------------------------------- reading


def _as_rgb(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 in 0..255 from a PIL image, uint8 array, or float array in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or min(array.shape[:2]) < 8:
        raise ValueError(f"expected an (H, W, 3) image of at least 8x8 pixels, got shape {array.shape}")
    array = array[..., :3].astype(np.float32)
    return array * 255.0 if np.issubdtype(np.asarray(image).dtype, np.floating) else array


def _background(rgb: np.ndarray) -> tuple[str, np.ndarray]:
    """Background = palette background most border pixels are nearest to; its measured colour.

    Objects may touch the border, so vote rather than average; use the measured median of the
    winners, because generated backgrounds are rarely exactly the palette value."""
    width = max(1, min(rgb.shape[:2]) // 32)
    border = np.concatenate([rgb[:width].reshape(-1, 3), rgb[-width:].reshape(-1, 3),
                             rgb[:, :width].reshape(-1, 3), rgb[:, -width:].reshape(-1, 3)])
    nearest = np.linalg.norm(border[:, None] - _BG_PALETTE[None], axis=2).argmin(axis=1)
    winner = int(np.bincount(nearest, minlength=len(_BG_NAMES)).argmax())
    return _BG_NAMES[winner], np.median(border[nearest == winner], axis=0)


def _candidates(background: str) -> np.ndarray:
    """Indices of the palette colours an object may have: never the background's own colour."""
    return np.array([i for i, c in enumerate(_COLOR_NAMES) if c != background])


def _blend_fit(pixels: np.ndarray, bg: np.ndarray, colours: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fit each pixel as bg + alpha * (colour - bg) for every colour: (alpha, residual), (N, K).

    Anti-aliased and blurred edges are exactly such blends, so an edge of a red object on white
    fits red with alpha 0.5 instead of looking pink."""
    v = _PALETTE[colours] - bg  # (K, 3)
    d = pixels - bg  # (N, 3)
    alpha = np.clip(d @ v.T / (v * v).sum(axis=1), 0.0, None)
    residual = np.linalg.norm(d[:, None, :] - alpha[..., None] * v[None], axis=2)
    return alpha, residual


def _major_colours(pixels: np.ndarray, bg: np.ndarray, colours: np.ndarray, min_area: int) -> np.ndarray:
    """Palette indices that cover a real part of a component (more than one => split it)."""
    alpha, residual = _blend_fit(pixels, bg, colours)
    best = residual.argmin(axis=1)
    solid = alpha[np.arange(len(best)), best] >= _SOLID
    votes = np.bincount(best[solid], minlength=len(colours))
    majors = np.flatnonzero((votes >= max(min_area / 2, _MAJOR * max(solid.sum(), 1))) & (votes > 0))
    return colours[majors] if len(majors) else colours[[np.bincount(best, minlength=len(colours)).argmax()]]


def _colour_masks(rgb: np.ndarray, component: np.ndarray, bg: np.ndarray, colours: np.ndarray,
                  min_area: int) -> list[np.ndarray]:
    """Masks of the pixels in `component` that are >= half covered by one colour each."""
    pixels = rgb[component]
    majors = _major_colours(pixels, bg, colours, min_area)
    alpha, residual = _blend_fit(pixels, bg, majors)
    owner = residual.argmin(axis=1)
    masks = []
    for k in range(len(majors)):
        inside = (owner == k) & (alpha[:, k] >= _COVERED)
        mask = np.zeros(component.shape, dtype=bool)
        mask[component] = inside
        masks.append(ndimage.binary_fill_holes(mask))
    return masks


def _pieces(mask: np.ndarray, min_area: int) -> list[np.ndarray]:
    """Connected parts of `mask` big enough to be objects rather than specks of noise."""
    labels, n = ndimage.label(mask)
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    return [labels == k for k in range(1, n + 1) if areas[k] >= min_area]


def _object_masks(rgb: np.ndarray, bg: np.ndarray, background: str) -> list[np.ndarray]:
    """One mask per object: components of non-background pixels, split where colours differ."""
    min_area = max(6, rgb.shape[0] * rgb.shape[1] // 400)
    smooth = ndimage.median_filter(rgb, size=(3, 3, 1))
    foreground = np.linalg.norm(smooth - bg, axis=2) > _FOREGROUND
    masks = []
    for component in _pieces(foreground, min_area):
        component = ndimage.binary_dilation(component)  # the median filter shaved thin tips off
        for colour_mask in _colour_masks(rgb, component, bg, _candidates(background), min_area):
            masks.extend(_pieces(colour_mask, min_area))
    return masks


def _colour_name(rgb: np.ndarray, mask: np.ndarray, background: str) -> str:
    """Nearest palette colour to the median of the interior, away from blended edges."""
    interior = ndimage.binary_erosion(mask)
    pixels = rgb[interior] if interior.sum() >= 3 else rgb[mask]
    colours = _candidates(background)
    distance = np.linalg.norm(_PALETTE[colours] - np.median(pixels, axis=0), axis=1)
    return _COLOR_NAMES[int(colours[distance.argmin()])]


@functools.cache
def _unit_moments(shape: str) -> tuple[float, float, float, float, float]:
    """(area, centroid u, centroid v, var u, var v) of `shape` filling the unit square."""
    n = 256
    cover = shape_coverage(shape, n, n).astype(np.float64)
    grid = (np.arange(n) + 0.5) / n
    area = cover.sum()
    cu, cv = (cover.sum(0) @ grid) / area, (cover.sum(1) @ grid) / area
    var_u, var_v = (cover.sum(0) @ (grid - cu) ** 2) / area, (cover.sum(1) @ (grid - cv) ** 2) / area
    return area / n**2, cu, cv, var_u, var_v


def _moments(alpha: np.ndarray) -> tuple[float, float, float, float, float]:
    """(mass, centroid x, centroid y, var x, var y) of a coverage map, in its pixel coordinates."""
    mass = float(alpha.sum())
    xs, ys = np.arange(alpha.shape[1]) + 0.5, np.arange(alpha.shape[0]) + 0.5
    cx, cy = (alpha.sum(0) @ xs) / mass, (alpha.sum(1) @ ys) / mass
    return mass, cx, cy, (alpha.sum(0) @ (xs - cx) ** 2) / mass, (alpha.sum(1) @ (ys - cy) ** 2) / mass


def _box_for(shape: str, moments: tuple, blur: float) -> tuple[float, float, float, float] | None:
    """The box `shape` must fill to reproduce the measured moments after a Gaussian blur.

    Blurring keeps mass and centroid and adds blur^2 to each variance, so the fit holds for soft
    generations as well as for crisp renders: the variances fix the aspect, the mass the size."""
    area, cu, cv, var_u, var_v = _unit_moments(shape)
    mass, cx, cy, var_x, var_y = moments
    if mass <= 0 or not var_x > blur**2 or not var_y > blur**2:  # nothing drawn, or NaN moments
        return None
    w, h = np.sqrt((var_x - blur**2) / var_u), np.sqrt((var_y - blur**2) / var_v)
    scale = np.sqrt(mass / (area * w * h))
    w, h = w * scale, h * scale
    return cx - cu * w, cy - cv * h, cx - cu * w + w, cy - cv * h + h


def _template_error(shape: str, alpha: np.ndarray, moments: tuple, blur: float) -> tuple[float, tuple] | None:
    """Squared error between the coverage and `shape` fitted to its moments and blurred by `blur`."""
    box = _box_for(shape, moments, blur)
    if box is None:
        return None
    template = shape_coverage(shape, alpha.shape[1], alpha.shape[0], box)
    if blur:
        template = ndimage.gaussian_filter(template, blur, mode="constant")
    return float(((template - alpha) ** 2).sum()), box


def _fit_shape(alpha: np.ndarray) -> tuple[str, tuple[float, float, float, float]] | None:
    """Shape and box whose rendering, blurred by the best of a few sigmas, reproduces the coverage;
    None when no shape can (no positive mass, or a spread no template reaches).

    Trying blurs (instead of solving for one) lets each shape pick the softness that suits it, which
    separates small stars from blobs far better than a moment-based estimate of the blur. A crisp
    image that a crisp template already explains almost exactly skips the blurred fits."""
    if not float(alpha.sum()) > 0:  # coverage clipped below 0 can cancel out: no centroid exists
        return None
    moments = _moments(alpha)
    if not np.isfinite(moments).all():
        return None
    best = (np.inf, "", (0.0, 0.0, 0.0, 0.0))
    for blur in _BLURS:
        for shape in SHAPES:
            fit = _template_error(shape, alpha, moments, blur)
            if fit is not None:
                best = min(best, (fit[0], shape, fit[1]))
        if best[0] < _EXACT * moments[0]:
            break
    return (best[1], best[2]) if best[1] and np.isfinite(best[2]).all() else None


def _coverage(rgb: np.ndarray, mask: np.ndarray, others: np.ndarray, bg: np.ndarray,
              colour: str) -> tuple[np.ndarray, int, int]:
    """How much of `colour` (vs the background) each pixel near the object shows, and the crop origin.

    The window reaches past the 50% mask to catch blurred edges but stops short of other objects."""
    window = ndimage.binary_dilation(mask, iterations=_HALO) & ~ndimage.binary_dilation(others)
    window |= mask
    rows, cols = np.flatnonzero(window.any(axis=1)), np.flatnonzero(window.any(axis=0))
    y0, x0 = max(0, rows[0] - 1), max(0, cols[0] - 1)
    crop = (slice(y0, rows[-1] + 2), slice(x0, cols[-1] + 2))
    v = _PALETTE[_COLOR_NAMES.index(colour)] - bg
    wv = _LUMA_WEIGHTED @ v
    alpha = np.clip((rgb[crop] - bg) @ wv / (v @ wv), -0.5, 1.5)
    return np.where(window[crop], alpha, 0.0), int(x0), int(y0)


def _cell_name(center: tuple[float, float], width: int, height: int) -> str:
    col = min(2, max(0, int(center[0] * 3 // width)))
    row = min(2, max(0, int(center[1] * 3 // height)))
    return _CELL_OF[(row, col)]


def _describe_object(rgb: np.ndarray, mask: np.ndarray, others: np.ndarray, bg: np.ndarray,
                     background: str) -> dict:
    colour = _colour_name(rgb, mask, background)
    alpha, ox, oy = _coverage(rgb, mask, others, bg, colour)
    fit = _fit_shape(alpha)
    if fit is None:  # a smear no shape explains: keep it as an object of unknown shape (never a match)
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        shape, (x0, y0, x1, y1) = UNKNOWN_SHAPE, (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    else:
        shape, (x0, y0, x1, y1) = fit[0], (fit[1][0] + ox, fit[1][1] + oy, fit[1][2] + ox, fit[1][3] + oy)
    height, width = mask.shape
    center = ((x0 + x1) / 2, (y0 + y1) / 2)
    return {
        "color": colour,
        "shape": shape,
        "size": "large" if max((x1 - x0) / width, (y1 - y0) / height) >= _LARGE else "small",
        "cell": _cell_name(center, width, height),
        "center": [round(float(center[0]), 2), round(float(center[1]), 2)],
        "bbox": [round(float(x0), 2), round(float(y0), 2), round(float(x1), 2), round(float(y1), 2)],
        "area": int(mask.sum()),
    }


def read_attributes(image: Image.Image | np.ndarray) -> dict:
    """Background, objects (largest first) and count of a `shapes`-style image, from pixels."""
    rgb = _as_rgb(image)
    background, bg = _background(rgb)
    masks = _object_masks(rgb, bg, background)
    union = np.logical_or.reduce(masks) if masks else np.zeros(rgb.shape[:2], dtype=bool)
    objects = [_describe_object(rgb, m, union & ~m, bg, background) for m in masks]
    objects.sort(key=lambda o: -o["area"])
    return {"background": background, "objects": objects, "count": len(objects)}
