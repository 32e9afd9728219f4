"""``ktl bench flower``: ktl on Flower against ``ktl simulate``, in one run.

``--engine simulation`` (the default), Flower's Simulation Engine:

1. Overhead: the same configuration (``--preset``, ``--clients``, ``--rounds``) through ``ktl simulate`` and
   through ``ktl flower simulate``; wall time per round (each side's own ``round_seconds``, so Ray's
   start-up is reported apart) and the ratio. Accuracies are compared too (they should be equal).
2. Scale: ``--scale-clients`` virtual clients (200) with a few samples each for ``--scale-rounds`` rounds:
   time per round and the peak memory of this process and its Ray workers together.

``--engine deployment``, Flower's Deployment Engine on loopback (`LocalDeployment`: a SuperLink and one
SuperNode per client, ``flwr run`` of this app), every process at one torch thread: a round after the
first against a ``ktl simulate`` round of the same federation at one thread (each side's own
``round_seconds``), with the node workers that keep each client in memory (`ktl.flower.worker`), with
them and SuperExec polling for tasks every 0.1 s (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``) and, for
comparison, without them (``KTL_FLOWER_WORKER=0``: every message rebuilds its client in a fresh
process); and where a round's seconds go on the SuperNodes, phase by phase (`breakdown`, from their
logs stamped line by line and the node workers' logs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
import torch

from ktl.api.process import free_port
from ktl.benchmarks.common import machine, report, run_metrics
from ktl.config import SimulateConfig, build_config
from ktl.flower.client_app import worker_path
from ktl.flower.config import FlowerOptions
from ktl.flower.simulation import run_flower_simulation
from ktl.simulate import run_simulation

__all__ = [
    "PHASES",
    "VARIANTS",
    "LocalDeployment",
    "breakdown",
    "main",
    "run",
    "run_deployment",
    "worker_trains",
]

ROOT = Path(__file__).resolve().parents[1]  # the app's project folder (pyproject.toml's [tool.flwr.app])
BIN = Path(sys.executable).parent  # its flags are declared in ktl.cli (Flower is imported only when it runs)


class _PeakMemory:
    """The largest RSS of this process and all its descendants (Ray's workers), sampled every 0.2 s."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.wait(0.2):
            total = 0
            for p in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):  # a worker that just exited
                    total += p.memory_info().rss
            self.peak = max(self.peak, total)

    def __enter__(self) -> _PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="ktl-bench-flower-"))
    overrides = {"num_clients": args.clients, "rounds": args.rounds}
    t0 = time.perf_counter()
    run_simulation(
        build_config(preset=args.preset, overrides={**overrides, "out": str(work / "sim")}), progress=False
    )
    sim_wall = time.perf_counter() - t0
    sim = run_metrics(work / "sim")
    t0 = time.perf_counter()
    flower = run_flower_simulation(
        build_config(preset=args.preset, overrides=overrides), FlowerOptions(out=str(work / "flower"))
    )
    flower_wall = time.perf_counter() - t0
    fl = run_metrics(work / "flower")
    sim_round = statistics.mean(r["round_seconds"] for r in sim)
    fl_round = statistics.mean(r["round_seconds"] for r in fl)
    later = slice(1, None) if len(sim) > 1 else slice(None)  # round 1 includes Ray's workers warming up
    res: dict[str, Any] = {
        "preset": args.preset,
        "clients": args.clients,
        "rounds": args.rounds,
        "simulate_round_s": sim_round,
        "flower_round_s": fl_round,
        "flower_overhead": fl_round / sim_round - 1,
        "simulate_later_round_s": statistics.mean(r["round_seconds"] for r in sim[later]),
        "flower_later_round_s": statistics.mean(r["round_seconds"] for r in fl[later]),
        "threads": torch.get_num_threads(),
        "simulate_wall_s": sim_wall,
        "flower_wall_s": flower_wall,
        "same_accuracies": [r["accuracy"] for r in sim] == flower["accuracy"],
        "machine": machine(),
    }
    if args.scale_clients:
        scale = build_config(
            preset=args.preset,
            overrides={
                "num_clients": args.scale_clients,
                "rounds": args.scale_rounds,
                "data": {"partition": "dirichlet", "alpha": 1.0},
            },
        )
        with _PeakMemory() as memory:
            t0 = time.perf_counter()
            summary = run_flower_simulation(scale, FlowerOptions(out=str(work / "scale")))
            scale_wall = time.perf_counter() - t0
        rows = run_metrics(work / "scale")
        res.update(
            scale_clients=args.scale_clients,
            scale_round_s=statistics.mean(r["round_seconds"] for r in rows),
            scale_wall_s=scale_wall,
            scale_peak_rss_gib=memory.peak / 2**30,
            scale_failures=summary["failures"],
            scale_final_accuracy=summary["final_accuracy"],
        )
    return res


_ANSI = re.compile(rb"\x1b\[[0-9;]*m")  # Flower's console colours


def _stamp(stream: Any, path: Path) -> None:
    """Copy a process's output (and its children's: SuperExec, every ``flwr-clientapp``) line by line to
    ``path``, each line prefixed with the wall-clock time it arrived — Flower's own lines carry none (its
    handler flushes every line, so the arrival is the emission)."""
    with open(path, "w", encoding="utf-8") as out:
        for raw in iter(stream.readline, b""):
            out.write(f"{time.time():.3f} {_ANSI.sub(b'', raw).decode(errors='replace')}")
            out.flush()


class LocalDeployment:
    """Flower's Deployment Engine on loopback, as docs/flower.md sets it up: a SuperLink (insecure) and
    ``nodes`` SuperNodes (partition ``i`` of ``nodes`` each, their own ports), each in its own process
    group, logs under ``work`` (every line stamped with its wall-clock time, `_stamp`); `run` is ``flwr
    run`` of this app with a run config."""

    def __init__(
        self, work: Path, nodes: int, env: dict[str, str] | None = None, supernode: list[str] | None = None
    ) -> None:
        self.work = work
        self.nodes = nodes
        self.supernode = supernode or [str(BIN / "flower-supernode")]  # the command that starts a SuperNode
        self.port = free_port()
        home = work / "flwr"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            '[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        self.env = {**os.environ, **(env or {}), "FLWR_HOME": str(home), "PYTHONUNBUFFERED": "1",
                    "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
        self.procs: list[subprocess.Popen[bytes]] = []
        self.readers: list[threading.Thread] = []

    def _start(self, cmd: list[str], log: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(  # its own process group: stopping it stops its helpers too
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        reader = threading.Thread(target=_stamp, args=(proc.stdout, self.work / log), daemon=True)
        reader.start()
        self.procs.append(proc)
        self.readers.append(reader)
        return proc

    def __enter__(self) -> LocalDeployment:
        link = self._start(
            [str(BIN / "flower-superlink"), "--insecure", "--disable-runtime-dependency-installation",
             "--port", str(self.port), "--database", str(self.work / "superlink.db")],
            "superlink.log",
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while True:  # until the SuperLink accepts connections
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1):
                break
            if link.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the SuperLink did not start: {(self.work / 'superlink.log').read_text()[-2000:]}"
                )
            time.sleep(0.5)
        for i in range(self.nodes):
            self._start(
                [*self.supernode, "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                 "--node-config", f"partition-id={i} num-partitions={self.nodes}", "--port", str(free_port())],
                f"supernode-{i}.log",
            )  # fmt: skip
        return self

    def run(self, run_config: dict[str, Any], out: Path, timeout: float = 1800.0) -> dict[str, Any]:
        """``flwr run`` of this app with ``run_config`` (keys its pyproject.toml lists); waits for the run
        folder's summary.json (``flower.out`` = ``out``)."""
        pairs = {**run_config, "flower.min-nodes": self.nodes, "flower.out": str(out)}
        settings = " ".join(f"{k}='{v}'" if isinstance(v, str) else f"{k}={v}" for k, v in pairs.items())
        done = subprocess.run(
            [str(BIN / "flwr"), "run", ".", "loopback", "--run-config", settings],
            cwd=ROOT, env=self.env, capture_output=True, timeout=300,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(
                f"flwr run failed: {done.stdout.decode()[-2000:]}{done.stderr.decode()[-2000:]}"
            )
        deadline = time.monotonic() + timeout
        while not (out / "summary.json").exists():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"no summary after {timeout:.0f}s: {(self.work / 'superlink.log').read_text()[-2000:]}"
                )
            time.sleep(1)
        return dict(json.loads((out / "summary.json").read_text()))

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        for reader in self.readers:  # until every output is copied (a straggling helper: not for ever)
            reader.join(10)


# -- where a round's seconds go on a SuperNode, from the stamped logs ------------------------------------

_STAMPED = re.compile(r"^(\d+\.\d+) (.*)$")
_NODE_ID = re.compile(r"SuperNode ID: (\d+)")
_RUN = re.compile(r"\[RUN \d+(?:, ROUND (\d+))?\]")  # a message's group id: ktl's round
_RECEIVING = re.compile(r"Receiving: (\w+) message")
_ANSWERED = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO (\w+) message answered in ([\d.]+) s$")

PHASES: tuple[tuple[str, str], ...] = (
    (
        "wait",
        "from the node's reply to its next message: the ServerApp's turnaround and the SuperNode's idle "
        "sleep (3 s after a pull that found nothing)",
    ),
    ("pull", "the SuperNode pulls the message from the SuperLink"),
    (
        "launch",
        "SuperExec's poll for the task and the `flwr-clientapp` process's start (Python, Flower's "
        "import) to its first line",
    ),
    (
        "clientapp",
        "`flwr-clientapp` fetches its task and the FAB, installs it, loads ktl's ClientApp, which "
        "forwards the message to the node worker",
    ),
    ("work", "the node worker: the client step (training, evaluation) and the state records"),
    ("reply", "back through the ClientApp to the SuperNode, which looks for replies every 0.5 s"),
    ("run", "the whole `flwr-clientapp` run (without a node worker)"),
    ("send", "the SuperNode pushes the reply to the SuperLink"),
)


def _node_rounds(log: Path) -> tuple[int | None, dict[int, dict[str, float]]]:
    """A SuperNode's stamped log: its node id and, per round (a train message's group id), when the message
    came (``recv``), was pulled (``got``), its ``flwr-clientapp`` logged its first line (``app``), and
    when the reply was being sent (``send``) and sent (``sent``)."""
    node_id: int | None = None
    rounds: dict[int, dict[str, float]] = {}
    group: int | None = None
    current: dict[str, float] | None = None
    for line in log.read_text(errors="replace").splitlines():
        m = _STAMPED.match(line)
        if m is None:
            continue
        t, text = float(m[1]), m[2]
        if node_id is None and (found := _NODE_ID.search(text)):
            node_id = int(found[1])
        elif found := _RUN.search(text):
            group = int(found[1]) if found[1] else None
        elif found := _RECEIVING.search(text):
            current = (
                rounds.setdefault(group, {"recv": t}) if found[1] == "train" and group is not None else None
            )
        elif current is not None:
            if "Received successfully" in text:
                current.setdefault("got", t)
            elif "Start `flwr-clientapp` process" in text:
                current.setdefault("app", t)
            elif "Sending:" in text:
                current.setdefault("send", t)
            elif "Sent successfully" in text:
                current.setdefault("sent", t)
                current = None
    return node_id, rounds


def worker_trains(log: Path) -> list[tuple[float, float]]:
    """The node worker's train messages in order: (start, end) wall-clock times (`ktl.flower.worker` logs
    each answer with its duration; a first answer that asked for the state is not a step)."""
    out = []
    for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
        m = _ANSWERED.match(line.strip())
        if m is None or m[2] != "train":
            continue
        end = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        out.append((end - float(m[3]), end))
    return out


def breakdown(work: Path, nodes: int) -> dict[str, float]:
    """Where a round after the first goes on the SuperNodes, in seconds: each phase (`PHASES`) averaged
    over nodes and rounds 2…; they add up to the node's cycle (``cycle``: one reply to the next), which in
    a run where every node trains every round is the round. ``wait_min`` is the shortest wait seen."""
    samples: dict[str, list[float]] = {}
    for i in range(nodes):
        node_id, rounds = _node_rounds(work / f"supernode-{i}.log")
        trains = worker_trains(worker_path(node_id, i).with_suffix(".log")) if node_id is not None else []
        ordered = sorted(rounds)
        with_worker = len(trains) == len(ordered)
        for k in ordered[1:]:
            ev, before = rounds[k], rounds.get(k - 1, {})
            if not {"recv", "got", "app", "send", "sent"} <= ev.keys() or "sent" not in before:
                continue
            phases = {"wait": ev["recv"] - before["sent"], "pull": ev["got"] - ev["recv"],
                      "launch": ev["app"] - ev["got"], "send": ev["sent"] - ev["send"]}  # fmt: skip
            if with_worker:
                start, end = trains[ordered.index(k)]
                phases.update(clientapp=start - ev["app"], work=end - start, reply=ev["send"] - end)
            else:
                phases["run"] = ev["send"] - ev["app"]
            phases["cycle"] = ev["sent"] - before["sent"]
            for name, value in phases.items():
                samples.setdefault(name, []).append(value)
    out = {name: statistics.mean(values) for name, values in samples.items()}
    if "wait" in samples:
        out["wait_min"] = min(samples["wait"])
        out["samples"] = len(samples["wait"])
    return out


def _later(rows: list[dict[str, Any]]) -> float:
    """The mean round time after the first (the first starts processes and builds the clients)."""
    return statistics.mean(r["round_seconds"] for r in (rows[1:] if len(rows) > 1 else rows))


# The deployment bench's variants: name, label, the SuperNodes' environment, and whether they are Flower's
# SuperNode with its fixed sleeps cut to 0.1 s (`ktl.benchmarks.supernode_whatif`: what those sleeps cost).
VARIANTS: tuple[tuple[str, str, dict[str, str], bool], ...] = (
    ("worker", "SuperNodes with node workers", {"KTL_FLOWER_WORKER": "1"}, False),
    (
        "fast_exec",
        "… and `FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1`",
        {"KTL_FLOWER_WORKER": "1", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"},
        False,
    ),
    (
        "whatif",
        "… and the SuperNode's fixed sleeps (3 s, 0.5 s) cut to 0.1 s (patched: what-if, not a setting)",
        {"KTL_FLOWER_WORKER": "1", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1", "KTL_WHATIF_SLEEP": "0.1"},
        True,
    ),
    ("no_worker", "SuperNodes, `KTL_FLOWER_WORKER=0`", {"KTL_FLOWER_WORKER": "0"}, False),
)


def run_deployment(args: argparse.Namespace) -> dict[str, Any]:
    """A round after the first on the Deployment Engine against a ``ktl simulate`` round, the same
    federation, one torch thread everywhere, in each of `VARIANTS` (without node workers only with
    ``--baseline``); and where a round's seconds go on the SuperNodes (`breakdown`)."""
    work = Path(tempfile.mkdtemp(prefix="ktl-bench-deploy-"))
    overrides = {"num_clients": args.clients, "rounds": args.rounds, "method": args.method}
    config: SimulateConfig = build_config(preset=args.preset, overrides=overrides)
    run_config = {"preset": args.preset, **overrides}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_simulation(config.model_copy(update={"out": work / "sim"}), progress=False)
    finally:
        torch.set_num_threads(threads)
    sim = run_metrics(work / "sim")
    one_thread = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    res: dict[str, Any] = {
        "engine": "deployment",
        "preset": args.preset,
        "method": args.method,
        "clients": args.clients,
        "rounds": args.rounds,
        "simulate_later_round_s": _later(sim),
        "machine": machine(),
        "load": os.getloadavg()[0],  # the shared machine's 1-minute load average, before and after
    }
    for name, _, env, whatif in VARIANTS:
        if name == "no_worker" and not args.baseline:
            continue
        supernode = [sys.executable, "-m", "ktl.benchmarks.supernode_whatif"] if whatif else None
        with LocalDeployment(work / name, args.clients, {**one_thread, **env}, supernode) as deployment:
            t0 = time.perf_counter()
            summary = deployment.run(run_config, work / name / "out")
            wall = time.perf_counter() - t0
        rows = run_metrics(work / name / "out")
        res[f"{name}_first_round_s"] = rows[0]["round_seconds"]
        res[f"{name}_later_round_s"] = _later(rows)
        res[f"{name}_ratio"] = _later(rows) / res["simulate_later_round_s"]
        res[f"{name}_wall_s"] = wall
        res[f"{name}_same_accuracies"] = summary["accuracy"] == [r["accuracy"] for r in sim]
        res[f"{name}_breakdown"] = breakdown(work / name, args.clients)
    res["load_after"] = os.getloadavg()[0]
    return res


def _deployment_markdown(res: dict[str, Any]) -> str:
    lines = [
        "## ktl on Flower's Deployment Engine (`ktl bench flower --engine deployment`)",
        "",
        f"{res['machine']}; 1-minute load average {res['load']:.1f} before and {res['load_after']:.1f} after (a "
        "shared machine: other jobs ran beside it, so the ratios are what one run measured under that "
        f"load). `{res['preset']}`, {res['method']}, {res['clients']} clients, {res['rounds']} rounds; a "
        "SuperLink and one SuperNode per client on loopback, every process at one torch thread, `ktl "
        "simulate` at one thread in the same run; each side's own `round_seconds`.",
        "",
        "| | round 1 | a round after the first | vs `ktl simulate` | same accuracies |",
        "|---|---|---|---|---|",
        f"| `ktl simulate` | | {res['simulate_later_round_s']:.2f} s | 1.00× | |",
    ]
    for name, label, _, _ in VARIANTS:
        if f"{name}_ratio" in res:
            lines.append(
                f"| {label} | {res[f'{name}_first_round_s']:.2f} s | {res[f'{name}_later_round_s']:.2f} s | "
                f"**{res[f'{name}_ratio']:.2f}×** | {'yes' if res[f'{name}_same_accuracies'] else 'no'} |"
            )
    shown = [
        (name, label) for name, label, _, _ in VARIANTS if res.get(f"{name}_breakdown", {}).get("samples")
    ]
    if shown:
        lines += [
            "",
            "Where a round after the first goes on a SuperNode (seconds, the mean over nodes and rounds 2…; "
            "from the SuperNodes' logs, each line stamped as it arrived, and the node worker's log): the "
            "phases of one node's cycle, from one reply to the next.",
            "",
            "| phase | what | " + " | ".join(label for _, label in shown) + " |",
            "|---|---|" + "---|" * len(shown),
        ]
        for phase, what in PHASES:
            if any(phase in res[f"{name}_breakdown"] for name, _ in shown):
                cells = [res[f"{name}_breakdown"].get(phase) for name, _ in shown]
                lines.append(f"| {phase} | {what} | " + " | ".join(
                    "" if c is None else f"{c:.2f}" for c in cells) + " |")  # fmt: skip
        lines += [
            "| **cycle** | one reply to the next (= a round: every node trains every round) | "
            + " | ".join(f"**{res[f'{name}_breakdown']['cycle']:.2f}**" for name, _ in shown)
            + " |",
            "| wait, shortest | | "
            + " | ".join(f"{res[f'{name}_breakdown']['wait_min']:.2f}" for name, _ in shown)
            + " |",
        ]
    lines += [
        "",
        "Under the Deployment Engine a SuperNode runs every message in a fresh `flwr-clientapp` process; the "
        "node worker (`ktl.flower.worker`, started by the first message) keeps the client — data, model, "
        "optimiser, the method's client state — in memory for the run, so a later round costs the message's "
        "process start and the training. Without it every message imports torch and rebuilds the client "
        "from `context.state`. The rest is Flower 1.42's own per-message cost, whatever the app: after it "
        "pushed a reply a SuperNode pulls at once and, finding nothing (the ServerApp cannot have sent the "
        "next round before it has this reply), sleeps 3 s (`time.sleep(3)` in "
        "`flwr.supernode.start_client_internal`: no flag, no variable), so every wait is at least 3 s; its "
        "SuperExec looks for tasks every `FLWR_SUPEREXEC_TASK_POLL_INTERVAL` (1 s by default); each message "
        "starts a `flwr-clientapp` process (Python and Flower's import) that installs the FAB; and the "
        "SuperNode looks for the reply every 0.5 s (fixed). The what-if row runs Flower's SuperNode with "
        "those two sleeps cut to 0.1 s (`ktl.benchmarks.supernode_whatif`, a patch for this measurement "
        "only): what a SuperNode that polled more often would give.",
    ]
    return "\n".join(lines)


def _markdown(res: dict[str, Any]) -> str:
    lines = [
        "## ktl on Flower's Simulation Engine (`ktl bench flower`)",
        "",
        f"{res['machine']}. `{res['preset']}`, {res['clients']} clients, {res['rounds']} rounds, one run; per-round "
        "times are each side's own (Ray's start-up is in the wall time only).",
        "",
        "| | per round (all) | per round (after the first) | wall |",
        "|---|---|---|---|",
        f"| `ktl simulate` | {res['simulate_round_s']:.2f} s | {res['simulate_later_round_s']:.2f} s | "
        f"{res['simulate_wall_s']:.1f} s |",
        f"| `ktl flower simulate` | {res['flower_round_s']:.2f} s | {res['flower_later_round_s']:.2f} s | "
        f"{res['flower_wall_s']:.1f} s |",
        f"| Flower's overhead | **{100 * res['flower_overhead']:+.1f} %** | "
        f"{100 * (res['flower_later_round_s'] / res['simulate_later_round_s'] - 1):+.1f} % | |",
        "",
        "Same per-round accuracies: "
        + (
            "yes."
            if res["same_accuracies"]
            else f"no — `ktl simulate` trained with {res['threads']} torch threads in one process, Ray's "
            "workers with one thread each (float reductions depend on the thread count); at the same "
            "thread count they are equal (tests/test_flower.py)."
        ),
    ]
    if "scale_clients" in res:
        lines += [
            "",
            f"Scale: {res['scale_clients']} virtual clients (Dirichlet α = 1 over the preset's data): "
            f"{res['scale_round_s']:.1f} s per round, {res['scale_wall_s']:.0f} s in all, peak memory "
            f"{res['scale_peak_rss_gib']:.2f} GiB (this process and Ray's workers), {res['scale_failures']} failed "
            f"replies, final accuracy {res['scale_final_accuracy']:.4f}.",
        ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if getattr(args, "engine", "simulation") == "deployment":
        res = run_deployment(args)
        return report(
            res, _deployment_markdown(res), as_json=args.json, write=args.write, section="flower-deployment"
        )
    res = run(args)
    return report(res, _markdown(res), as_json=args.json, write=args.write, section="flower")
