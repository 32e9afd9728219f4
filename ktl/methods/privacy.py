"""Differential privacy on uploaded prototypes, for every method that uploads them.

The mechanism and its accounting are in `ktl.clients.privacy` (Gaussian mechanism on per-class sums,
zCDP composition); this module holds the setting section ``privacy`` and applies it where a method makes
its upload, so fedktl, fedproto and fedtgp get it the same way, in every transport.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from ktl.clients import LocalClient
from ktl.clients.privacy import epsilon_for, noise_std
from ktl.errors import ConfigError
from ktl.records import Prototypes
from ktl.seeding import torch_generator

__all__ = ["PrivacySettings", "private_prototypes", "privacy_facts"]


class PrivacySettings(BaseModel):
    """Differential privacy on uploaded prototypes: the Gaussian mechanism on each round's per-class sums,
    with (ε, δ) for all the rounds of the budget together (see `ktl.clients.privacy`)."""

    model_config = ConfigDict(extra="forbid")

    epsilon: float | None = Field(
        None, gt=0, description="Total ε over all the budget's rounds; none = no noise (no DP)."
    )
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of the (ε, δ) guarantee.")
    rounds: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Rounds (releases) the budget covers; none = the run's rounds in ktl simulate. "
        "Required for a federation on a server, which accepts no upload past it.",
    )

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
