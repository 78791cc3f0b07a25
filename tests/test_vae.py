"""Autoencoders on a tiny random diffusers AutoencoderKL built here, identity AE, storage, PIL."""

import json

import pytest
import torch

from latentdit.pixels import from_pil, to_pil
from latentdit.vae import (
    AutoencoderNotAvailable,
    IdentityAutoencoder,
    KLAutoencoder,
    dequantize_latents,
    load_autoencoder,
    quantize_latents,
)

diffusers = pytest.importorskip("diffusers")


def _tiny_kl(seed: int = 0, **config) -> torch.nn.Module:
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        **config,
    ).eval()


def _images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def test_kl_shapes_and_downsample():
    ae = KLAutoencoder(_tiny_kl())
    assert (ae.latent_channels, ae.downsample) == (4, 2)
    z = ae.encode(_images(2, 32))
    assert z.shape == (2, 4, 16, 16) and z.dtype == torch.float32
    x = ae.decode(z)
    assert x.shape == (2, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert ae.encode(_images(1, 48)).shape == (1, 4, 24, 24)  # non-square multiples work too


def test_scaling_and_shift_come_from_the_config():
    vae = _tiny_kl(scaling_factor=0.5, shift_factor=0.1)
    ae = KLAutoencoder(vae)
    x = _images()
    with torch.no_grad():
        z_raw = vae.encode(x).latent_dist.mode()
        round_trip = vae.decode(z_raw).sample.clamp(-1, 1)
    z = ae.encode(x)
    assert torch.allclose(z, (z_raw - 0.1) * 0.5, atol=1e-6)
    assert torch.allclose(ae.decode(z), round_trip, atol=1e-5)
    assert KLAutoencoder(_tiny_kl()).scale.item() == pytest.approx(0.18215)  # default SD factor, shift 0


def test_per_channel_latent_statistics_are_used():
    mean, std = [0.1, -0.2, 0.3, 0.0], [2.0, 1.0, 0.5, 1.0]
    vae = _tiny_kl(scaling_factor=0.5, latents_mean=mean, latents_std=std)
    x = _images(1)
    with torch.no_grad():
        z_raw = vae.encode(x).latent_dist.mode()
    expected = (z_raw - torch.tensor(mean).view(1, 4, 1, 1)) * 0.5 / torch.tensor(std).view(1, 4, 1, 1)
    assert torch.allclose(KLAutoencoder(vae).encode(x), expected, atol=1e-6)


def test_sampling_is_seeded_and_differs_from_the_mode():
    ae = KLAutoencoder(_tiny_kl())
    x = _images(1)
    a = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    b = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, ae.encode(x), atol=1e-4)


def test_tiled_decode_matches_untiled():
    ae = KLAutoencoder(_tiny_kl())
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    full = ae.decode(z)
    tiled = ae.decode(z, tile=32, overlap=8)
    seams = ae.decode(z, tile=32, overlap=0)  # no blending: visible seams
    assert tiled.shape == full.shape == (1, 3, 128, 128)
    error = (tiled - full).abs()
    assert error.mean() < 0.03 and error.max() < 0.3
    assert error.max() < 0.5 * (seams - full).abs().max()  # the blend is what removes the seams
    assert torch.equal(ae.decode(z, tile=64), full)  # a tile as big as the latent is untiled
    with pytest.raises(ValueError, match="overlap"):
        ae.decode(z, tile=8, overlap=8)


def test_identity_round_trips_exactly():
    ae = load_autoencoder("identity")
    assert isinstance(ae, IdentityAutoencoder)
    x = _images(2, 20)
    z = ae.encode(x)
    assert torch.equal(z, x) and torch.equal(ae.decode(z), x)
    assert ae.describe() == {"kind": "identity", "path": None, "latent_channels": 3, "downsample": 1}
    assert isinstance(load_autoencoder(**ae.describe()), IdentityAutoencoder)


def test_quantize_error_is_at_most_half_a_step():
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
    q, scale = quantize_latents(latents)
    assert q.dtype == torch.uint8 and q.shape == latents.shape
    assert scale == pytest.approx(float(latents.abs().max()) / 127)
    assert ((dequantize_latents(q, scale) - latents).abs() <= scale / 2 + 1e-6).all()
    q_fixed, s = quantize_latents(latents, scale=0.01)  # a fixed scale clips what it cannot hold
    assert s == 0.01 and dequantize_latents(q_fixed, s).abs().max() <= 128 * 0.01 + 1e-6


def test_quantize_rejects_bad_input():
    with pytest.raises(ValueError, match="positive"):
        quantize_latents(torch.ones(2), scale=0.0)
    with pytest.raises(ValueError, match="uint8"):
        dequantize_latents(torch.ones(2), 0.1)
    q, scale = quantize_latents(torch.zeros(3))
    assert scale > 0 and torch.equal(dequantize_latents(q, scale), torch.zeros(3))


def test_pil_round_trip():
    x = _images(2, 16)
    pil = to_pil(x)
    assert len(pil) == 2 and pil[0].size == (16, 16) and pil[0].mode == "RGB"
    back = from_pil(pil)
    assert back.shape == x.shape and (back - x).abs().max() <= 1 / 255 + 1e-6
    assert torch.equal(from_pil(to_pil(back)), back)  # pixel values survive exactly


def test_from_pil_size_is_width_height_and_sizes_must_agree():
    from PIL import Image

    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    assert from_pil([wide], size=(16, 8)).shape == (1, 3, 8, 16)
    red = from_pil([wide])
    assert red[0, 0].eq(1).all() and red[0, 1].eq(-1).all()
    with pytest.raises(ValueError, match="different sizes"):
        from_pil([wide, Image.new("RGB", (20, 20))])


def test_encode_and_decode_check_their_input():
    ae = KLAutoencoder(_tiny_kl())
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        ae.encode(_images() * 127.5 + 127.5)
    with pytest.raises(ValueError, match="multiple"):
        ae.encode(_images(1, 31))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        ae.encode(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="latents"):
        ae.decode(torch.zeros(1, 3, 8, 8))


def test_saved_folder_loads_with_identical_outputs(tmp_path):
    vae = _tiny_kl(scaling_factor=0.5)
    vae.save_pretrained(tmp_path)
    built, loaded = KLAutoencoder(vae), load_autoencoder("kl", str(tmp_path))
    x = _images()
    z = built.encode(x)
    assert torch.equal(loaded.encode(x), z) and torch.equal(loaded.decode(z), built.decode(z))
    d = loaded.describe()
    assert (
        json.loads(json.dumps(d))
        == d
        == {
            "kind": "kl",
            "path": str(tmp_path),
            "latent_channels": 4,
            "downsample": 2,
        }
    )
    assert torch.equal(load_autoencoder(**d).encode(x), z)
    with pytest.raises(ValueError, match="latent_channels=16 was recorded"):
        load_autoencoder(**{**d, "latent_channels": 16})


def test_pipeline_folder_uses_its_vae_subfolder(tmp_path):
    vae = _tiny_kl()
    vae.save_pretrained(tmp_path / "vae")
    x = _images(1)
    assert torch.equal(load_autoencoder("kl", str(tmp_path)).encode(x), KLAutoencoder(vae).encode(x))


def test_missing_folder_is_one_clear_error(tmp_path):
    missing = tmp_path / "no-such-vae"
    with pytest.raises(AutoencoderNotAvailable, match="config.json") as info:
        load_autoencoder("kl", str(missing))
    assert str(missing) in str(info.value) and info.value.__cause__ is None
    with pytest.raises(ValueError, match="needs path"):
        load_autoencoder("kl")
    with pytest.raises(ValueError, match="kl, identity"):
        load_autoencoder("vqgan")


def test_differentiable_decode_matches_decode_and_passes_gradients():
    ae = KLAutoencoder(_tiny_kl())
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2), requires_grad=True)
    images = ae.decode_differentiable(z)
    torch.testing.assert_close(images.clamp(-1, 1), ae.decode(z.detach()))
    (grad,) = torch.autograd.grad(images.mean(), z)
    assert grad.shape == z.shape and grad.abs().sum() > 0
