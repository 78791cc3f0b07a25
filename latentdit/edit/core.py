"""What the editing operations share beyond the pipeline's public steps."""

from __future__ import annotations

from torch import Tensor

from ..pipeline import Text2Image
from ..pixels import to_pil
from ..plan import OutputType, check_output_type

# Edits start from a given image at t = strength and guide on every step they run; the sampling
# config's guidance interval is tuned for sampling from pure noise.
EVERY_STEP = (0.0, 1.0)


def decode_pasted(pipe: Text2Image, latents: Tensor, output_type: OutputType,
                  paste: tuple[Tensor, Tensor] | None = None) -> list | Tensor:
    """``pipe.decode``; with ``paste = (pixels, mask)`` the pixels where the mask is 0 are put back
    exactly (blended where it is soft)."""
    check_output_type(output_type)
    if paste is None or output_type == "latent":
        return pipe.decode(latents, output_type)
    images = pipe.decode(latents, "tensor")
    pixels, mask = (v.to(images.device) for v in paste)
    images = mask * images + (1 - mask) * pixels
    return images if output_type == "tensor" else to_pil(images)

