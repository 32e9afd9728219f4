"""Settings explain themselves: each meaning is written once, as a pydantic field description, and feeds
``ktl simulate --help`` (with the chosen preset's values), the JSON/OpenAPI schema and
docs/configuration.md (generated; a stale page fails here)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ktl.api.settings import ServerSettings
from ktl.cli import main
from ktl.config import SimulateConfig, iter_settings, preset_settings, preset_value, update_docs

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "configuration.md"


@pytest.mark.parametrize("model", [SimulateConfig, ServerSettings], ids=lambda m: m.__name__)
def test_every_leaf_setting_has_a_description(model: type) -> None:
    settings = list(iter_settings(model))
    assert len(settings) > 10
    missing = [s.name for s in settings if not s.description]
    assert not missing, f"settings without Field(description=...): {missing}"


def test_the_generated_reference_is_up_to_date() -> None:
    text = DOCS.read_text()
    assert "<!-- settings:begin -->" in text and "<!-- settings:end -->" in text
    assert update_docs(text) == text, (
        "docs/configuration.md is stale: run python -m ktl.config --write-docs docs/configuration.md"
    )
    # The reference carries the descriptions themselves, not a copy that could drift.
    lr = next(s for s in iter_settings() if s.name == "client.lr")
    assert f"| `client.lr` | `0.01` | {lr.description} |" in text


def test_preset_values() -> None:
    assert preset_value("cpu-small", "client.lr") == 0.05
    assert preset_value(None, "client.lr") == 0.01
    assert preset_value("smoke", "client.epochs") == 1  # not set by the preset: the default
    chosen = preset_settings("smoke")
    assert chosen["aligner.steps"] == 50 and "client.epochs" not in chosen


def _help(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *argv: str) -> str:
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag: no wrapping inside "cpu-small"
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def _flag_line(text: str, flag: str) -> str:
    return next(line for line in text.splitlines() if re.match(rf"\s*{re.escape(flag)}\b", line))


@pytest.mark.parametrize(
    "argv",
    [
        ["simulate", "--preset", "cpu-small", "--help"],
        ["simulate", "--preset=cpu-small", "--help"],
        ["simulate", "--help", "--preset", "cpu-small"],
        ["client", "run", "--help"],  # client run's preset defaults to cpu-small
    ],
)
def test_help_shows_meaning_default_and_preset_value(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    line = _flag_line(_help(capsys, monkeypatch, *argv), "--client.lr")
    assert "SGD learning rate" in line
    assert "default 0.01" in line and "preset cpu-small: 0.05" in line


def test_help_without_a_preset_shows_defaults_only(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = _help(capsys, monkeypatch, "simulate", "--help")
    line = _flag_line(text, "--client.lr")
    assert "SGD learning rate" in line and "default 0.01" in line and "preset" not in line
    # A percent sign in a description must not break argparse's formatting; every flag has a meaning.
    assert "(undocumented)" not in text


def test_an_unknown_preset_still_gives_help(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    line = _flag_line(_help(capsys, monkeypatch, "simulate", "--preset", "huge", "--help"), "--client.lr")
    assert "default 0.01" in line and "preset" not in line


@pytest.mark.parametrize("model", [SimulateConfig, ServerSettings], ids=lambda m: m.__name__)
def test_json_schema_carries_the_descriptions(model: type) -> None:
    schema = model.model_json_schema()
    assert schema["properties"]["device"]["description"]
    if model is SimulateConfig:
        client = schema["$defs"]["ClientSettings"]["properties"]
        assert client["lr"]["description"].startswith("SGD learning rate")
        aligner = schema["$defs"]["AlignerSettings"]["properties"]
        assert "MMD" in aligner["mmd_weight"]["description"]
    else:
        assert "413" in schema["properties"]["max_upload_bytes"]["description"]
