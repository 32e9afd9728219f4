"""Diffusers diffusion models as generators: unconditional ``UNet2DModel`` folders ("ddim") and Stable-
Diffusion-style latent pipelines ("stable-diffusion").

The latent is the model's initial noise ``x_T`` (flattened), prior N(0, I). It is mapped to an image
deterministically by DDIM with η = 0 over ``GeneratorSpec.num_inference_steps`` steps, so equal latents
give equal images, whatever the batch. Folders are read with ``local_files_only``: nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
from diffusers.models.unets.unet_2d import UNet2DModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.schedulers.scheduling_ddim import DDIMScheduler

from ktl.errors import GeneratorLoadError
from ktl.generator.base import GeneratorSpec, ModuleGenerator, one_line
from ktl.generator.registry import register_generator

__all__ = ["DDIMGenerator", "LatentDiffusionGenerator"]


def _folder(spec: GeneratorSpec, kind: str) -> Path:
    if spec.path is None:
        raise GeneratorLoadError(f"generator kind {kind!r} needs generator.path (a local model folder)")
    folder = Path(spec.path).expanduser()
    if not folder.is_dir():
        raise GeneratorLoadError(f"generator folder {folder} does not exist")
    return folder


def _component(folder: Path, name: str, expected: tuple[str, ...], kind: str) -> dict[str, Any]:
    """The config of ``folder/name`` after checking it is one of the ``expected`` classes."""
    config_file = folder / name / ("scheduler_config.json" if name == "scheduler" else "config.json")
    if not config_file.is_file():
        raise GeneratorLoadError(f"{folder} is not a {kind!r} folder: it has no {name}/{config_file.name}")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise GeneratorLoadError(f"{config_file} is not valid JSON: {one_line(exc)}") from exc
    found = config.get("_class_name") if isinstance(config, dict) else None
    if found not in expected:
        raise GeneratorLoadError(
            f"{folder}/{name} holds a {found!r}, not {' or '.join(expected)} (generator kind {kind!r})"
        )
    return config


def _ddim(folder: Path, kind: str) -> DDIMScheduler:
    config = _component(folder, "scheduler", ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler"), kind)
    return DDIMScheduler.from_config(config)


def _denoise(
    model: Any, scheduler: DDIMScheduler, x: torch.Tensor, steps: int, **unet_kwargs: torch.Tensor
) -> torch.Tensor:
    """DDIM, η = 0, from ``x = x_T``; ``model(x, t, **kwargs).sample`` predicts what the scheduler expects."""
    scheduler.set_timesteps(steps, device=x.device)
    for t in scheduler.timesteps:
        out = model(x, t, **unet_kwargs).sample
        x = scheduler.step(out, t, x, eta=0.0, return_dict=False)[0]
    return x


class DDIMGenerator(ModuleGenerator):
    """An unconditional ``UNet2DModel`` + scheduler folder (``DDPMPipeline.save_pretrained`` layout).

    ``latent_dim = channels · size²``: the initial noise; ``synthesize`` runs DDIM (η = 0).
    """

    latent_prior = "standard-normal"

    def __init__(
        self, unet: UNet2DModel, scheduler: DDIMScheduler, *, steps: int, batch_size: int, description: str
    ) -> None:
        self.unet = unet.eval().requires_grad_(False)
        self.scheduler = scheduler
        self.steps = steps
        self.batch_size = batch_size
        self.description = description
        self.pretrained = True
        cfg = unet.config
        self.num_channels = int(cfg["out_channels"])
        self.image_size = int(cfg["sample_size"])
        self._shape = (int(cfg["in_channels"]), self.image_size, self.image_size)
        self.latent_dim = self._shape[0] * self.image_size**2

    def modules(self) -> list[torch.nn.Module]:
        return [self.unet]

    @torch.inference_mode()
    def synthesize(self, latents: torch.Tensor) -> torch.Tensor:
        out = []
        for chunk in latents.to(self.device, torch.float32).split(self.batch_size):
            x = _denoise(self.unet, self.scheduler, chunk.reshape(-1, *self._shape), self.steps)
            out.append(((x + 1.0) / 2.0).clamp(0.0, 1.0))
        return torch.cat(out)


@register_generator("ddim")
def load_ddim(spec: GeneratorSpec, device: torch.device) -> DDIMGenerator:
    """Load ``unet/`` (UNet2DModel) and ``scheduler/`` from a local folder; DDIM with η = 0."""
    folder = _folder(spec, "ddim")
    _component(folder, "unet", ("UNet2DModel",), "ddim")
    scheduler = _ddim(folder, "ddim")
    try:
        unet = UNet2DModel.from_pretrained(str(folder / "unet"), local_files_only=True)
    except Exception as exc:  # diffusers raises many types for a corrupted folder
        raise GeneratorLoadError(f"could not load the UNet2DModel in {folder}/unet: {one_line(exc)}") from exc
    description = f"DDIM ({spec.num_inference_steps} steps, eta 0) over the UNet2DModel in {folder}"
    gen = DDIMGenerator(
        unet, scheduler, steps=spec.num_inference_steps, batch_size=spec.batch_size, description=description
    )
    return gen.to(device)


class LatentDiffusionGenerator(ModuleGenerator):
    """A Stable-Diffusion-style pipeline folder: text encoder + UNet2DConditionModel in a VAE's latent space.

    The fixed prompt is encoded once; the latent is the UNet's initial latent noise ``(4, h, h)``;
    ``synthesize`` runs DDIM (η = 0, no classifier-free guidance) and decodes with the VAE.
    """

    latent_prior = "standard-normal"

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler: DDIMScheduler,
        prompt_embeds: torch.Tensor,
        *,
        steps: int,
        batch_size: int,
        description: str,
    ) -> None:
        self.unet = unet.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        self.scheduler = scheduler
        self.prompt_embeds = prompt_embeds  # (1, tokens, d)
        self.steps = steps
        self.batch_size = batch_size
        self.description = description
        self.pretrained = True
        size = int(unet.config["sample_size"])
        self._shape = (int(unet.config["in_channels"]), size, size)
        self.latent_dim = self._shape[0] * size * size
        self.image_size = size * 2 ** (len(vae.config["block_out_channels"]) - 1)
        self.num_channels = int(vae.config["out_channels"])
        self.scaling_factor = float(vae.config["scaling_factor"])

    def modules(self) -> list[torch.nn.Module]:
        return [self.unet, self.vae]

    def to(self, device: torch.device | str) -> LatentDiffusionGenerator:
        super().to(device)
        self.prompt_embeds = self.prompt_embeds.to(device)
        return self

    @torch.inference_mode()
    def synthesize(self, latents: torch.Tensor) -> torch.Tensor:
        out = []
        for chunk in latents.to(self.device, torch.float32).split(self.batch_size):
            x = chunk.reshape(-1, *self._shape) * self.scheduler.init_noise_sigma
            cond = self.prompt_embeds.expand(x.shape[0], -1, -1)
            x = _denoise(self.unet, self.scheduler, x, self.steps, encoder_hidden_states=cond)
            images = self.vae.decode(x / self.scaling_factor).sample
            out.append(((images + 1.0) / 2.0).clamp(0.0, 1.0))
        return torch.cat(out)


@register_generator("stable-diffusion")
def load_stable_diffusion(spec: GeneratorSpec, device: torch.device) -> LatentDiffusionGenerator:
    """Load ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` and ``scheduler/`` from a local folder."""
    from transformers import CLIPTextModel, CLIPTokenizer

    kind = "stable-diffusion"
    folder = _folder(spec, kind)
    _component(folder, "unet", ("UNet2DConditionModel",), kind)
    _component(folder, "vae", ("AutoencoderKL",), kind)
    if not (folder / "text_encoder" / "config.json").is_file() or not (folder / "tokenizer").is_dir():
        raise GeneratorLoadError(f"{folder} is not a {kind!r} folder: it needs text_encoder/ and tokenizer/")
    scheduler = _ddim(folder, kind)
    try:
        unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"), local_files_only=True)
        vae = AutoencoderKL.from_pretrained(str(folder / "vae"), local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(str(folder / "text_encoder"), local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
    except Exception as exc:  # diffusers/transformers raise many types for a corrupted folder
        raise GeneratorLoadError(f"could not load the pipeline in {folder}: {one_line(exc)}") from exc
    tokens = tokenizer(
        [spec.prompt],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    with torch.inference_mode():
        embeds = text_encoder(tokens.input_ids)[0].clone()
    what = f"prompt {spec.prompt!r}" if spec.prompt else "unconditional (empty prompt)"
    description = f"latent diffusion in {folder}, {what}, DDIM {spec.num_inference_steps} steps (eta 0)"
    gen = LatentDiffusionGenerator(
        unet,
        vae,
        scheduler,
        embeds,
        steps=spec.num_inference_steps,
        batch_size=spec.batch_size,
        description=description,
    )
    return gen.to(device)
