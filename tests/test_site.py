"""A site's own data (`ktl.site`): the folder layouts a site may hold (PFLlib .npz, PNGs sorted by class),
labels checked against the federation's classes, one line for a bad folder, and the Flower path from a
SuperNode's ``--node-config "data-dir=…"`` to the client it trains (fast; the Deployment Engine run with
site folders is in tests/test_flower_deployment.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ktl.config import build_config
from ktl.data import build_federated_data
from ktl.errors import DataError
from ktl.site import load_site, node_site_data

pytest.importorskip("flwr")
from flwr.app import Context, RecordDict  # noqa: E402 - Flower is an optional extra

from ktl.flower.client import client_data  # noqa: E402


def write_npz_site(
    folder: Path, x: torch.Tensor, y: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor
) -> None:
    """A site folder as PFLlib writes one client: uint8 images (the [0, 1] floats × 255, exact)."""
    folder.mkdir(parents=True)

    def u8(t: torch.Tensor) -> np.ndarray:
        return (t * 255).round().to(torch.uint8).numpy()

    np.savez(folder / "train.npz", x=u8(x), y=y.numpy())
    np.savez(folder / "test.npz", x=u8(tx), y=ty.numpy())


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8), mode="L").save(path)


def _context(node_config: dict[str, bool | float | int | str]) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def test_a_supernodes_data_dir_is_that_sites_files_alone(tmp_path: Path) -> None:
    """Partition 2 of the smoke data written as a site folder: the node's client gets exactly those samples
    (pixels and labels), under its own partition id, with the classes the folder states."""
    config = build_config(preset="smoke")
    data = build_federated_data(config.data, num_clients=config.num_clients, seed=config.seed)
    part = data.clients[2]
    site = tmp_path / "site-2"
    write_npz_site(site, part.train_x, part.train_y, part.test_x, part.test_y)
    (site / "config.json").write_text(json.dumps({"class_names": data.class_names}))
    got, index = client_data(config, _context({"partition-id": 2, "data-dir": str(site)}))
    assert index == 2 and got.class_names == data.class_names and got.source == f"site {site}"
    local = got.clients[index]
    assert torch.equal(local.train_x, part.train_x) and torch.equal(local.train_y, part.train_y)
    assert torch.equal(local.test_x, part.test_x) and torch.equal(local.test_y, part.test_y)
    # Without data-dir the node takes its partition of the preset's data, as before.
    preset, _ = client_data(config, _context({"partition-id": 2}))
    assert preset.source == data.source


def test_npz_labels_are_checked_against_the_federations_classes(tmp_path: Path) -> None:
    site = tmp_path / "site"
    x = torch.rand(6, 1, 8, 8)
    write_npz_site(site, x, torch.tensor([0, 1, 2, 3, 0, 5]), x[:2], torch.tensor([0, 1]))
    with pytest.raises(DataError, match=r"labels must lie in \[0, 4\)"):
        node_site_data({"data-dir": str(site), "num-classes": 4}, 0)
    got = node_site_data({"data-dir": str(site), "num-classes": 6}, 0)  # no config.json: C from the node
    assert got is not None and got.class_names == [f"class {c}" for c in range(6)]
    with pytest.raises(DataError, match="the federation's classes are unknown") as info:
        node_site_data({"data-dir": str(site)}, 0)
    assert "\n" not in str(info.value)


def test_an_image_folder_site_maps_class_folders_to_the_federations_order(tmp_path: Path) -> None:
    """The site holds two of three classes; a folder may be named by the class or by its label."""
    site = tmp_path / "site"
    for split, n in (("train", 3), ("test", 1)):
        for i in range(n):
            _png(site / split / "circle" / f"{i}.png", 10)
            _png(site / split / "1" / f"{i}.png", 200)  # label 1: "cross"
    (site / "config.json").write_text(json.dumps({"class_names": ["square", "cross", "circle"]}))
    got = node_site_data({"data-dir": str(site)}, 3)
    assert got is not None
    local = got.clients[3]
    assert sorted(local.train_y.tolist()) == [1, 1, 1, 2, 2, 2]
    assert local.train_x.shape == (6, 1, 8, 8)
    # each label's pixels are its folder's
    assert all(
        abs(float(px.mean()) - (200 if label == 1 else 10) / 255) < 1e-6
        for px, label in zip(local.train_x, local.train_y.tolist(), strict=True)
    )
    assert sorted(local.test_y.tolist()) == [1, 2]


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ({}, "does not exist"),
        ({"readme.txt": "x"}, "is not a site folder"),
        ({"train/dog/0.png": 1, "test/dog/0.png": 1}, "'dog' is not one of the federation's classes"),
        ({"train/circle/0.png": 1, "test/circle/a.txt": "x"}, "holds no .png files"),
    ],
)
def test_a_bad_site_folder_is_one_line(tmp_path: Path, layout: dict[str, object], expected: str) -> None:
    site = tmp_path / "site"
    if layout:
        site.mkdir()
    for name, value in layout.items():
        path = site / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(value, int):
            _png(path, value)
        else:
            path.write_text(str(value))
    with pytest.raises(DataError, match=expected) as info:
        load_site(site, num_classes=2, class_names=["circle", "cross"])
    assert "\n" not in str(info.value)
