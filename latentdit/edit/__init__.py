"""Editing on top of ``Text2Image``: img2img, inpainting and outpainting, inversion and prompt
editing, interpolation and panning, and sampling steered by a loss.

Each is a small change to where the sampler starts or what happens after a step (DESIGN §2):
img2img starts the grid at ``t = strength``; inpainting re-imposes the known region after every
step through ``on_step``; inversion runs the deterministic sampler on the reversed grid. Every
function takes the pipeline first and an image as a PIL image, a file, an array or a tensor::

    from latentdit import Text2Image, img2img
    pipe = Text2Image.from_pretrained("shapes")
    img2img(pipe, "in.png", "a blue circle in the center", strength=0.6)[0].save("out.png")
"""

from .animate import interpolate, mix_conditions, slerp
from .guidance import color_loss, loss_guided, sample_guided
from .images import check_animation_path, load_image, load_mask, save_animation
from .inversion import Inversion, edit_image, edit_mask, invert, reconstruct
from .repaint import extend_canvas, img2img, inpaint, latent_mask, outpaint, pan, reimpose

__all__ = [
    "Inversion", "check_animation_path", "color_loss", "edit_image", "edit_mask",
    "extend_canvas", "img2img", "inpaint", "interpolate", "invert", "latent_mask", "load_image", "load_mask",
    "loss_guided", "mix_conditions", "outpaint", "pan", "reconstruct", "reimpose",
    "sample_guided", "save_animation", "slerp",
]
