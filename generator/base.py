"""The generator protocol every adapter implements, and the spec that selects one."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Self, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict, Field

__all__ = ["DEFAULT_SPREAD", "Generator", "GeneratorSpec", "ModuleGenerator"]

# The default spread of jobs, `ktl generate` and the console's form. 0 gave byte-identical images for every
# image of a class; 0.25 gives all distinct (80 of 80 at 8 per class, mean pairwise RMS pixel distance
# within a class 0.089 against 0.305 between class means) while a latent stays in the prior's 99 % norm
# band (N(0, I₂₅₆): norm 16.6 of [14.2, 17.8]; 0.5 leaves it, at 18.0). Measured in docs/generate.md.
DEFAULT_SPREAD = 0.25


class GeneratorSpec(BaseModel):
    """Which generator the server loads. Nothing is ever fetched from a hub: ``path`` is a local folder."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field("autoencoder-kl", description="A registered generator adapter (`ktl list` shows them)")
    path: Path | None = Field(
        None,
        description="A local model folder (a .pkl file for stylegan); none = the embedded pretrained "
        "default shipped with ktl",
    )
    seed: int = Field(
        0,
        description="Initialises the embedded default only while it has no trained weights (they ship "
        "with the package)",
    )
    batch_size: int = Field(64, ge=1, description="Latents per generator forward pass")
    num_inference_steps: int = Field(
        20, ge=1, le=1000, description="DDIM steps (η = 0) of the ddim and stable-diffusion kinds"
    )
    prompt: str = Field(
        "",
        max_length=1000,
        description="stable-diffusion: the fixed prompt, encoded once (empty = unconditional)",
    )
    truncation_psi: float = Field(
        1.0, gt=0, le=2, description="stylegan: truncation ψ of w, w = w_avg + ψ·(w − w_avg)"
    )
    trust_pickle: bool = Field(
        False,
        description="stylegan: load the pickle (loading it runs its code); only for the operator's own file",
    )
    code_path: Path | None = Field(
        None, description="stylegan: folder holding the operator's NVlabs dnnlib/ and torch_utils/"
    )


@runtime_checkable
class Generator(Protocol):
    """A frozen image generator with a latent prior.

    Attributes
    ----------
    latent_dim
        W, the flattened latent size.
    image_size
        H = W of the generated images.
    num_channels
        Channels of the generated images (3).
    device
        Where latents are sampled and images synthesised.
    description
        A one-line human description recorded in run summaries (says whether the weights are trained).
    pretrained
        False while the generator runs on untrained (seeded random) weights.

    An adapter whose prior is exactly N(0, I) may also set ``latent_prior = "standard-normal"`` (optional;
    anything else, or no attribute, means "sampled"): the aligner then uses the closed-form MMD prior
    terms instead of drawing prior samples.
    """

    latent_dim: int
    image_size: int
    num_channels: int
    description: str
    pretrained: bool

    @property
    def device(self) -> torch.device: ...

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(n, W)`` draws from the latent prior, on `device`."""
        ...

    def synthesize(self, latents: torch.Tensor) -> torch.Tensor:
        """Images ``(n, C, H, W)`` in [0, 1] for ``(n, W)`` latents, batched, under `torch.inference_mode`."""
        ...

    def to(self, device: torch.device | str) -> Generator: ...


class ModuleGenerator:
    """Plumbing shared by adapters over torch modules: `device`, `to` and N(0, I) `sample_latents`.

    Subclasses set ``latent_dim`` and return their modules from `modules` (the first one's parameters
    tell the device).
    """

    latent_dim: int

    def modules(self) -> list[torch.nn.Module]:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.modules()[0].parameters()).device

    def to(self, device: torch.device | str) -> Self:
        for module in self.modules():
            torch.nn.Module.to(module, device)
        return self

    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn(n, self.latent_dim, generator=generator, device=self.device)


def resolve_path(path: Path | None, default: Path) -> Path:
    return default if path is None else Path(path).expanduser()


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (library errors often span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__
