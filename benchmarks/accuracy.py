"""``ktl bench accuracy``: every method in the same harness, side by side, mean ± std over seeds.

A *suite* is scenarios × variants × seeds. Every run is an ordinary ``ktl simulate`` run (same models,
data, partitions, local budget and seeds for every variant of a scenario), written to
``RUNS/<suite>-<profile>/<scenario>/<variant>-s<seed>/``; a run whose ``summary.json`` exists is not
run again, so an interrupted suite resumes where it stopped. The table is built from the run folders:
last-round and best-round accuracy (test-sample-weighted over clients, %), bytes up and down per client
per round, wall time per run. ``--write docs/results.md`` replaces the suite's section there and draws
one PNG per scenario (mean accuracy per round, ± std shaded).

Statistics (`paired_difference`): beside the last round, each run's mean over its last ``--last-k`` rounds
(less noisy than one round); each variant's paired difference to the suite's reference variant, seed by
seed (same data, partitions and initialisations: the seed's noise cancels), with a 95 % Student-t
interval over the seeds both ran; a difference is *significant* when its interval excludes 0, and the table
says which are, per scenario. The default is 5 seeds: with 3, the t-interval's half-width is 4.3 standard
errors.

Global test set: every run is also scored on a held-out set of Fashion-MNIST images that no client trains
or tests on, the same images for every method and seed (``data.global_test_size``: 1 000 on the cpu
profile, 10 000 on the gpu ones; ``study.global_eval_rounds``: the last 3 rounds). Each client's model is
scored on all of it and the clients' mean is the run's ``global_accuracy`` (metrics.jsonl); the table shows
its last-k mean ± std and its paired difference to the reference beside the clients' own splits. A
client's own split holds the few classes it trains on; the global set holds all ten, so it asks how much a
client learnt beyond its own classes — what knowledge transfer is for.

Profiles: ``cpu`` finishes the main suite in about an hour on 2 cores (the cpu-small zoo and local
budget, 15 rounds, "all data" scaled to 25 %); ``gpu`` is closer to the paper (the gpu preset: all of
Fashion-MNIST, the paper's local training, ResNet-18 in the zoo, 100 rounds); ``gpu-htfe8`` is the gpu
profile with HtFLlib's HtFE8 model family (``--models htfe8``), the heterogeneous setting its papers report.
The main suite compares every method: local, FedProto, FedTGP, FD, LG-FedAvg, FedGH, FedGen, FML, FedKD
and FedKTL.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ktl.benchmarks.common import machine, run_metrics, write_section
from ktl.config import build_config
from ktl.host import describe
from ktl.simulate import run_simulation

__all__ = [
    "PROFILES",
    "SUITES",
    "Scenario",
    "Suite",
    "Variant",
    "add_arguments",
    "main",
    "paired_difference",
    "summarize",
    "t_quantile_975",
]

logger = logging.getLogger("ktl.bench.accuracy")


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    overrides: dict[str, Any]  # nested config overrides on top of the profile
    profile_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # profile → more overrides


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: dict[str, Any]  # nested config overrides, including the method


@dataclass(frozen=True)
class Suite:
    name: str
    title: str
    scenarios: tuple[Scenario, ...]
    variants: tuple[Variant, ...]
    reference: str | None = None  # the variant the others are compared with ("Δ vs" column)


# The held-out global test set every run of a profile is also scored on (data.global_test_size; the
# same images for every method and seed), in the last 3 rounds (study.global_eval_rounds' default). On
# the cpu profile 1 000 images: scoring 20 clients on 2 000 took 11.0 s a round on one core (0.56 s for
# their own splits), so 1 000 in 3 of 15 rounds adds ~16 s to a run of ~100–200 s; a GPU scores the
# size of Fashion-MNIST's official test split for little.
_GLOBAL_CPU = {"data": {"global_test_size": 1000}}
_GLOBAL_GPU = {"data": {"global_test_size": 10_000}}

# profile → (preset, overrides applied to every run)
PROFILES: dict[str, tuple[str, dict[str, Any]]] = {
    "cpu": ("cpu-small", {"rounds": 15, **_GLOBAL_CPU}),
    "gpu": ("gpu", {**_GLOBAL_GPU}),
    # HtFLlib's HtFE8 family (4-layer CNN, GoogLeNet, MobileNetV2, ResNet-18/34/50/101/152) on all of
    # Fashion-MNIST: the heterogeneous setting its papers report, for a GPU box
    "gpu-htfe8": ("gpu", {"models": ["htfe8"], **_GLOBAL_GPU}),
}

_ALL = Scenario(
    "dir-all",
    "Dirichlet 0.1, all the data",
    {"data": {"partition": "dirichlet", "alpha": 0.1, "fraction": 1.0}},
    {"cpu": {"data": {"fraction": 0.25}}},  # 2 cores: a quarter of Fashion-MNIST stands in for all
)
_LOW = Scenario(
    "dir-lowdata",
    "Dirichlet 0.1, low data (10 % of Fashion-MNIST)",
    {"data": {"partition": "dirichlet", "alpha": 0.1, "fraction": 0.1}},
)
_PATHOLOGICAL = Scenario(
    "pathological",
    "Pathological, 2 classes per client (10 % of the data)",
    {"data": {"partition": "pathological", "classes_per_client": 2, "fraction": 0.1}},
    {"gpu": {"data": {"fraction": 1.0}}},
)


def _few_shot(shots: int) -> Scenario:
    return Scenario(
        f"one-client-{shots}shot",
        f"One client, {shots} labelled samples per class (test: its 25 % split of 10 % of the data)",
        {"num_clients": 1, "data": {"fraction": 0.1, "shots": shots}, "client": {"batch_size": 10}},
    )


_BASELINES = tuple(
    Variant(m, {"method": m})
    for m in (
        "local",
        "fedproto",
        "fedtgp",
        "fd",
        "lg-fedavg",
        "fedgh",
        "fedgen",
        "fml",
        "fedkd",
        "fedmrl",
        "fedktl",
    )
)
_FEDKTL = Variant("fedktl", {"method": "fedktl"})
# the paper's alignment objective (the default, balanced, keeps every class on the manifold)
_PAPER_OBJECTIVE = Variant("paper-objective", {"method": "fedktl", "aligner": {"objective": "paper"}})

SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite(
            "main",
            "Baselines and FedKTL",
            (_LOW, _ALL, _PATHOLOGICAL),
            (*_BASELINES, _PAPER_OBJECTIVE),  # FedKTL with either alignment objective beside the baselines
            reference="local",
        ),
        Suite(
            "fewshot",
            "One client, few shots: with and without the server's pairs",
            (_few_shot(5), _few_shot(20)),
            (Variant("local", {"method": "local"}), _FEDKTL, _PAPER_OBJECTIVE),
            reference="local",
        ),
        Suite(
            "ablations",
            "FedKTL ablations (low data)",
            (_LOW,),
            (
                _FEDKTL,
                _PAPER_OBJECTIVE,
                Variant("no-mmd", {"method": "fedktl", "aligner": {"mmd_weight": 0.0}}),
                Variant("no-centroid-mse", {"method": "fedktl", "aligner": {"lam": 0.0}}),
                Variant("no-generator", {"method": "fedktl-latents"}),
                Variant("mu-0.2", {"method": "fedktl", "fedktl": {"mu": 0.2}}),
                Variant("mu-5", {"method": "fedktl", "fedktl": {"mu": 5.0}}),
                Variant("lambda-0.1", {"method": "fedktl", "aligner": {"lam": 0.1}}),
                Variant("lambda-10", {"method": "fedktl", "aligner": {"lam": 10.0}}),
                Variant("pairs-5", {"method": "fedktl", "fedktl": {"pairs_per_class": 5}}),
                Variant(
                    "pairs-5-kept-5",
                    {"method": "fedktl", "fedktl": {"pairs_per_class": 5}, "client": {"pairs_memory": 5}},
                ),
            ),
            reference="fedktl",
        ),
        Suite(
            "privacy",
            "Differential privacy on uploaded prototypes (low data; ε over the whole run, δ = 1e-5)",
            (_LOW,),
            (
                _FEDKTL,
                Variant("fedktl-eps8", {"method": "fedktl", "privacy": {"epsilon": 8.0}}),
                Variant("fedktl-eps1", {"method": "fedktl", "privacy": {"epsilon": 1.0}}),
                Variant("fedproto-eps8", {"method": "fedproto", "privacy": {"epsilon": 8.0}}),
                Variant("local", {"method": "local"}),
            ),
            reference="fedktl",
        ),
        Suite(
            "secagg",
            "Secure aggregation: the server sees only per-class sums (low data; ktl simulate sums in "
            "plaintext, SecAgg+ on Flower gives the same sum up to its quantisation)",
            (_LOW,),
            (
                Variant("fedproto", {"method": "fedproto"}),
                Variant("fedproto-secagg", {"method": "fedproto-secagg"}),
                # float32 on the wire both ways: plain and secure FedProto then see the same numbers.
                Variant("fedproto-fp32", {"method": "fedproto", "baseline": {"upload_dtype": "float32"}}),
                Variant(
                    "fedproto-secagg-fp32",
                    {"method": "fedproto-secagg", "baseline": {"upload_dtype": "float32"}},
                ),
                _FEDKTL,
                Variant("fedktl-secagg", {"method": "fedktl-secagg"}),
            ),
            reference="fedproto",
        ),
    )
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", default="main", choices=sorted(SUITES), help="which table (default main)")
    parser.add_argument(
        "--profile", default="cpu", choices=sorted(PROFILES), help="cpu (default), gpu or gpu-htfe8"
    )
    parser.add_argument(
        "--seeds", default="0,1,2,3,4", help="comma-separated seeds (default 0,1,2,3,4: paired 95 %% CIs)"
    )
    parser.add_argument(
        "--last-k",
        type=int,
        default=3,
        help="the table's second accuracy is each run's mean over its last K rounds (default 3)",
    )
    parser.add_argument("--runs", type=Path, default=Path("runs/bench-accuracy"), help="run folders go here")
    parser.add_argument("--device", default=None, help="override the profile's device (cpu, cuda, auto)")
    parser.add_argument("--rounds", type=int, default=None, help="override the profile's rounds")
    parser.add_argument(
        "--scenarios", default=None, help="comma-separated subset of the suite's scenarios (default: all)"
    )
    parser.add_argument(
        "--variants", default=None, help="comma-separated subset of the suite's variants (default: all)"
    )
    parser.add_argument(
        "--summarize-only", action="store_true", help="build the table from existing run folders only"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--write", type=Path, default=None, help="write the table (and plots) into this file")


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def _pick(items: tuple[Any, ...], names: str | None, what: str) -> list[Any]:
    if names is None:
        return list(items)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {i.name: i for i in items}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise SystemExit(f"ktl: error: unknown {what} {unknown[0]!r}; this suite has: {', '.join(known)}")
    return [known[n] for n in wanted]


def run_overrides(
    profile: str, scenario: Scenario, variant: Variant, seed: int, out: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """The nested overrides of one run: profile ← scenario ← its profile tweak ← variant ← seed, out."""
    _, base = PROFILES[profile]
    data = _merge(base, scenario.overrides)
    data = _merge(data, scenario.profile_overrides.get(profile, {}))
    data = _merge(data, variant.overrides)
    data = _merge(data, {"seed": seed, "out": str(out)})
    if args.device is not None:
        data["device"] = args.device
    if args.rounds is not None:
        data["rounds"] = args.rounds
    return data


def run_suite(args: argparse.Namespace) -> Path:
    """Run every missing (scenario, variant, seed) of the suite; returns the suite's folder."""
    suite = SUITES[args.suite]
    preset, _ = PROFILES[args.profile]
    seeds = [int(s) for s in args.seeds.split(",")]
    scenarios = _pick(suite.scenarios, args.scenarios, "scenario")
    variants = _pick(suite.variants, args.variants, "variant")
    root = args.runs / f"{suite.name}-{args.profile}"
    todo = []
    for scenario in scenarios:
        for variant in variants:
            for seed in seeds:
                out = root / scenario.name / f"{variant.name}-s{seed}"
                if not (out / "summary.json").is_file():
                    todo.append((scenario, variant, seed, out))
    # Validate every config before the first run starts, so a typo fails in a second, not an hour in.
    configs = [
        build_config(preset=preset, overrides=run_overrides(args.profile, sc, v, s, out, args))
        for sc, v, s, out in todo
    ]
    done = _finished_runs(args.runs)
    logger.info(
        "suite %s (%s): %d runs to do, %d already done",
        suite.name,
        args.profile,
        len(todo),
        len(scenarios) * len(variants) * len(seeds) - len(todo),
    )
    for (scenario, variant, seed, _), config in tqdm(
        list(zip(todo, configs, strict=True)), desc=suite.name, unit="run"
    ):
        out = Path(str(config.out))
        twin = done.get(_config_key(config))
        if twin is not None:  # the same resolved config already ran in another suite: same numbers
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(twin, out)
            (out / "reused_from.txt").write_text(f"{twin}\n")
            logger.info("%s / %s / seed %d: identical to %s, copied", scenario.name, variant.name, seed, twin)
            continue
        t0 = time.perf_counter()
        summary = run_simulation(config, overwrite=True, progress=False)
        logger.info(
            "%s / %s / seed %d: last %.2f %%, best %.2f %% (%.0f s)",
            scenario.name,
            variant.name,
            seed,
            100 * summary["final_accuracy"],
            100 * summary["best_accuracy"],
            time.perf_counter() - t0,
        )
    return root


def _config_key(config: Any) -> str:
    """A run's resolved config without its output folder and preset label: equal keys, equal runs."""
    data = json.loads(config.model_dump_json())
    data.pop("out", None)
    data.pop("preset", None)
    return json.dumps(data, sort_keys=True)


def _finished_runs(runs: Path) -> dict[str, Path]:
    """Every finished run folder under ``runs`` by its config key (for reuse across suites)."""
    from ktl.config import SimulateConfig

    found: dict[str, Path] = {}
    for summary in sorted(runs.glob("*/*/*/summary.json")):
        try:
            config = SimulateConfig.model_validate_json((summary.parent / "config.json").read_text())
        except (OSError, ValueError):
            continue
        found.setdefault(_config_key(config), summary.parent)
    return found


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# Student's t 0.975 quantiles for 1–30 degrees of freedom (standard tables); above 30 the Cornish–Fisher
# expansion around the normal quantile is within 1e-4 of them.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)  # fmt: skip
_Z975 = 1.959964


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` ≥ 1 degrees of freedom (a 95 % two-sided interval)."""
    if df < 1:
        raise ValueError("a t quantile needs at least one degree of freedom")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def paired_difference(values: dict[int, float], reference: dict[int, float]) -> dict[str, Any] | None:
    """The per-seed differences ``values[s] − reference[s]`` over the seeds both have: their mean, the 95 %
    t-interval ``mean ± t(n−1)·sd/√n`` (None with one seed), and ``significant`` (the interval excludes 0).
    None when no seed is shared."""
    seeds = sorted(set(values) & set(reference))
    if not seeds:
        return None
    diffs = [values[s] - reference[s] for s in seeds]
    mean = statistics.mean(diffs)
    ci: tuple[float, float] | None = None
    if len(diffs) > 1:
        half = t_quantile_975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
        ci = (mean - half, mean + half)
    significant = ci is not None and (ci[0] > 0 or ci[1] < 0)
    return {"seeds": seeds, "mean": mean, "ci95": ci, "significant": significant}


def _accuracies(run_dir: Path) -> tuple[list[float | None], list[float | None]]:
    """Per round: the accuracy on the clients' own splits, and on the global test set (None where a round
    was not scored on it; every None in a run that predates it)."""
    lines = run_metrics(run_dir)
    return [m["accuracy"] for m in lines], [m.get("global_accuracy") for m in lines]


def _last_k_mean(curve: list[float | None], k: int) -> float | None:
    """The mean of the values scored among the last ``k`` rounds, in %; None if none was."""
    scored = [a for a in curve[-k:] if a is not None]
    return 100 * statistics.mean(scored) if scored else None


def summarize(root: Path, suite: Suite, seeds: list[int] | None = None, last_k: int = 3) -> dict[str, Any]:
    """Per scenario and variant: accuracy (last, mean of the last ``last_k`` rounds, best, per round) mean ±
    std over the seeds found, and per seed; the mean of the last ``last_k`` rounds' accuracy on the global
    test set (``global_last_k``, from the seeds whose runs were scored on it); bytes per client per round,
    wall time. Per scenario, each variant's paired difference to the suite's reference
    (`paired_difference`) on the last round, the last-k mean and the global last-k mean, under
    ``"paired"``."""
    if last_k < 1:
        raise SystemExit("ktl: error: --last-k must be at least 1")
    out: dict[str, Any] = {"suite": suite.name, "scenarios": []}
    for scenario in suite.scenarios:
        rows = []
        for variant in suite.variants:
            runs = []
            for path in sorted((root / scenario.name).glob(f"{variant.name}-s*/summary.json")):
                name, _, tail = path.parent.name.rpartition("-s")
                if name != variant.name or not tail.isdigit():
                    continue  # another variant whose name starts with this one's (fedproto-secagg-s0)
                seed = int(tail)
                if seeds is None or seed in seeds:
                    runs.append((json.loads(path.read_text()), _accuracies(path.parent)))
            if not runs:
                continue
            summaries = [s for s, _ in runs]
            curves = [c for _, (c, _) in runs]
            length = min(len(c) for c in curves)
            per_seed: dict[int, dict[str, float]] = {}
            for s, (c, g) in runs:
                local_k = _last_k_mean(c, last_k)
                per_seed[s["seed"]] = {
                    "last": 100 * s["final_accuracy"],
                    "last_k": 100 * s["final_accuracy"] if local_k is None else local_k,
                }
                global_k = _last_k_mean(g, last_k)
                if global_k is not None:
                    per_seed[s["seed"]]["global_last_k"] = global_k
            global_seeds = sorted(seed for seed, v in per_seed.items() if "global_last_k" in v)
            rows.append(
                {
                    "variant": variant.name,
                    "method": summaries[0]["method"],
                    "seeds": sorted(s["seed"] for s in summaries),
                    "last": _mean_std([100 * s["final_accuracy"] for s in summaries]),
                    "last_k": _mean_std([v["last_k"] for v in per_seed.values()]),
                    "k": last_k,
                    "global_seeds": global_seeds,
                    "global_last_k": _mean_std([per_seed[seed]["global_last_k"] for seed in global_seeds])
                    if global_seeds
                    else None,
                    "per_seed": per_seed,
                    "best": _mean_std([100 * s["best_accuracy"] for s in summaries]),
                    "bytes_up": statistics.mean(s["bytes_up_per_client_round"] for s in summaries),
                    "bytes_down": statistics.mean(s["bytes_down_per_client_round"] for s in summaries),
                    "wall_s": statistics.mean(s["wall_time_s"] for s in summaries),
                    "curve": [_mean_std([100 * c[i] for c in curves]) for i in range(length)],
                    "privacy": summaries[0].get("privacy"),
                    "rounds": summaries[0]["rounds"],
                    "num_clients": summaries[0]["num_clients"],
                    "data": summaries[0]["data"],
                    "device": summaries[0]["device"],
                    "hosts": dict(Counter(describe(s.get("host"), s.get("versions")) for s in summaries)),
                }
            )
        if rows:
            out["scenarios"].append(
                {"name": scenario.name, "title": scenario.title, "rows": rows, "paired": _paired(rows, suite)}
            )
    return out


def _paired(rows: list[dict[str, Any]], suite: Suite) -> dict[str, dict[str, Any]]:
    """Variant → its paired differences to the reference on ``last``, ``last_k`` and ``global_last_k``
    (None where no seed has both; empty without a reference)."""
    ref = next((r for r in rows if r["variant"] == suite.reference), None)
    if ref is None or "per_seed" not in ref:
        return {}
    out = {}
    for r in rows:
        if r is ref or "per_seed" not in r:
            continue
        pairs = {
            key: paired_difference(
                {s: v[key] for s, v in r["per_seed"].items() if key in v},
                {s: v[key] for s, v in ref["per_seed"].items() if key in v},
            )
            for key in ("last", "last_k", "global_last_k")
        }
        if pairs["last"] is not None:
            out[r["variant"]] = pairs
    return out


def _diff(pair: dict[str, Any] | None) -> str:
    """``+1.23 [+0.40, +2.06]*`` (* significant), or the mean alone with one seed."""
    if pair is None:
        return "—"
    if pair["ci95"] is None:
        return f"{pair['mean']:+.2f} (one seed)"
    lo, hi = pair["ci95"]
    return f"{pair['mean']:+.2f} [{lo:+.2f}, {hi:+.2f}]{'*' if pair['significant'] else ''}"


def _significance(
    paired: dict[str, dict[str, Any]], reference: str, k: int, key: str = "last_k", on: str = ""
) -> str | None:
    """One sentence per scenario: which paired differences (the last-k mean, ``key``) are significant, which
    are not; ``on`` names the test set."""
    judged = {v: p[key] for v, p in paired.items() if p.get(key) and p[key]["ci95"] is not None}
    if not judged:
        return None
    yes = [f"{v} ({p['mean']:+.2f})" for v, p in judged.items() if p["significant"]]
    no = [v for v, p in judged.items() if not p["significant"]]
    seeds = min(len(p["seeds"]) for p in judged.values())
    return (
        f"Paired differences to {reference}{on} (mean of the last {k} rounds, ≥ {seeds} seeds, 95 % "
        f"t-interval): significant: {', '.join(yes) or 'none'}; not significant (interval contains 0): "
        f"{', '.join(no) or 'none'}."
    )


def _pm(value: tuple[float, float], seeds: list[int]) -> str:
    """``mean ± std`` over seeds; a single seed has no spread to show."""
    return f"{value[0]:.2f} ± {value[1]:.2f}" if len(seeds) > 1 else f"{value[0]:.2f} (one seed)"


def _bytes(n: float) -> str:
    return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n:.0f} B"


def _made_on(res: dict[str, Any]) -> str:
    """Where the table's runs ran: the one machine, or each machine with its number of runs (runs of one
    table may come from several: a resumed suite, runs copied in from another box). Rows without hosts
    (made by hand) fall back to the machine writing the table."""
    hosts: Counter[str] = Counter()
    for sc in res["scenarios"]:
        for row in sc["rows"]:
            hosts.update(row.get("hosts", {}))
    if not hosts:
        return f"on {res['machine']}"
    if len(hosts) == 1:
        return f"on {next(iter(hosts))}"
    made = "; ".join(f"{n} on {host}" for host, n in hosts.most_common())
    return f"(written on {res['machine']}); runs: {made}"


def to_markdown(res: dict[str, Any], suite: Suite, command: str, plots: dict[str, str]) -> str:
    lines = [f"### {suite.title} — {res['profile']} profile", "", f"`{command}` {_made_on(res)}."]
    devices = sorted({r["device"] for sc in res["scenarios"] for r in sc["rows"]})
    lines[-1] += f" Device: {', '.join(devices)}."
    k = res.get("last_k", 3)
    for sc in res["scenarios"]:
        rows = sc["rows"]
        first = rows[0]
        all_seeds = sorted({s for r in rows for s in r["seeds"]})
        lines += [
            "",
            f"**{sc['title']}** — {first['num_clients']} client(s), {first['rounds']} rounds, "
            f"seeds {','.join(map(str, all_seeds))}.",
            "",
            "| variant | seeds | last round (%) | best round (%) | Δ last vs "
            f"{suite.reference or '—'} | mean of last {k} rounds (%) | Δ last-{k} vs {suite.reference or '—'}, "
            "paired, 95 % CI | up / client / round | down / client / round | wall time / run |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        ref = next((r for r in rows if r["variant"] == suite.reference), None)
        paired = sc.get("paired", {})
        # The global test set's columns, where any run was scored on it (runs before it was built were not).
        with_global = any(r.get("global_last_k") for r in rows)
        if with_global:
            lines[-2] = lines[-2].replace(
                " | up / client / round",
                f" | global test set, mean of last {k} rounds (%) | Δ global last-{k} vs "
                f"{suite.reference or '—'}, paired, 95 % CI | up / client / round",
            )
            lines[-1] += "---|---|"
        for r in rows:
            pair = paired.get(r["variant"])
            if ref is None or r is ref:
                delta = delta_k = delta_g = "—"
            elif pair is not None:
                delta, delta_k = _diff(pair["last"]), _diff(pair["last_k"])
                delta_g = _diff(pair.get("global_last_k"))
            else:
                delta, delta_k, delta_g = f"{r['last'][0] - ref['last'][0]:+.2f}", "—", "—"
            last_k = _pm(r["last_k"], r["seeds"]) if "last_k" in r else "—"
            glob = ""
            if with_global:
                g = r.get("global_last_k")
                glob = f"{_pm(g, r['global_seeds']) if g else '—'} | {delta_g} | "
            lines.append(
                f"| {r['variant']} | {','.join(map(str, r['seeds']))} | {_pm(r['last'], r['seeds'])} | "
                f"{_pm(r['best'], r['seeds'])} | {delta} | {last_k} | {delta_k} | {glob}"
                f"{_bytes(r['bytes_up'])} | {_bytes(r['bytes_down'])} | {r['wall_s']:.0f} s |"
            )
        sentence = _significance(paired, suite.reference or "—", k)
        if sentence:
            lines += ["", sentence]
        sentence = _significance(
            paired, suite.reference or "—", k, "global_last_k", " on the global test set"
        )
        if sentence:
            lines += ["", sentence]
        verdict = _fedktl_verdict(rows)
        if verdict:
            lines += ["", verdict]
        if sc["name"] in plots:
            lines += ["", f"![{sc['title']}]({plots[sc['name']]})"]
    return "\n".join(lines)


def _fedktl_verdict(rows: list[dict[str, Any]]) -> str | None:
    """One sentence: FedKTL's last-round mean against the best baseline's (methods other than FedKTL)."""
    fedktl = next((r for r in rows if r["variant"] == "fedktl"), None)
    baselines = [r for r in rows if not r["method"].startswith("fedktl") and r["variant"] == r["method"]]
    if fedktl is None or not baselines:
        return None
    best = max(baselines, key=lambda r: r["last"][0])
    gap = fedktl["last"][0] - best["last"][0]
    seeds = min(len(fedktl["seeds"]), len(best["seeds"]))
    if seeds < 3:  # the target is judged on the mean over 3 seeds
        return (
            f"FedKTL vs the best baseline ({best['variant']}), last round: {gap:+.2f} points on "
            f"{seeds} seed(s) — too few to judge the +2-point target."
        )
    sentence = (
        f"FedKTL vs the best baseline ({best['variant']}), last round: **{gap:+.2f} points** "
        f"({'meets' if gap >= 2 else 'does not meet'} the +2-point target)."
    )
    scored = [r for r in baselines if r.get("global_last_k")]
    if fedktl.get("global_last_k") and scored:
        top = max(scored, key=lambda r: r["global_last_k"][0])
        sentence += (
            f" On the global test set (mean of the last {fedktl['k']} rounds) vs its best baseline "
            f"({top['variant']}): {fedktl['global_last_k'][0] - top['global_last_k'][0]:+.2f} points."
        )
    return sentence


def plot(res: dict[str, Any], folder: Path, stem: str) -> dict[str, str]:
    """One PNG per scenario: mean accuracy per round per variant, ± std shaded. Returns name → file name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for sc in res["scenarios"]:
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
        for i, r in enumerate(sc["rows"]):
            mean = [m for m, _ in r["curve"]]
            std = [s for _, s in r["curve"]]
            x = list(range(1, len(mean) + 1))
            # ten colours, then the same colours dashed, dotted: the main table has twelve variants
            colour, style = f"C{i % 10}", ("-", "--", ":", "-.")[i // 10 % 4]
            ax.plot(x, mean, label=r["variant"], linewidth=1.4, color=colour, linestyle=style)
            ax.fill_between(
                x,
                [m - s for m, s in zip(mean, std, strict=True)],
                [m + s for m, s in zip(mean, std, strict=True)],
                color=colour,
                alpha=0.15,
            )
        ax.set_xlabel("round")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(sc["title"], fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        name = f"{stem}-{sc['name']}.png"
        fig.savefig(folder / name)
        plt.close(fig)
        out[sc["name"]] = name
    return out


def main(args: argparse.Namespace) -> int:
    full = SUITES[args.suite]
    suite = replace(
        full,
        scenarios=tuple(_pick(full.scenarios, args.scenarios, "scenario")),
        variants=tuple(_pick(full.variants, args.variants, "variant")),
    )
    root = args.runs / f"{suite.name}-{args.profile}"
    if not args.summarize_only:
        root = run_suite(args)
    seeds = [int(s) for s in args.seeds.split(",")]
    res = summarize(root, suite, seeds, last_k=args.last_k)
    if not res["scenarios"]:
        raise SystemExit(f"ktl: error: no finished runs under {root}")
    res.update(profile=args.profile, machine=machine(), last_k=args.last_k)
    command = (
        f"ktl bench accuracy --suite {suite.name} --profile {args.profile} --seeds {args.seeds} "
        f"--last-k {args.last_k}"
    )
    for flag, names in (("--scenarios", args.scenarios), ("--variants", args.variants)):
        if names is not None:  # the table is a subset of the suite: say which
            command += f" {flag} {names}"
    plots: dict[str, str] = {}
    if args.write is not None:
        images = args.write.parent / "images"
        names = plot(res, images, f"accuracy-{suite.name}-{args.profile}")
        plots = {k: f"images/{v}" for k, v in names.items()}
    markdown = to_markdown(res, suite, command, plots)
    if args.write is not None:
        write_section(args.write, f"accuracy-{suite.name}-{args.profile}", markdown)
    sys.stdout.write((json.dumps(res) if args.json else markdown) + "\n")
    return 0
