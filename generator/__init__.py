"""Frozen image generators behind one protocol (``ktl.generator``).

Importing this package registers the built-in adapters.
"""

from ktl.generator import autoencoder as _autoencoder  # noqa: F401  (registers "autoencoder-kl")
from ktl.generator import diffusion as _diffusion  # noqa: F401  ("ddim", "stable-diffusion")
from ktl.generator import stylegan as _stylegan  # noqa: F401  ("stylegan")
from ktl.generator.base import Generator, GeneratorSpec
from ktl.generator.registry import available_generators, load_generator, register_generator

__all__ = ["Generator", "GeneratorSpec", "available_generators", "load_generator", "register_generator"]
