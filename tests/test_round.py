import pytest
import torch
import torch.nn.functional as F

from ktl.aligner import AlignerSettings
from ktl.clients import simplex_etf
from ktl.errors import PayloadError
from ktl.generator import GeneratorSpec, load_generator
from ktl.methods import KnowledgeTransferServer, stack_uploads
from ktl.records import Prototypes

C = 10


def server(pairs_per_class: int = 1, seed: int = 0) -> KnowledgeTransferServer:
    return KnowledgeTransferServer.create(
        num_classes=C,
        proto_dim=C,
        generator=load_generator(GeneratorSpec()),
        aligner_settings=AlignerSettings(steps=30),
        pairs_per_class=pairs_per_class,
        seed=seed,
    )


def client_upload(classes: list[int], seed: int) -> Prototypes:
    g = torch.Generator().manual_seed(seed)
    etf = simplex_etf(C, seed=0)
    vectors = F.normalize(etf.T[classes] + 0.1 * torch.randn(len(classes), C, generator=g), dim=1)
    return Prototypes(vectors, torch.tensor(classes), torch.randint(1, 30, (len(classes),), generator=g))


UPLOADS = {"a": client_upload([0, 1, 2], 1), "b": client_upload([1, 2, 5], 2), "c": client_upload([5, 7], 3)}


def test_round_returns_pairs_for_present_classes_only() -> None:
    result = server().run_round(UPLOADS, round_index=1)
    pairs = result.pairs
    assert pairs.class_ids.tolist() == [0, 1, 2, 5, 7]
    assert pairs.images.shape == (5, 3, 32, 32) and pairs.latents.shape == (5, 256)
    assert float(pairs.images.min()) >= 0 and float(pairs.images.max()) <= 1
    assert result.present.nonzero().flatten().tolist() == [0, 1, 2, 5, 7]
    torch.testing.assert_close(pairs.latents, result.centroids[[0, 1, 2, 5, 7]])
    assert result.num_uploads == 3 and result.num_rows == 8


def test_several_pairs_per_class_start_with_the_centroid() -> None:
    result = server(pairs_per_class=3).run_round(UPLOADS, round_index=1)
    ids = result.pairs.class_ids
    assert ids.tolist() == [c for c in (0, 1, 2, 5, 7) for _ in range(3)]
    lat = result.pairs.latents.view(5, 3, -1)
    torch.testing.assert_close(lat[:, 0], result.centroids[[0, 1, 2, 5, 7]])
    assert not torch.allclose(lat[1, 1], lat[1, 0])  # an aligned single upload, not the centroid


def test_same_seed_same_round_is_reproduced() -> None:
    a = server(seed=4).run_round(UPLOADS, round_index=2).pairs
    b = server(seed=4).run_round(UPLOADS, round_index=2).pairs
    assert torch.equal(a.latents, b.latents) and torch.equal(a.images, b.images)


def test_a_bad_upload_rejects_the_round_and_leaves_the_aligner_untouched() -> None:
    srv = server()
    before = [p.detach().clone() for p in srv.aligner.transformer.parameters()]
    bad = dict(UPLOADS)
    bad["d"] = Prototypes(torch.ones(1, C), torch.tensor([3]), torch.tensor([4]))  # not unit norm
    with pytest.raises(PayloadError) as info:
        srv.run_round(bad, round_index=1)
    assert info.value.reason == "norm"
    assert all(torch.equal(a, b) for a, b in zip(before, srv.aligner.transformer.parameters(), strict=True))
    with pytest.raises(PayloadError) as info:
        srv.run_round({}, round_index=1)
    assert info.value.reason == "no_uploads"


def test_stack_uploads_keeps_the_mapping_order() -> None:
    v, y, n = stack_uploads({"z": UPLOADS["c"], "a": UPLOADS["a"]})
    assert y.tolist() == [5, 7, 0, 1, 2] and v.shape == (5, C) and n.shape == (5,)
    torch.testing.assert_close(v[:2], UPLOADS["c"].vectors)
