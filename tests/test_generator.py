import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DModel

from ktl.errors import GeneratorLoadError
from ktl.generator import Generator, GeneratorSpec, available_generators, load_generator

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(8, 16),
    latent_channels=2,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=16,
    scaling_factor=1.0,
)


def test_embedded_default_is_pretrained_and_small() -> None:
    g = load_generator(GeneratorSpec())
    assert isinstance(g, Generator)
    assert g.latent_dim == 256 and g.image_size == 32 and g.num_channels == 3
    assert g.pretrained is True and "UNTRAINED" not in g.description
    default = Path(__file__).resolve().parents[1] / "generator" / "default"
    weights = default / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size <= 30 * 2**20  # the repo ships it
    meta = json.loads((default / "training.json").read_text())
    assert "Open Font License" in meta["data"]["licence"]  # source and licence recorded


def test_embedded_default_decodes_prior_draws_to_images_not_noise() -> None:
    # A trained decoder maps neighbouring latents to similar images; an untrained one does too, but its
    # images have almost no spatial structure: neighbouring pixels are nearly independent. Emoji are smooth.
    g = load_generator(GeneratorSpec())
    x = g.synthesize(g.sample_latents(64, torch.Generator().manual_seed(0)))
    dx = (x[..., 1:] - x[..., :-1]).abs().mean()
    spread = (x - x.mean(dim=(2, 3), keepdim=True)).abs().mean()
    assert float(dx) < 0.5 * float(spread)
    assert float(x.std(dim=0).mean()) > 0.05  # different latents, different images


def test_synthesize_range_shape_batching_and_no_grad() -> None:
    small_batches = load_generator(GeneratorSpec(batch_size=3))
    one_batch = load_generator(GeneratorSpec(batch_size=64))
    z = small_batches.sample_latents(10, torch.Generator().manual_seed(0))
    a, b = small_batches.synthesize(z), one_batch.synthesize(z)
    assert a.shape == (10, 3, 32, 32) and not a.requires_grad
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a[0], a[1])  # different latents, different images


def test_latents_are_seeded() -> None:
    g = load_generator(GeneratorSpec())
    z1 = g.sample_latents(4, torch.Generator().manual_seed(5))
    z2 = g.sample_latents(4, torch.Generator().manual_seed(5))
    assert torch.equal(z1, z2) and z1.shape == (4, 256)


def test_embedded_default_is_fast_enough_on_cpu() -> None:
    # Not a timing assertion: the default must stay small (C images well under a second on a CPU).
    g = load_generator(GeneratorSpec())
    n_params = sum(p.numel() for p in g.vae.decoder.parameters())  # type: ignore[attr-defined]
    assert n_params < 2_000_000


def test_loads_a_saved_autoencoder_folder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_VAE)
    vae.save_pretrained(tmp_path)
    g = load_generator(GeneratorSpec(path=tmp_path))
    assert g.pretrained and g.latent_dim == 2 * 8 * 8 and g.image_size == 16
    z = g.sample_latents(2, torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ((vae.decode(z.view(2, 2, 8, 8)).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(g.synthesize(z), expected)


def test_load_errors_are_one_clear_line(tmp_path: Path) -> None:
    cases = {}
    cases["does not exist"] = tmp_path / "missing"
    (tmp_path / "empty").mkdir()
    cases["no config.json"] = tmp_path / "empty"
    corrupt = tmp_path / "corrupt"
    AutoencoderKL(**TINY_VAE).save_pretrained(corrupt)
    weights = corrupt / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    cases["could not load"] = corrupt
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "config.json").write_text("{not json")
    cases["could not load"] = corrupt
    wrong = tmp_path / "unet"
    UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 16),
        norm_num_groups=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    ).save_pretrained(wrong)
    cases["not an AutoencoderKL"] = wrong
    no_weights = tmp_path / "no-weights"
    AutoencoderKL(**TINY_VAE).save_config(no_weights)
    cases["no diffusion_pytorch_model"] = no_weights
    for needle, path in cases.items():
        with pytest.raises(GeneratorLoadError) as info:
            load_generator(GeneratorSpec(path=path))
        assert needle in str(info.value), (needle, str(info.value))
    with pytest.raises(GeneratorLoadError, match="could not load|not an AutoencoderKL"):
        load_generator(GeneratorSpec(path=garbage))


def test_unknown_kind_lists_the_available_ones() -> None:
    with pytest.raises(GeneratorLoadError, match="available: autoencoder-kl"):
        load_generator(GeneratorSpec(kind="biggan"))
    assert "autoencoder-kl" in available_generators()
