"""``Text2Image``: prompts -> images with classifier-free guidance and any sampler, as public steps.

The steps (``prepare``, ``encode``, ``noise``, ``denoiser``, ``sample``, ``decode``) are what
editing, evaluation and serving build on; ``__call__`` is their shortest composition. Defaults
(steps, sampler, guidance, its interval, grid) are resolved in one place, ``prepare``; guidance
and its interval are applied in one place, ``denoiser``: one batched pass over [conditional,
unconditional] rows, mixed in x0 space. Because x0, eps and v are affine in the network output
for a fixed x_t, mixing x0 equals mixing eps or v.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from .checkpoint import CheckpointConfig, base_folder, check_image_size, component_path, load_denoiser
from .condition import Condition
from .config import SamplingConfig, check_count_contrast, check_guidance_interval
from .control import MapInput, control_input
from .counts import CountContrast, contrast_prompts
from .device import DType, compute_dtype, resolve_device
from .inpainting import is_inpainting, masked_condition
from .lora import load_adapter, remove_lora
from .model import Denoiser
from .pixels import to_pil
from .plan import (
    OutputType,
    SamplingPlan,
    check_finite,
    check_output_type,
    check_positive,
    check_strength,
    negative_list,
    prompt_list,
    seed_list,
)
from .rows import RowThreads
from .samplers import Denoise, OnStep, get_sampler, row_generators, time_grid
from .schedules import NoisePath, to_x0
from .text import TextEncoder, load_text_encoder
from .threads import row_threads
from .vae import Autoencoder, load_autoencoder


def autocast(device: torch.device, dtype: DType) -> contextlib.AbstractContextManager:
    """bf16 autocast on CPU and CUDA; ``"auto"``: only where the device computes bf16 natively
    (``latentdit.device.compute_dtype``); ``None``/fp32 disables it."""
    dtype = compute_dtype(device, dtype)
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


class Text2Image:
    """A latent text-to-image (or class-to-image) pipeline around a ``Denoiser``.

    ``pipe(prompts, ...)`` composes six public steps, which editing (and anything else that
    samples) calls instead of re-implementing them::

        plan = pipe.prepare(steps, sampler=..., guidance_scale=..., strength=1.0)  # options + grid
        cond, uncond = pipe.encode(prompts, negative)          # uncond: null condition if no negative
        x = pipe.noise(seed_list(seed, n), pipe.latent_shape(height, width))
        denoise = pipe.denoiser(cond, uncond, plan.guidance_scale, dtype,
                                guidance_interval=plan.guidance_interval)
        latents = pipe.sample(x, denoise, plan, seed=seeds)
        images = pipe.decode(latents, "pil")
    """

    def __init__(self, model: Denoiser, autoencoder: Autoencoder, text_encoder: TextEncoder | None = None,
                 path: NoisePath | None = None, sampling: SamplingConfig | None = None,
                 device: str | torch.device = "cpu"):
        self.model = model.eval()
        self.autoencoder = autoencoder
        self.text_encoder = text_encoder
        self.path = path or NoisePath("flow")
        self.sampling = sampling or SamplingConfig()
        self.device = torch.device(device)
        self._cast: tuple[tuple, Denoiser] | None = None
        self._rows: RowThreads | None = None
        if model.config.is_text and text_encoder is None:
            raise ValueError("this model is text-conditional: pass a text_encoder")

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path = "shapes", device: str | torch.device = "auto",
                        text_encoder: TextEncoder | None = None,
                        autoencoder: Autoencoder | None = None, adapter: str | Path | None = None) -> Text2Image:
        """Load a model folder, a packaged model name (``shapes``) or a hub id, with the encoders
        its config names (override either by passing an instance). ``device="auto"``: the
        accelerator when there is one. ``adapter``: a LoRA adapter folder to load on top."""
        device = resolve_device(device)
        model, config, directory = load_denoiser(name_or_path, device)
        folders = (directory, base_folder(directory, config))  # a delta's components may be its base's
        pipe = cls(model, autoencoder or _load_ae(config, folders, device),
                   text_encoder or _load_text(config, folders, device),
                   NoisePath(config.diffusion.path), config.sampling, device)
        if adapter is not None:
            pipe.load_adapter(adapter)
        return pipe

    def load_adapter(self, directory: str | Path) -> None:
        """Merge a LoRA adapter folder (``latentdit finetune-concept``) into the denoiser; it must
        have been trained on this very base model (``lora.load_adapter`` checks)."""
        load_adapter(self.model, directory, merge=True)

    def unload_adapter(self) -> None:
        """Take a loaded adapter back out: the base model as it was loaded."""
        remove_lora(self.model, merge=False)

    # -- step 1: options and the time grid --------------------------------------------
    def prepare(self, steps: int | None = None, *, sampler: str | None = None,
                guidance_scale: float | None = None, guidance_interval: tuple[float, float] | None = None,
                grid: str | None = None, shift: float | None = None, eta: float | None = None,
                strength: float = 1.0, count_contrast: float | None = None) -> SamplingPlan:
        """Step 1: every option left None replaced by the sampling config's, checked, and the time
        grid. ``strength`` < 1 starts the grid at ``t = strength`` and runs
        ``max(1, round(steps * strength))`` of the ``steps`` (diffusers' img2img count)."""
        steps = check_positive(self.sampling.steps if steps is None else steps, "steps")
        strength = check_strength(strength)
        if strength == 0.0:
            raise ValueError("sampling needs strength > 0 (at 0 there is nothing to sample)")
        if strength < 1.0:
            steps = max(1, round(steps * strength))
        name = sampler or self.sampling.sampler
        get_sampler(name)  # an unknown name fails here, before any encoding
        interval = self.sampling.guidance_interval if guidance_interval is None else guidance_interval
        g = self.sampling.guidance_scale if guidance_scale is None else guidance_scale
        return SamplingPlan(steps=steps, ts=self.grid(steps, grid, shift, t_start=strength), sampler=name,
                            options={"eta": self.sampling.eta if eta is None else eta} if name == "ddim" else {},
                            guidance_scale=check_finite(g, "guidance scale"),
                            guidance_interval=check_guidance_interval(interval),
                            count_contrast=check_count_contrast(
                                self.sampling.count_contrast if count_contrast is None else count_contrast))


    def grid(self, steps: int, grid: str | None = None, shift: float | None = None,
             t_start: float = 1.0) -> Tensor:
        """The decreasing time grid of ``steps`` steps from ``t_start`` to 0 (``prepare`` calls it)."""
        grid = grid or self.sampling.grid
        shift = self.sampling.shift if shift is None else shift
        return time_grid(steps, self.path, grid, shift=shift, t_max=t_start)

    # -- step 2: conditioning ------------------------------------------------------------
    def encode(self, prompts: Sequence[str | int],
               negative: Sequence[str] | None = None) -> tuple[Condition, Condition]:
        """(conditional, unconditional) rows. Without a negative prompt the unconditional row
        is the model's learned null condition, as in training."""
        n = len(prompts)
        if self.model.config.num_classes:
            labels = _class_labels(prompts, self.model.config.num_classes, self.device)
            null = torch.full_like(labels, self.model.config.num_classes)
            return Condition(labels=labels), Condition(labels=null)
        texts = [_check_prompt(p) for p in prompts] + list(negative or [])
        self.text_encoder.check_readable(texts)
        emb = self.text_encoder.encode(texts).to(self.device)
        cfg = self.model.config
        rows = Condition.from_text(emb, cfg)
        cond = rows.map(lambda v: v[:n])
        if negative:
            return cond, rows.map(lambda v: v[n:])
        return cond, self.null_condition(cond)

    def encode_with_contrast(self, prompts: Sequence[str | int], negative: Sequence[str] | None,
                             scale: float) -> tuple[Condition, Condition, CountContrast | None]:
        """``encode``, plus the count contrast of the prompts that name a count when ``scale`` > 0
        (``latentdit.counts``), encoded in the same call so that every row has one token length.
        Without a count, or at scale 0, exactly ``encode``'s rows and None."""
        rows, higher = ([], []) if scale == 0 or self.model.config.num_classes else contrast_prompts(prompts)
        if not rows:
            return *self.encode(prompts, negative), None
        n = len(prompts)
        cond, uncond = self.encode([*prompts, *higher], None if negative is None else
                                   [*negative, *(negative[i] for i in rows)])
        contrast = CountContrast(torch.tensor(rows, device=self.device), cond.map(lambda v: v[n:]), scale)
        return cond.map(lambda v: v[:n]), uncond.map(lambda v: v[:n]), contrast

    def encode_image(self, images: Tensor) -> Tensor:
        """Scaled latents of (N, 3, H, W) images in [-1, 1], after checking the size suits the model."""
        h, w = images.shape[-2:]
        step = self.autoencoder.downsample * self.model.config.patch_size
        if h % step or w % step:
            raise ValueError(f"the image is {w}x{h} (width x height); this model needs both sides to be "
                             f"multiples of {step}: resize or crop it")
        return self.autoencoder.encode(images.to(self.device))

    def null_condition(self, like: Condition) -> Condition:
        """The learned null condition with the rows and token length of ``like``: what ``encode``
        pairs with a prompt that has no negative prompt, and the unconditional model alone."""
        if like.labels is not None:
            return Condition(labels=torch.full_like(like.labels, self.model.config.num_classes))
        rows = next(v for v in (like.text, like.pooled) if v is not None).shape[0]
        length = like.text.shape[1] if like.text is not None else 1
        return Condition(*self.model.null_condition(rows, length)).map(lambda v: v.detach())

    def unconditional(self, n: int = 1) -> Condition:
        """n rows of the null condition with the token length of an empty prompt (no prompt at all)."""
        empty = self.encode([0 if self.model.config.num_classes else ""])[1]
        return empty.repeat(n)

    # -- step 3: the starting latents -------------------------------------------------
    def latent_shape(self, height: int | None, width: int | None) -> tuple[int, int, int]:
        """(C, h, w) of the latents of a height x width image (default: the model's base size)."""
        d = self.autoencoder.downsample
        height, width = check_image_size(height, width, base=self.model.config.base_size * d,
                                         step=d * self.model.config.patch_size)
        return self.model.config.in_channels, height // d, width // d

    def noise(self, seeds: Sequence[int], shape: tuple[int, int, int]) -> Tensor:
        """Step 3: one independently seeded noise tensor per image (seeds from ``seeds``), so an
        image does not depend on the batch it was drawn in."""
        rows = [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.stack(rows).to(self.device)

    def add_noise(self, x0: Tensor, noise: Tensor, t: float) -> Tensor:
        """x_t = alpha(t) x0 + sigma(t) noise at one time t for the whole batch (exactly ``noise``
        at flow's t = 1): where img2img and inpainting start, and what inpainting re-imposes."""
        alpha, sigma = self.path.alpha_sigma(torch.tensor(float(t), dtype=torch.float64))
        return float(alpha) * x0 + float(sigma) * noise

    # -- step 4: the guided denoiser ---------------------------------------------------
    def denoiser(self, cond: Condition, uncond: Condition | None, guidance_scale: float,
                 dtype: DType = "auto", mask_latent: Tensor | None = None,
                 guidance_interval: tuple[float, float] = (0.0, 1.0), *,
                 contrast: CountContrast | None = None) -> Callable[[Tensor, Tensor], Tensor]:
        """The sampler's (x_t, t) -> x0 callable, with CFG when guidance_scale != 1 and
        ``guidance_interval[0] <= t <= guidance_interval[1]`` (one conditional pass elsewhere).
        ``mask_latent``: an inpainting variant's extra input channels, one row per image.
        ``contrast``: on the guided steps, its rows are also guided away from its condition
        (``latentdit.counts``), with one more model row each. ``dtype``: the autocast dtype,
        ``"auto"`` for bf16 where the device computes it natively and fp32 elsewhere."""
        guidance_scale = check_finite(guidance_scale, "guidance scale")
        dtype = compute_dtype(self.device, dtype)
        guided = uncond is not None and guidance_scale != 1.0
        if contrast is not None and (not guided or contrast.scale == 0 or not len(contrast.rows)):
            contrast = None
        lo, hi = check_guidance_interval(guidance_interval)
        both = Condition.cat(cond, uncond) if guided else cond
        rows_k = None if contrast is None else contrast.rows
        if rows_k is not None:  # [conditional, unconditional, the counted rows' contrast]
            both = Condition.cat(both, contrast.cond)
        prediction = self.model.config.prediction
        model = self.inference_model(dtype)
        extra = {} if mask_latent is None else {"mask_latent": mask_latent}

        rows = self.row_threads()

        def forward(inputs: dict[str, Tensor | None]) -> Tensor:
            kw = dict(inputs)
            x, t = kw.pop("x"), kw.pop("t")
            with torch.no_grad(), autocast(self.device, dtype):  # both are per thread
                return model(x, t, **kw)

        def run(x: Tensor, t: Tensor, c: Condition, kw: dict[str, Tensor]) -> Tensor:
            pred = rows.run(forward, {"x": x, "t": t, **c.kwargs(), **kw})
            return to_x0(pred.float(), x, t, self.path, prediction)

        @torch.no_grad()
        def denoise(x: Tensor, t: Tensor) -> Tensor:
            t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t  # one time for every row
            if not guided or not lo <= float(t.reshape(-1)[0]) <= hi:
                return run(x, t, cond, extra)
            def stacked(v: Tensor) -> Tensor:
                return torch.cat([v, v] if rows_k is None else [v, v, v[rows_k]])

            n = x.shape[0]
            x0 = run(stacked(x), stacked(t), both, {k: stacked(v) for k, v in extra.items()})
            x0_c, x0_u = x0[:n], x0[n:2 * n]
            out = x0_u + guidance_scale * (x0_c - x0_u)
            if rows_k is None:
                return out
            return out.index_add(0, rows_k, contrast.scale * (x0_c[rows_k] - x0[2 * n:]))

        return denoise

    def prompt_denoiser(self, prompt: str | int | None, plan: SamplingPlan | None = None, *,
                        negative_prompt: str | None = None, dtype: DType = "auto",
                        repeat: int = 1, mask_latent: Tensor | None = None) -> Denoise:
        """``denoiser`` for one prompt, its row repeated ``repeat`` times, guided as ``plan`` says
        (``plan=None``: the conditional prediction alone, as inversion needs). ``prompt=None``:
        the null condition alone (unconditional, never guided)."""
        if prompt is None:
            return self.denoiser(self.unconditional(repeat), None, 1.0, dtype, mask_latent)
        cond, uncond = self.encode([prompt], None if negative_prompt is None else [negative_prompt])
        if plan is None:
            return self.denoiser(cond.repeat(repeat), None, 1.0, dtype, mask_latent)
        return self.denoiser(cond.repeat(repeat), uncond.repeat(repeat), plan.guidance_scale, dtype, mask_latent,
                             plan.guidance_interval)

    def row_threads(self) -> RowThreads:
        """How the denoiser's batch is run: on the CPU, its rows split across one Python thread
        per intra-op thread torch has (or ``LATENTDIT_ROW_THREADS``), each running its rows alone
        (``latentdit.rows``: no OpenMP barrier per operator, which a busy machine makes slow);
        elsewhere in one call."""
        threads = row_threads(torch.get_num_threads()) if self.device.type == "cpu" else 1
        if self._rows is None or self._rows.threads != threads:
            if self._rows is not None:
                self._rows.close()
            self._rows = RowThreads(threads)
        return self._rows

    def inference_model(self, dtype: DType) -> Denoiser:
        """The denoiser for sampling under ``autocast(dtype)``: a copy whose linear and conv
        weights are stored in ``dtype``, which is exactly what autocast would cast them to on
        every call (a visible share of a CPU sampling run: docs/architecture.md#performance-notes).
        Rebuilt when the model's weights change; the model itself is returned for fp32."""
        dtype = compute_dtype(self.device, dtype)
        if dtype is None or dtype == torch.float32:
            return self.model
        key = (dtype, tuple((p.data_ptr(), p._version) for p in self.model.parameters()))
        if self._cast is None or self._cast[0] != key:
            cast = copy.deepcopy(self.model).requires_grad_(False)
            for module in cast.modules():
                if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                    module.to(dtype)
            self._cast = (key, cast)
        return self._cast[1]

    # -- steps 5 and 6 ---------------------------------------------------------------------
    def sample(self, x: Tensor, denoise: Denoise, plan: SamplingPlan, *, seed: int | Sequence[int] = 0,
               on_step: OnStep | None = None, progress: bool = True) -> Tensor:
        """Step 5: the plan's sampler over its grid from x, with an optional progress bar.
        ``seed``: one per row of x (or an int: row i uses seed + i), the seeds ``noise`` drew x
        from; a stochastic sampler draws each row's noise from that row's own generator
        (``row_generators``), so an image does not depend on its batch here either.
        ``on_step`` may replace each step's result."""
        fn = get_sampler(plan.sampler)
        gen = row_generators(seed_list(seed, x.shape[0]))
        bar = _progress(len(plan.ts) - 1, progress)

        def hook(i: int, t: Tensor, x_next: Tensor, x0: Tensor) -> Tensor | None:
            bar.update(1)
            check_finite_sample(x_next, f"step {i + 1} of {len(plan.ts) - 1}")
            return on_step(i, t, x_next, x0) if on_step else None

        try:
            return fn(denoise, x, plan.ts.to(x.device), self.path, generator=gen, on_step=hook, **plan.options)
        finally:
            bar.close()

    def decode(self, latents: Tensor, output_type: OutputType = "pil") -> list[Image.Image] | Tensor:
        """Step 6: latents to PIL images, a tensor in [-1, 1] ("tensor") or the latents themselves."""
        check_output_type(output_type)
        if output_type == "latent":
            return latents
        check_finite_sample(latents, "the end of sampling")
        images = self.autoencoder.decode(latents.float())
        check_finite_sample(images, "decoding")
        return images if output_type == "tensor" else to_pil(images)

    # -- the whole call ---------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, prompts: str | int | Sequence[str | int], negative_prompt: str | Sequence[str] | None = None,
                 steps: int | None = None, guidance_scale: float | None = None, sampler: str | None = None,
                 seed: int | Sequence[int] = 0, height: int | None = None, width: int | None = None,
                 num_images_per_prompt: int = 1, dtype: DType = "auto",
                 output_type: OutputType = "pil", progress: bool = True, shift: float | None = None,
                 grid: str | None = None, eta: float | None = None,
                 guidance_interval: tuple[float, float] | None = None, control: MapInput | None = None,
                 control_scale: float = 1.0, count_contrast: float | None = None) -> list[Image.Image] | Tensor:
        """Generate ``num_images_per_prompt`` images per prompt. ``seed``: an int (image i uses
        seed + i) or one seed per image. ``output_type``: "pil", "tensor" ([-1, 1]) or "latent".
        ``guidance_interval``: guide only for t in [lo, hi] (default: the sampling config's).
        ``control``: a control model's map (a file, a PIL image with white objects, or (H, W) /
        (N, 1, H, W) values in [0, 1]; ``latentdit.control``), weakened by ``control_scale``.
        ``count_contrast``: how far prompts naming a count are guided away from their count one
        higher (``latentdit.counts``; default: the sampling config's)."""
        prompts = prompt_list(prompts)
        k = check_positive(num_images_per_prompt, "num_images_per_prompt")
        plan = self.prepare(steps, sampler=sampler, guidance_scale=guidance_scale,
                            guidance_interval=guidance_interval, grid=grid, shift=shift, eta=eta,
                            count_contrast=count_contrast)
        check_output_type(output_type)
        seeds = seed_list(seed, len(prompts) * k)
        cond, uncond, contrast = self.encode_with_contrast(prompts, negative_list(negative_prompt, len(prompts)),
                                                           plan.count_contrast)
        x = self.noise(seeds, self.latent_shape(height, width))
        extra = control_input(self.model.config, control, len(seeds), x.shape[-2:], control_scale, self.device)
        if is_inpainting(self.model.config):  # generating from nothing: everything is to be painted
            extra = masked_condition(torch.zeros_like(x), torch.ones_like(x[:, :1]))
        denoise = self.denoiser(cond.repeat(k), uncond.repeat(k), plan.guidance_scale, dtype, extra,
                                plan.guidance_interval, contrast=None if contrast is None else contrast.expand(k))
        return self.decode(self.sample(x, denoise, plan, seed=seeds, progress=progress), output_type)


def check_finite_sample(x: Tensor, where: str) -> None:
    """A non-finite sample would be written as a black or garbage image: stop and say where."""
    if not bool(torch.isfinite(x).all()):
        raise FloatingPointError(f"sampling produced non-finite values (NaN or inf) at {where}; the model "
                                 "weights may be damaged, or try --fp32")


def _load_ae(config: CheckpointConfig, folders: tuple[Path, Path | None], device) -> Autoencoder:
    desc = component_path(folders[0], config.autoencoder, folders[1]) or {"kind": "identity"}
    return load_autoencoder(**desc, device=device)  # recorded channels/downsample are checked


def _load_text(config: CheckpointConfig, folders: tuple[Path, Path | None], device) -> TextEncoder | None:
    desc = component_path(folders[0], config.text_encoder, folders[1])
    if not desc:
        return None
    return load_text_encoder(**desc, device=str(device))  # recorded dims are checked


def _check_prompt(p: Any) -> str:
    if not isinstance(p, str):
        raise ValueError(f"prompts must be strings for a text model, got {type(p).__name__}")
    return p


def _class_labels(prompts: Sequence[Any], num_classes: int, device) -> Tensor:
    try:
        labels = [int(p) for p in prompts]
    except (TypeError, ValueError):
        raise ValueError("this is a class-conditional model: prompts must be class ids") from None
    if min(labels) < 0 or max(labels) >= num_classes:
        raise ValueError(f"class ids must be in [0, {num_classes - 1}], got {labels}")
    return torch.tensor(labels, device=device)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, leave=False, desc="sampling")
