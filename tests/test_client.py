from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ktl.clients import ClientModel, ClientSettings, LocalClient, LocalData, simplex_etf
from ktl.clients.backbones import Backbone
from ktl.clients.inputs import adapt_images
from ktl.records import Pairs

C = 4


class _Flatten(nn.Module):
    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values.flatten(1)


def crafted_client() -> LocalClient:
    """A client whose head output is the image itself: 1×1×C 'images', identity head."""
    backbone = Backbone(_Flatten(), lambda out: out, feature_dim=C)  # type: ignore[arg-type]
    model = ClientModel(backbone, proto_dim=C)
    with torch.no_grad():
        model.head.weight.copy_(torch.eye(C))
        model.head.bias.zero_()
    # pixels p in [0, 1] are normalised to 2p - 1 before the model.
    x = torch.tensor(
        [[0.75, 0.5, 0.5, 0.5], [1.0, 0.5, 0.5, 0.5], [0.5, 0.5, 1.0, 0.25], [0.5, 1.0, 0.5, 0.5]]
    ).view(4, 1, 1, C)
    y = torch.tensor([0, 0, 2, 0])
    data = LocalData(x, y, x, y)
    return LocalClient(client_id="crafted", model=model, data=data, etf=simplex_etf(C, seed=0))


def test_prototypes_equal_a_hand_computation() -> None:
    client = crafted_client()
    p = client.prototypes()
    # head outputs 2p - 1 per row: [.5,0,0,0], [1,0,0,0], [0,0,1,-.5], [0,1,0,0]
    rows = torch.tensor([[0.5, 0, 0, 0], [1.0, 0, 0, 0], [0, 0, 1.0, -0.5], [0, 1.0, 0, 0]])
    unit = rows / rows.norm(dim=1, keepdim=True)
    class0 = unit[[0, 1, 3]].mean(0)
    class2 = unit[2]
    expected = torch.stack([class0 / class0.norm(), class2 / class2.norm()])
    assert p.class_ids.tolist() == [0, 2]  # classes 1 and 3 are absent: not sent
    assert p.counts.tolist() == [3, 1]
    torch.testing.assert_close(p.vectors, expected)
    p.validate(num_classes=C, dim=C)


def synthetic_local(n: int = 64, seed: int = 0, size: int = 12) -> LocalData:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (n,), generator=g)
    x = (0.2 + 0.6 * F.one_hot(y, C).float()).repeat_interleave(size * size // C + 1, dim=1)[:, : size * size]
    x = (x + 0.05 * torch.randn(n, size * size, generator=g)).clamp(0, 1).view(n, 1, size, size)
    return LocalData(x[: n * 3 // 4], y[: n * 3 // 4], x[n * 3 // 4 :], y[n * 3 // 4 :])


def cnn_client(settings: ClientSettings | None = None, data: LocalData | None = None) -> LocalClient:
    data = data or synthetic_local(size=28)
    model = ClientModel.build("cnn4", num_channels=1, image_size=28, proto_dim=C)
    return LocalClient(
        client_id="c", model=model, data=data, etf=simplex_etf(C, seed=0), settings=settings, seed=0
    )


def some_pairs(m: int = C, scale: float = 1.0, latent_dim: int = 32) -> Pairs:
    return Pairs(
        images=torch.rand(m, 3, 32, 32),
        latents=scale * torch.randn(m, latent_dim),
        class_ids=torch.arange(m) % C,
    )


def test_local_training_learns() -> None:
    client = cnn_client(ClientSettings(lr=0.05, batch_size=16))
    before = client.evaluate()
    losses = [client.train().supervised_loss for _ in range(8)]
    correct, total = client.evaluate()
    assert losses[-1] < losses[0]
    assert correct / total >= 0.9 and correct >= before[0]


def test_projector_persists_and_keeps_training_across_rounds() -> None:
    client = cnn_client(ClientSettings(lr=0.05, batch_size=16))
    client.receive_pairs(some_pairs())
    projector = client.model.projector
    assert projector is not None
    start = projector.weight.detach().clone()
    first = client.train(mu=1.0)
    after_one = projector.weight.detach().clone()
    client.receive_pairs(some_pairs())  # next round's pairs must not reset the projector
    assert client.model.projector is projector
    assert torch.equal(projector.weight, after_one) and not torch.equal(after_one, start)
    for _ in range(5):
        last = client.train(mu=1.0)
    assert last.distill_loss < first.distill_loss


@pytest.mark.parametrize("name", ["cnn4", "resnet-s", "vit-small"])
def test_losses_stay_finite_under_harsh_settings(name: str) -> None:
    # A large step, a large μ and latents a thousand times the unit scale: clipping and the RMS scaling
    # keep every step finite (in an independent check the unclipped MSE diverged to inf at μ = 1).
    settings = ClientSettings(lr=0.5, batch_size=8)
    data = synthetic_local(size=28)
    model = ClientModel.build(name, num_channels=1, image_size=28, proto_dim=C)
    client = LocalClient(
        client_id=name, model=model, data=data, etf=simplex_etf(C, seed=0), settings=settings
    )
    client.receive_pairs(some_pairs(scale=1e3))
    for _ in range(3):
        stats = client.train(mu=50.0)
        assert stats.skipped == 0 and stats.steps > 0
        assert torch.isfinite(torch.tensor([stats.supervised_loss, stats.distill_loss])).all()
    assert all(torch.isfinite(p).all() for p in client.model.parameters())
    assert torch.isfinite(client.prototypes().vectors).all()


def test_tiny_data_and_a_single_pair_do_not_crash_batchnorm() -> None:
    data = synthetic_local(n=4, size=28)  # 3 training samples: batch of 2 + a lone one (skipped)
    model = ClientModel.build("resnet-s", num_channels=1, image_size=28, proto_dim=C)
    client = LocalClient(
        client_id="bn", model=model, data=data, etf=simplex_etf(C), settings=ClientSettings(batch_size=2)
    )
    client.receive_pairs(some_pairs(m=1))
    stats = client.train(mu=1.0)
    assert stats.steps == 1 and stats.skipped == 0


def test_adapt_images_converts_channels_and_size() -> None:
    rgb = torch.rand(2, 3, 32, 32)
    gray = adapt_images(rgb, num_channels=1, image_size=28)
    assert gray.shape == (2, 1, 28, 28) and gray.min() >= -1 and gray.max() <= 1
    white = adapt_images(torch.ones(1, 3, 32, 32), num_channels=1, image_size=28)
    torch.testing.assert_close(white, torch.ones(1, 1, 28, 28))
    back = adapt_images(torch.rand(2, 1, 28, 28), num_channels=3, image_size=32)
    assert back.shape == (2, 3, 32, 32)


def test_batchnorm_stats_frozen_normalises_but_keeps_running_stats() -> None:
    from ktl.clients.trainer import batchnorm_stats_frozen

    bn = nn.BatchNorm1d(3)
    bn.train()
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    x = 5 + 3 * torch.randn(64, 3)
    with batchnorm_stats_frozen(bn):
        out = bn(x)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2] and bn.momentum == 0.1
    assert float(out.detach().mean().abs()) < 1e-4  # normalised with the batch's own statistics
    bn(x)  # outside, running statistics move again
    assert not torch.equal(bn.running_mean, before[0])


def test_generated_pairs_do_not_shift_the_statistics_used_on_real_data() -> None:
    model = ClientModel.build("resnet-s", num_channels=1, image_size=28, proto_dim=C)
    client = LocalClient(client_id="bn", model=model, data=synthetic_local(size=28), etf=simplex_etf(C))
    client.receive_pairs(some_pairs())
    stats = [m.running_mean.clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    client.model.train()
    distil = client._distillation()
    assert distil is not None
    distil().backward()
    after = [m.running_mean for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(stats, after, strict=True))


def test_projector_comes_from_the_clients_seed_not_the_global_rng() -> None:
    def projector_after(global_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        model = ClientModel.build("cnn4", num_channels=1, image_size=28, proto_dim=C)
        client = LocalClient(
            client_id="p", model=model, data=synthetic_local(size=28), etf=simplex_etf(C), seed=5
        )
        pairs = some_pairs()
        torch.manual_seed(global_seed)  # whatever else the process did
        state = torch.random.get_rng_state()
        client.receive_pairs(pairs)
        assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is not advanced
        assert client.model.projector is not None
        return client.model.projector.weight.detach().clone(), client.model.projector.bias.detach().clone()

    (w1, b1), (w2, b2) = projector_after(1), projector_after(2)
    assert torch.equal(w1, w2) and torch.equal(b1, b2)
    bound = 1 / 512**0.5  # nn.Linear's default init range for 512 inputs
    assert float(w1.abs().max()) <= bound + 1e-6 and float(w1.std()) > 0.3 * bound


def test_pairs_memory_keeps_the_last_rounds_pairs() -> None:
    client = cnn_client(ClientSettings(pairs_memory=2))
    rounds = [some_pairs(m=4), some_pairs(m=6), some_pairs(m=5)]
    held = []
    for pairs in rounds:
        client.receive_pairs(pairs)
        assert client._pairs is not None
        held.append(client._pairs.z)
    assert [len(z) for z in held] == [4, 10, 11]  # the latest round and the one before it
    torch.testing.assert_close(held[2], torch.cat([rounds[1].latents, rounds[2].latents]))
    client.receive_pairs(some_pairs(m=3, latent_dim=16))  # another generator: older latents dropped
    assert client._pairs is not None and client._pairs.z.shape == (3, 16)
    client.receive_pairs(None)
    assert client._pairs is None
    default = cnn_client()
    for pairs in rounds:
        default.receive_pairs(pairs)
    assert default._pairs is not None and torch.equal(default._pairs.z, rounds[2].latents)
