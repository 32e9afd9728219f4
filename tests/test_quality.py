"""The alignment quality report (ktl.quality): verdicts on constructed rounds, finite numbers, the PCA
picture, the KID, isolation from the server's random streams, and the files a FedKTL run writes."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ktl import inspect as ki
from ktl.aligner import AlignerSettings
from ktl.clients import simplex_etf
from ktl.config import build_config
from ktl.generator import GeneratorSpec, load_generator
from ktl.methods import KnowledgeTransferServer
from ktl.quality import REPORT_KEYS, VERDICTS, QualityThresholds, quality_metrics, quality_report
from ktl.records import Prototypes
from ktl.simulate import run_simulation

W = 64
C = 6
ROWS_PER_CLASS = 3
SCALE = math.sqrt(2 * W)  # the prior scale of N(0, I_W)


def prior_sampler(seed: int = 11) -> Callable[[int], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return lambda n: torch.randn(n, W, generator=g)


def round_from(rows: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Aligned rows with unit counts, their class centroids and the present mask."""
    centroids = torch.zeros(C, W)
    present = torch.zeros(C, dtype=torch.bool)
    for c in ids.unique().tolist():
        centroids[c] = rows[ids == c].mean(0)
        present[c] = True
    counts = torch.ones(len(ids), dtype=torch.int64)
    return {"aligned": rows, "class_ids": ids, "counts": counts, "centroids": centroids, "present": present}


def ideal_rows(seed: int = 0, noise: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """Every class's rows near one prior draw (clients agree; centroids distributed as the prior)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(C).repeat(ROWS_PER_CLASS)
    centres = torch.randn(C, W, generator=g)
    return centres[ids] + noise * torch.randn(len(ids), W, generator=g), ids


def report_of(rows: torch.Tensor, ids: torch.Tensor, **kw: Any) -> dict[str, Any]:
    return quality_report(**round_from(rows, ids), sample_prior=prior_sampler(), **kw).report


def assert_finite(report: dict[str, Any]) -> None:
    assert tuple(report) == REPORT_KEYS
    numbers = [report[k] for k in REPORT_KEYS[:6] + ("kid", "kid_std") if report[k] is not None]
    numbers += list(report["class_spread"].values())
    assert numbers and all(isinstance(x, float) and math.isfinite(x) for x in numbers)
    assert report["mmd_to_prior"] >= 0 and report["mmd_prior_to_prior"] > 0
    assert report["verdict"] in VERDICTS and report["verdict_line"].startswith(report["verdict"] + ":")
    json.dumps(report, allow_nan=False)  # JSON-ready, nothing infinite


def test_rows_from_the_prior_with_separated_centroids_are_ok() -> None:
    rows, ids = ideal_rows()
    report = report_of(rows, ids)
    assert_finite(report)
    assert report["verdict"] == "ok", report["verdict_line"]
    assert 0.7 < report["mmd_ratio"] < 1.5
    assert abs(report["prior_scale"] - SCALE) < 0.1 * SCALE
    assert (
        report["centroid_min_distance"] > 0.5
        and report["centroid_mean_distance"] >= report["centroid_min_distance"]
    )
    assert set(report["class_spread"]) == {str(c) for c in range(C)}
    assert all(s < 0.05 for s in report["class_spread"].values())  # the clients agree
    assert report["kid"] is None and report["kid_std"] is None  # no images given
    assert report["thresholds"]["off_manifold_ratio"] == QualityThresholds().off_manifold_ratio


def test_equal_centroids_are_collapsed() -> None:
    g = torch.Generator().manual_seed(1)
    ids = torch.arange(C).repeat(ROWS_PER_CLASS)
    rows = torch.randn(1, W, generator=g) + 0.01 * torch.randn(len(ids), W, generator=g)
    report = report_of(rows, ids)
    assert_finite(report)
    assert report["verdict"] == "collapsed", report["verdict_line"]
    assert report["centroid_min_distance"] < QualityThresholds().collapse_fraction


def test_rows_shifted_far_from_the_prior_are_off_manifold() -> None:
    rows, ids = ideal_rows()
    shift = 3 * SCALE / math.sqrt(W)  # every coordinate: three prior scales in all
    report = report_of(rows + shift, ids)
    assert_finite(report)
    assert report["verdict"] == "off-manifold", report["verdict_line"]
    assert report["mmd_ratio"] > 3 * report_of(rows, ids)["mmd_ratio"]
    assert report["centroid_min_distance"] > 0.5  # the classes are still apart: it is not a collapse


def test_one_class_is_few_classes_with_no_centroid_distances() -> None:
    rows, ids = ideal_rows()
    one = ids == 2
    report = report_of(rows[one], ids[one])
    assert_finite(report)
    assert report["verdict"] == "few-classes"
    assert report["centroid_min_distance"] is None and report["centroid_mean_distance"] is None
    assert list(report["class_spread"]) == ["2"]


def test_class_spread_is_count_weighted_distance_to_the_centroid() -> None:
    ids = torch.tensor([0, 0, 1, 1])
    rows = torch.zeros(4, W)
    rows[1, 0] = 4.0  # class 0: rows at 0 and 4 along one axis
    rows[2:, 1] = torch.tensor([1.0, -1.0])  # class 1: ±1, centroid at 0
    rnd = round_from(rows, ids)
    rnd["counts"] = torch.tensor([3, 1, 5, 5])
    rnd["centroids"][0, 0] = 1.0  # the count-weighted centroid of class 0: (3·0 + 1·4) / 4
    report = quality_report(**rnd, sample_prior=prior_sampler()).report
    spread = {c: s * report["prior_scale"] for c, s in report["class_spread"].items()}
    assert spread["0"] == pytest.approx((3 * 1.0 + 1 * 3.0) / 4, rel=1e-6)
    assert spread["1"] == pytest.approx(1.0, rel=1e-6)


def test_the_pca_picture_decodes_as_a_png() -> None:
    rows, ids = ideal_rows()
    result = quality_report(**round_from(rows, ids), sample_prior=prior_sampler())
    image = Image.open(io.BytesIO(result.png))
    assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
    assert len(set(image.convert("RGB").getdata())) > 10  # something is drawn


def test_kid_is_null_below_the_minimum_and_separates_unlike_images() -> None:
    rows, ids = ideal_rows()
    g = torch.Generator().manual_seed(2)
    prior_images = torch.rand(32, 3, 16, 16, generator=g)
    like = torch.rand(12, 3, 16, 16, generator=g)
    unlike = torch.zeros(12, 3, 16, 16)
    few = report_of(rows, ids, images=like[:7], prior_images=prior_images)
    assert few["kid"] is None and QualityThresholds().min_kid_images == 8
    same = report_of(rows, ids, images=like, prior_images=prior_images)
    apart = report_of(rows, ids, images=unlike, prior_images=prior_images)
    assert_finite(same)
    assert_finite(apart)
    assert apart["kid"] > 10 * abs(same["kid"]) and apart["kid"] > same["kid"] + 3 * same["kid_std"]


def test_many_rows_are_capped_and_the_global_random_state_is_untouched() -> None:
    g = torch.Generator().manual_seed(3)
    ids = torch.arange(C).repeat(100)
    rows = torch.randn(C, W, generator=g)[ids] + 0.05 * torch.randn(len(ids), W, generator=g)
    drawn: list[int] = []
    sample = prior_sampler()

    def counting(n: int) -> torch.Tensor:
        drawn.append(n)
        return sample(n)

    state = torch.get_rng_state()
    t = QualityThresholds(max_rows=64, norm_band_draws=64)
    report = quality_report(
        **round_from(rows, ids),
        sample_prior=counting,
        thresholds=t,
        images=torch.rand(8, 3, 8, 8, generator=g),
        prior_images=torch.rand(8, 3, 8, 8, generator=g),
    ).report
    assert torch.equal(torch.get_rng_state(), state)
    assert max(drawn) == 64
    assert_finite(report)
    assert report["verdict"] == "ok" and report["kid"] is not None


def test_quality_metrics_hold_the_headline_numbers() -> None:
    rows, ids = ideal_rows()
    report = report_of(rows, ids)
    metrics = quality_metrics(report)
    assert metrics == {
        "quality_mmd_ratio": report["mmd_ratio"],
        "quality_off_manifold_classes": 0.0,
        "quality_centroid_min_distance": report["centroid_min_distance"],
    }
    one = ids == 0
    assert set(quality_metrics(report_of(rows[one], ids[one]))) == {
        "quality_mmd_ratio",
        "quality_off_manifold_classes",
    }


def test_each_class_has_its_norm_distance_rows_and_holders() -> None:
    rows, ids = ideal_rows()
    owners = torch.arange(len(ids)) // C  # ROWS_PER_CLASS clients, each with one row of every class
    report = report_of(rows, ids, owners=owners)
    band = report["norm_band"]
    # N(0, I_64): norms ≈ 8 ± 0.71, so the central 99 % lies near 8 ∓ 2.58·0.71 (loose: 4096 draws).
    assert band["coverage"] == 0.99 and 5.6 < band["lo"] < 6.6 < band["median"] < 8.5 < band["hi"] < 10.2
    assert set(report["classes"]) == {str(c) for c in range(C)} and report["off_manifold_classes"] == []
    for c, facts in report["classes"].items():
        centroid = rows[ids == int(c)].mean(0)
        assert facts["norm"] == pytest.approx(float(centroid.norm()), rel=1e-5)
        assert facts["rows"] == ROWS_PER_CLASS and facts["holders"] == ROWS_PER_CLASS
        assert facts["inside"] == (band["lo"] <= facts["norm"] <= band["hi"]) and facts["distance"] == 0
    one_client = report_of(rows, ids, owners=torch.zeros(len(ids), dtype=torch.int64))
    assert all(f["holders"] == 1 and f["rows"] == ROWS_PER_CLASS for f in one_client["classes"].values())


def test_a_single_class_off_the_norm_band_makes_the_round_off_manifold_and_is_named() -> None:
    rows, ids = ideal_rows()
    far, near = ids == 4, ids == 1
    rows[far] *= 3.0  # class 4's centroid at ≈ 3× the typical norm
    rows[near] *= 0.3  # class 1's at ≈ 0.3×: inside the shell is off the typical set too
    report = report_of(rows, ids)
    assert_finite(report)
    assert report["mmd_ratio"] < QualityThresholds().off_manifold_ratio  # the MMD alone would say "ok"
    assert report["verdict"] == "off-manifold" and report["off_manifold_classes"] == [1, 4]
    assert "classes 1 (norm" in report["verdict_line"] and ", 4 (norm" in report["verdict_line"]
    band, four = report["norm_band"], report["classes"]["4"]
    assert not four["inside"]
    assert four["distance"] == pytest.approx((four["norm"] - band["hi"]) / report["prior_scale"])
    assert report["classes"]["0"]["inside"]


def imbalanced_uploads(clients: int = 6) -> dict[str, Prototypes]:
    """Classes 0–8 held by every client, class 9 by the first one only (the issue's pathological case)."""
    etf = simplex_etf(10, seed=0)
    out = {}
    for i in range(clients):
        classes = list(range(9)) + ([9] if i == 0 else [])
        g = torch.Generator().manual_seed(i)
        vectors = F.normalize(etf.T[classes] + 0.3 * torch.randn(len(classes), 10, generator=g), dim=1)
        counts = torch.randint(5, 50, (len(classes),), generator=g)
        out[f"c{i}"] = Prototypes(vectors, torch.tensor(classes), counts)
    return out


@pytest.mark.parametrize("objective", ["paper", "balanced"])
def test_a_class_one_client_holds_is_flagged_with_the_paper_objective_and_kept_on_the_manifold_by_balanced(
    objective: str,
) -> None:
    server = KnowledgeTransferServer.create(
        num_classes=10,
        proto_dim=10,
        generator=load_generator(GeneratorSpec()),  # the embedded generator: N(0, I_256) prior
        aligner_settings=AlignerSettings(steps=100, objective=objective),
        seed=0,
    )
    result = server.run_round(imbalanced_uploads(), round_index=1)
    report = server.quality(result, 1).report
    nine = report["classes"]["9"]
    assert (nine["rows"], nine["holders"], report["classes"]["0"]["holders"]) == (1, 1, 6)
    # paper: class 9 drifts out of the shell (measured: norm 55 against a band ending at 17.9)
    if objective == "paper":
        assert 9 in report["off_manifold_classes"] and report["verdict"] == "off-manifold"
        assert "9 (norm" in report["verdict_line"] and "1 holder)" in report["verdict_line"]
    else:  # every class inside the prior's 99 % norm band, and the classes still apart (distinct images)
        assert report["off_manifold_classes"] == [] and report["verdict"] == "ok", report["verdict_line"]
        assert report["centroid_min_distance"] > 0.5


def uploads() -> dict[str, Prototypes]:
    etf = simplex_etf(10, seed=0)
    out = {}
    for i, classes in enumerate(([0, 1, 2, 3, 4], [3, 4, 5, 6, 7], [6, 7, 8, 9, 0])):
        g = torch.Generator().manual_seed(i)
        vectors = F.normalize(etf.T[classes] + 0.1 * torch.randn(5, 10, generator=g), dim=1)
        out[f"c{i}"] = Prototypes(vectors, torch.tensor(classes), torch.randint(1, 30, (5,), generator=g))
    return out


def test_the_report_leaves_the_servers_rounds_unchanged() -> None:
    def server() -> KnowledgeTransferServer:
        return KnowledgeTransferServer.create(
            num_classes=10,
            proto_dim=10,
            generator=load_generator(GeneratorSpec()),
            aligner_settings=AlignerSettings(steps=10, prior_samples=64, bandwidth_samples=256),
            seed=5,
        )

    plain, reported = server(), server()
    ups = uploads()
    first = reported.run_round(ups, round_index=1)
    quality = reported.quality(first, 1)
    assert quality.report["kid"] is not None  # 10 images: enough for the KID
    assert_finite(quality.report)
    assert torch.equal(plain.run_round(ups, round_index=1).centroids, first.centroids)
    torch.testing.assert_close(
        plain.run_round(ups, round_index=2).centroids,
        reported.run_round(ups, round_index=2).centroids,
        rtol=0,
        atol=0,
    )
    again = reported.quality(first, 1)
    assert again.report == quality.report  # its own seeded stream: the same report for the same round


def test_a_fedktl_simulation_writes_the_quality_files(tmp_path: Path) -> None:
    config = build_config(
        overrides={
            "rounds": 1,
            "num_clients": 2,
            "models": ["cnn4"],
            "data": {"dataset": "synthetic", "fraction": 0.2, "alpha": 1.0},
            "client": {"batch_size": 32},
            "aligner": {"steps": 10, "prior_samples": 64, "bandwidth_samples": 256},
            "out": str(tmp_path / "run"),
        }
    )
    run_simulation(config, progress=False)
    run = tmp_path / "run"
    report = json.loads((run / "rounds" / "quality-0001.json").read_text())
    assert_finite(report)
    assert (run / "rounds" / "quality-0001.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run / "quality.json").read_text()) == report  # the last round's, as published
    assert ki.load_quality(run, 1) == report and ki.RunView(run).quality(2) is None
    metrics = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert metrics["quality_mmd_ratio"] == report["mmd_ratio"] and metrics["quality_seconds"] > 0


def test_inspect_lists_each_class_against_the_norm_band() -> None:
    rows, ids = ideal_rows()
    rows[ids == 4] *= 3.0
    report = report_of(rows, ids)
    lines = ki.class_typicality(report, [f"c{i}" for i in range(C)])
    assert lines[0].startswith("prior's 99% norm band: [") and len(lines) == 1 + C
    assert "class 4 c4: norm" in lines[5] and "OFF-MANIFOLD" in lines[5]
    assert lines[1].endswith(": ok") and "3 rows, 3 holders" in lines[1]
    assert ki.class_typicality({"verdict": "ok"}) == []  # a report written before per-class typicality
