"""The alignment quality report of a FedKTL round: is F(prototypes) in the generator's latent distribution,
are the classes kept apart, do the clients agree, and do the round's images look like the generator's own?

`quality_report` computes it from what a round already produced — the aligned rows F(p_i) with their class
ids and counts, the class centroids and which classes are present, the round's generated images — plus
fresh draws of the generator's latent prior (and images of some of them), taken from the caller's own
seeded random stream, never from the server's. It returns the report (a JSON-ready dict, `REPORT_KEYS`)
and a 2-D PCA picture (PNG) of F(prototypes), the centroids and prior draws.

The numbers (docs/architecture.md, "Alignment quality report"):

- ``mmd_to_prior``: MMD² (biased V-statistic, never negative) between the aligned rows and a prior draw of
  the same size, under the aligner's kernel (RBF mixture at ``h₀·multipliers``, ``h₀`` the prior's mean
  squared inter-sample distance, `ktl.aligner.mmd`), averaged over `QualityThresholds.prior_repeats` draws.
- ``mmd_prior_to_prior``: the same statistic between two independent prior draws of that size, averaged the
  same way, the first draw shaped like the rows (one prior point per class, repeated over that class's
  rows): the value the ideal F — every row at its class centroid, the centroids distributed as the prior —
  gets at this sample size and class structure (the V-statistic's floor; without the shaping, agreeing
  clients alone would raise the ratio by about half the rows per class).
- ``mmd_ratio``: their quotient; ≈ 1 means F(prototypes) is as close to the prior as the ideal F.
- ``prior_scale``: ``sqrt(h₀)``, the typical distance between two prior draws; every distance below is in
  units of it.
- ``centroid_min_distance`` / ``centroid_mean_distance``: the closest / mean pair of present class
  centroids (null with fewer than two classes).
- ``class_spread``: per class, the count-weighted mean distance of its rows to its centroid (how much the
  clients agree on that class).
- ``kid`` / ``kid_std``: KID of the round's images against images of prior draws, in the feature space of
  `ktl.pretrain.RandomConvFeatures` (no Inception weights offline; not comparable to published KIDs);
  null with fewer than `QualityThresholds.min_kid_images` round images.
- ``norm_band``: the prior's typical set as the central ``QualityThresholds.norm_coverage`` (99 %) interval
  of the norms of `QualityThresholds.norm_band_draws` prior draws (`ktl.aligner.typical.NormBand`): ``lo``,
  ``hi``, ``median``, ``coverage``.
- ``classes``: per present class (id as a string): its centroid's ``norm``, its ``distance`` outside the
  norm band in prior scales (0 inside), its ``rows`` (uploaded prototypes) and ``holders`` (clients that
  uploaded it), and ``inside`` (whether the norm lies in the band).
- ``off_manifold_classes``: the ids of the present classes whose centroid lies outside the norm band.
- ``verdict``: ``few-classes`` (fewer than two classes present), else ``collapsed`` (closest centroids
  under `QualityThresholds.collapse_fraction` of the prior scale), else ``off-manifold`` (a class centroid
  outside the norm band — the line names the classes — or the MMD ratio above
  `QualityThresholds.off_manifold_ratio`), else ``ok``.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ktl.aligner.mmd import DEFAULT_BANDWIDTH_MULTIPLIERS, mmd2_rbf, prior_bandwidths
from ktl.aligner.typical import NORM_BAND_DRAWS, TYPICAL_COVERAGE, NormBand
from ktl.pretrain import kid_report

__all__ = [
    "QUALITY_FILE",
    "QUALITY_PNG",
    "REPORT_KEYS",
    "VERDICTS",
    "QualityResult",
    "QualityThresholds",
    "pca_2d",
    "pca_png",
    "quality_metrics",
    "quality_report",
]

QUALITY_FILE = "quality.json"  # the report, beside a round's pairs
QUALITY_PNG = "quality-pca.png"  # the 2-D PCA picture
VERDICTS = ("ok", "collapsed", "off-manifold", "few-classes")
REPORT_KEYS = (
    "mmd_to_prior",
    "mmd_prior_to_prior",
    "mmd_ratio",
    "prior_scale",
    "centroid_min_distance",
    "centroid_mean_distance",
    "class_spread",
    "norm_band",
    "classes",
    "off_manifold_classes",
    "kid",
    "kid_std",
    "verdict",
    "verdict_line",
    "thresholds",
)
_TINY = 1e-12


@dataclass(frozen=True)
class QualityThresholds:
    """The verdict's thresholds and the report's size bounds (all written into the report).

    collapse_fraction
        ``collapsed`` when the two closest class centroids are nearer than this fraction of the prior scale.
        Two independent prior draws lie ≈ 1 prior scale apart; a healthy round keeps its centroids at a
        sizeable fraction of that (closest pair 0.5–0.8 on the smoke preset), while centroids within 0.1 of the scale
        decode to near-identical images, i.e. the clients get (almost) the same target for both classes.
    off_manifold_ratio
        ``off-manifold`` when the MMD ratio exceeds it. The ideal F (rows of a class at their centroid,
        centroids distributed as the prior) gives 1.00 ± 0.03 over seeds, rows that are independent prior
        draws less (≈ 0.5); shifting ideal rows by ¼, ½ and 1 prior scale gives ≈ 1.4, 2.2 and 4.5 (10
        classes, 3 rows each, W = 256). 3 flags a shift of about ⅔ of the prior scale: latents that far out
        are outside what the generator was trained on.
    min_classes
        Fewer present classes than this is ``few-classes`` (no centroid separation to judge).
    min_kid_images
        The KID needs at least this many round images (and as many prior images): its subsets are half the
        smaller set, and fewer than 4 images per subset make it mostly noise. Below it ``kid`` is null.
    max_rows
        At most this many aligned rows (a seeded subset) and prior draws enter the MMD, so the report's cost
        is bounded whatever the federation's size.
    prior_repeats
        Both MMDs are averaged over this many independent prior draws (and pairs of draws).
    kid_prior_images
        Images of prior draws the KID compares the round's images with.
    kid_subsets
        KID subsets (their mean and standard deviation are ``kid`` and ``kid_std``).
    norm_coverage
        The norm band is the central ``norm_coverage`` of the prior draws' norms: 0.99, so a centroid drawn
        from the prior itself falls outside 1 % of the time (W = 256, N(0, I): [14.2, 17.8]), while the
        paper's objective put the class held by one client at norm 40–90 (docs/architecture.md).
    norm_band_draws
        Prior draws the band is read from: 4096 leave ≈ 20 draws in each 0.5 % tail, so the band's ends move
        by < 0.1 of a norm between seeds (W = 256).
    """

    collapse_fraction: float = 0.1
    off_manifold_ratio: float = 3.0
    min_classes: int = 2
    min_kid_images: int = 8
    max_rows: int = 512
    prior_repeats: int = 8
    kid_prior_images: int = 32
    kid_subsets: int = 50
    norm_coverage: float = TYPICAL_COVERAGE
    norm_band_draws: int = NORM_BAND_DRAWS

    def __post_init__(self) -> None:
        if not 0 < self.norm_coverage < 1 or self.norm_band_draws < 2:
            raise ValueError("norm_coverage must lie in (0, 1) and norm_band_draws be ≥ 2")
        if self.collapse_fraction <= 0 or self.off_manifold_ratio <= 1:
            raise ValueError("collapse_fraction must be > 0 and off_manifold_ratio > 1")
        if min(self.min_classes, self.min_kid_images, self.max_rows, self.prior_repeats) < 1:
            raise ValueError("min_classes, min_kid_images, max_rows and prior_repeats must be positive")
        if self.max_rows < 2 or self.kid_subsets < 1 or self.kid_prior_images < 0:
            raise ValueError("max_rows must be ≥ 2, kid_subsets ≥ 1, kid_prior_images ≥ 0")


@dataclass(frozen=True)
class QualityResult:
    """The report (JSON-ready, keys `REPORT_KEYS`) and its PCA picture (PNG bytes)."""

    report: dict[str, Any]
    png: bytes

    def to_json(self) -> bytes:
        return (json.dumps(self.report, indent=1) + "\n").encode()


def quality_report(
    aligned: torch.Tensor,
    class_ids: torch.Tensor,
    counts: torch.Tensor,
    centroids: torch.Tensor,
    present: torch.Tensor,
    sample_prior: Callable[[int], torch.Tensor],
    *,
    images: torch.Tensor | None = None,
    prior_images: torch.Tensor | None = None,
    multipliers: Sequence[float] = DEFAULT_BANDWIDTH_MULTIPLIERS,
    thresholds: QualityThresholds | None = None,
    seed: int = 0,
    title: str = "F(prototypes) vs the generator's prior",
    owners: torch.Tensor | None = None,
) -> QualityResult:
    """The quality report of one round.

    Parameters
    ----------
    aligned, class_ids, counts
        ``(n, W)`` F(prototypes) after the round's alignment, their ``(n,)`` classes and sample counts.
    centroids, present
        ``(C, W)`` class centroids and the ``(C,)`` bool mask of classes present this round.
    sample_prior
        ``n → (n, W)`` fresh prior draws; it owns its (seeded) random stream.
    images, prior_images
        The round's generated images and images of prior draws by the same generator (``(m, 3, H, W)`` in
        [0, 1]); the KID is null unless both hold at least ``min_kid_images``.
    multipliers
        The aligner's bandwidth multipliers.
    seed
        Seeds the row subset (above ``max_rows``); the caller's global random state is left as it was.
    owners
        ``(n,)`` which upload (client) each row came from, for the per-class ``holders``; without it every
        row counts as its own holder (a client uploads at most one row per class).
    """
    t = thresholds or QualityThresholds()
    rows = aligned.detach().double().cpu()
    ids = class_ids.detach().cpu().long()
    weights = counts.detach().cpu().double()
    cents = centroids.detach().double().cpu()
    mask = present.detach().cpu().bool()
    n = rows.shape[0]
    if n == 0:
        raise ValueError("the quality report needs at least one aligned row")
    g = torch.Generator().manual_seed(seed)
    pick = torch.arange(n) if n <= t.max_rows else torch.randperm(n, generator=g)[: t.max_rows]
    subset = rows[pick]
    size = subset.shape[0]

    # One plain prior draw per repeat for F(P), and per repeat a pair for the floor: a plain draw and a
    # draw shaped like the rows (one prior point per class, repeated over that class's rows) — what an
    # ideal F gives: rows of a class at their centroid, centroids distributed as the prior.
    sub_ids = ids[pick]
    _, slot = torch.unique(sub_ids, return_inverse=True)
    classes_in_subset = int(slot.max()) + 1
    draws = [sample_prior(size).detach().double().cpu() for _ in range(2 * t.prior_repeats)]
    shaped = [
        sample_prior(max(classes_in_subset, 2)).detach().double().cpu()[slot] for _ in range(t.prior_repeats)
    ]
    bank = torch.cat(draws)
    bandwidths = prior_bandwidths(bank, tuple(multipliers))
    prior_scale = math.sqrt(float(prior_bandwidths(bank, (1.0,))[0]))  # sqrt(h₀)
    to_prior = _mean(mmd2_rbf(subset, draws[i], bandwidths, unbiased=False) for i in range(t.prior_repeats))
    floor = _mean(
        mmd2_rbf(shaped[i], draws[t.prior_repeats + i], bandwidths, unbiased=False)
        for i in range(t.prior_repeats)
    )
    ratio = to_prior / max(floor, _TINY)

    kept = mask.nonzero().flatten()
    present_centroids = cents[kept]
    min_d: float | None = None
    mean_d: float | None = None
    if kept.numel() >= 2:
        d = torch.cdist(present_centroids, present_centroids)
        upper = d[torch.triu_indices(kept.numel(), kept.numel(), offset=1).unbind()]
        min_d = float(upper.min()) / prior_scale
        mean_d = float(upper.mean()) / prior_scale
    spread: dict[str, float] = {}
    for c in kept.tolist():
        mine = ids == c
        if bool(mine.any()):
            dist = (rows[mine] - cents[c]).norm(dim=1)
            w = weights[mine]
            spread[str(c)] = float((dist * w).sum() / w.sum().clamp_min(_TINY)) / prior_scale

    band = NormBand.from_draws(sample_prior(t.norm_band_draws), t.norm_coverage)
    owner_of = None if owners is None else owners.detach().cpu().long().tolist()
    norms = cents.norm(dim=1)
    distance = band.distance(norms) / prior_scale
    classes: dict[str, dict[str, Any]] = {}
    for c in kept.tolist():
        mine = (ids == c).nonzero().flatten().tolist()
        classes[str(c)] = {
            "norm": float(norms[c]),
            "distance": float(distance[c]),
            "rows": len(mine),
            "holders": len(mine) if owner_of is None else len({owner_of[i] for i in mine}),
            "inside": bool(distance[c] == 0),
        }
    off_classes = [int(c) for c, facts in classes.items() if not facts["inside"]]

    kid: float | None = None
    kid_std: float | None = None
    if (
        images is not None
        and prior_images is not None
        and min(len(images), len(prior_images)) >= t.min_kid_images
    ):
        kid, kid_std = _kid(prior_images, images, subsets=t.kid_subsets)

    verdict, line = _verdict(
        t, int(kept.numel()), ratio, min_d, [(c, classes[str(c)]) for c in off_classes], band
    )
    report: dict[str, Any] = {
        "mmd_to_prior": to_prior,
        "mmd_prior_to_prior": floor,
        "mmd_ratio": ratio,
        "prior_scale": prior_scale,
        "centroid_min_distance": min_d,
        "centroid_mean_distance": mean_d,
        "class_spread": spread,
        "norm_band": {"lo": band.lo, "hi": band.hi, "median": band.median, "coverage": band.coverage},
        "classes": classes,
        "off_manifold_classes": off_classes,
        "kid": kid,
        "kid_std": kid_std,
        "verdict": verdict,
        "verdict_line": line,
        "thresholds": asdict(t),
    }
    picture = pca_png(
        subset,
        sub_ids,
        present_centroids,
        kept,
        draws[0],
        title=f"{title}\n{verdict} (MMD ratio {ratio:.2f})",
    )
    return QualityResult(report=report, png=picture)


def quality_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The report's headline numbers as round metrics: ``quality_mmd_ratio``,
    ``quality_off_manifold_classes`` (how many), and ``quality_centroid_min_distance`` and ``quality_kid``
    where they are defined."""
    out = {
        "quality_mmd_ratio": float(report["mmd_ratio"]),
        "quality_off_manifold_classes": float(len(report.get("off_manifold_classes", []))),
    }
    for key, name in (("centroid_min_distance", "quality_centroid_min_distance"), ("kid", "quality_kid")):
        if report.get(key) is not None:
            out[name] = float(report[key])
    return out


def _kid(prior_images: torch.Tensor, images: torch.Tensor, *, subsets: int) -> tuple[float, float]:
    """`ktl.pretrain.kid_report` of the round's images against the prior's, always in the feature space of
    ``RandomConvFeatures(0)`` (the one ``ktl pretrain-generator`` reports in), so rounds compare. It seeds torch's global
    generators, which also reseeds CUDA's when CUDA is in use: their states are saved and restored around
    it (the CPU's too), so the training that follows draws exactly what it would have drawn without it."""
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchmetrics: "KID keeps its features" (a few dozen)
        scores = kid_report(
            prior_images.float().cpu(), {"round": images.float().cpu()}, seed=0, subsets=subsets
        )
    return scores["round"]["kid"], scores["round"]["kid_std"]


def _mean(values: Any) -> float:
    items = [float(v) for v in values]
    return max(sum(items) / len(items), 0.0)


def _verdict(
    t: QualityThresholds,
    classes: int,
    ratio: float,
    min_d: float | None,
    off: list[tuple[int, dict[str, Any]]],
    band: NormBand,
) -> tuple[str, str]:
    if classes < t.min_classes or min_d is None:
        return (
            "few-classes",
            f"few-classes: {classes} class{'es' if classes != 1 else ''} present (at least {t.min_classes} "
            f"needed to judge how far apart the classes are); MMD ratio {ratio:.2f}",
        )
    if min_d < t.collapse_fraction:
        return (
            "collapsed",
            f"collapsed: class centroids nearly coincide (min centroid distance {min_d:.3f} of the prior "
            f"scale < {t.collapse_fraction:g}); their images will look alike; MMD ratio {ratio:.2f}",
        )
    if off:
        named = ", ".join(
            f"{c} (norm {f['norm']:.1f}, {f['holders']} holder{'s' if f['holders'] != 1 else ''})"
            for c, f in off
        )
        return (
            "off-manifold",
            f"off-manifold: class{'es' if len(off) > 1 else ''} {named} outside the prior's "
            f"{band.coverage:.0%} norm band [{band.lo:.1f}, {band.hi:.1f}]; MMD ratio {ratio:.2f}, min centroid "
            f"distance {min_d:.2f} of the prior scale",
        )
    if ratio > t.off_manifold_ratio:
        return (
            "off-manifold",
            f"off-manifold: F(prototypes) far from the generator's prior (MMD ratio {ratio:.2f} > "
            f"{t.off_manifold_ratio:g}); min centroid distance {min_d:.2f} of the prior scale",
        )
    return (
        "ok",
        f"ok: F(prototypes) in distribution (MMD ratio {ratio:.2f}), every class centroid in the prior's "
        f"{band.coverage:.0%} norm band [{band.lo:.1f}, {band.hi:.1f}], classes kept apart (min centroid "
        f"distance {min_d:.2f} of the prior scale)",
    )


def pca_2d(*groups: torch.Tensor) -> list[torch.Tensor]:
    """Project every group of ``(n_i, W)`` rows onto the top two principal axes of all rows together."""
    rows = torch.cat([g.float() for g in groups])
    mean = rows.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(rows - mean, full_matrices=False)
    axes = v[:2].T
    if axes.shape[1] < 2:  # one-dimensional rows: the second axis is zero
        axes = torch.cat([axes, torch.zeros_like(axes)], dim=1)
    return [(g.float() - mean) @ axes for g in groups]


def pca_png(
    aligned: torch.Tensor,
    class_ids: torch.Tensor,
    centroids: torch.Tensor,
    centroid_ids: torch.Tensor,
    prior: torch.Tensor,
    *,
    title: str,
) -> bytes:
    """A PNG (matplotlib, Agg canvas: no global backend is set) of F(prototypes) coloured by class, the
    class centroids (crosses) and prior draws (grey), on the top two principal axes of all of them."""
    p_rows, p_cents, p_prior = pca_2d(aligned, centroids, prior)
    fig = Figure(figsize=(5.5, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.scatter(p_prior[:, 0], p_prior[:, 1], s=8, c="0.7", label="prior draws")
    colours = [f"C{int(c) % 10}" for c in class_ids.tolist()]
    ax.scatter(p_rows[:, 0], p_rows[:, 1], s=18, c=colours, alpha=0.8, label="F(prototypes)")
    ax.scatter(
        p_cents[:, 0],
        p_cents[:, 1],
        s=90,
        marker="X",
        c=[f"C{int(c) % 10}" for c in centroid_ids.tolist()] or "k",
        edgecolors="black",
        linewidths=0.8,
        label="class centroids",
    )
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(loc="best", fontsize=8)
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.11, top=0.88)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
