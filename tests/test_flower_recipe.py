"""docs/flower.md's Deployment Engine recipe, taken from the page itself (the ```bash block between
``<!-- recipe:begin -->`` and ``<!-- recipe:end -->``), so that the page cannot rot: a fast check that its
commands hang together (distinct ports, the SuperLink the config names, a valid run config, ``--stream``,
the venv on PATH), and a slow run of the block as written — its ports and run folder swapped for free
ones — whose accuracies must equal ``ktl simulate``'s, once on the preset's partitions and once with each
SuperNode on a site folder of its own (``data-dir``)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
from pathlib import Path

import pytest
import tomllib
import torch

from ktl.config import build_config
from ktl.data import build_federated_data
from ktl.simulate import run_simulation

pytest.importorskip("flwr")
from flwr.common.config import parse_config_args  # noqa: E402 - Flower is an optional extra

from ktl.api.process import free_port  # noqa: E402
from ktl.flower.config import from_run_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "flower.md"


def recipe() -> str:
    """The bash block of the recipe, verbatim."""
    text = DOC.read_text()
    begin, end = text.index("<!-- recipe:begin -->"), text.index("<!-- recipe:end -->")
    match = re.search(r"```bash\n(.*?)```", text[begin:end], re.S)
    assert match, "the recipe markers hold no ```bash block"
    return match.group(1)


def commands(script: str) -> list[list[str]]:
    """Each command line of the script (continuations joined, heredoc bodies skipped) as words."""
    out: list[list[str]] = []
    heredoc: str | None = None
    for line in script.replace("\\\n", " ").splitlines():
        if heredoc is not None:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        words = shlex.split(line, comments=True)
        if "<<" in line:
            heredoc = line.split("<<", 1)[1].strip().strip("'\"")
        if words:
            out.append(words)
    return out


def config_toml(script: str) -> dict[str, object]:
    body = re.search(r"config\.toml\" <<'EOF'\n(.*?)\nEOF\n", script, re.S)
    assert body, "the recipe writes no config.toml"
    assert body.group(1).count("\n") > 2  # multi-line TOML, as flwr reads it
    return tomllib.loads(body.group(1))


def option(words: list[str], name: str) -> str:
    return words[words.index(name) + 1]


def test_the_recipes_commands_hang_together() -> None:
    script = recipe()
    cmds = commands(script)
    assert any(c[:1] == ["export"] and c[1].startswith("PATH=") and ".venv/bin" in c[1] for c in cmds)
    links = [c for c in cmds if c[0] == "flower-superlink"]
    nodes = [c for c in cmds if c[0] == "flower-supernode"]
    runs = [c for c in cmds if c[:2] == ["flwr", "run"]]
    assert len(links) == 1 and len(nodes) >= 2 and len(runs) == 1
    link_port = option(links[0], "--port")
    assert "--disable-runtime-dependency-installation" in links[0]
    node_ports = [option(n, "--port") for n in nodes]
    assert len({link_port, *node_ports}) == 1 + len(nodes), "every SuperNode needs its own --port"
    assert {option(n, "--superlink") for n in nodes} == {f"127.0.0.1:{link_port}"}
    configs = [dict(kv.split("=", 1) for kv in option(n, "--node-config").split()) for n in nodes]
    assert sorted(int(c["partition-id"]) for c in configs) == list(range(len(nodes)))
    assert {int(c["num-partitions"]) for c in configs} == {len(nodes)}
    toml = config_toml(script)
    superlinks = toml["superlink"]
    assert isinstance(superlinks, dict)
    run = runs[0]
    name = run[3] if len(run) > 3 and not run[3].startswith("-") else superlinks["default"]
    assert superlinks[name]["address"] == f"127.0.0.1:{link_port}" and superlinks[name]["insecure"] is True
    assert run[2] == "." and "--stream" in run
    run_config = parse_config_args([option(run, "--run-config")])
    config, options = from_run_config(run_config)  # valid as the ServerApp will read it
    assert config.num_clients == len(nodes) == options.min_nodes
    assert options.out and "&" in script and "kill" in script  # background services are stopped
    # The page's data-dir example is a node config Flower accepts (its values are TOML: a quoted path).
    example = re.search(r'--node-config "([^"]*data-dir=[^"]*)"', DOC.read_text())
    assert example, "the page shows no data-dir node config"
    assert isinstance(parse_config_args([example.group(1)])["data-dir"], str)


def _free_ports(script: str) -> str:
    """The block with each of its port numbers replaced by a free one (other tests may hold 909x)."""
    ports = sorted(set(re.findall(r"127\.0\.0\.1[:/](\d{4,5})|--port (\d{4,5})", script)))
    numbers = {p for pair in ports for p in pair if p}
    for port in numbers:
        script = re.sub(rf"\b{port}\b", str(free_port()), script)
    return script


def _write_sites(folder: Path, num_clients: int) -> list[Path]:
    """The smoke preset's partitions as site folders (PFLlib .npz, uint8: exact), with the classes."""
    config = build_config(preset="smoke", overrides={"num_clients": num_clients})
    data = build_federated_data(config.data, num_clients=num_clients, seed=config.seed)
    sites = []
    for i, part in enumerate(data.clients):
        site = folder / f"site-{i}"
        site.mkdir(parents=True)

        def u8(t: torch.Tensor) -> object:
            return (t * 255).round().to(torch.uint8).numpy()

        import numpy as np

        np.savez(site / "train.npz", x=u8(part.train_x), y=part.train_y.numpy())
        np.savez(site / "test.npz", x=u8(part.test_x), y=part.test_y.numpy())
        (site / "config.json").write_text(json.dumps({"class_names": data.class_names}))
        sites.append(site)
    return sites


@pytest.mark.slow
@pytest.mark.parametrize("data", ["partitions", "sites"])
def test_the_recipe_runs_as_written_and_gives_simulates_accuracies(tmp_path: Path, data: str) -> None:
    script = _free_ports(recipe())
    out = tmp_path / "out"
    script = script.replace("flower.out='runs/flower-deployment'", f"flower.out='{out}'")
    assert str(out) in script
    if data == "sites":  # each SuperNode on its own folder: the data-dir line of the page's note
        for i, site in enumerate(_write_sites(tmp_path / "sites", 2)):
            script = script.replace(
                f"partition-id={i} num-partitions=2", f"partition-id={i} num-partitions=2 data-dir='{site}'"
            )
        assert script.count("data-dir=") == 2
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "OMP_NUM_THREADS": "1"}
    log = tmp_path / "recipe.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            ["bash", "-c", script],
            cwd=ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        rc = proc.wait(900)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert rc == 0 and (out / "summary.json").is_file(), log.read_text()[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["data"].startswith("site ") == (
        data == "sites"
    )  # the nodes' data source, as they report it
    torch.manual_seed(1234)
    config = build_config(
        preset="smoke",
        overrides={"method": "fedproto", "rounds": 2, "num_clients": 2, "out": str(tmp_path / "sim")},
    )
    run_simulation(config, progress=False)
    simulated = json.loads((tmp_path / "sim" / "summary.json").read_text())
    assert summary["accuracy"] == simulated["accuracy"]
