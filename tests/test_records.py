import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save

from ktl.errors import PayloadError
from ktl.records import Pairs, Prototypes


def protos(n: int = 3, k: int = 10) -> Prototypes:
    return Prototypes(
        vectors=F.normalize(torch.randn(n, k), dim=1),
        class_ids=torch.arange(n) * 2,
        counts=torch.arange(1, n + 1),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prototypes_roundtrip(dtype: torch.dtype) -> None:
    p = protos()
    data = p.to_bytes(dtype)
    q = Prototypes.from_bytes(data)
    assert q.vectors.dtype == dtype
    torch.testing.assert_close(q.vectors.float(), p.vectors, atol=2e-3, rtol=0)
    assert torch.equal(q.class_ids, p.class_ids) and torch.equal(q.counts, p.counts)
    q.validate(num_classes=10, dim=10)  # fp16 rounding stays inside the norm tolerance


def test_fp16_halves_the_prototype_bytes() -> None:
    p = protos(n=10)
    saved = len(p.to_bytes(torch.float32)) - len(p.to_bytes(torch.float16))
    assert abs(saved - 10 * 10 * 2) <= 16  # n·K·2 bytes, give or take the header's padding


def bad_cases():
    ok = protos()
    yield "dim", Prototypes(F.normalize(torch.randn(3, 7), dim=1), ok.class_ids, ok.counts)
    v = ok.vectors.clone()
    v[0, 0] = float("nan")
    yield "non_finite", Prototypes(v, ok.class_ids, ok.counts)
    yield "norm", Prototypes(ok.vectors * 2, ok.class_ids, ok.counts)
    yield "class_range", Prototypes(ok.vectors, torch.tensor([0, 1, 10]), ok.counts)
    yield "class_range", Prototypes(ok.vectors, torch.tensor([-1, 1, 2]), ok.counts)
    yield "class_repeated", Prototypes(ok.vectors, torch.tensor([0, 1, 1]), ok.counts)
    yield "counts", Prototypes(ok.vectors, ok.class_ids, torch.tensor([1, 0, 2]))
    yield (
        "empty",
        Prototypes(torch.zeros(0, 10), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)),
    )


@pytest.mark.parametrize(("reason", "payload"), list(bad_cases()))
def test_validation_rejects_with_a_reason(reason: str, payload: Prototypes) -> None:
    with pytest.raises(PayloadError) as info:
        payload.validate(num_classes=10, dim=10)
    assert info.value.reason == reason


def test_construction_rejects_bad_shapes_and_dtypes() -> None:
    v = F.normalize(torch.randn(3, 10), dim=1)
    with pytest.raises(PayloadError, match="1-D") as info:
        Prototypes(v, torch.arange(2), torch.ones(3, dtype=torch.long))
    assert info.value.reason == "shape"
    with pytest.raises(PayloadError) as info:
        Prototypes(v, torch.arange(3, dtype=torch.int32), torch.ones(3, dtype=torch.long))
    assert info.value.reason == "dtype"
    with pytest.raises(PayloadError) as info:
        Prototypes(v.to(torch.int64), torch.arange(3), torch.ones(3, dtype=torch.long))
    assert info.value.reason == "dtype"


def test_from_bytes_rejects_garbage_and_wrong_tensors() -> None:
    for junk in (b"", b"not safetensors at all", b"\x80\x04\x95" + b"\x00" * 40):  # the last: a pickle header
        with pytest.raises(PayloadError) as info:
            Prototypes.from_bytes(junk)
        assert info.value.reason == "not_safetensors"
    with pytest.raises(PayloadError) as info:
        Prototypes.from_bytes(save({"prototypes": torch.zeros(1, 2)}))
    assert info.value.reason == "missing_tensor"
    extra = {
        "prototypes": torch.zeros(1, 2),
        "class_ids": torch.zeros(1, dtype=torch.long),
        "counts": torch.ones(1, dtype=torch.long),
        "evil": torch.zeros(1),
    }
    with pytest.raises(PayloadError) as info:
        Prototypes.from_bytes(save(extra))
    assert info.value.reason == "unexpected_tensor"


def test_pairs_roundtrip_quantises_images_to_uint8() -> None:
    images = torch.rand(4, 3, 8, 8)
    pairs = Pairs(images=images, latents=torch.randn(4, 16), class_ids=torch.tensor([0, 1, 2, 3]))
    back = Pairs.from_bytes(pairs.to_bytes())
    assert back.images.dtype == torch.float32 and len(back) == 4
    assert float((back.images - images).abs().max()) <= 0.5 / 255 + 1e-6
    torch.testing.assert_close(back.latents, pairs.latents)
    assert torch.equal(back.class_ids, pairs.class_ids)


def test_pairs_reject_mismatched_shapes() -> None:
    with pytest.raises(PayloadError):
        Pairs(images=torch.rand(4, 3, 8, 8), latents=torch.randn(3, 16), class_ids=torch.arange(4))
