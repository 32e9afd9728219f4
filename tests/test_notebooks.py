"""The notebooks run top to bottom (on a tiny synthetic run) and are committed without outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="dev dependency: pip install -e .[dev]")
nbclient = pytest.importorskip("nbclient", reason="dev dependency: pip install -e .[dev]")

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_both_notebooks_exist() -> None:
    assert {p.name for p in NOTEBOOKS} >= {"inspect_alignment.ipynb", "quickstart.ipynb"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stored_without_outputs(path: Path) -> None:
    cells = json.loads(path.read_text())["cells"]
    for cell in cells:
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [] and cell.get("execution_count") is None, path.name


@pytest.mark.parametrize(
    "path",
    # the quickstart runs in make test; the alignment notebook (its own simulate run) in make test-all
    [pytest.param(p, marks=pytest.mark.slow) if p.stem == "inspect_alignment" else p for p in NOTEBOOKS],
    ids=lambda p: p.stem,
)
def test_notebook_runs_top_to_bottom(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("KTL_RUN", "KTL_SERVER"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend shows the plots
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    if path.stem == "inspect_alignment":  # its last view: the quality report, numbers and picture
        last = nb.cells[-1].outputs
        text = "".join(o.get("text", "") for o in last if o.output_type == "stream")
        assert "mmd_ratio:" in text and "centroid_min_distance:" in text, text
        assert "norm band" in text and "class 0 " in text and " holders: " in text, text
        assert any("image/png" in o.get("data", {}) for o in last)
    # every grid and plot is shown: one image output per display or plt.show in the notebook
    images = sum("image/png" in o.get("data", {}) for o in outputs)
    expected = {"quickstart": 1, "inspect_alignment": 5}[path.stem]  # 6 with the emoji font installed
    assert images >= expected, os.fspath(path)
