"""The ``ktl`` command. Errors a user can fix print as one line: ``ktl: error: …`` (exit status 2)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ktl.errors import KtlError

__all__ = ["main", "build_parser"]

logger = logging.getLogger("ktl")


def _setup_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger("ktl")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    for noisy in ("transformers", "diffusers", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    from ktl.config import config_fields

    group = parser.add_argument_group("settings (override the preset; see docs/configuration.md)")
    for dotted, _annotation, help_text in config_fields():
        if dotted == "preset":
            continue
        names = [f"--{dotted.replace('_', '-')}"]
        if "_" in dotted:
            names.append(f"--{dotted}")
        group.add_argument(
            *names, dest=f"set:{dotted}", default=argparse.SUPPRESS, metavar="V", help=help_text
        )


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from ktl.config import config_fields, nest, parse_flag_value

    annotations = {dotted: ann for dotted, ann, _ in config_fields()}
    given = {k.removeprefix("set:"): v for k, v in vars(args).items() if k.startswith("set:")}
    return nest({k: parse_flag_value(annotations[k], v) for k, v in given.items()})


def _cmd_simulate(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from ktl.config import build_config
    from ktl.simulate import run_simulation

    config = build_config(preset=args.preset, config_file=args.config, overrides=_overrides(args))
    with logging_redirect_tqdm(loggers=[logging.getLogger("ktl")]):
        run_simulation(config, overwrite=args.overwrite, progress=not args.no_progress)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from ktl.clients.backbones import BACKBONES
    from ktl.config import available_presets
    from ktl.data import DATASETS
    from ktl.generator import available_generators
    from ktl.methods import available_methods

    lines = [
        "presets:    " + ", ".join(available_presets()),
        "methods:    " + ", ".join(available_methods()),
        "datasets:   " + ", ".join(sorted(DATASETS)),
        "generators: " + ", ".join(available_generators()),
        "models:",
        *(f"  {name:12s} {info.summary}" for name, info in sorted(BACKBONES.items())),
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ktl", description="Generator-based knowledge transfer (FedKTL).")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser(
        "simulate",
        help="run N clients × R rounds in one process",
        description="Run a federated simulation; e.g. ktl simulate --preset cpu-small --method fedktl --seed 0",
    )
    sim.add_argument("--preset", default=None, help="a preset name (see `ktl list`), e.g. cpu-small")
    sim.add_argument(
        "--config", type=Path, default=None, help="a TOML or JSON config file (e.g. a run's config.json)"
    )
    sim.add_argument(
        "--overwrite", action="store_true", help="replace the contents of an existing --out folder"
    )
    sim.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_config_flags(sim)
    sim.set_defaults(func=_cmd_simulate)

    lst = sub.add_parser("list", help="presets, methods, data sets, generators and models")
    lst.set_defaults(func=_cmd_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(-1 if args.quiet else args.verbose)
    try:
        return int(args.func(args))
    except KtlError as exc:
        sys.stderr.write(f"ktl: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("ktl: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
