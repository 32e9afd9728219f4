"""The HtFLlib baselines with a trainable classifier: lg-fedavg, fedgh, fedgen, fml, fedkd, fedmrl.

Each server step is checked against a hand computation on a tiny case; the client side (classifier mode,
companions, state that must survive a Flower round) on the crafted and CNN clients of test_client.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ktl.clients import Companion
from ktl.clients.inputs import normalize_pixels
from ktl.errors import ConfigError, PayloadError
from ktl.methods import METHODS, CostShape, Method, MethodContext, load_method
from ktl.methods.fedgen import FedGen, draw_labels
from ktl.methods.fedkd import svd_compress, svd_recover
from ktl.methods.heads import kl_to, weighted_mean
from ktl.records import WEIGHT_LIMIT, Prototypes, Weights
from ktl.seeding import derive_seed
from tests.test_client import C, cnn_client, crafted_client

K = C  # proto_dim = C, as every transport builds it
NEW = ("lg-fedavg", "fedgh", "fedgen", "fml", "fedkd", "fedmrl")
SHARED = ("fml", "fedkd", "fedmrl")  # a shared model averaged by the server


def method(name: str, **sections: object) -> Method:
    cls = METHODS[name]
    ctx = MethodContext(num_classes=C, proto_dim=K, class_names=None, seed=3)
    return cls(cls.settings_from(sections), ctx)


def head_upload(weight: torch.Tensor, bias: torch.Tensor, counts: list[int]) -> bytes:
    return Weights({"weight": weight, "bias": bias}, torch.tensor(counts)).to_bytes()


def test_every_new_method_is_registered() -> None:
    assert set(NEW) <= set(METHODS)


def test_weights_round_trip_and_refusals() -> None:
    w = Weights({"a": torch.arange(6.0).view(2, 3)}, torch.tensor([5]))
    back = Weights.from_bytes(w.to_bytes())
    torch.testing.assert_close(back.tensors["a"], w.tensors["a"])
    assert back.num_samples == 5 and back.rows == 1
    with pytest.raises(PayloadError, match="not a safetensors"):
        Weights.from_bytes(b"\x80\x04K\x01.")  # a pickle is never read
    with pytest.raises(PayloadError, match="layout"):
        back.validate({"a": (3, 2)}, counts=1)
    with pytest.raises(PayloadError, match="counts"):
        back.validate({"a": (2, 3)}, counts=C)
    with pytest.raises(PayloadError, match="beyond"):
        Weights({"a": torch.tensor([2 * WEIGHT_LIMIT])}, torch.tensor([1])).validate(None, counts=1)
    with pytest.raises(PayloadError, match="NaN"):
        Weights({"a": torch.tensor([float("nan")])}, torch.tensor([1])).validate(None, counts=1)
    with pytest.raises(PayloadError, match="at least one sample"):
        Weights({"a": torch.tensor([1.0])}, torch.tensor([0])).validate(None, counts=1)


# -- LG-FedAvg ------------------------------------------------------------------------------------------


def test_lg_fedavg_server_step_is_the_sample_weighted_mean_classifier() -> None:
    m = method("lg-fedavg")
    w1, w2 = torch.ones(C, K), torch.full((C, K), 5.0)
    b1, b2 = torch.zeros(C), torch.full((C,), 4.0)
    out = m.server_update({"a": head_upload(w1, b1, [1]), "b": head_upload(w2, b2, [3])}, 1)
    mean = Weights.from_bytes(out.payload or b"")
    # (1·1 + 3·5) / 4 = 4 and (1·0 + 3·4) / 4 = 3
    torch.testing.assert_close(mean.tensors["weight"], torch.full((C, K), 4.0))
    torch.testing.assert_close(mean.tensors["bias"], torch.full((C,), 3.0))
    assert mean.counts.tolist() == [4]
    with pytest.raises(PayloadError, match="layout"):
        m.validate_upload(head_upload(torch.ones(C, K + 1), b1, [1]))


def test_lg_fedavg_client_trains_with_cross_entropy_and_takes_the_mean() -> None:
    m, client = method("lg-fedavg"), cnn_client()
    assert client.model.classifier is None  # the fixed ETF until a classifier method touches it
    update = m.client_update(client, 1)
    assert client.model.classifier is not None and update.stats.steps > 0
    sent = m.validate_upload(update.payload or b"")
    assert sent.counts.tolist() == [client.num_train]
    target = torch.full((C, K), 0.25)
    m.client_receive(client, head_upload(target, torch.zeros(C), [1]))
    torch.testing.assert_close(client.model.classifier.weight.detach(), target)
    correct, total = client.evaluate()  # the classifier's argmax
    with torch.no_grad():
        logits = client.model.classifier(client._head_outputs(client.data.test_x))
    assert correct == int((logits.argmax(1) == client.data.test_y).sum()) and total == client.num_test


def test_the_classifier_survives_a_client_state_round_trip() -> None:
    m, client = method("lg-fedavg"), cnn_client()
    m.client_update(client, 1)
    fresh = cnn_client()
    fresh.load_state_tensors(client.state_tensors())
    assert fresh.model.classifier is not None
    torch.testing.assert_close(fresh.model.classifier.weight, client.model.classifier.weight)
    assert fresh.evaluate() == client.evaluate()


# -- FedGH ----------------------------------------------------------------------------------------------


def test_fedgh_server_step_is_sgd_on_the_uploaded_prototypes() -> None:
    m = method("fedgh", fedgh={"server_epochs": 1, "server_batch_size": 100, "server_lr": 0.5})
    head0 = copy.deepcopy(m.head)  # type: ignore[attr-defined]
    a = Prototypes(torch.tensor([[1.0, 0.0, 0.0, 2.0]]), torch.tensor([0]), torch.tensor([3]))
    b = Prototypes(
        torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0]]), torch.tensor([1, 3]), torch.tensor([1, 2])
    )
    out = m.server_update({"a": a.to_bytes(), "b": b.to_bytes()}, 1)
    # one full-batch step: ∇W = (softmax(Wx + b) − onehot(y))ᵀ x / n, ∇b = mean of the residuals
    x = torch.cat([a.vectors, b.vectors])
    y = torch.tensor([0, 1, 3])
    with torch.no_grad():
        residual = F.softmax(x @ head0.weight.T + head0.bias, dim=1) - F.one_hot(y, C).float()
        weight = head0.weight - 0.5 * residual.T @ x / 3
        bias = head0.bias - 0.5 * residual.mean(dim=0)
    sent = Weights.from_bytes(out.payload or b"")
    torch.testing.assert_close(sent.tensors["weight"], weight)
    torch.testing.assert_close(sent.tensors["bias"], bias)
    assert out.metrics["prototypes"] == 3


def test_fedgh_uploads_raw_mean_features_and_refuses_huge_ones() -> None:
    m, client = method("fedgh"), crafted_client()
    update = m.client_update(client, 1)
    table = m.validate_upload(update.payload or b"")
    h = client._head_outputs(client.data.train_x)
    torch.testing.assert_close(table.vectors[0], h[client.data.train_y == 0].mean(dim=0))
    huge = Prototypes(torch.full((1, K), 2 * WEIGHT_LIMIT), torch.tensor([0]), torch.tensor([1]))
    with pytest.raises(PayloadError, match="beyond"):
        m.validate_upload(huge.to_bytes())


# -- FedGen ---------------------------------------------------------------------------------------------


def test_fedgen_server_step_is_one_adam_step_on_the_ensemble_and_the_mean_head() -> None:
    m = method("fedgen", fedgen={"server_steps": 1, "batch_size": 6, "server_lr": 0.01, "hidden_dim": 8})
    assert isinstance(m, FedGen)
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(C, K, generator=g), torch.randn(C, K, generator=g)
    b1, b2 = torch.randn(C, generator=g), torch.randn(C, generator=g)
    uploads = {"a": head_upload(w1, b1, [1, 0, 0, 0]), "b": head_upload(w2, b2, [0, 2, 0, 1])}
    expected_gen = copy.deepcopy(m.generator)
    out = m.server_update(uploads, 7)
    # by hand: the same draws, the ensemble 1/4·head_a + 3/4·head_b, CE, then Adam's first step
    # θ − lr·g/(|g| + ε) (bias-corrected moments m̂ = g, v̂ = g²)
    draws = torch.Generator().manual_seed(derive_seed(3, "fedgen-server", 7))
    counts = torch.tensor([1, 2, 0, 1])
    y = draw_labels(counts, 6, draws)
    z = expected_gen(y, draws)
    logits = 0.25 * F.linear(z, w1, b1) + 0.75 * F.linear(z, w2, b2)
    F.cross_entropy(logits, y).backward()
    sent = Weights.from_bytes(out.payload or b"")
    for name, p in expected_gen.named_parameters():
        assert p.grad is not None
        step = p.detach() - 0.01 * p.grad / (p.grad.abs() + 1e-8)
        torch.testing.assert_close(sent.tensors[f"generator.{name}"], step, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sent.tensors["head.weight"], 0.25 * w1 + 0.75 * w2)
    assert sent.counts.tolist() == counts.tolist()  # the federation's label counts
    with pytest.raises(PayloadError, match="counts"):
        m.validate_upload(head_upload(w1, b1, [1]))  # FedGen needs the per-class counts


def test_fedgen_client_learns_from_the_generator_and_keeps_it_as_state() -> None:
    m = method("fedgen", fedgen={"server_steps": 2, "hidden_dim": 8})
    client = cnn_client()
    first = m.client_update(client, 1)
    assert first.stats.distill_loss == 0  # no generator yet
    broadcast = m.server_update({client.client_id: first.payload or b""}, 1).payload or b""
    m.client_receive(client, broadcast)
    second = m.client_update(client, 2)
    assert second.stats.distill_loss > 0
    state = m.client_state(client)
    other = method("fedgen", fedgen={"server_steps": 2, "hidden_dim": 8})
    other.load_client_state(client, state)
    assert {k: v.shape for k, v in other.client_state(client).items()} == {
        k: v.shape for k, v in state.items()
    }


# -- FML and FedKD ----------------------------------------------------------------------------------------


def test_weighted_mean_refuses_uploads_of_two_layouts() -> None:
    a = Weights({"x": torch.ones(2)}, torch.tensor([1]))
    b = Weights({"x": torch.ones(3)}, torch.tensor([1]))
    with pytest.raises(PayloadError, match="layout"):
        weighted_mean({"a": a, "b": b})


@pytest.mark.parametrize("name", SHARED)
def test_shared_model_server_step_averages_and_then_holds_the_layout(name: str) -> None:
    m = method(name)
    one = Weights({"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(0.0)}, torch.tensor([2])).to_bytes()
    two = Weights({"w": torch.tensor([4.0, 8.0]), "b": torch.tensor(3.0)}, torch.tensor([1])).to_bytes()
    mean = Weights.from_bytes(m.server_update({"a": one, "b": two}, 1).payload or b"")
    torch.testing.assert_close(mean.tensors["w"], torch.tensor([2.0, 4.0]))  # (2·1 + 4)/3, (2·2 + 8)/3
    torch.testing.assert_close(mean.tensors["b"], torch.tensor(1.0))
    with pytest.raises(PayloadError, match="layout"):  # the federation's layout is now fixed
        m.validate_upload(Weights({"w": torch.ones(2)}, torch.tensor([1])).to_bytes())
    again = METHODS[name](m.settings, m.ctx)  # a restarted server keeps it
    again.load_state_tensors(m.state_tensors())
    with pytest.raises(PayloadError, match="layout"):
        again.validate_upload(
            Weights({"w": torch.ones(3), "b": torch.tensor(0.0)}, torch.tensor([1])).to_bytes()
        )


def test_kl_to_is_the_kl_of_the_fixed_target() -> None:
    logits, target = torch.tensor([[0.0, 1.0], [2.0, 0.0]]), torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    p, q = F.softmax(target, 1), F.softmax(logits, 1)
    expected = (p * (p.log() - q.log())).sum(1).mean()
    torch.testing.assert_close(kl_to(logits, target), expected)
    learner, moving = logits.clone().requires_grad_(), target.clone().requires_grad_()
    kl_to(learner, moving).backward()
    assert learner.grad is not None and moving.grad is None  # the target gets no gradient


@pytest.mark.parametrize("name", SHARED)
def test_shared_model_clients_train_both_models_and_restore_them(name: str) -> None:
    m, client = method(name), cnn_client()
    update = m.client_update(client, 1)
    assert update.stats.steps > 0 and update.stats.distill_loss > 0
    sent = m.validate_upload(update.payload or b"")
    assert sent.counts.tolist() == [client.num_train]
    shared = m.shared_model(client)  # type: ignore[attr-defined]
    fresh_shared = method(name).shared_model(cnn_client())  # type: ignore[attr-defined]
    assert any(
        not torch.equal(a, b) for a, b in zip(shared.parameters(), fresh_shared.parameters(), strict=True)
    )
    m.client_receive(client, m.server_update({"c": update.payload or b""}, 1).payload or b"")
    state = m.client_state(client)
    other = method(name)
    other.load_client_state(client, state)
    for k, v in other.client_state(client).items():
        torch.testing.assert_close(v, state[k])


def test_a_companion_steps_with_the_clients_optimiser() -> None:
    client = cnn_client()
    extra = torch.nn.Parameter(torch.tensor(1.0))
    companion = Companion(loss=lambda x, h, y: extra * 0 + extra.pow(2), parameters=[extra])
    stats = client.train(companion=companion)
    assert stats.steps > 0 and float(extra.detach()) < 1.0  # d(e²)/de = 2e pulls it towards 0


def _round_one(name: str) -> dict[str, bytes]:
    """One tiny upload of method ``name``'s kind."""
    if name in SHARED:
        return {"a": Weights({"w": torch.ones(2), "b": torch.tensor(1.0)}, torch.tensor([1])).to_bytes()}
    if name == "fedgh":
        return {"a": Prototypes(torch.eye(K)[:2], torch.tensor([0, 1]), torch.tensor([2, 3])).to_bytes()}
    counts = [2, 1, 0, 1] if name == "fedgen" else [4]
    return {"a": head_upload(torch.ones(C, K), torch.zeros(C), counts)}


@pytest.mark.parametrize("name", NEW)
def test_a_restarted_server_keeps_the_methods_state(name: str, tmp_path: Path) -> None:
    """What a server step learned (FedGH's classifier, FedGen's generator, the averaged layout) is saved
    with the method and comes back on a restart; a fresh method does not have it."""
    m = method(name, **({"fedgen": {"server_steps": 3}} if name == "fedgen" else {}))
    m.server_update(_round_one(name), 1)
    m.save_pretrained(tmp_path)
    again = load_method(tmp_path, m.ctx)
    assert type(again) is type(m)
    mine, theirs, fresh = m.state_tensors(), again.state_tensors(), type(m)(m.settings, m.ctx).state_tensors()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(value, theirs[key]) for key, value in mine.items())
    if name != "lg-fedavg":  # its layout is the federation's from the start: nothing to keep
        assert mine.keys() != fresh.keys() or any(not torch.equal(v, fresh[k]) for k, v in mine.items())


def test_the_admission_estimate_counts_the_shared_model_by_hand() -> None:
    """cnn4 at 3 × 32 × 32 with K = C = 10: conv 3·32·25 + 32, conv 32·64·25 + 64, fc 64·5·5·512 + 512,
    head 512·10 + 10, classifier 10·10 + 10 = 878,648 floats; a round of 20 uploads holds them, a float64
    accumulator (two float32s' worth) and the mean: 4 bytes × 878,648 × 23."""
    fml = METHODS["fml"]
    shape = CostShape(num_classes=10, proto_dim=10, rows=10 * 20)
    floats = 3 * 32 * 25 + 32 + 32 * 64 * 25 + 64 + 64 * 5 * 5 * 512 + 512 + 512 * 10 + 10 + 10 * 10 + 10
    assert floats == 878_648
    assert fml.server_cost(fml.settings_from({}), shape).memory_bytes == 4 * floats * 23
    mrl = METHODS["fedmrl"]  # its shared extractor ends in d = ⌈10/4⌉ = 3 dims, the global header 3 → 10
    mrl_floats = floats - (512 * 10 + 10 + 10 * 10 + 10) + 512 * 3 + 3 + 3 * 10 + 10
    assert mrl.server_cost(mrl.settings_from({}), shape).memory_bytes == 4 * mrl_floats * 23
    lg = METHODS["lg-fedavg"]
    assert lg.server_cost(lg.settings_from({}), shape).memory_bytes == 4 * 10 * 11 * 23


def test_fedkd_svd_keeps_the_singular_values_that_hold_the_energy() -> None:
    """σ = 3, 2, 1: σ² shares 9/14 ≈ 0.64, 13/14 ≈ 0.93, 1 — T = 0.9 keeps two, and the matrix comes back
    as diag(3, 2, 0, …); a conv kernel keeps its shape; a matrix the factors would not shrink stays whole."""
    d = torch.zeros(8, 8)
    d[0, 0], d[1, 1], d[2, 2] = 3.0, 2.0, 1.0
    sent = svd_compress({"d": d, "b": torch.ones(8), "small": torch.eye(2)}, 0.9)
    assert sent["d@u"].shape == (8, 2) and sent["d@v"].shape == (2, 8)
    assert torch.equal(sent["small"], torch.eye(2)) and torch.equal(sent["b"], torch.ones(8))
    back = svd_recover(sent)
    expected = d.clone()
    expected[2, 2] = 0.0
    torch.testing.assert_close(back["d"], expected, atol=1e-6, rtol=0)
    g = torch.Generator().manual_seed(0)
    kernel = (torch.randn(16, 2, generator=g) @ torch.randn(2, 3 * 5 * 5, generator=g)).view(16, 3, 5, 5)
    again = svd_recover(svd_compress({"conv": kernel}, 0.999))["conv"]
    assert again.shape == kernel.shape
    torch.testing.assert_close(again, kernel, atol=1e-4, rtol=1e-4)
    with pytest.raises(PayloadError, match="@u and @v"):
        svd_recover({"d@u": sent["d@u"], "d@shape": sent["d@shape"]})
    with pytest.raises(PayloadError, match="do not make its shape"):
        svd_recover({**sent, "d@shape": torch.tensor([8.0, 9.0])})
    with pytest.raises(
        PayloadError, match="do not make its shape"
    ):  # a small pair may not claim a huge tensor
        svd_recover(
            {
                "h@u": torch.ones(100_000, 1),
                "h@v": torch.ones(1, 100_000),
                "h@shape": torch.tensor([1e5, 1e5]),
            }
        )
    with pytest.raises(PayloadError, match="without their @u"):
        svd_recover({"d@v": sent["d@v"]})


def test_fedkd_with_svd_sends_fewer_bytes_and_averages_what_they_stand_for() -> None:
    # a freshly trained CNN's matrices are nearly full rank: T = 0.95 keeps almost all of them (2.32 MB of
    # 2.32 MB here), T = 0.5 about a third; FedKD's gains come as training makes them low rank
    whole, compressed = method("fedkd"), method("fedkd", fedkd={"svd_energy": 0.5})
    a, b = cnn_client(), cnn_client()
    full = whole.client_update(a, 1).payload or b""
    small = compressed.client_update(b, 1).payload or b""
    assert len(small) < len(full) / 2
    stood_for = compressed.validate_upload(small)  # decoded whole, checked against the layout
    out = compressed.server_update({"b": small}, 1)
    sent = Weights.from_bytes(out.payload or b"")
    assert any(k.endswith("@u") for k in sent.tensors)  # the broadcast is compressed too
    mean = svd_recover(sent.tensors)
    for name, value in stood_for.tensors.items():  # one upload: its mean is itself, up to a re-compression
        assert mean[name].shape == value.shape
    compressed.client_receive(b, out.payload or b"")
    shared = compressed.shared_model(b)  # type: ignore[attr-defined]
    torch.testing.assert_close(shared.state_dict()["head.weight"], mean["head.weight"])


def test_fedmrl_predicts_with_the_local_header_on_the_fused_representation() -> None:
    """After a round, the client scores with P([G(x), F(x)]) through its own classifier (what the paper
    evaluates), P a private (d + K) → K projector, G the shared extractor to d = ⌈K/4⌉; scoring leaves the
    shared model's state alone; the training loss adds the global header's CE on the first d dims."""
    m, client = method("fedmrl"), cnn_client()
    m.client_update(client, 1)
    d = math.ceil(K / 4)
    shared, projector = m.shared_model(client), m.private_module(client)  # type: ignore[attr-defined]
    assert isinstance(projector, torch.nn.Linear) and (projector.in_features, projector.out_features) == (
        d + K,
        K,
    )
    assert shared.classifier is not None and shared.classifier.in_features == d
    model, classifier = client.model, client.model.classifier
    assert classifier is not None
    x, y = normalize_pixels(client.data.test_x), client.data.test_y
    model.eval()
    with torch.no_grad():
        own = model.head(model.backbone(x))
        fused = projector(torch.cat((shared.eval()(x), own), dim=1))
        expected = int((classifier(fused).argmax(1) == y).sum())
        global_ce = F.cross_entropy(shared.classifier(fused[:, :d]), y)
        companion = m.companion(client, shared)  # type: ignore[attr-defined]
        torch.testing.assert_close(companion.loss(x, fused, y), global_ce)
    before = {k: v.clone() for k, v in shared.state_dict().items()}
    assert client.evaluate() == (expected, int(y.shape[0]))
    assert all(torch.equal(v, before[k]) for k, v in shared.state_dict().items())
    with torch.no_grad():
        torch.testing.assert_close(model(x), fused)  # the model's own forward is the fused one


def test_fedmrl_refuses_a_malformed_upload_and_a_too_wide_coarse_representation() -> None:
    m, client = method("fedmrl"), cnn_client()
    good = m.client_update(client, 1).payload or b""
    m.server_update({"a": good}, 1)  # the federation's layout: this shared model
    with pytest.raises(PayloadError, match="not a safetensors"):
        m.validate_upload(b"\x80\x04K\x01.")  # a pickle is never read
    sent = Weights.from_bytes(good)
    wrong = {k: (v[:1] if k == "classifier.weight" else v) for k, v in sent.tensors.items()}
    with pytest.raises(PayloadError, match="layout"):
        m.validate_upload(Weights(wrong, sent.counts).to_bytes())
    nan = {k: torch.full_like(v, float("nan")) for k, v in sent.tensors.items()}
    with pytest.raises(PayloadError, match="NaN"):
        m.validate_upload(Weights(nan, sent.counts).to_bytes())
    with pytest.raises(ConfigError, match="sub_dim 5 exceeds"):
        method("fedmrl", fedmrl={"sub_dim": K + 1})
