"""The diffusers and StyleGAN adapters, on tiny random models built with the real classes (no downloads)."""

import json
import pickle
import sys
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    UNet2DConditionModel,
    UNet2DModel,
)

from ktl.errors import GeneratorLoadError
from ktl.generator import Generator, GeneratorSpec, load_generator


def _tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )


@pytest.fixture(scope="module")
def ddim_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ddpm")
    DDPMPipeline(unet=_tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(folder)
    return folder


def _write_tokenizer(folder: Path) -> None:
    from transformers import CLIPTokenizer

    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in letters:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    src = folder / "src"
    src.mkdir()
    (src / "vocab.json").write_text(json.dumps(vocab))
    (src / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(src / "vocab.json"), str(src / "merges.txt"), model_max_length=8)
    tok.save_pretrained(folder / "tokenizer")


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = tmp_path_factory.mktemp("sd")
    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
        norm_num_groups=4,
    ).save_pretrained(folder / "unet")
    AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=8,
    ).save_pretrained(folder / "vae")
    config = CLIPTextConfig(
        vocab_size=60,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=8,
    )
    CLIPTextModel(config).save_pretrained(folder / "text_encoder")
    _write_tokenizer(folder)
    DDIMScheduler(num_train_timesteps=100).save_pretrained(folder / "scheduler")
    return folder


def _check_protocol(g: Generator, latent_dim: int, size: int) -> None:
    assert isinstance(g, Generator) and g.pretrained and g.latent_dim == latent_dim
    z = g.sample_latents(5, torch.Generator().manual_seed(0))
    assert z.shape == (5, latent_dim)
    torch.testing.assert_close(z, g.sample_latents(5, torch.Generator().manual_seed(0)))
    x = g.synthesize(z)
    assert x.shape == (5, g.num_channels, size, size) and g.image_size == size
    assert float(x.min()) >= 0 and float(x.max()) <= 1 and not x.requires_grad
    torch.testing.assert_close(g.synthesize(z), x)  # deterministic
    assert not torch.allclose(x[0], x[1])


def test_ddim_adapter(ddim_folder: Path) -> None:
    g = load_generator(GeneratorSpec(kind="ddim", path=ddim_folder, num_inference_steps=4, batch_size=2))
    _check_protocol(g, 3 * 8 * 8, 8)
    z = g.sample_latents(5, torch.Generator().manual_seed(1))
    one_batch = load_generator(
        GeneratorSpec(kind="ddim", path=ddim_folder, num_inference_steps=4, batch_size=64)
    )
    torch.testing.assert_close(g.synthesize(z), one_batch.synthesize(z), atol=1e-5, rtol=1e-5)
    # The same DDIM loop written out with the diffusers classes directly.
    unet = UNet2DModel.from_pretrained(str(ddim_folder / "unet"))
    scheduler = DDIMScheduler.from_config(DDPMScheduler.load_config(str(ddim_folder / "scheduler")))
    scheduler.set_timesteps(4)
    x = z.view(5, 3, 8, 8)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    torch.testing.assert_close(g.synthesize(z), ((x + 1) / 2).clamp(0, 1), atol=1e-5, rtol=1e-5)
    fewer = load_generator(GeneratorSpec(kind="ddim", path=ddim_folder, num_inference_steps=2))
    assert not torch.allclose(fewer.synthesize(z), g.synthesize(z))  # the setting is used


def test_stable_diffusion_adapter(sd_folder: Path) -> None:
    g = load_generator(
        GeneratorSpec(kind="stable-diffusion", path=sd_folder, num_inference_steps=3, batch_size=2)
    )
    _check_protocol(g, 4 * 4 * 4, 8)
    prompted = load_generator(
        GeneratorSpec(kind="stable-diffusion", path=sd_folder, num_inference_steps=3, prompt="a cat")
    )
    z = g.sample_latents(3, torch.Generator().manual_seed(2))
    assert not torch.allclose(prompted.synthesize(z), g.synthesize(z))  # the prompt conditions the UNet
    assert "a cat" in prompted.description and "unconditional" in g.description


_TINY_G = """
import torch
from torch import nn

class TinyG(nn.Module):
    z_dim, w_dim, c_dim, num_ws, img_resolution, img_channels = 6, 5, 0, 3, 4, 3

    def __init__(self):
        super().__init__()
        self.map = nn.Linear(6, 5)
        self.syn = nn.Linear(5, 3 * 4 * 4)
        self.register_buffer("w_avg", torch.zeros(5))

    def mapping(self, z, c, truncation_psi=1.0):
        w = self.map(z)
        w = self.w_avg + truncation_psi * (w - self.w_avg)
        return w[:, None, :].repeat(1, self.num_ws, 1)

    def synthesis(self, ws, noise_mode="random"):
        assert noise_mode == "const"
        return torch.tanh(self.syn(ws.mean(dim=1))).view(-1, 3, 4, 4)
"""


@pytest.fixture()
def stylegan_pickle(tmp_path: Path):
    code = tmp_path / "code"
    (code / "torch_utils").mkdir(parents=True)
    (code / "dnnlib").mkdir()
    (code / "dnnlib" / "__init__.py").write_text("")
    (code / "torch_utils" / "__init__.py").write_text("")
    (code / "torch_utils" / "tiny_g.py").write_text(_TINY_G)
    sys.path.insert(0, str(code))
    try:
        from torch_utils.tiny_g import TinyG  # type: ignore[import-not-found]

        torch.manual_seed(0)
        net = TinyG()
        path = tmp_path / "network.pkl"
        path.write_bytes(pickle.dumps({"G_ema": net}))
    finally:
        sys.path.remove(str(code))
        for name in [m for m in sys.modules if m.split(".")[0] in ("torch_utils", "dnnlib")]:
            del sys.modules[name]
    yield path, code, net
    for name in [m for m in sys.modules if m.split(".")[0] in ("torch_utils", "dnnlib")]:
        del sys.modules[name]
    if str(code) in sys.path:
        sys.path.remove(str(code))


def test_stylegan_adapter_with_trust_and_code_path(stylegan_pickle) -> None:
    path, code, net = stylegan_pickle
    g = load_generator(
        GeneratorSpec(kind="stylegan", path=path, trust_pickle=True, code_path=code, batch_size=2)
    )
    _check_protocol(g, 5, 4)
    z = torch.randn(3, 6, generator=torch.Generator().manual_seed(0))
    w = g.sample_latents(3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(w, net.map(z))
        expected = ((torch.tanh(net.syn(w)).view(-1, 3, 4, 4) + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(g.synthesize(w), expected)
    half = load_generator(
        GeneratorSpec(kind="stylegan", path=path, trust_pickle=True, code_path=code, truncation_psi=0.5)
    )
    torch.testing.assert_close(half.sample_latents(3, torch.Generator().manual_seed(0)), 0.5 * w)


def test_stylegan_refuses_without_trust_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"G_ema": Payload()}))
    with pytest.raises(GeneratorLoadError, match="trust_pickle") as err:
        load_generator(GeneratorSpec(kind="stylegan", path=path))
    assert "\n" not in str(err.value) and not marker.exists()


def test_stylegan_without_its_code_is_one_clear_line(stylegan_pickle) -> None:
    path, _, _ = stylegan_pickle
    with pytest.raises(GeneratorLoadError, match="code_path") as err:
        load_generator(GeneratorSpec(kind="stylegan", path=path, trust_pickle=True))
    assert "\n" not in str(err.value)


def test_wrong_missing_and_corrupted_folders_are_one_clear_line(
    tmp_path: Path, ddim_folder: Path, sd_folder: Path
) -> None:
    vae_folder = tmp_path / "vae"
    AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        norm_num_groups=4,
    ).save_pretrained(vae_folder)
    corrupt = tmp_path / "corrupt"
    DDPMPipeline(unet=_tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=10)).save_pretrained(corrupt)
    weights = corrupt / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    cases = [
        (GeneratorSpec(kind="ddim", path=tmp_path / "missing"), "does not exist"),
        (GeneratorSpec(kind="ddim"), "needs generator.path"),
        (GeneratorSpec(kind="ddim", path=vae_folder), "not a 'ddim' folder"),
        (GeneratorSpec(kind="stable-diffusion", path=ddim_folder), "UNet2DModel"),
        (GeneratorSpec(kind="ddim", path=sd_folder), "UNet2DConditionModel"),
        (GeneratorSpec(kind="ddim", path=corrupt), "could not load"),
        (GeneratorSpec(kind="autoencoder-kl", path=ddim_folder), "no config.json"),
        (GeneratorSpec(kind="stylegan", path=ddim_folder, trust_pickle=True), "does not exist"),
    ]
    for spec, message in cases:
        with pytest.raises(GeneratorLoadError) as err:
            load_generator(spec)
        assert message in str(err.value) and "\n" not in str(err.value), (spec, str(err.value))
