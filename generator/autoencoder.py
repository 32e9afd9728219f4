"""A diffusers ``AutoencoderKL`` decoder as a generator, and the embedded default built on it.

The latent is the VAE's spatial latent ``(c, s, s)`` flattened to ``W = c·s·s``; its prior is a standard
normal (``decode(z / scaling_factor)``, the diffusers convention).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

from ktl.errors import GeneratorLoadError
from ktl.generator.base import GeneratorSpec, ModuleGenerator, resolve_path
from ktl.generator.registry import register_generator

__all__ = ["AutoencoderKLGenerator", "EMBEDDED_DEFAULT_DIR"]

# config.json (+ diffusion_pytorch_model.safetensors once trained weights ship) of the embedded default.
EMBEDDED_DEFAULT_DIR = Path(__file__).parent / "default"
_WEIGHTS = "diffusion_pytorch_model.safetensors"


class AutoencoderKLGenerator(ModuleGenerator):
    """Generator protocol over the decoder of a diffusers ``AutoencoderKL``.

    Parameters
    ----------
    vae
        The autoencoder; only ``post_quant_conv`` and ``decoder`` are used.
    description
        One line for run summaries.
    pretrained
        Whether ``vae`` holds trained weights.
    batch_size
        Latents per decoder forward pass.
    """

    def __init__(
        self, vae: AutoencoderKL, *, description: str, pretrained: bool, batch_size: int = 64
    ) -> None:
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        n_up = len(cfg["up_block_types"])
        self.latent_channels = int(cfg["latent_channels"])
        self.image_size = int(cfg["sample_size"])
        self.latent_size = self.image_size // 2 ** (n_up - 1)
        self.latent_dim = self.latent_channels * self.latent_size**2
        self.num_channels = int(cfg["out_channels"])
        self.scaling_factor = float(cfg["scaling_factor"])
        self.description = description
        self.pretrained = pretrained
        self.batch_size = batch_size
        self.latent_prior = "standard-normal"  # decode(z / scaling_factor) with z ~ N(0, I)

    def modules(self) -> list[torch.nn.Module]:
        return [self.vae]

    @torch.inference_mode()
    def synthesize(self, latents: torch.Tensor) -> torch.Tensor:
        shape = (self.latent_channels, self.latent_size, self.latent_size)
        out = []
        for chunk in latents.to(self.device, torch.float32).split(self.batch_size):
            z = chunk.reshape(-1, *shape) / self.scaling_factor
            out.append(((self.vae.decode(z).sample + 1.0) / 2.0).clamp(0.0, 1.0))
        return torch.cat(out)


def _load_vae(folder: Path, spec: GeneratorSpec) -> tuple[AutoencoderKL, bool]:
    if not folder.is_dir():
        raise GeneratorLoadError(f"generator folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise GeneratorLoadError(f"{folder} is not an AutoencoderKL folder: it has no config.json")
    has_weights = (folder / _WEIGHTS).is_file()
    try:
        config = AutoencoderKL.load_config(str(folder))
        if config.get("_class_name") != "AutoencoderKL":
            raise GeneratorLoadError(
                f"{folder} holds a {config.get('_class_name')!r}, not an AutoencoderKL (kind autoencoder-kl)"
            )
        if has_weights:
            return AutoencoderKL.from_pretrained(str(folder), local_files_only=True), True
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            return AutoencoderKL.from_config(config), False
    except GeneratorLoadError:
        raise
    except Exception as exc:  # diffusers raises many types for a corrupted folder
        raise GeneratorLoadError(f"could not load the AutoencoderKL in {folder}: {exc}") from exc


@register_generator("autoencoder-kl")
def load_autoencoder_kl(spec: GeneratorSpec, device: torch.device) -> AutoencoderKLGenerator:
    """Load an ``AutoencoderKL`` folder (``save_pretrained`` layout); ``path=None`` is the embedded default.

    A folder without weights is only accepted for the embedded default, which then runs seeded and
    untrained, and says so in its description.
    """
    folder = resolve_path(spec.path, EMBEDDED_DEFAULT_DIR)
    embedded = spec.path is None
    vae, pretrained = _load_vae(folder, spec)
    if not pretrained and not embedded:
        raise GeneratorLoadError(f"{folder} has a config.json but no {_WEIGHTS}")
    if embedded:
        state = "pretrained" if pretrained else f"UNTRAINED: seeded random init, seed {spec.seed}"
        description = f"embedded default AutoencoderKL decoder ({state})"
    else:
        description = f"AutoencoderKL decoder from {folder}"
    gen = AutoencoderKLGenerator(
        vae, description=description, pretrained=pretrained, batch_size=spec.batch_size
    )
    return gen.to(device)
