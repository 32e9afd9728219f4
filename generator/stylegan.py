"""NVlabs StyleGAN2 / StyleGAN3 / StyleGAN-XL pickles as generators ("stylegan"), in w space.

A pickle runs code when it is loaded, so ktl loads one only when the operator says the file is theirs
(``generator.trust_pickle = true``) and only from the operator's path; it never unpickles anything a
client sent. The pickle refers to NVlabs' ``dnnlib`` and ``torch_utils`` packages, which ktl does not ship
(their licence is not ours): the operator points ``generator.code_path`` at a checkout holding them.

The latent is w (``G.w_dim``); the prior is the mapping network's image of z ~ N(0, I) with the
truncation trick ``w = w_avg + ψ (w - w_avg)`` (``generator.truncation_psi``). Images come from
``G.synthesis`` with w broadcast to every layer and constant noise, so they are deterministic.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path
from typing import Any

import torch

from ktl.errors import GeneratorLoadError
from ktl.generator.base import GeneratorSpec, ModuleGenerator, one_line
from ktl.generator.registry import register_generator

__all__ = ["StyleGANGenerator"]


class StyleGANGenerator(ModuleGenerator):
    """Generator protocol over an NVlabs ``G_ema`` network (mapping + synthesis)."""

    latent_prior = "sampled"  # the mapping network's output: not a standard normal

    def __init__(self, net: Any, *, truncation_psi: float, batch_size: int, description: str) -> None:
        self.net = net.eval().requires_grad_(False)
        self.truncation_psi = truncation_psi
        self.batch_size = batch_size
        self.description = description
        self.pretrained = True
        self.latent_dim = int(net.w_dim)
        self.image_size = int(net.img_resolution)
        self.num_channels = int(net.img_channels)

    def modules(self) -> list[torch.nn.Module]:
        return [self.net]

    def _labels(self, n: int) -> torch.Tensor | None:
        c_dim = int(getattr(self.net, "c_dim", 0))
        return torch.zeros(n, c_dim, device=self.device) if c_dim else None

    @torch.inference_mode()
    def sample_latents(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        z = torch.randn(n, int(self.net.z_dim), generator=generator, device=self.device)
        ws = self.net.mapping(z, self._labels(n), truncation_psi=self.truncation_psi)
        return ws[:, 0, :].float().clone()

    @torch.inference_mode()
    def synthesize(self, latents: torch.Tensor) -> torch.Tensor:
        out = []
        for w in latents.to(self.device, torch.float32).split(self.batch_size):
            ws = w[:, None, :].repeat(1, int(self.net.num_ws), 1)
            images = self.net.synthesis(ws, noise_mode="const")
            out.append(((images.float() + 1.0) / 2.0).clamp(0.0, 1.0))
        return torch.cat(out)


@register_generator("stylegan")
def load_stylegan(spec: GeneratorSpec, device: torch.device) -> StyleGANGenerator:
    """Unpickle ``G_ema`` from the operator's file — only with ``trust_pickle`` set."""
    if spec.path is None:
        raise GeneratorLoadError("generator kind 'stylegan' needs generator.path (the operator's .pkl file)")
    path = Path(spec.path).expanduser()
    if not spec.trust_pickle:
        raise GeneratorLoadError(
            f"refusing to unpickle {path}: a pickle runs code when loaded; if it is your own file, set "
            "generator.trust_pickle = true (and generator.code_path to your dnnlib/torch_utils checkout)"
        )
    if not path.is_file():
        raise GeneratorLoadError(f"StyleGAN pickle {path} does not exist (or is not a file)")
    if spec.code_path is not None:
        code = str(Path(spec.code_path).expanduser())
        if not Path(code).is_dir():
            raise GeneratorLoadError(f"generator.code_path {code} is not a folder")
        if code not in sys.path:
            sys.path.insert(0, code)
    try:
        with path.open("rb") as f:
            data = pickle.load(f)  # noqa: S301 - the operator's own file, behind trust_pickle (see above)
    except ModuleNotFoundError as exc:
        raise GeneratorLoadError(
            f"{path} needs the module {exc.name!r} (NVlabs dnnlib/torch_utils): set generator.code_path to "
            "the folder that holds them"
        ) from exc
    except Exception as exc:  # truncated or foreign files raise many types
        raise GeneratorLoadError(f"could not unpickle {path}: {one_line(exc)}") from exc
    net = data.get("G_ema") if isinstance(data, dict) else None
    needed = ("mapping", "synthesis", "z_dim", "w_dim", "num_ws", "img_resolution", "img_channels")
    if net is None or not all(hasattr(net, a) for a in needed):
        raise GeneratorLoadError(f"{path} is not a StyleGAN network pickle: no usable 'G_ema'")
    description = f"StyleGAN G_ema from {path} (w space, truncation psi {spec.truncation_psi})"
    gen = StyleGANGenerator(
        net, truncation_psi=spec.truncation_psi, batch_size=spec.batch_size, description=description
    )
    return gen.to(device)
