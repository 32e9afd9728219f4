"""What ``ktl list`` shows — presets, methods, data sets, generators, models and model groups — without
importing torch.

The registries live in modules that import torch and transformers (seconds). The built-in names are
therefore also written to ``catalog.json`` beside this module, generated from the live registries
(``python -m ktl.catalog --write``; a test fails when it is stale, as for docs/configuration.md).
`listing` reads that file unless a registry module has been imported in this process — a plugin or an
entry point may then have added names, and the live registries are listed instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["CATALOG", "listing", "live", "main", "write"]

CATALOG = Path(__file__).with_name("catalog.json")
# Importing any of these may register names beyond the built-in ones.
_REGISTRIES = ("ktl.methods", "ktl.clients.backbones", "ktl.data", "ktl.generator.registry")


def _presets() -> list[str]:
    return sorted(
        p.name.removesuffix(".toml")
        for p in resources.files("ktl.presets").iterdir()
        if p.name.endswith(".toml")
    )


def live() -> dict[str, Any]:
    """Every registered name (imports the registries)."""
    from ktl.clients.backbones import BACKBONES, MODEL_GROUPS
    from ktl.data import DATASETS
    from ktl.generator import available_generators
    from ktl.methods import available_methods

    return {
        "methods": available_methods(),
        "datasets": sorted(DATASETS),
        "generators": available_generators(),
        "models": {name: info.summary for name, info in sorted(BACKBONES.items())},
        "model_groups": {
            name: {"summary": group.summary, "members": list(group.members)}
            for name, group in sorted(MODEL_GROUPS.items())
        },
    }


def listing() -> dict[str, Any]:
    """Presets and registered names: from ``catalog.json`` when nothing beyond the built-ins can be
    registered, else live."""
    names: dict[str, Any] | None = None
    if not any(m in sys.modules for m in _REGISTRIES) and CATALOG.is_file():
        names = json.loads(CATALOG.read_text())
    return {"presets": _presets(), **(names if names is not None else live())}


def write(path: Path = CATALOG) -> None:
    path.write_text(json.dumps(live(), indent=2, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ktl.catalog", description=__doc__)
    parser.add_argument("--write", action="store_true", help=f"regenerate {CATALOG.name} from the registries")
    args = parser.parse_args(argv)
    if args.write:
        write()
    sys.stdout.write(json.dumps(live(), indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
