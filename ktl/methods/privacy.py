"""Differential privacy on uploaded prototypes, for every method that uploads them.

The mechanism and its accounting are in `ktl.clients.privacy` (Gaussian mechanism on per-class sums,
zCDP composition); this module holds the setting section ``privacy`` and applies it where a method makes
its upload, so fedktl, fedproto and fedtgp get it the same way, in every transport.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ktl.clients import LocalClient
from ktl.clients.privacy import epsilon_for, noise_std
from ktl.errors import ConfigError
from ktl.records import Prototypes
from ktl.seeding import torch_generator

__all__ = ["PrivacySettings", "private_prototypes", "privacy_facts"]


class PrivacySettings(BaseModel):
    """Differential privacy on uploaded prototypes: the Gaussian mechanism on each round's per-class sums,
    with (ε, δ) for all the rounds of the budget together (see `ktl.clients.privacy`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # Below ε = 1e-3 or δ = 1e-20 the noise's σ runs into float under/overflow (ε = 5e-324 divided by
    # zero); no useful budget lies there.
    epsilon: float | None = Field(
        None,
        ge=1e-3,
        le=1e6,
        description="Total ε over all the budget's rounds, 1e-3 to 1e6; none = no noise (no DP).",
    )
    delta: float = Field(1e-5, ge=1e-20, lt=1, description="δ of the (ε, δ) guarantee, 1e-20 to < 1.")
    rounds: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Rounds (releases) the budget covers; none = the run's rounds in ktl simulate. "
        "Required for a federation on a server, which accepts no upload past it.",
    )

    @model_validator(mode="after")
    def _finite_noise(self) -> PrivacySettings:
        if self.epsilon is not None and self.rounds is not None:
            std = self.noise_std()
            if not (math.isfinite(std) and std > 0):
                raise ValueError(
                    f"epsilon {self.epsilon:g}, delta {self.delta:g} over {self.rounds} rounds give no finite "
                    f"noise (σ = {std}); choose a larger epsilon or delta"
                )
        return self

    @property
    def enabled(self) -> bool:
        return self.epsilon is not None

    def noise_std(self) -> float:
        """σ per round's release (sensitivity 1) that spends exactly (ε, δ) over `rounds` releases."""
        if self.epsilon is None or self.rounds is None:
            raise ConfigError("privacy: the noise needs both privacy.epsilon and privacy.rounds")
        return noise_std(self.epsilon, self.delta, self.rounds)

    def spent(self, releases: int) -> float:
        """ε accounted after ``releases`` rounds at this noise (0 before the first)."""
        if releases <= 0:
            return 0.0
        return epsilon_for(self.noise_std(), self.delta, releases)


def private_prototypes(
    privacy: PrivacySettings, seed: int, client: LocalClient, round_index: int
) -> Prototypes:
    """The client's prototypes, through the Gaussian mechanism when ``privacy.epsilon`` is set. The noise
    stream is derived from the seed, the client's id and the round, so a retried round draws the same."""
    if not privacy.enabled:
        return client.prototypes()
    g = torch_generator(seed, "privacy", client.client_id, round_index)
    return client.prototypes(noise_std=privacy.noise_std(), generator=g)


def privacy_facts(privacy: PrivacySettings) -> dict[str, Any]:
    """The budget as a run summary or a federation shows it (nothing without DP)."""
    if privacy.epsilon is None or privacy.rounds is None:
        return {}
    return {"privacy": {"epsilon": privacy.epsilon, "delta": privacy.delta, "noise_std": privacy.noise_std()}}
