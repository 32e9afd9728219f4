from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ktl.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--rounds", "-1"], ["rounds", "greater than or equal to 1", "-1"]),
        (["--models", "cnn4,resnet-999"], ["models", "unknown model 'resnet-999'", "available:"]),
        (["--data.alpha", "0"], ["data.alpha", "greater than 0"]),
        (["--data.alpha", "-0.5"], ["data.alpha", "greater than 0"]),
        (["--method", "fedavg"], ["unknown method 'fedavg'", "fedktl"]),
        (["--device", "gpu0"], ["device"]),
        (["--client.lr", "fast"], ["client.lr", "valid number"]),
        (["--num-clients", "0"], ["num_clients"]),
        (["--dataset-typo"], ["unrecognized arguments"]),
    ],
)
def test_bad_config_values_give_one_clear_line(
    capsys: pytest.CaptureFixture[str], args: list[str], needles: list[str]
) -> None:
    try:
        code, err = run_cli(capsys, "simulate", "--preset", "smoke", "--no-progress", *args)
    except SystemExit as exc:  # argparse's own errors (unknown flags) exit directly
        code, err = int(exc.code or 0), capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if "error" in line]
    assert len(error_lines) == 1
    for needle in needles:
        assert needle in error_lines[0], (needle, error_lines[0])


def test_missing_data_path_is_one_line_naming_the_package(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, err = run_cli(
        capsys,
        "simulate",
        "--preset",
        "smoke",
        "--data.dataset",
        "fashion-mnist",
        "--data.path",
        str(tmp_path / "nowhere"),
        "--out",
        str(tmp_path / "run"),
        "--no-progress",
    )
    assert code == 2
    assert err.strip().count("\n") == 0 and err.startswith("ktl: error: Fashion-MNIST not found")
    assert "dataset-fashion-mnist" in err
    assert not (tmp_path / "run").exists()


def test_unknown_preset_and_bad_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, err = run_cli(capsys, "simulate", "--preset", "huge")
    assert code == 2 and "unknown preset 'huge'" in err and "cpu-small" in err
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = [")
    code, err = run_cli(capsys, "simulate", "--config", str(bad))
    assert code == 2 and "cannot parse config file" in err
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("roundz = 3\n")
    code, err = run_cli(capsys, "simulate", "--config", str(unknown))
    assert code == 2 and "roundz: unknown setting" in err


def test_a_run_prints_per_round_accuracy_and_the_run_folder(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "run"
    code, err = run_cli(
        capsys, "simulate", "--preset", "smoke", "--rounds", "1", "--out", str(out), "--no-progress"
    )
    assert code == 0
    assert "round 1/1  accuracy" in err and str(out) in err
    # The resolved config reproduces the run: a config file plus a flag override.
    code, err = run_cli(
        capsys,
        "simulate",
        "--config",
        str(out / "config.json"),
        "--out",
        str(tmp_path / "again"),
        "--no-progress",
    )
    assert code == 0 and (tmp_path / "again" / "summary.json").is_file()


def test_console_entry_point_has_no_traceback_on_bad_input() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ktl", "simulate", "--preset", "smoke", "--rounds", "-3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("ktl: error: invalid config: rounds") and "Traceback" not in proc.stderr


def test_list_shows_the_registries(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("cpu-small", "fedktl", "local", "fashion-mnist", "autoencoder-kl", "vit-small", "lg-fedavg"):
        assert word in out
    # a model group with its members, one flag away (--models htfe8)
    assert "htfe8" in out and "= cnn4, googlenet, mobilenetv2-1.0, resnet18, resnet34, resnet50" in out


def test_abbreviated_flags_are_refused_and_close_matches_suggested(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--round 3`` is not ``--rounds 3`` (argparse would have taken the prefix); a misspelled flag or
    command gets a "did you mean"."""
    for argv, hint in (
        (["simulate", "--round", "3"], "did you mean --rounds?"),
        (["simulate", "--client.lrr", "0.1"], "did you mean --client.lr?"),
        (["simulat"], "did you mean simulate?"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("ktl: error:") and err.endswith(hint)


def test_help_list_and_a_mistyped_command_answer_without_importing_torch() -> None:
    """``ktl --help`` and argument errors build no settings flags and import no benchmark, ``ktl list``
    reads ktl/catalog.json: torch (seconds to import) stays out. Checked on what is imported, not on a clock (the figure is in docs/benchmarks.md)."""
    probe = (
        "import sys, contextlib, io\n"
        "from ktl.cli import main\n"
        "for argv in (['--help'], ['simulat'], ['serve', '--nope'], ['list']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()), "
        "contextlib.redirect_stderr(io.StringIO()):\n"
        "        main(argv)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'ktl.config') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_misspelled_setting_in_a_config_file_or_run_config_gets_a_suggestion(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ktl.errors import ConfigError
    from ktl.flower.config import from_run_config

    bad = tmp_path / "bad.toml"
    bad.write_text("[client]\nlrr = 0.1\n")
    assert main(["simulate", "--preset", "smoke", "--config", str(bad)]) == 2
    assert capsys.readouterr().err.strip().endswith("client.lrr: unknown setting (did you mean client.lr?)")
    with pytest.raises(ConfigError, match="did you mean data.alpha"):
        from_run_config({"settings": "data.alpah=0.5"})


def test_the_catalog_ktl_list_reads_is_the_registries() -> None:
    """ktl/catalog.json is generated (``python -m ktl.catalog --write``): stale, this fails."""
    import json

    from ktl.catalog import CATALOG, live

    assert json.loads(CATALOG.read_text()) == live(), "stale: run python -m ktl.catalog --write"
