"""Docs stay true to the code: every setting is documented, and the README opens with the two commands."""

from pathlib import Path

from ktl.config import available_presets, config_fields

ROOT = Path(__file__).resolve().parents[1]


def test_every_setting_is_documented() -> None:
    text = (ROOT / "docs" / "configuration.md").read_text()
    missing = [dotted for dotted, _, _ in config_fields() if dotted != "preset" and f"`{dotted}`" not in text]
    assert not missing, f"undocumented settings: {missing}"
    for preset in available_presets():
        assert f"`{preset}`" in text


def test_readme_opens_with_demo_and_test() -> None:
    head = (ROOT / "README.md").read_text().split("\n## ", 1)[0]
    assert "make demo" in head and "make test" in head
    assert "make test" in (ROOT / ".ci" / "run").read_text()
