"""What the notebooks look at: a run folder (or a running server through the SDK) and the views the
paper's argument needs — per-class images across rounds, F(prototypes) against the generator's prior in
2-D, the aligner's loss per server step, and images from aligned latents beside images from unaligned
inputs (raw prototypes linearly lifted to the latent size) and from prior samples — and each round's
alignment quality report (`ktl.quality`; `load_quality`), the same numbers a server's round state carries.

Kept out of the notebooks so that they stay short and what they compute is tested.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ktl.aligner import Aligner
from ktl.aligner.aligner import class_centroids
from ktl.config import SimulateConfig
from ktl.generator import Generator, load_generator
from ktl.quality import pca_2d
from ktl.records import Pairs, Prototypes

__all__ = [
    "RunView",
    "ServerView",
    "aligned_centroids",
    "class_centroids",
    "class_images_over_rounds",
    "class_typicality",
    "lift_linearly",
    "load_quality",
    "nearest_images",
    "pca_2d",
    "distinctness",
]


@dataclass(frozen=True)
class RunView:
    """A ``ktl simulate`` run folder of a FedKTL run (written with per-round artifacts)."""

    path: Path

    def __post_init__(self) -> None:
        if not (self.path / "summary.json").is_file():
            raise FileNotFoundError(f"{self.path} is not a finished run folder (no summary.json)")
        if not (self.path / "rounds").is_dir():
            raise FileNotFoundError(f"{self.path} has no rounds/ folder: was it a FedKTL run?")

    @cached_property
    def summary(self) -> dict[str, Any]:
        return json.loads((self.path / "summary.json").read_text())

    @cached_property
    def config(self) -> SimulateConfig:
        return SimulateConfig.model_validate_json((self.path / "config.json").read_text())

    @property
    def class_names(self) -> list[str]:
        names = self.summary.get("class_names")
        return list(names) if names else [f"class {c}" for c in range(self.aligner().num_classes)]

    def rounds(self) -> list[int]:
        return sorted(int(p.stem.split("-")[1]) for p in (self.path / "rounds").glob("pairs-*.safetensors"))

    def pairs(self, r: int) -> Pairs:
        return Pairs.from_bytes((self.path / "rounds" / f"pairs-{r:04d}.safetensors").read_bytes())

    def history(self, r: int) -> dict[str, list[float]]:
        return json.loads((self.path / "rounds" / f"aligner-{r:04d}.json").read_text())

    def quality(self, r: int) -> dict[str, Any] | None:
        """Round ``r``'s alignment quality report (`ktl.quality`), or None if the run wrote none."""
        path = self.path / "rounds" / f"quality-{r:04d}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def quality_png(self, r: int) -> bytes | None:
        """Round ``r``'s 2-D PCA picture of F(prototypes), centroids and prior draws (PNG), or None."""
        path = self.path / "rounds" / f"quality-{r:04d}.png"
        return path.read_bytes() if path.is_file() else None

    def uploads(self) -> Prototypes:
        """Every client's prototypes of the last round, stacked."""
        return Prototypes.from_bytes((self.path / "uploads.safetensors").read_bytes())

    def aligner(self) -> Aligner:
        return Aligner.from_pretrained(self.path / "aligner")

    def generator(self, device: torch.device | str = "cpu") -> Generator:
        return load_generator(self.config.generator, torch.device(device))

    def accuracy(self) -> list[float]:
        lines = (self.path / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["accuracy"] for line in lines if line.strip()]


class ServerView:
    """The same per-round views from a running ktl server, through the SDK: pairs and round stats (the
    server does not publish uploads or its aligner, so the 2-D and lifted views need a run folder)."""

    def __init__(self, sdk: Any, federation_id: str) -> None:
        self.sdk = sdk
        self.fid = federation_id

    @property
    def class_names(self) -> list[str]:
        spec = self.sdk.federation(self.fid)["spec"]
        return list(spec.get("class_names") or [f"class {c}" for c in range(spec["num_classes"])])

    def rounds(self) -> list[int]:
        fed = self.sdk.federation(self.fid)
        last = int(fed.get("current_round", 1))
        return [r for r in range(1, last + 1) if self.sdk.round(self.fid, r)["state"] == "published"]

    def pairs(self, r: int) -> Pairs:
        return self.sdk.pairs(self.fid, r)

    def stats(self, r: int) -> dict[str, Any]:
        return dict(self.sdk.round(self.fid, r).get("stats") or {})

    def quality(self, r: int) -> dict[str, Any] | None:
        """Round ``r``'s alignment quality report from its round state (None: not published, or a method
        without one)."""
        report = self.sdk.round(self.fid, r).get("quality")
        return dict(report) if report is not None else None

    def quality_png(self, r: int) -> bytes:
        """Round ``r``'s PCA picture (``GET …/rounds/{r}/quality.png``)."""
        return bytes(self.sdk.request("GET", f"/v1/federations/{self.fid}/rounds/{r}/quality.png").content)


def load_quality(source: RunView | ServerView | str | Path, r: int) -> dict[str, Any] | None:
    """Round ``r``'s alignment quality report from a run folder (a path or a `RunView`) or a server
    (`ServerView`): the same dict either way (keys `ktl.quality.REPORT_KEYS`), None where there is none."""
    view = RunView(Path(source)) if isinstance(source, str | Path) else source
    return view.quality(r)


def class_typicality(report: dict[str, Any], class_names: list[str] | None = None) -> list[str]:
    """One line per class of a quality report: its centroid's norm against the prior's norm band, the
    distance outside it (prior scales), rows and holders, and ``OFF-MANIFOLD`` where it lies outside.
    Empty for a report without per-class typicality (written by an older ktl)."""
    band = report.get("norm_band")
    if not band:
        return []
    lines = [f"prior's {band['coverage']:.0%} norm band: [{band['lo']:.2f}, {band['hi']:.2f}]"]
    for c, f in report.get("classes", {}).items():
        name = f" {class_names[int(c)]}" if class_names and int(c) < len(class_names) else ""
        mark = "ok" if f["inside"] else f"OFF-MANIFOLD (distance {f['distance']:.2f} prior scales)"
        lines.append(
            f"  class {c}{name}: norm {f['norm']:.2f}, {f['rows']} rows, {f['holders']} holders: {mark}"
        )
    return lines


def class_images_over_rounds(
    pairs_by_round: dict[int, Pairs], num_classes: int
) -> tuple[torch.Tensor, list[str]]:
    """One row per class, one column per round: the first pair of each class in each round (a blank
    tile where a class had no pair). Returns ``(C·R, 3, H, W)`` images and their labels, row-major."""
    rounds = sorted(pairs_by_round)
    first = next(iter(pairs_by_round.values())).images
    blank = torch.ones_like(first[0])
    tiles, labels = [], []
    for c in range(num_classes):
        for r in rounds:
            p = pairs_by_round[r]
            hit = (p.class_ids == c).nonzero().flatten()
            tiles.append(p.images[hit[0]] if hit.numel() else blank)
            labels.append(f"c{c} r{r}")
    return torch.stack(tiles), labels


def lift_linearly(vectors: torch.Tensor, latent_dim: int, *, seed: int = 0) -> torch.Tensor:
    """Unaligned generator inputs: ``(n, K)`` unit prototypes through a fixed random map with orthonormal
    columns to ``(n, W)``, scaled by sqrt(W) so their norm matches a standard-normal prior sample's."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(latent_dim, vectors.shape[1], generator=g))
    return F.normalize(vectors.float(), dim=1) @ q.T * latent_dim**0.5


def aligned_centroids(aligner: Aligner, uploads: Prototypes) -> torch.Tensor:
    """F(prototypes), count-weighted per class — the latents the server synthesizes — ``(C, W)``."""
    with torch.no_grad():
        q = aligner.transformer(uploads.vectors.float().to(aligner.device))
        centroids, _ = class_centroids(
            q,
            uploads.class_ids.to(aligner.device),
            uploads.counts.float().to(aligner.device),
            aligner.num_classes,
        )
    return centroids.cpu()


def nearest_images(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Index into ``bank`` of each query's nearest image (pixel L2, after resizing to the bank's size)."""
    q = queries.float()
    if q.shape[-2:] != bank.shape[-2:]:
        q = F.interpolate(q, size=bank.shape[-2:], mode="bilinear", antialias=True, align_corners=False)
    if q.shape[1] != bank.shape[1]:
        q = q.mean(1, keepdim=True).expand(-1, bank.shape[1], -1, -1)
    return torch.cdist(q.flatten(1), bank.float().flatten(1)).argmin(dim=1)


def distinctness(images: torch.Tensor) -> float:
    """Mean pixel distance (RMS per pixel) between every two of ``(m, C, H, W)`` images — one image per
    class, so higher means more class-distinct images."""
    flat = images.float().flatten(1)
    m = flat.shape[0]
    if m < 2:
        return 0.0
    d = torch.cdist(flat, flat) / flat.shape[1] ** 0.5
    return float(d.sum() / (m * (m - 1)))
