"""FedKTL (Zhang et al., CVPR 2024): prototypes up, image-vector pairs from an aligned generator down.

The server step is `KnowledgeTransferServer.run_round`: one round's uploaded prototypes → aggregate →
align (``ktl.aligner``) → synthesize (``ktl.generator``) → `Pairs`. The method `FedKTL` wraps it in the
`Method` protocol, so ``ktl simulate``, the HTTP server and a participant drive the same steps;
`FedKTLLatents` is the "no generator" ablation.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save as st_save

from ktl.aligner import Aligner, AlignerSettings, AlignResult, FeatureTransformer
from ktl.clients import LocalClient
from ktl.errors import ConfigError, PayloadError
from ktl.generator import Generator
from ktl.imaging import pairs_grid_png
from ktl.methods.base import (
    ClientUpdate,
    CostShape,
    Method,
    MethodContext,
    MethodSettings,
    ServerCost,
    ServerUpdate,
    register_method,
)
from ktl.methods.privacy import PrivacySettings, privacy_facts, private_prototypes
from ktl.quality import (
    QUALITY_FILE,
    QUALITY_PNG,
    QualityResult,
    QualityThresholds,
    quality_metrics,
    quality_report,
)
from ktl.records import Pairs, Prototypes
from ktl.seeding import derive_seed, torch_generator
from ktl.work import Work, run_to_end

__all__ = [
    "FedKTL",
    "FedKTLLatents",
    "FedKTLMethodSettings",
    "FedKTLSettings",
    "KnowledgeTransferServer",
    "RoundResult",
    "stack_uploads",
]

logger = logging.getLogger(__name__)


class FedKTLSettings(BaseModel):
    """Federation-level FedKTL knobs (the aligner has its own section)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    # The targets are divided by their RMS, so μ = 1 weighs a fresh projector's error (≈ 1) like one unit
    # of the margin loss, whatever the generator's latent scale.
    mu: float = Field(
        1.0, ge=0, le=1e6, description="Weight μ of the clients' distillation MSE on the server's pairs."
    )
    pairs_per_class: int = Field(
        1,
        ge=1,
        le=1000,
        description="Pairs per present class each round: 1 = the class centroid; more add aligned single "
        "uploads of that class.",
    )
    upload_dtype: Literal["float16", "float32"] = Field(
        "float16", description="Dtype of uploaded prototypes: float16 halves the bytes (norms move < 1e-3)."
    )


@dataclass(frozen=True)
class RoundResult:
    """What the server publishes after a round, plus what it learned about the round."""

    pairs: Pairs
    centroids: torch.Tensor  # (C, W) on the CPU; zero rows for classes nobody uploaded
    present: torch.Tensor  # (C,) bool
    history: dict[str, list[float]]  # the aligner's per-step loss, mmd, mse
    aligned: torch.Tensor  # (n, W) F(prototypes) after the round's alignment, upload order, on the CPU
    class_ids: torch.Tensor  # (n,) class of each aligned row
    counts: torch.Tensor  # (n,) samples behind each row
    num_uploads: int
    num_rows: int
    align_seconds: float
    synthesize_seconds: float
    owners: torch.Tensor | None = None  # (n,) index of the upload (client) each row came from

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
        """Align the round's prototypes and synthesize the pairs (`round_steps` run to the end).

        Parameters
        ----------
        uploads
            Client id → its prototypes for this round (each is validated first).
        round_index
            Selects this round's random stream, so a re-run of a round reproduces it.
        """
        return run_to_end(self.round_steps(uploads, round_index=round_index))

    def round_steps(self, uploads: Mapping[str, Prototypes], *, round_index: int) -> Work[RoundResult]:
        """`run_round` as resumable work: yields after every alignment step. ``align_seconds`` counts
        the time spent aligning, not the time spent paused between slices."""
        if not uploads:
            raise PayloadError("no_uploads", "a round needs at least one upload to close")
        for prototypes in uploads.values():
            self.validate(prototypes)
        vectors, class_ids, counts = stack_uploads(uploads)
        sizes = torch.tensor([p.class_ids.numel() for p in uploads.values()])
        owners = torch.repeat_interleave(torch.arange(len(uploads)), sizes)
        device = self.aligner.device
        prior_rng = torch_generator(self.seed, "prior", round_index, device=self.generator.device)

        def sample_prior(n: int, g: torch.Generator) -> torch.Tensor:
            return self.generator.sample_latents(n, generator=g).to(device)

        fitting = self.aligner.fit_steps(
            vectors,
            class_ids,
            counts,
            sample_prior=sample_prior,
            generator=prior_rng,
            standard_normal_prior=getattr(self.generator, "latent_prior", "sampled") == "standard-normal",
        )
        busy, t0 = 0.0, time.perf_counter()
        while True:
            try:
                next(fitting)
            except StopIteration as done:
                fit: AlignResult = done.value
                break
            busy += time.perf_counter() - t0
            yield
            t0 = time.perf_counter()
        latents, pair_classes = self.pair_latents(
            fit, class_ids, torch_generator(self.seed, "pairs", round_index)
        )
        t1 = time.perf_counter()
        align_seconds = busy + t1 - t0
        images = self.generator.synthesize(latents.to(self.generator.device)).float().cpu()
        t2 = time.perf_counter()
        pairs = Pairs(images=images, latents=latents.float().cpu(), class_ids=pair_classes)
        return RoundResult(
            pairs=pairs,
            centroids=fit.centroids.cpu(),
            present=fit.present.cpu(),
            history=fit.history,
            aligned=fit.aligned.detach().float().cpu(),
            class_ids=class_ids.cpu(),
            counts=counts.cpu(),
            num_uploads=len(uploads),
            num_rows=int(vectors.shape[0]),
            align_seconds=align_seconds,
            synthesize_seconds=t2 - t1,
            owners=owners,
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

    def quality(
        self,
        result: RoundResult,
        round_index: int,
        *,
        thresholds: QualityThresholds | None = None,
        title: str = "F(prototypes) vs the generator's prior",
    ) -> QualityResult:
        """The round's alignment quality report (`ktl.quality`): its prior draws, images of some of them and
        its subsets come from the round's own ``"quality"`` stream, so the server's streams (and with them
        every training number) are the same with or without it."""
        t = thresholds or QualityThresholds()
        rng = torch_generator(self.seed, "quality", round_index, device=self.generator.device)

        def sample_prior(n: int) -> torch.Tensor:
            return self.generator.sample_latents(n, generator=rng).float().cpu()

        prior_images = None
        if result.pairs.images.shape[0] >= t.min_kid_images and t.kid_prior_images > 0:
            latents = sample_prior(t.kid_prior_images).to(self.generator.device)
            prior_images = self.generator.synthesize(latents).float().cpu()
        return quality_report(
            result.aligned,
            result.class_ids,
            result.counts,
            result.centroids,
            result.present,
            sample_prior,
            images=result.pairs.images,
            prior_images=prior_images,
            multipliers=self.aligner.settings.bandwidth_multipliers,
            thresholds=t,
            seed=derive_seed(self.seed, "quality", round_index),
            title=title,
            owners=result.owners,
        )

    def save_pretrained(self, path: str | Path) -> None:
        """Save the warm aligner (F and its settings) HF-style under ``path``."""
        self.aligner.save_pretrained(path)


# -- the method ---------------------------------------------------------------------------------------

_ALIGNER_FOLDER = "aligner"


class FedKTLMethodSettings(MethodSettings):
    """The sections FedKTL reads."""

    fedktl: FedKTLSettings = Field(
        default_factory=FedKTLSettings, description="FedKTL: μ, pairs per class, upload dtype."
    )
    aligner: AlignerSettings = Field(
        default_factory=AlignerSettings, description="The server's feature transformer F and its training."
    )
    privacy: PrivacySettings = Field(
        default_factory=PrivacySettings, description="Differential privacy on uploaded prototypes."
    )


@register_method("fedktl")
class FedKTL(Method):
    """FedKTL: prototypes up, image-vector pairs from the aligned generator down, distillation on them.

    The server side (`KnowledgeTransferServer`: the warm aligner and the generator) is built on first use,
    so a client-side instance needs no generator.
    """

    settings_model = FedKTLMethodSettings
    uses_generator = True
    broadcast_file = "pairs.safetensors"
    settings: FedKTLMethodSettings

    def __init__(self, settings: MethodSettings, ctx: MethodContext) -> None:
        super().__init__(settings, ctx)
        self.upload_dtype: torch.dtype = getattr(torch, self.settings.fedktl.upload_dtype)
        self._server: KnowledgeTransferServer | None = None
        self.last: RoundResult | None = None
        self.last_quality: QualityResult | None = None

    @property
    def generator(self) -> Generator:
        if self.ctx.generator is None:
            raise ConfigError(f"method {self.name!r} needs a generator on the server")
        return self.ctx.generator

    @property
    def server(self) -> KnowledgeTransferServer:
        """The server step; a fresh aligner seeded from the context's seed unless one was loaded."""
        if self._server is None:
            self._server = self._server_with(
                Aligner.create(
                    num_classes=self.ctx.num_classes,
                    proto_dim=self.ctx.proto_dim,
                    latent_dim=self.generator.latent_dim,
                    settings=self.settings.aligner,
                    device=self.ctx.device,
                    seed=self.ctx.seed,
                )
            )
        return self._server

    def _server_with(self, aligner: Aligner) -> KnowledgeTransferServer:
        return KnowledgeTransferServer(
            num_classes=self.ctx.num_classes,
            proto_dim=self.ctx.proto_dim,
            generator=self.generator,
            aligner=aligner,
            pairs_per_class=self.settings.fedktl.pairs_per_class,
            seed=self.ctx.seed,
        )

    @classmethod
    def server_cost(cls, settings: MethodSettings, shape: CostShape) -> ServerCost:
        """F's parameters (counted on the meta device: nothing is allocated) with their gradients and
        Adam moments; a step's activations and kernel matrices over its row batch and the prior draws; the
        prior bank for the bandwidths; the round's pairs. Flops: F forward and backward (6 per parameter
        and row) and the pairwise distances of the MMD."""
        if not isinstance(settings, FedKTLMethodSettings):
            raise TypeError("FedKTL.server_cost takes FedKTLMethodSettings")
        a, w = settings.aligner, max(shape.latent_dim, 1)
        with torch.device("meta"):
            f = FeatureTransformer(shape.proto_dim, w, a.hidden_dim, a.num_layers)
        params = sum(p.numel() for p in f.parameters())
        n = min(a.batch_size, max(shape.rows, 1))
        m = a.prior_samples
        kernels = len(a.bandwidth_multipliers) + 2
        activations = n * (a.hidden_dim * max(a.num_layers - 1, 0) * 3 + w * 4)
        mmd = (n + m) * (n + m) * kernels + m * w
        pairs = shape.num_classes * settings.fedktl.pairs_per_class * (w + shape.image_values)
        floats = (
            4 * params
            + activations
            + mmd
            + a.bandwidth_samples * w
            + pairs
            + shape.rows * (shape.proto_dim + w)
        )
        flops = 6.0 * params * n + 6.0 * (n + m) * (n + m) * w
        return ServerCost(memory_bytes=4 * floats, steps=a.steps, flops_per_step=flops)

    # -- client side ---------------------------------------------------------------------------------

    def client_update(self, client: LocalClient, round_index: int) -> ClientUpdate:
        stats = client.train(mu=self.settings.fedktl.mu)
        prototypes = private_prototypes(self.settings.privacy, self.ctx.seed, client, round_index)
        return ClientUpdate(stats=stats, payload=prototypes.to_bytes(self.upload_dtype))

    def client_receive(self, client: LocalClient, payload: bytes) -> None:
        client.receive_pairs(Pairs.from_bytes(payload))

    # -- server side ---------------------------------------------------------------------------------

    def align(self, uploads: Mapping[str, bytes], round_index: int) -> Work[RoundResult]:
        """Validate the uploads, align them and synthesize the pairs; a diverged alignment raises."""
        result = yield from self.server.round_steps(self.decode_uploads(uploads), round_index=round_index)
        if not bool(torch.isfinite(result.centroids).all()):
            raise RuntimeError("alignment diverged: the centroids are not finite (lower aligner.lr?)")
        self.last = result
        return result

    def server_steps(self, uploads: Mapping[str, bytes], round_index: int) -> Work[ServerUpdate]:
        result = yield from self.align(uploads, round_index)
        grid = pairs_grid_png(result.pairs, self.ctx.class_names, self.settings.fedktl.pairs_per_class)
        centroids = st_save(
            {"centroids": result.centroids.float().contiguous(), "present": result.present.to(torch.uint8)}
        )
        files = {
            "pairs.png": grid,
            "centroids.safetensors": centroids,
            "align-history.json": (json.dumps(result.history) + "\n").encode(),
        }
        metrics = result.stats()
        t0 = time.perf_counter()
        quality = self.round_quality(result, round_index)
        if quality is not None:
            files[QUALITY_FILE] = quality.to_json()
            files[QUALITY_PNG] = quality.png
            metrics.update(quality_metrics(quality.report), quality_seconds=time.perf_counter() - t0)
        return ServerUpdate(payload=result.pairs.to_bytes(), metrics=metrics, files=files)

    def round_quality(self, result: RoundResult, round_index: int) -> QualityResult | None:
        """The round's quality report (kept for `save_round`); a report that cannot be made is logged and
        left out — it never fails the round it describes."""
        self.last_quality = None
        try:
            quality = self.server.quality(
                result, round_index, title=f"round {round_index}: F(prototypes) vs the generator's prior"
            )
        except Exception:
            logger.warning("round %d: no alignment quality report", round_index, exc_info=True)
            return None
        self.last_quality = quality
        logger.info("round %d: %s", round_index, quality.report["verdict_line"])
        norms = " ".join(f"{c}:{f['norm']:.1f}" for c, f in quality.report["classes"].items())
        logger.info("round %d: class centroid norms %s", round_index, norms)
        return quality

    # -- state -------------------------------------------------------------------------------------------

    def save_extra_state(self, path: Path) -> None:
        """The warm aligner, HF-style, in ``aligner/`` (nothing before the first round)."""
        if self._server is not None:
            self._server.save_pretrained(path / _ALIGNER_FOLDER)

    def load_extra_state(self, path: Path) -> None:
        folder = path / _ALIGNER_FOLDER
        if folder.is_dir():
            self._server = self._server_with(Aligner.from_pretrained(folder, device=self.ctx.device))

    # -- run folders ---------------------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        facts: dict[str, Any] = {}
        if self.ctx.generator is not None:
            facts.update(generator=self.generator.description, generator_pretrained=self.generator.pretrained)
        return {**facts, **privacy_facts(self.settings.privacy)}

    def save_round(self, run_dir: Path, round_index: int, uploads: Mapping[str, bytes]) -> None:
        """Per round: the pairs (wire format), the aligner's per-step loss/MMD/MSE and the alignment
        quality report with its PCA picture (``quality-<r>.json``, ``quality-<r>.png``) under ``rounds/``;
        the last round's uploads as ``uploads.safetensors`` (for notebooks)."""
        if self.last is None:
            return
        folder = run_dir / "rounds"
        folder.mkdir(exist_ok=True)
        (folder / f"pairs-{round_index:04d}.safetensors").write_bytes(self.last.pairs.to_bytes())
        (folder / f"aligner-{round_index:04d}.json").write_text(json.dumps(self.last.history) + "\n")
        if self.last_quality is not None:
            (folder / f"quality-{round_index:04d}.json").write_bytes(self.last_quality.to_json())
            (folder / f"quality-{round_index:04d}.png").write_bytes(self.last_quality.png)
        rows = list(self.decode_uploads(uploads).values())
        merged = Prototypes(
            vectors=torch.cat([p.vectors.float() for p in rows]),
            class_ids=torch.cat([p.class_ids for p in rows]),
            counts=torch.cat([p.counts for p in rows]),
        )
        (run_dir / "uploads.safetensors").write_bytes(merged.to_bytes())

    def save_artifacts(self, run_dir: Path) -> dict[str, str]:
        out: dict[str, str] = {}
        if self._server is not None:
            self._server.save_pretrained(run_dir / _ALIGNER_FOLDER)
            out["aligner"] = _ALIGNER_FOLDER
        if (run_dir / "rounds").is_dir():
            out.update(rounds="rounds", uploads="uploads.safetensors")
        return out


@register_method("fedktl-latents")
class FedKTLLatents(FedKTL):
    """Ablation "without the generator": the server aligns as FedKTL but sends only the class centroids
    (latents); each client distils its own images of a class towards that class's latent."""

    broadcast_file = "latents.safetensors"

    def server_steps(self, uploads: Mapping[str, bytes], round_index: int) -> Work[ServerUpdate]:
        result = yield from self.align(uploads, round_index)
        present = result.present.nonzero().flatten()
        table = Prototypes(
            vectors=result.centroids[present],
            class_ids=present,
            counts=torch.ones_like(present),
        )
        return ServerUpdate(payload=table.to_bytes(torch.float32), metrics=result.stats())

    def client_receive(self, client: LocalClient, payload: bytes) -> None:
        table = Prototypes.from_bytes(payload)
        client.receive_latent_targets(table.vectors, table.class_ids)
