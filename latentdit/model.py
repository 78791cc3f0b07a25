"""The denoiser: a PixArt-alpha / DiT style transformer over latent patches.

PixArt-alpha (Chen et al. 2023, arXiv:2310.00426): adaLN-single modulation, cross-attention to text.
DiT (Peebles & Xie 2022, arXiv:2212.09748): patchify, zero-initialised residual gates and output.
The model knows nothing about noise schedules: it maps (x_t, t in [0, 1], condition) to whatever
``config.prediction`` names, and the caller converts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig, model_preset


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """Sin-cos features of positions ``pos`` (M,) -> (M, dim), as in MAE / DiT."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = pos.double()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d(dim: int, h: int, w: int, spacing: float) -> Tensor:
    """(h*w, dim) embedding of a token grid whose coordinates step by ``spacing`` base cells.

    A spacing below 1 interpolates the training grid (sampling at a larger size, PixArt's
    ``interpolation_scale``); a canvas wider than the base extends it (outpainting, panning).
    """
    ys, xs = torch.meshgrid(torch.arange(h) * spacing, torch.arange(w) * spacing, indexing="ij")
    return torch.cat([sincos_1d(dim // 2, ys.flatten()), sincos_1d(dim // 2, xs.flatten())], dim=1)


def timestep_features(t: Tensor, dim: int = 256) -> Tensor:
    """Sinusoidal features of t in [0, 1], scaled by 1000 so frequencies match DDPM-trained nets."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angles = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """x * (1 + scale) + shift as one fused op (it runs on every token, twice per block)."""
    return torch.addcmul(shift, x, 1 + scale)


class HeadNorm(nn.Module):
    """Per-head normalisation of queries or keys: LayerNorm ("layer", as in ViT-22B) or RMSNorm
    ("rms"), with an optional learned per-channel scale that follows the input dtype (no
    mixed-dtype warning under bf16 autocast). On CPU torch has a fused layer_norm but decomposes
    rms_norm into small ops; "rms" is therefore computed here from one fused fp32 ``vector_norm``
    reduction and two products, which is faster there (docs/architecture.md#performance-notes)."""

    def __init__(self, dim: int, kind: str, affine: bool = True, eps: float = 1e-6):
        super().__init__()
        if kind not in ("layer", "rms"):
            raise ValueError(f"qk_norm must be 'layer', 'rms' or 'none', got {kind!r}")
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        weight = None if self.weight is None else self.weight.to(x.dtype)
        if self.kind == "layer":
            return F.layer_norm(x, (x.shape[-1],), weight, eps=self.eps)
        length = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
        y = x * torch.rsqrt(length.square() / x.shape[-1] + self.eps).to(x.dtype)
        return y if weight is None else y * weight


EXPLICIT_ATTENTION_MAX = 512 * 512  # query x key tokens below which CPU uses the explicit product


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, maps: list[Tensor] | None = None,
           bias: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d) + bias) v over (N, heads, T, d) with an optional (N, 1, 1, S) key
    mask and an optional additive (N, heads, T, S) bias on the logits.

    Accelerators use ``scaled_dot_product_attention``. On CPU in bf16, for the short sequences of
    latent DiTs, SDPA's flash kernel has a backward several times slower than its forward
    (docs/architecture.md#performance-notes); the explicit product is faster there, so it is used
    up to EXPLICIT_ATTENTION_MAX. In fp32 SDPA is the faster of the two. ``maps``: when given, the
    weights are computed explicitly in fp32 and their mean over heads, (N, T, S), is appended to it.
    """
    explicit = maps is not None or (q.device.type == "cpu" and q.dtype == torch.bfloat16)
    if not explicit or (maps is None and q.shape[-2] * k.shape[-2] > EXPLICIT_ATTENTION_MAX):
        if bias is not None:
            bias = bias.to(q.dtype)
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = q @ k.transpose(-2, -1)  # (N, heads, T, S)
    scores = (scores if maps is None else scores.float()) * q.shape[-1] ** -0.5
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    if maps is not None:
        maps.append(weights.mean(1))  # (N, T, S)
    return weights.to(v.dtype) @ v


class Attention(nn.Module):
    """Multi-head attention (see ``attend``); normed queries and keys keep logits bounded in bf16
    (Dehghani et al. 2023, arXiv:2302.05442)."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, qk_norm: str = "layer"):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.cross = context_dim is not None
        if self.cross:
            self.q, self.kv = nn.Linear(dim, dim), nn.Linear(context_dim, 2 * dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        if qk_norm == "none":
            self.q_norm, self.k_norm = nn.Identity(), nn.Identity()
        else:
            # Attention only sees q.k, so per-channel scales on q and k act as their product:
            # "layer" keeps one (on k); "rms" keeps both, as checkpoints written with it have.
            self.q_norm = HeadNorm(self.head_dim, qk_norm, affine=qk_norm == "rms")
            self.k_norm = HeadNorm(self.head_dim, qk_norm)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None,
                maps: list[Tensor] | None = None, bias: Tensor | None = None) -> Tensor:
        """maps: when given, the attention weights averaged over heads, (N, T, S), are appended to it;
        bias: (N, heads, T, S) added to the attention logits."""
        n, t, d = x.shape
        if self.cross:
            q = self.q(x).view(n, t, self.heads, self.head_dim)
            k, v = self.kv(context).view(n, -1, 2, self.heads, self.head_dim).unbind(2)
        else:
            q, k, v = self.qkv(x).view(n, t, 3, self.heads, self.head_dim).unbind(2)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (N, heads, T, head_dim)
        attn_mask = None if mask is None else mask[:, None, None, :]  # (N, 1, 1, L)
        y = attend(q, k, v, attn_mask, maps, bias)
        return self.out(y.transpose(1, 2).reshape(n, t, d))


class MLP(nn.Module):
    """GELU MLP, or with a 3x3 depthwise conv between the projections (LocalViT, Li et al. 2021,
    arXiv:2104.05707; the original Transformer Latent Diffusion) for cheap local mixing."""

    def __init__(self, dim: int, ratio: float, kind: str, gelu: str = "exact"):
        super().__init__()
        hidden = int(dim * ratio)
        self.approximate = "tanh" if gelu == "tanh" else "none"
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden) if kind == "dwconv" else None

    def forward(self, x: Tensor, hw: tuple[int, int]) -> Tensor:
        x = F.gelu(self.fc1(x), approximate=self.approximate)
        if self.dw is not None:
            n, t, c = x.shape
            grid = x.transpose(1, 2).reshape(n, c, *hw)  # (N, hidden, h, w)
            x = F.gelu(self.dw(grid), approximate=self.approximate).flatten(2).transpose(1, 2)
        return self.fc2(x)


LAYOUT_GAIN_RATE = 10.0  # the layout gains learn this many times faster than other weights
# how much of the layout planner's reference one training batch replaces (a running mean)
REFERENCE_MOMENTUM = 0.01
# a cell where placed objects were (almost) never seen counts as seen this share of evenly, so that
# the prior's ratio against the reference stays bounded there
USUAL_FLOOR = 0.05


class Block(nn.Module):
    """Self-attention, cross-attention to the condition tokens, MLP. With adaLN-single the six
    modulation vectors come from one shared projection of t plus a per-block learned table."""

    def __init__(self, cfg: ModelConfig, cross: bool):
        super().__init__()
        d = cfg.width
        self.adaln = cfg.modulation == "adaln-single"
        self.norm1 = nn.LayerNorm(d, elementwise_affine=not self.adaln, eps=1e-6)
        self.attn = Attention(d, cfg.heads, qk_norm=cfg.qk_norm)
        self.norm_x = nn.LayerNorm(d, eps=1e-6) if cross and cfg.cross_norm else nn.Identity()
        cross_qk = cfg.qk_norm if cfg.cross_norm else "none"
        self.cross = Attention(d, cfg.heads, context_dim=d, qk_norm=cross_qk) if cross else None
        self.norm2 = nn.LayerNorm(d, elementwise_affine=not self.adaln, eps=1e-6)
        self.mlp = MLP(d, cfg.mlp_ratio, cfg.mlp, cfg.gelu)
        self.table = nn.Parameter(torch.zeros(6, d)) if self.adaln else None
        # how strongly each cross-attention head follows the layout planner's prior, used times
        # LAYOUT_GAIN_RATE: it starts at cfg.layout_gain (face value by default), so that the denoising
        # loss sees a plan acted on from the first step; a new planner plans nothing, so the model
        # starts as it was
        self.layout_gain = None
        if cross and cfg.layout_planner:
            self.layout_gain = nn.Parameter(torch.full((cfg.heads,), cfg.layout_gain / LAYOUT_GAIN_RATE))

    def forward(self, x: Tensor, mod: Tensor | None, ctx: Tensor | None, ctx_mask: Tensor | None,
                hw: tuple[int, int], maps: list[Tensor] | None = None, prior: Tensor | None = None) -> Tensor:
        if self.adaln:
            sh1, sc1, g1, sh2, sc2, g2 = (self.table[None] + mod).chunk(6, dim=1)  # (N, 1, D) each
            x = torch.addcmul(x, g1, self.attn(modulate(self.norm1(x), sh1, sc1)))
        else:
            x = x + self.attn(self.norm1(x))
        if self.cross is not None:
            bias = None
            if prior is not None:  # (N, heads, T, L'): each head's gain times the planner's log-prior
                bias = (LAYOUT_GAIN_RATE * self.layout_gain)[None, :, None, None] * prior[:, None]
            x = x + self.cross(self.norm_x(x), ctx, ctx_mask, maps, bias)
        if self.adaln:
            return torch.addcmul(x, g2, self.mlp(modulate(self.norm2(x), sh2, sc2), hw))
        return x + self.mlp(self.norm2(x), hw)


class TextRefinerBlock(nn.Module):
    """Self-attention among the text tokens and an MLP, pre-norm, with zero-initialised outputs
    (an identity at init). Text tokens otherwise reach the image only as fixed keys and values;
    these blocks let each token take in the sentence around it (which object a relation word
    names) before cross-attention, as joint image-text attention does, at the cost of a few
    short sequences: the text length, not the image, sets their size."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.width
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
        self.attn = Attention(d, cfg.heads, qk_norm=cfg.qk_norm)
        self.mlp = MLP(d, cfg.mlp_ratio, "gelu", cfg.gelu)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x), mask=mask)
        return x + self.mlp(self.norm2(x), (0, 0))


class LayoutPlanner(nn.Module):
    """Where each text token's object will be: per token, logits over the cells of the base token
    grid plus one "nowhere in particular" class (words that name no object, pads, the null prompt).

    Trained on grounding boxes (``grounding.layout_loss``), it turns the sentence into a layout
    prior: which image tokens should read which words. Order and relation words change where an
    object goes; a denoising loss hears that only faintly (by the time an object shows, its colour
    finds its words), a planner trained on where each object was hears nothing else. Its log-prior
    is added to every cross-attention head's logits, scaled by that head's learned gain."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.grid = max(cfg.base_size // cfg.patch_size, 1)
        # one self-attention over the text tokens (no MLP: a per-token linear head does the rest), so
        # that a planner shipped as a delta stays small
        self.norm_in = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn = Attention(cfg.width, cfg.heads, qk_norm=cfg.qk_norm)
        self.norm = nn.LayerNorm(cfg.width, eps=1e-6)
        self.head = nn.Linear(cfg.width, self.grid**2 + 1)
        # where a placed word's object is when its caption says no more: the running mean of the
        # cells of every placed word seen in training (``observe``), a statistic of the data that no
        # gradient moves. The prior says how much more than this a token should read a word, so
        # that a plan that only repeats where objects usually are biases nothing.
        self.register_buffer("reference", self.even())

    def even(self) -> Tensor:
        """An even spread over the cells: the reference before any training batch was seen."""
        return torch.full((self.grid**2,), 1.0 / self.grid**2)

    @torch.no_grad()
    def observe(self, cells: Tensor) -> None:
        """Fold one batch's placed words into the reference: cells (P, grid**2), each row where one
        placed word's object is (``grounding.placed_targets``)."""
        if len(cells):
            self.reference.lerp_(cells.float().mean(0).to(self.reference), REFERENCE_MOMENTUM)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a planner saved before it had a reference plans against an even spread, as it did then
        state_dict.setdefault(prefix + "reference", self.even().to(self.reference))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def reset_head(self, nowhere: float = 8.0) -> None:
        """Every word "nowhere in particular" (probability e**nowhere / (grid**2 + e**nowhere)): a
        plan that biases no head until the planner has learned one."""
        nn.init.zeros_(self.head.weight)
        with torch.no_grad():
            self.head.bias.zero_()[-1] = nowhere

    def forward(self, ctx: Tensor, mask: Tensor) -> Tensor:
        """ctx: (N, L, D) text tokens, mask: (N, L) -> (N, L, grid**2 + 1) logits, "nowhere" last."""
        x = ctx + self.attn(self.norm_in(ctx), mask=mask)
        return self.head(self.norm(x)).float()


def is_planner_weight(name: str) -> bool:
    """The weights a layout planner adds to a model without one (the planner and the gains)."""
    return name.startswith("planner.") or name.endswith(".layout_gain")


def layout_prior(logits: Tensor, h: int, w: int, reference: Tensor | None = None,
                 floor: float = -8.0) -> Tensor:
    """Planner logits (N, L, G*G + 1) -> (N, h*w, L): log of how much more than usual each image
    token of an h x w grid should read each word (0 for "nowhere in particular"), at least
    ``floor``. Usual is the reference plan (G*G,) probabilities (``LayoutPlanner.reference``):
    where a placed word's object is when its caption says no more, so that a word whose plan only
    repeats it (an object with no stated place, a counted one) is biased nowhere; without one,
    an even spread. A grid other than G x G resamples the cell probabilities."""
    n, length, cells = logits.shape
    g = math.isqrt(cells - 1)
    probs = logits.float().softmax(-1)
    where, nowhere = probs[..., :-1], probs[..., -1:]
    usual = (reference.float() / reference.float().sum() if reference is not None
             else where.new_full((g * g,), 1.0 / (g * g)))
    if (h, w) != (g, g):
        where = F.interpolate(where.reshape(n * length, 1, g, g), size=(h, w), mode="bilinear",
                              align_corners=False).reshape(n, length, h * w)
        where = where * ((1 - nowhere) / where.sum(-1, keepdim=True).clamp_min(1e-12))
        usual = F.interpolate(usual.reshape(1, 1, g, g), size=(h, w), mode="bilinear",
                              align_corners=False).reshape(h * w)
        usual = usual / usual.sum()
    ratio = nowhere + where / usual.clamp_min(USUAL_FLOOR / (h * w))
    return ratio.clamp_min(1e-12).log().clamp_min(floor).transpose(1, 2)


class Denoiser(nn.Module):
    """Latent transformer denoiser. See ``forward`` for the interface."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = cfg = config
        d, p = cfg.width, cfg.patch_size
        self.patch = nn.Conv2d(cfg.in_channels + cfg.extra_in_channels, d, p, stride=p)
        self.t_embed = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        self.uses_tokens = cfg.text_dim > 0
        cross = self.uses_tokens or cfg.modulation == "none"
        if cfg.text_dim:
            self.text_proj = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU("tanh"), nn.Linear(d, d))
            self.null_text = nn.Parameter(torch.randn(1, cfg.text_dim) / cfg.text_dim**0.5)
            if cfg.text_refiner:
                self.text_pos = nn.Parameter(torch.zeros(cfg.max_text_len, d))
                self.text_refiner = nn.ModuleList(TextRefinerBlock(cfg) for _ in range(cfg.text_refiner))
            if cfg.layout_planner:
                self.planner = LayoutPlanner(cfg)
        if cfg.pooled_dim:
            self.pooled_proj = nn.Sequential(nn.Linear(cfg.pooled_dim, d), nn.SiLU(), nn.Linear(d, d))
            self.null_pooled = nn.Parameter(torch.zeros(cfg.pooled_dim))
        if cfg.num_classes:
            self.class_embed = nn.Embedding(cfg.num_classes + 1, d)  # last row: the null class
        if cfg.modulation == "adaln-single":
            self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
            self.final_table = nn.Parameter(torch.randn(2, d) / d**0.5)
        self.blocks = nn.ModuleList(Block(cfg, cross) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=cfg.modulation == "none", eps=1e-6)
        self.final = nn.Linear(d, p * p * cfg.out_channels)
        self._pos_cache: dict[tuple[int, int, float], Tensor] = {}
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT init: xavier linears, zero adaLN projection, zero output, zero extra input channels."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        with torch.no_grad():
            w[:, self.config.in_channels:] = 0
        nn.init.normal_(self.t_embed[0].weight, std=0.02)
        nn.init.normal_(self.t_embed[2].weight, std=0.02)
        if hasattr(self, "t_block"):
            nn.init.zeros_(self.t_block[1].weight)
            nn.init.zeros_(self.t_block[1].bias)
        if hasattr(self, "class_embed"):
            nn.init.normal_(self.class_embed.weight, std=0.02)
        nn.init.zeros_(self.final.weight)
        nn.init.zeros_(self.final.bias)
        for block in getattr(self, "text_refiner", ()):
            for out in (block.attn.out, block.mlp.fc2):
                nn.init.zeros_(out.weight)
        if hasattr(self, "planner"):
            self.planner.reset_head()

    # -- conditioning ------------------------------------------------------------------------
    def null_condition(self, n: int, length: int = 1) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """The learned "no prompt" condition for classifier-free guidance: (text, mask, pooled);
        the text is one learned token followed by ``length - 1`` masked pads."""
        pooled = self.null_pooled.expand(n, -1) if self.config.pooled_dim else None
        if not self.config.text_dim:
            return None, None, pooled
        p = self.null_text
        text = torch.cat([p.expand(n, 1, -1), p.new_zeros(n, length - 1, p.shape[1])], dim=1)
        mask = torch.zeros(n, length, dtype=torch.bool, device=p.device)
        mask[:, 0] = True
        return text, mask, pooled

    def drop_condition(self, text: Tensor | None, mask: Tensor | None, pooled: Tensor | None,
                       drop: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        """Replace the rows where ``drop`` (N,) is True by the null condition (CFG training)."""
        length = text.shape[1] if text is not None else 1
        nt, nm, npool = self.null_condition(drop.shape[0], length)
        if text is not None and nt is not None:
            text = torch.where(drop[:, None, None], nt.to(text.dtype), text)
            mask = torch.where(drop[:, None], nm, mask.bool())
        if pooled is not None and npool is not None:
            pooled = torch.where(drop[:, None], npool.to(pooled.dtype), pooled)
        return text, mask, pooled

    def pos_embed(self, h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Position embedding of an h x w token grid. Coordinates are expressed in cells of the
        base grid: the shorter side always spans the base, so 2x resolution interpolates."""
        base = self.config.base_size / self.config.patch_size
        spacing = base / min(h, w)
        key = (h, w, spacing)
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_2d(self.config.width, h, w, spacing)
        return self._pos_cache[key].to(device=device, dtype=dtype)

    def _condition(self, t: Tensor, text: Tensor | None, text_mask: Tensor | None,
                   pooled: Tensor | None, labels: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """-> (c: (N, D) global condition, ctx: (N, L', D) context tokens or None, ctx mask)."""
        c = self.t_embed(timestep_features(t).to(self.t_embed[0].weight.dtype))  # (N, D)
        extra = []
        if self.config.pooled_dim:
            if pooled is None:
                raise ValueError("this model needs a pooled text vector (pooled=...)")
            extra.append(self.pooled_proj(pooled))  # (N, D)
        if self.config.num_classes:
            if labels is None:
                raise ValueError("this class-conditional model needs labels=...")
            extra.append(self.class_embed(labels))
        if self.config.modulation == "adaln-single":
            c = c + sum(extra) if extra else c
            ctx, mask = self._text_tokens(text, text_mask)
            return c, ctx, mask
        # Original TLD recipe: noise level and pooled text enter as two cross-attention tokens.
        tokens = torch.stack([c, *extra], dim=1)  # (N, 1 or 2, D)
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        ctx, tmask = self._text_tokens(text, text_mask)
        if ctx is not None:
            tokens, mask = torch.cat([tokens, ctx], 1), torch.cat([mask, tmask], 1)
        return c, tokens, mask

    def _text_tokens(self, text: Tensor | None, mask: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        if not self.uses_tokens:
            return None, None
        if text is None or mask is None:
            raise ValueError("this text-conditional model needs text=(N, L, D) and text_mask=(N, L)")
        if text.shape[-1] != self.config.text_dim:
            raise ValueError(f"text embeddings have dim {text.shape[-1]}, the model expects "
                             f"{self.config.text_dim}")
        mask = mask.bool()
        # A row with every token masked would make attention NaN: let it see its first token.
        mask = mask | (~mask.any(1, keepdim=True) & (torch.arange(mask.shape[1], device=mask.device) == 0))
        ctx = self.text_proj(text)
        if self.config.text_refiner:
            if ctx.shape[1] > self.config.max_text_len:
                raise ValueError(f"{ctx.shape[1]} text tokens, but this model's text refiner has positions "
                                 f"for {self.config.max_text_len} (max_text_len)")
            ctx = ctx + self.text_pos[: ctx.shape[1]].to(ctx.dtype)
            for block in self.text_refiner:
                ctx = block(ctx, mask)
        return ctx, mask

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor, text: Tensor | None = None, text_mask: Tensor | None = None,
                pooled: Tensor | None = None, mask_latent: Tensor | None = None,
                labels: Tensor | None = None, attention_maps: list[Tensor] | None = None,
                layouts: list[Tensor] | None = None) -> Tensor:
        """x: (N, C, H, W) noisy latents; t: (N,) in [0, 1]; text: (N, L, D) token embeddings;
        text_mask: (N, L) bool; pooled: (N, D_pooled) or None; mask_latent: (N, extra, H, W)
        extra input channels (inpainting variants); labels: (N,) class ids for class models;
        attention_maps: a list that receives each cross-attention block's head-averaged weights,
        (N, T, L') over the context tokens (the text tokens are the last L), for grounding losses;
        layouts: a list that receives the layout planner's logits (N, L, G*G + 1), for its loss.
        Returns the prediction named by config.prediction, shape of x."""
        cfg, (n, _, hh, ww) = self.config, x.shape
        p = cfg.patch_size
        if hh % p or ww % p:
            raise ValueError(f"latent size {hh}x{ww} is not a multiple of the patch size {p}")
        if cfg.extra_in_channels:
            if mask_latent is None:
                raise ValueError(f"this model takes {cfg.extra_in_channels} extra input channels "
                                 "(mask_latent=...)")
            x = torch.cat([x, mask_latent.to(x.dtype)], dim=1)
        t = t.expand(n) if t.dim() == 0 else t
        h, w = hh // p, ww // p
        tokens = self.patch(x).flatten(2).transpose(1, 2)  # (N, T, D), T = h*w
        tokens = tokens + self.pos_embed(h, w, tokens.device, tokens.dtype)
        c, ctx, ctx_mask = self._condition(t, text, text_mask, pooled, labels)
        mod = self.t_block(c).view(n, 6, -1) if cfg.modulation == "adaln-single" else None  # (N, 6, D)
        prior = self._layout_prior(ctx, ctx_mask, text, h, w, layouts) if cfg.layout_planner else None
        for block in self.blocks:
            tokens = block(tokens, mod, ctx, ctx_mask, (h, w), attention_maps, prior)
        return self._unpatchify(self._final(tokens, c), h, w)

    def _layout_prior(self, ctx: Tensor, ctx_mask: Tensor, text: Tensor, h: int, w: int,
                      layouts: list[Tensor] | None) -> Tensor:
        """(N, h*w, L') log-prior over the context tokens: the planner's over the text tokens (the
        last L), none over the tokens before them (t and the pooled vector without adaLN)."""
        length = text.shape[1]
        # The planner reads the text tokens without training them: its loss would otherwise pull
        # the projection the denoiser reads toward what a layout needs.
        logits = self.planner(ctx[:, -length:].detach(), ctx_mask[:, -length:])
        if layouts is not None:
            layouts.append(logits)
        # The planner learns from boxes alone; the denoiser learns how far to follow it (the gains).
        prior = layout_prior(logits.detach(), h, w, self.planner.reference)
        return F.pad(prior, (ctx.shape[1] - length, 0))

    def _final(self, x: Tensor, c: Tensor) -> Tensor:
        x = self.final_norm(x)
        if self.config.modulation == "adaln-single":
            shift, scale = (self.final_table[None] + c[:, None]).chunk(2, dim=1)
            x = modulate(x, shift, scale)
        return self.final(x)  # (N, T, p*p*C)

    def _unpatchify(self, x: Tensor, h: int, w: int) -> Tensor:
        p, c = self.config.patch_size, self.config.out_channels
        x = x.view(x.shape[0], h, w, p, p, c)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], c, h * p, w * p)  # (N, C, H, W)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_denoiser(preset: str = "tiny", **overrides) -> Denoiser:
    """A fresh denoiser from a named preset (see ``config.PRESETS``)."""
    return Denoiser(model_preset(preset, **overrides))
