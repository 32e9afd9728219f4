"""Secure aggregation (``fedproto-secagg``, ``fedktl-secagg``): clients upload summands, the server step reads
only their sum — in plaintext in ``ktl simulate``, under Flower's SecAgg+ on Flower, where no reply carries
a client's summand in the clear."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from pydantic import ValidationError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ktl.api.schemas import FederationSpec
from ktl.config import build_config
from ktl.errors import ConfigError, PayloadError
from ktl.methods import SUM_UPLOAD, MethodContext, ServerUpdate, get_method
from ktl.methods.secure import FedProtoSecAgg, decode_sum, encode_summand
from ktl.records import Prototypes
from ktl.simulate import run_simulation
from tests.conftest import simulate_like_ray

C = K = 10
CTX = MethodContext(num_classes=C, proto_dim=K, class_names=None)


def _tables(n: int, seed: int) -> dict[str, Prototypes]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(n):
        ids = torch.randperm(C, generator=g)[: 3 + i % 5].sort().values
        vectors = F.normalize(torch.randn(len(ids), K, generator=g), dim=1)
        out[f"c{i}"] = Prototypes(
            vectors=vectors, class_ids=ids, counts=torch.randint(1, 500, (len(ids),), generator=g)
        )
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_sum_of_summands_gives_fedproto_table_bit_for_bit(seed: int) -> None:
    tables = _tables(6, seed)
    settings = {"baseline": {"upload_dtype": "float32"}}
    plain = get_method("fedproto")(get_method("fedproto").settings_from(settings), CTX)
    secure = FedProtoSecAgg(FedProtoSecAgg.settings_from(settings), CTX)
    expected = plain.server_update({k: t.to_bytes(torch.float32) for k, t in tables.items()}, 1)
    summands = {k: encode_summand(t, C, K, 65_536) for k, t in tables.items()}
    given = secure.server_input(summands)
    assert list(given) == [SUM_UPLOAD]  # the server step reads one sum, not the uploads
    got = secure.server_update(given, 1)
    a, b = Prototypes.from_bytes(expected.payload or b""), Prototypes.from_bytes(got.payload or b"")
    assert torch.equal(a.class_ids, b.class_ids) and torch.equal(a.counts, b.counts)
    assert torch.equal(a.vectors, b.vectors)


def test_a_summand_hides_which_classes_are_absent_and_a_sum_counts_its_clients() -> None:
    tables = _tables(4, 0)
    payloads = [encode_summand(t, C, K, 1024) for t in tables.values()]
    one = st_load(payloads[0])
    assert one["weighted"].shape == (C, K) and one["counts"].shape == (C,)  # dense: every class has a row
    method = FedProtoSecAgg(FedProtoSecAgg.settings_from({"secagg": {"count_scale": 1024}}), CTX)
    summed = method.server_input({str(i): p for i, p in enumerate(payloads)})[SUM_UPLOAD]
    table, clients = decode_sum(summed, C, K, 1024)
    assert clients == 4
    expected_counts = torch.zeros(C, dtype=torch.long)
    for t in tables.values():
        expected_counts[t.class_ids] += t.counts
    assert torch.equal(table.counts, expected_counts[table.class_ids])


def test_a_client_above_the_count_bound_refuses_and_forged_sums_are_refused() -> None:
    big = Prototypes(vectors=torch.eye(K)[:1], class_ids=torch.tensor([0]), counts=torch.tensor([2000]))
    with pytest.raises(ConfigError, match="count_scale"):
        encode_summand(big, C, K, 1024)
    good = st_load(encode_summand(_tables(1, 0)["c0"], C, K, 1024))

    forged = [
        {**good, "clients": torch.tensor([0.5], dtype=torch.float64)},  # not a whole number of clients
        {**good, "counts": good["counts"] - 1.0},  # negative counts
        {**good, "weighted": good["weighted"] * 3},  # rows longer than their counts allow
    ]
    for tensors in forged:
        with pytest.raises(PayloadError):
            decode_sum(st_save(tensors), C, K, 1024)


def test_secure_methods_run_in_simulate_and_equal_fedproto_there(tmp_path: Path) -> None:
    """ktl simulate sums in plaintext: fedproto-secagg's accuracies are FedProto's (float32 uploads, so both
    see the same numbers); fedktl-secagg runs with finite losses."""

    def rounds(method: str, **overrides: Any) -> list[dict[str, Any]]:
        out = tmp_path / method
        config = build_config(preset="smoke", overrides={"method": method, "out": str(out), **overrides})
        run_simulation(config, progress=False)
        return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]

    fp32 = {"rounds": 3, "baseline": {"upload_dtype": "float32"}}
    plain, secure = rounds("fedproto", **fp32), rounds("fedproto-secagg", **fp32)
    assert [x["accuracy"] for x in secure] == [x["accuracy"] for x in plain]
    lines = rounds("fedktl-secagg", rounds=2, aligner={"steps": 20})
    assert all(np.isfinite(x["align_loss_last"]) and np.isfinite(x["train_loss"]) for x in lines)


def test_the_http_server_refuses_secure_aggregation_methods() -> None:
    for method in ("fedproto-secagg", "fedktl-secagg"):
        with pytest.raises(ValidationError, match="needs secure aggregation"):
            FederationSpec.model_validate({"name": "x", "num_classes": 10, "method": method})


def test_on_flower_secagg_plus_hands_the_server_only_the_sum(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One round of fedproto-secagg with 3 clients on the Simulation Engine. ktl simulate with the same seed
    (one thread, as Ray's workers) trains the same clients, so its summands are what the Flower clients
    masked: the server step's input equals their sum up to SecAgg+'s quantisation, no reply reaching the
    server holds an array, and each masked vector is spread over the whole modulus, not near its plaintext."""
    from ktl.flower.config import FlowerOptions
    from ktl.flower.server_app import CountingGrid
    from ktl.flower.simulation import run_flower_simulation

    inputs: list[Mapping[str, bytes]] = []
    summands: list[bytes] = []
    received: list[Any] = []
    real_update, real_client = FedProtoSecAgg.server_update, FedProtoSecAgg.client_update

    def record_update(self: FedProtoSecAgg, uploads: Mapping[str, bytes], r: int) -> ServerUpdate:
        inputs.append(dict(uploads))
        return real_update(self, uploads, r)

    def record_client(self: FedProtoSecAgg, client: Any, r: int) -> Any:
        update = real_client(self, client, r)
        summands.append(update.payload)
        return update

    real_received = CountingGrid._received

    def record_received(self: CountingGrid, messages: Any) -> Any:
        out = real_received(self, messages)
        received.extend(out)
        return out

    monkeypatch.setattr(FedProtoSecAgg, "server_update", record_update)
    monkeypatch.setattr(FedProtoSecAgg, "client_update", record_client)
    monkeypatch.setattr(CountingGrid, "_received", record_received)
    overrides = {"method": "fedproto-secagg", "num_clients": 3, "rounds": 1}
    simulated = simulate_like_ray(
        build_config(preset="smoke", overrides={**overrides, "out": str(tmp_path / "sim")})
    )
    assert len(summands) == 3 and len(inputs) == 1
    plain_sum = {k: v.double() for k, v in st_load(inputs[0][SUM_UPLOAD]).items()}
    inputs.clear()

    flower = run_flower_simulation(build_config(preset="smoke", overrides=overrides), FlowerOptions())
    assert flower["failures"] == 0 and flower["accuracy"] == [simulated["final_accuracy"]]
    assert len(inputs) == 1 and list(inputs[0]) == [SUM_UPLOAD]
    secure_sum = st_load(inputs[0][SUM_UPLOAD])
    step = 2.0 / 2**22  # one quantisation level of [-1, 1]; stochastic rounding moves each client by < 1
    for name, value in plain_sum.items():
        assert torch.allclose(secure_sum[name].double(), value, atol=3 * step, rtol=0), name

    arrays = [
        m for m in received if not m.has_error() for rec in m.content.array_records.values() if len(rec)
    ]
    assert not arrays  # secaggplus_mod clears the plaintext arrays before a reply leaves the client
    masked = [
        [bytes_to_ndarray(b) for b in m.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        for m in received
        if not m.has_error() and Key.MASKED_PARAMETERS in m.content.config_records.get(RECORD_KEY_CONFIGS, {})
    ]
    assert len(masked) == 3
    for vectors in masked:
        weighted = np.asarray(next(v for v in vectors if v.ndim == 2), dtype=np.float64)  # the (C, K) one
        spread = weighted.ravel() / 2**32
        # Plaintext quantised values sit near 2**21 (0.0005 of the modulus); masked ones are uniform on it.
        assert 0.3 < spread.mean() < 0.7 and spread.max() > 0.5
