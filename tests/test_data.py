from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from ktl.data import DataConfig, build_federated_data
from ktl.data.fashion_mnist import CLASS_NAMES, DEBIAN_DIR, find_fashion_mnist, load_fashion_mnist, read_idx
from ktl.data.partition import dirichlet_partition, pathological_partition, split_train_test
from ktl.data.pfl import load_pfl_folder, read_client_npz
from ktl.data.synthetic import make_synthetic
from ktl.errors import DataError


def labels_balanced(n_per_class: int = 500, classes: int = 10) -> np.ndarray:
    return np.repeat(np.arange(classes), n_per_class)


def test_dirichlet_covers_every_sample_exactly_once() -> None:
    y = labels_balanced()
    parts = dirichlet_partition(y, 20, 0.1, np.random.default_rng(0))
    allidx = np.concatenate(parts)
    assert len(parts) == 20 and allidx.shape[0] == y.shape[0]
    assert np.array_equal(np.sort(allidx), np.arange(y.shape[0]))
    assert min(len(p) for p in parts) >= 20


def _dominant_share(parts: list[np.ndarray], y: np.ndarray) -> float:
    return float(np.mean([np.bincount(y[p], minlength=10).max() / len(p) for p in parts]))


def test_dirichlet_small_alpha_is_skewed_large_alpha_is_not() -> None:
    y = labels_balanced()
    for seed in range(3):
        skewed = _dominant_share(dirichlet_partition(y, 20, 0.1, np.random.default_rng(seed)), y)
        even = _dominant_share(dirichlet_partition(y, 20, 100.0, np.random.default_rng(seed)), y)
        assert skewed > 0.5  # on average most of a client's data is one class
        assert even < 0.2  # close to the uniform 0.1


def test_partition_is_seeded() -> None:
    y = labels_balanced(100)
    a = dirichlet_partition(y, 5, 0.5, np.random.default_rng(3))
    b = dirichlet_partition(y, 5, 0.5, np.random.default_rng(3))
    c = dirichlet_partition(y, 5, 0.5, np.random.default_rng(4))
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))


def test_pathological_gives_k_classes_and_covers_all() -> None:
    y = labels_balanced(200)
    parts = pathological_partition(y, 20, 2, np.random.default_rng(0))
    assert all(len(np.unique(y[p])) == 2 for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(y.shape[0]))


def test_partition_errors_are_clear() -> None:
    y = labels_balanced(10)
    with pytest.raises(DataError, match="alpha"):
        dirichlet_partition(y, 5, 0.0, np.random.default_rng(0))
    with pytest.raises(DataError, match="cannot cover"):
        pathological_partition(y, 3, 2, np.random.default_rng(0))
    with pytest.raises(DataError, match="samples"):
        dirichlet_partition(y, 50, 1.0, np.random.default_rng(0))


def test_split_train_test_is_disjoint_75_25() -> None:
    idx = np.arange(100, 200)
    train, test = split_train_test(idx, 0.75, np.random.default_rng(0))
    assert len(train) == 75 and len(test) == 25
    assert np.array_equal(np.sort(np.concatenate([train, test])), idx)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion_mnist(root: Path, n_train: int = 60, n_test: int = 20) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(root / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(root / f"{stem}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


def test_idx_reader_and_loader_on_a_fake_folder(tmp_path: Path) -> None:
    fake_fashion_mnist(tmp_path)
    assert read_idx(tmp_path / "train-images-idx3-ubyte.gz").shape == (60, 28, 28)
    data = load_fashion_mnist(tmp_path)
    assert data.images.shape == (80, 1, 28, 28) and data.images.dtype == np.uint8
    assert data.class_names == CLASS_NAMES and np.array_equal(data.labels[:10], np.arange(10))


def test_data_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_fashion_mnist(tmp_path / "fashion-mnist")
    monkeypatch.setenv("KTL_DATA_DIR", str(tmp_path))
    assert find_fashion_mnist() == tmp_path / "fashion-mnist"


def test_missing_data_names_the_package(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        find_fashion_mnist(tmp_path / "nowhere")
    message = str(info.value)
    assert "dataset-fashion-mnist" in message and "nowhere" in message and "\n" not in message


def test_truncated_idx_is_a_data_error(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, 1]) + struct.pack(">I", 10) + b"\x00" * 3)
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)


@pytest.mark.skipif(
    not DEBIAN_DIR.is_dir(),
    reason="Debian's dataset-fashion-mnist is not installed (make setup installs it as root)",
)
def test_real_fashion_mnist_from_debian() -> None:
    data = load_fashion_mnist()
    assert data.images.shape == (70000, 1, 28, 28)
    assert np.array_equal(np.bincount(data.labels), np.full(10, 7000))


def test_synthetic_set_shapes_and_balance() -> None:
    data = make_synthetic(samples_per_class=30, seed=1)
    assert data.images.shape == (300, 1, 28, 28) and data.images.dtype == np.uint8
    assert np.array_equal(np.bincount(data.labels), np.full(10, 30))


def test_build_federated_data_from_synthetic() -> None:
    cfg = DataConfig(dataset="synthetic", alpha=0.5, fraction=0.5)
    fed = build_federated_data(cfg, num_clients=5, seed=0)
    assert len(fed.clients) == 5 and fed.num_classes == 10
    total = sum(c.train_y.numel() + c.test_y.numel() for c in fed.clients)
    assert total == 1500  # half of 3000
    for c in fed.clients:
        assert (
            c.train_x.dtype.is_floating_point and float(c.train_x.min()) >= 0 and float(c.train_x.max()) <= 1
        )
        assert c.test_y.numel() >= 1
    again = build_federated_data(cfg, num_clients=5, seed=0)
    assert all(a.train_y.equal(b.train_y) for a, b in zip(fed.clients, again.clients, strict=True))


def _pfl_folder(root: Path, pickled: bool) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        (root / split).mkdir(parents=True)
        for i in range(3):
            x = (rng.random((n, 1, 28, 28)) * 2 - 1).astype(np.float32)  # PFLlib's normalised floats
            y = rng.integers(0, 10, n)
            with open(root / split / f"{i}.npz", "wb") as f:
                if pickled:
                    np.savez_compressed(f, data={"x": x, "y": y})
                else:
                    np.savez_compressed(f, x=x, y=y)
    return root


@pytest.mark.parametrize("pickled", [True, False])
def test_pfl_folder_both_layouts(tmp_path: Path, pickled: bool) -> None:
    images, splits = load_pfl_folder(_pfl_folder(tmp_path, pickled))
    assert images.images.shape == (24, 1, 28, 28) and images.images.dtype == np.uint8
    assert (
        len(splits) == 3
        and [len(tr) for tr, _ in splits] == [6, 6, 6]
        and [len(te) for _, te in splits] == [2, 2, 2]
    )
    fed = build_federated_data(DataConfig(dataset="pfl-npz", path=tmp_path), num_clients=3, seed=0)
    assert [c.train_y.numel() for c in fed.clients] == [6, 6, 6]
    with pytest.raises(DataError, match="holds 3 clients"):
        build_federated_data(DataConfig(dataset="pfl-npz", path=tmp_path), num_clients=4, seed=0)


class _Evil:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (Path.touch, (Path("/tmp/ktl-pwned"),))


def test_pfl_pickle_with_foreign_classes_is_refused(tmp_path: Path) -> None:
    arr = np.empty((), dtype=object)
    arr[()] = {"x": _Evil(), "y": np.zeros(1)}
    path = tmp_path / "0.npz"
    with open(path, "wb") as f:
        np.savez(f, data=arr)
    with pytest.raises(DataError, match="refusing to unpickle"):
        read_client_npz(path)
    assert not Path("/tmp/ktl-pwned").exists()


def test_pfl_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="train/ and test/"):
        load_pfl_folder(tmp_path)
    with pytest.raises(DataError, match="needs --data.path"):
        build_federated_data(DataConfig(dataset="pfl-npz"), num_clients=2, seed=0)


def test_a_preset_does_not_shrink_a_users_own_data_and_class_names_come_from_it(tmp_path: Path) -> None:
    """cpu-small subsamples its Fashion-MNIST to 25 %; on a user's pfl-npz folder that fraction is not applied
    unless the user sets it. A PFLlib folder's config.json may name its classes."""
    from ktl.config import build_config

    root = _pfl_folder(tmp_path / "pfl", pickled=False)
    (root / "config.json").write_text(
        json.dumps({"num_classes": 10, "class_names": [f"c{i}" for i in range(10)]})
    )
    own = {"num_clients": 3, "data": {"dataset": "pfl-npz", "path": str(root)}}
    config = build_config(preset="cpu-small", overrides=own)
    assert config.data.fraction == 1.0
    fed = build_federated_data(config.data, num_clients=3, seed=0)
    assert [c.train_y.numel() for c in fed.clients] == [6, 6, 6]  # every sample kept
    assert fed.class_names == [f"c{i}" for i in range(10)]
    asked = build_config(preset="cpu-small", overrides={**own, "data": {**own["data"], "fraction": 0.5}})
    assert asked.data.fraction == 0.5  # asked for: applied
    assert build_config(preset="cpu-small").data.fraction == 0.25  # the preset's own data: as before
