"""The FedKTL server step, independent of transport.

`KnowledgeTransferServer.run_round` takes one round's uploaded prototypes and returns the image-vector
pairs: aggregate → align (``ktl.aligner``) → synthesize (``ktl.generator``) → `Pairs`. ``ktl simulate``
calls it in one process; the HTTP service wraps the same object with persistence.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from ktl.aligner import Aligner, AlignerSettings, AlignResult
from ktl.errors import PayloadError
from ktl.generator import Generator
from ktl.records import Pairs, Prototypes
from ktl.seeding import torch_generator

__all__ = ["FedKTLSettings", "RoundResult", "KnowledgeTransferServer", "stack_uploads"]

logger = logging.getLogger(__name__)


class FedKTLSettings(BaseModel):
    """Federation-level FedKTL knobs (the aligner has its own section)."""

    model_config = ConfigDict(extra="forbid")

    # Weight μ of the clients' distillation MSE. The targets are divided by their RMS, so μ = 1 weighs a
    # fresh projector's error (≈ 1) like one unit of the margin loss, whatever the generator's latent scale.
    mu: float = Field(1.0, ge=0, le=1e6)
    pairs_per_class: int = Field(1, ge=1, le=1000)  # 1 = the class centroid; more add aligned single uploads
    upload_dtype: Literal["float16", "float32"] = "float16"  # fp16 halves the upload; norms move < 1e-3


@dataclass(frozen=True)
class RoundResult:
    """What the server publishes after a round, plus what it learned about the round."""

    pairs: Pairs
    centroids: torch.Tensor  # (C, W) on the CPU; zero rows for classes nobody uploaded
    present: torch.Tensor  # (C,) bool
    history: dict[str, list[float]]  # the aligner's per-step loss, mmd, mse
    num_uploads: int
    num_rows: int
    align_seconds: float
    synthesize_seconds: float

    def stats(self) -> dict[str, float]:
        """The round's figures for logs and metrics: sizes, first/last alignment losses, timings."""
        h = self.history
        return {
            "uploads": self.num_uploads,
            "rows": self.num_rows,
            "align_loss_first": h["loss"][0],
            "align_loss_last": h["loss"][-1],
            "align_mmd_last": h["mmd"][-1],
            "align_mse_last": h["mse"][-1],
            "align_seconds": self.align_seconds,
            "synthesize_seconds": self.synthesize_seconds,
        }


def stack_uploads(uploads: Mapping[str, Prototypes]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenate uploads, in the mapping's order, into ``(n, K)`` float32 vectors, ``(n,)`` class ids and
    counts. Callers give a canonical order (simulate: client order; the service: registration order), so
    the same uploads give the same alignment bit for bit."""
    items = list(uploads.values())
    vectors = torch.cat([p.vectors.float() for p in items])
    class_ids = torch.cat([p.class_ids for p in items])
    counts = torch.cat([p.counts for p in items])
    return vectors, class_ids, counts


class KnowledgeTransferServer:
    """FedKTL's server: owns the aligner (warm across rounds) and a frozen generator.

    Parameters
    ----------
    num_classes
        C.
    proto_dim
        K (= C in FedKTL).
    generator
        The frozen generator; its device is where images are made.
    aligner
        The feature transformer and its training loop; its device is where alignment runs.
    pairs_per_class
        Images per present class per round: the centroid first, then aligned single uploads of the class.
    seed
        Seeds the prior draws of every round (each round gets its own derived stream).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        proto_dim: int,
        generator: Generator,
        aligner: Aligner,
        pairs_per_class: int = 1,
        seed: int = 0,
    ) -> None:
        if aligner.latent_dim != generator.latent_dim:
            raise ValueError(
                f"aligner outputs W={aligner.latent_dim}, generator expects W={generator.latent_dim}"
            )
        self.num_classes = num_classes
        self.proto_dim = proto_dim
        self.generator = generator
        self.aligner = aligner
        self.pairs_per_class = pairs_per_class
        self.seed = seed

    @classmethod
    def create(
        cls,
        *,
        num_classes: int,
        proto_dim: int,
        generator: Generator,
        aligner_settings: AlignerSettings | None = None,
        pairs_per_class: int = 1,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ) -> KnowledgeTransferServer:
        aligner = Aligner.create(
            num_classes=num_classes,
            proto_dim=proto_dim,
            latent_dim=generator.latent_dim,
            settings=aligner_settings,
            device=device,
            seed=seed,
        )
        return cls(
            num_classes=num_classes,
            proto_dim=proto_dim,
            generator=generator,
            aligner=aligner,
            pairs_per_class=pairs_per_class,
            seed=seed,
        )

    def validate(self, prototypes: Prototypes) -> None:
        """Raise `PayloadError` unless ``prototypes`` fit this federation (K, class range, norms, …)."""
        prototypes.validate(num_classes=self.num_classes, dim=self.proto_dim)

    def run_round(self, uploads: Mapping[str, Prototypes], *, round_index: int) -> RoundResult:
        """Align the round's prototypes and synthesize the pairs.

        Parameters
        ----------
        uploads
            Client id → its prototypes for this round (each is validated first).
        round_index
            Selects this round's random stream, so a re-run of a round reproduces it.
        """
        if not uploads:
            raise PayloadError("no_uploads", "a round needs at least one upload to close")
        for prototypes in uploads.values():
            self.validate(prototypes)
        vectors, class_ids, counts = stack_uploads(uploads)
        device = self.aligner.device
        prior_rng = torch_generator(self.seed, "prior", round_index, device=self.generator.device)

        def sample_prior(n: int, g: torch.Generator) -> torch.Tensor:
            return self.generator.sample_latents(n, generator=g).to(device)

        t0 = time.perf_counter()
        fit = self.aligner.fit(
            vectors,
            class_ids,
            counts,
            sample_prior=sample_prior,
            generator=prior_rng,
            standard_normal_prior=getattr(self.generator, "latent_prior", "sampled") == "standard-normal",
        )
        latents, pair_classes = self.pair_latents(
            fit, class_ids, torch_generator(self.seed, "pairs", round_index)
        )
        t1 = time.perf_counter()
        images = self.generator.synthesize(latents.to(self.generator.device)).float().cpu()
        t2 = time.perf_counter()
        pairs = Pairs(images=images, latents=latents.float().cpu(), class_ids=pair_classes)
        return RoundResult(
            pairs=pairs,
            centroids=fit.centroids.cpu(),
            present=fit.present.cpu(),
            history=fit.history,
            num_uploads=len(uploads),
            num_rows=int(vectors.shape[0]),
            align_seconds=t1 - t0,
            synthesize_seconds=t2 - t1,
        )

    def pair_latents(
        self, fit: AlignResult, class_ids: torch.Tensor, rng: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents to synthesize: per present class its centroid, then ``pairs_per_class - 1`` aligned single
        uploads of that class (a seeded choice on the CPU ``rng``, cycling if the class has fewer uploads)."""
        latents, labels = [], []
        class_ids = class_ids.cpu()
        for c in fit.present.nonzero().flatten().tolist():
            latents.append(fit.centroids[c : c + 1])
            extra = self.pairs_per_class - 1
            if extra:
                rows = (class_ids == c).nonzero().flatten()
                pick = rows[torch.randperm(rows.numel(), generator=rng)]
                pick = pick.repeat(-(-extra // pick.numel()))[:extra]
                latents.append(fit.aligned[pick.to(fit.aligned.device)])
            labels += [c] * self.pairs_per_class
        return torch.cat(latents), torch.tensor(labels, dtype=torch.int64)

    def save_pretrained(self, path: str | Path) -> None:
        """Save the warm aligner (F and its settings) HF-style under ``path``."""
        self.aligner.save_pretrained(path)
