"""Baselines (fedproto, fedtgp, fd), the no-generator ablation, DP uploads and the few-shot option."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ktl.clients.losses import etf_cosines
from ktl.clients.privacy import epsilon_for, noise_std
from ktl.config import build_config
from ktl.data import DataConfig, build_federated_data
from ktl.errors import ConfigError
from ktl.methods import METHODS, Method, MethodContext, adaptive_margin, class_mean_table
from ktl.records import Prototypes
from ktl.simulate import method_settings, run_simulation
from tests.test_client import C, cnn_client, crafted_client
from tests.test_simulate import TINY, tiny


def table(vectors: list[list[float]], ids: list[int], counts: list[int]) -> Prototypes:
    return Prototypes(vectors=torch.tensor(vectors), class_ids=torch.tensor(ids), counts=torch.tensor(counts))


def upload(vectors: list[list[float]], ids: list[int], counts: list[int]) -> bytes:
    return table(vectors, ids, counts).to_bytes()


def test_every_method_is_registered_by_name() -> None:
    assert {"local", "fedktl", "fedproto", "fedtgp", "fd", "fedktl-latents"} <= set(METHODS)
    assert all(cls.name == name for name, cls in METHODS.items())


def test_class_mean_table_weights_by_sample_counts() -> None:
    uploads = {
        "a": table([[1.0, 0.0], [0.0, 1.0]], [0, 2], [3, 1]),
        "b": table([[0.0, 1.0]], [0], [1]),
    }
    means, counts = class_mean_table(uploads, 3)
    torch.testing.assert_close(means[0], torch.tensor([0.75, 0.25]))
    torch.testing.assert_close(means[2], torch.tensor([0.0, 1.0]))
    assert counts.tolist() == [4.0, 0.0, 1.0]
    assert means[1].abs().sum() == 0  # nobody sent class 1


def test_adaptive_margin_is_the_largest_nearest_class_distance_capped() -> None:
    vectors = torch.tensor([[0.0, 0.0], [3.0, 0.0], [3.0, 1.0], [0.0, 0.0]])
    ids = torch.tensor([0, 1, 2, 0])
    # nearest other class: 0 → 1 at 3, 1 → 2 at 1, 2 → 1 at 1: the largest is 3
    assert adaptive_margin(vectors, ids, 3, threshold=100.0) == pytest.approx(3.0)
    assert adaptive_margin(vectors, ids, 3, threshold=0.5) == pytest.approx(0.5)
    assert adaptive_margin(vectors[:1], ids[:1], 3, threshold=100.0) == 0.0


def _method(tmp_path: Path, name: str, **extra: object) -> Method:
    """Method ``name`` with the settings of a tiny config (and ``extra``), for C classes."""
    config = tiny(tmp_path, "ctx", method=name, **extra)
    ctx = MethodContext(num_classes=C, proto_dim=C, class_names=[str(i) for i in range(C)], seed=config.seed)
    return METHODS[name](method_settings(config), ctx)


def test_fedtgp_learns_prototypes_that_classify_the_uploads(tmp_path: Path) -> None:
    method = _method(tmp_path, "fedtgp", baseline={"tgp_steps": 200})
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(C, C, generator=g), dim=1)
    uploads = {}
    for client in range(5):
        noisy = F.normalize(centres + 0.2 * torch.randn(C, C, generator=g), dim=1)
        uploads[f"c{client}"] = upload(noisy.tolist(), list(range(C)), [10] * C)
    table, counts = method.aggregate(method.decode_uploads(uploads), 1)  # type: ignore[attr-defined]
    assert table.shape == (C, C) and bool(torch.isfinite(table).all())
    assert counts.tolist() == [50.0] * C
    # every upload's nearest global prototype is its own class's
    rows = torch.cat([Prototypes.from_bytes(b).vectors for b in uploads.values()])
    nearest = torch.cdist(rows, table).argmin(dim=1)
    assert nearest.tolist() == list(range(C)) * 5


def test_table_regulariser_pulls_towards_the_global_row_and_ignores_absent_classes(tmp_path: Path) -> None:
    method = _method(tmp_path, "fedproto")
    client = crafted_client()
    table = torch.zeros(C, C)
    table[0] = torch.tensor([1.0, 0.0, 0.0, 0.0])
    payload = Prototypes(vectors=table[:1], class_ids=torch.tensor([0]), counts=torch.tensor([3])).to_bytes()
    method.client_receive(client, payload)
    pull = method._regularizer(client)  # type: ignore[attr-defined]
    assert pull is not None
    head = torch.tensor(
        [[2.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 5.0, 0.0]], requires_grad=True
    )
    labels = torch.tensor([0, 0, 2])  # class 2 is not in the table: no pull
    loss = pull(head, labels)
    # row 0 sits on the prototype (0), row 1 is at squared distance 2: mean over the 2 pulled rows = 1
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert bool(torch.isfinite(head.grad).all()) and float(head.grad[2].abs().sum()) == 0.0


def test_fd_uploads_mean_cosines_per_class() -> None:
    client = crafted_client()
    table = client.mean_cosines()
    cos = etf_cosines(client._head_outputs(client.data.train_x), client.etf)
    assert table.class_ids.tolist() == [0, 2] and table.counts.tolist() == [3, 1]
    torch.testing.assert_close(table.vectors[0], cos[[0, 1, 3]].mean(0))
    torch.testing.assert_close(table.vectors[1], cos[2])


def test_latent_targets_pair_the_clients_own_images_with_their_class_latent() -> None:
    client = cnn_client()
    latents = torch.randn(2, 16)
    client.receive_latent_targets(latents, torch.tensor([1, 3]))
    held = client._pairs
    assert held is not None
    y = client.data.train_y
    wanted = (y == 1) | (y == 3)
    assert held.x.shape[0] == int(wanted.sum())
    expected = torch.where((y[wanted] == 1)[:, None], latents[0], latents[1])
    torch.testing.assert_close(held.z, expected)
    first = client.train(mu=1.0)
    for _ in range(3):
        last = client.train(mu=1.0)
    assert math.isfinite(last.distill_loss) and last.distill_loss < first.distill_loss


def test_noise_std_and_epsilon_invert_each_other_and_grow_with_rounds() -> None:
    for eps in (0.5, 1.0, 8.0):
        for rounds in (1, 15, 100):
            std = noise_std(eps, 1e-5, rounds)
            assert epsilon_for(std, 1e-5, rounds) == pytest.approx(eps, rel=1e-9)
    assert noise_std(1.0, 1e-5, 100) > noise_std(1.0, 1e-5, 10) > noise_std(8.0, 1e-5, 10)
    with pytest.raises(ValueError):
        noise_std(0.0, 1e-5, 10)


def test_private_prototypes_hide_counts_and_degrade_with_noise() -> None:
    client = cnn_client()
    clean = client.prototypes()
    g = torch.Generator().manual_seed(0)
    slight = client.prototypes(noise_std=1e-3, generator=g)
    heavy = client.prototypes(noise_std=1e3, generator=g)
    for p in (slight, heavy):
        assert p.class_ids.tolist() == clean.class_ids.tolist()
        assert p.counts.tolist() == [1] * len(p.counts)  # true counts would leak
        p.validate(num_classes=C, dim=C)
    cos_slight = (slight.vectors * clean.vectors).sum(1)
    cos_heavy = (heavy.vectors * clean.vectors).sum(1)
    assert bool((cos_slight > 0.999).all()) and float(cos_heavy.abs().mean()) < 0.9


def test_few_shot_keeps_at_most_the_shots_per_class_and_the_whole_test_split() -> None:
    full = build_federated_data(DataConfig(dataset="synthetic", alpha=1.0), num_clients=2, seed=0)
    few = build_federated_data(DataConfig(dataset="synthetic", alpha=1.0, shots=3), num_clients=2, seed=0)
    for a, b in zip(full.clients, few.clients, strict=True):
        counts = np.bincount(b.train_y.numpy(), minlength=10)
        assert counts.max() <= 3
        assert set(b.train_y.tolist()) == set(a.train_y.tolist())  # every local class kept
        assert torch.equal(a.test_y, b.test_y)


@pytest.mark.parametrize("method", ["fedproto", "fedtgp", "fd", "fedktl-latents"])
def test_each_method_runs_in_the_simulator_and_moves_bytes(tmp_path: Path, method: str) -> None:
    summary = run_simulation(tiny(tmp_path, method, method=method), progress=False)
    lines = [json.loads(x) for x in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    assert all(0 <= r["accuracy"] <= 1 and r["skipped_steps"] == 0 for r in lines)
    assert lines[0]["distill_loss"] == 0 and lines[1]["distill_loss"] > 0  # the table arrives after round 1
    assert summary["bytes_up_per_client_round"] > 0 and summary["bytes_down_per_client_round"] > 0


def test_fedktl_upload_is_c_by_k_fp16_plus_framing(tmp_path: Path) -> None:
    config = build_config(
        overrides={
            **TINY,
            "rounds": 1,
            "num_clients": 1,
            "data": {"dataset": "synthetic", "alpha": 1.0},
            "out": str(tmp_path / "one"),
        }
    )
    summary = run_simulation(config, progress=False)
    vectors = 10 * 10 * 2  # C × K × fp16: the one client holds every class
    framing = summary["bytes_up_per_client_round"] - vectors
    assert 0 < framing < 400  # class ids, counts and the safetensors header


def test_privacy_runs_with_prototype_methods_and_is_refused_for_fd(tmp_path: Path) -> None:
    summary = run_simulation(tiny(tmp_path, "dp", privacy={"epsilon": 4.0}), progress=False)
    assert summary["privacy"]["epsilon"] == 4.0
    assert summary["privacy"]["noise_std"] == pytest.approx(noise_std(4.0, 1e-5, TINY["rounds"]))
    with pytest.raises(ConfigError, match="privacy.epsilon"):
        run_simulation(tiny(tmp_path, "fd-dp", method="fd", privacy={"epsilon": 4.0}), progress=False)


def test_fedktl_run_folder_keeps_every_rounds_pairs_and_aligner_history(tmp_path: Path) -> None:
    run_simulation(tiny(tmp_path, "run"), progress=False)
    rounds = tmp_path / "run" / "rounds"
    assert sorted(p.name for p in rounds.iterdir()) == [
        "aligner-0001.json",
        "aligner-0002.json",
        "pairs-0001.safetensors",
        "pairs-0002.safetensors",
        "quality-0001.json",
        "quality-0001.png",
        "quality-0002.json",
        "quality-0002.png",
    ]
    history = json.loads((rounds / "aligner-0002.json").read_text())
    assert len(history["mmd"]) == TINY["aligner"]["steps"]  # type: ignore[index]
    uploads = Prototypes.from_bytes((tmp_path / "run" / "uploads.safetensors").read_bytes())
    assert uploads.vectors.shape[1] == 10 and uploads.vectors.shape[0] >= 10  # every client's rows
    torch.testing.assert_close(
        uploads.vectors.norm(dim=1), torch.ones(len(uploads.vectors)), atol=1e-2, rtol=0
    )


def test_a_method_reads_only_its_own_sections(tmp_path: Path) -> None:
    config = tiny(tmp_path, "x", baseline={"lam": 3.0}, fedktl={"mu": 2.0}, privacy={"epsilon": 5.0})
    proto = METHODS["fedproto"].settings_from(config)
    ktl = METHODS["fedktl"].settings_from(config)
    assert set(proto.model_dump()) == {"baseline", "privacy"} and proto.baseline.lam == 3.0  # type: ignore[attr-defined]
    assert set(ktl.model_dump()) == {"fedktl", "aligner", "privacy"} and ktl.fedktl.mu == 2.0  # type: ignore[attr-defined]
    assert METHODS["local"].settings_from(config).model_dump() == {}
    with pytest.raises(ConfigError, match="not available for method 'fd'"):
        METHODS["fd"].settings_from(config)


def test_fedktl_state_round_trips_and_the_next_round_is_the_same_warm_or_reloaded(tmp_path: Path) -> None:
    from ktl.generator import GeneratorSpec, load_generator
    from ktl.methods import load_method

    config = tiny(tmp_path, "ktl")
    ctx = MethodContext(
        num_classes=C, proto_dim=C, class_names=None, seed=3, generator=load_generator(GeneratorSpec(), "cpu")
    )
    g = torch.Generator().manual_seed(0)

    def uploads() -> dict[str, bytes]:
        return {
            f"c{i}": upload(
                F.normalize(torch.randn(C, C, generator=g), dim=1).tolist(), list(range(C)), [5] * C
            )
            for i in range(3)
        }

    warm = METHODS["fedktl"](method_settings(config), ctx)
    warm.server_update(uploads(), 1)
    warm.save_pretrained(tmp_path / "state")
    reloaded = load_method(tmp_path / "state", ctx)
    assert type(reloaded) is type(warm) and reloaded.settings == warm.settings
    second = uploads()
    assert warm.server_update(second, 2).payload == reloaded.server_update(second, 2).payload
    with pytest.raises(ConfigError, match="C=4"):
        load_method(tmp_path / "state", MethodContext(num_classes=5, proto_dim=5, class_names=None))
