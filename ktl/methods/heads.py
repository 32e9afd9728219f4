"""What the methods with a trainable classifier share: the classifier itself, weights payloads and their
sample-weighted average.

LG-FedAvg, FedGH, FedGen, FML and FedKD train a linear classifier ``K → C`` on the head's outputs with
cross-entropy (HtFLlib's ``model.head``), instead of FedKTL's fixed ETF and margin loss. The classifier is
created on a client the first time one of these methods touches it, from the method's seed alone, so every
client starts from the same one (HtFLlib's server sends its initial head to all) on every transport.

Weights travel as `ktl.records.Weights` (safetensors: ``weights.<name>`` and the sample ``counts``). A
server learns a payload's layout — the names and shapes — from the round's uploads or from what it last
broadcast (`WeightsAverage`), and refuses anything else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ktl.clients import ClientModel, Companion, LocalClient
from ktl.errors import PayloadError
from ktl.methods.base import (
    ClientUpdate,
    CostShape,
    Method,
    MethodContext,
    MethodSettings,
    ServerCost,
    ServerUpdate,
)
from ktl.records import Weights
from ktl.seeding import derive_seed
from ktl.work import Work

__all__ = [
    "Layout",
    "SharedModelMethod",
    "WeightsAverage",
    "classifier_draws",
    "classifier_layout",
    "classifier_tensors",
    "ensure_classifier",
    "floating_state",
    "kl_to",
    "layout_of",
    "load_classifier",
    "weighted_mean",
]

Layout = dict[str, tuple[int, ...]]  # tensor name → shape


def classifier_draws(seed: int) -> torch.Generator:
    """The generator every initial classifier is drawn from: the method's seed alone."""
    return torch.Generator().manual_seed(derive_seed(seed, "classifier"))


def ensure_classifier(client: LocalClient, seed: int) -> nn.Linear:
    """The client's trainable classifier, created on first use from ``seed`` alone (the same on every
    client and transport)."""
    model = client.model
    if model.classifier is None:
        model.ensure_classifier(client.num_classes, generator=classifier_draws(seed))
    assert model.classifier is not None  # narrowing for mypy: ensure_classifier set it
    return model.classifier


def classifier_layout(num_classes: int, dim: int) -> Layout:
    return {"weight": (num_classes, dim), "bias": (num_classes,)}


def classifier_tensors(classifier: nn.Linear) -> dict[str, torch.Tensor]:
    """``weight`` ``(C, K)`` and ``bias`` ``(C,)``, detached CPU float32 copies."""
    return {k: v.detach().float().cpu().clone() for k, v in classifier.state_dict().items()}


def load_classifier(classifier: nn.Linear, tensors: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        classifier.weight.copy_(tensors["weight"])
        classifier.bias.copy_(tensors["bias"])


def floating_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's floating-point state (parameters and float buffers such as BatchNorm's running
    statistics; integer counters stay local), as detached CPU float32 copies."""
    return {
        k: v.detach().float().cpu().clone() for k, v in module.state_dict().items() if v.is_floating_point()
    }


def layout_of(tensors: Mapping[str, torch.Tensor]) -> Layout:
    return {k: tuple(v.shape) for k, v in tensors.items()}


def weighted_mean(uploads: Mapping[str, Weights]) -> dict[str, torch.Tensor]:
    """The sample-weighted mean of every tensor over the uploads (FedAvg's rule; float64 sums). All uploads
    must share one layout (`PayloadError` otherwise)."""
    items = list(uploads.values())
    if not items:
        raise PayloadError("no_uploads", "a round needs at least one upload to close")
    layout = layout_of(items[0].tensors)
    total = sum(w.num_samples for w in items)
    out: dict[str, torch.Tensor] = {}
    for name, shape in layout.items():
        acc = torch.zeros(shape, dtype=torch.float64)
        for w in items:
            t = w.tensors.get(name)
            if t is None or tuple(t.shape) != shape or set(w.tensors) != set(layout):
                raise PayloadError("layout", "the round's uploads do not share one layout of weights")
            acc += t.double() * (w.num_samples / total)
        out[name] = acc.float()
    return out


class WeightsAverage(Method):
    """A method whose clients upload weights that the server averages, weighted by samples, and sends
    back: LG-FedAvg (the classifier), FML and FedKD (the shared model). Subclasses say what a client's
    weights are (`local_weights`), how it takes the average (`take_weights`) and how it trains (the
    `client_update` step); the layout is `expected_layout`, or else learned from the uploads."""

    broadcast_file = "weights.safetensors"

    def __init__(self, settings: MethodSettings, ctx: MethodContext) -> None:
        super().__init__(settings, ctx)
        self.layout: Layout | None = self.expected_layout()  # learned from the first round when None

    # -- what a subclass says ------------------------------------------------------------------------

    def expected_layout(self) -> Layout | None:
        """The payload's names and shapes when the federation alone fixes them (None: learn them)."""
        return None

    def local_weights(self, client: LocalClient) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def payload_floats(cls, settings: MethodSettings, shape: CostShape) -> int:
        """The floats of one upload (default: a classifier, C × (K + 1))."""
        return shape.num_classes * (shape.proto_dim + 1)

    @classmethod
    def server_cost(cls, settings: MethodSettings, shape: CostShape) -> ServerCost:
        """The round's decoded uploads (``rows`` / C of them), a float64 accumulator and the mean."""
        uploads = max(1, -(-shape.rows // max(shape.num_classes, 1)))
        floats = cls.payload_floats(settings, shape)
        return ServerCost(memory_bytes=4 * floats * (uploads + 3), flops_per_step=2.0 * floats * uploads)

    def take_weights(self, client: LocalClient, tensors: Mapping[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def encode(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What travels for ``tensors``, both ways (default: the tensors themselves; FedKD: SVD factors)."""
        return tensors

    def decode(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors back from what `encode` sent (`PayloadError` when that cannot be done)."""
        return tensors

    # -- client side ---------------------------------------------------------------------------------

    def weights_payload(self, client: LocalClient) -> bytes:
        """The client's upload: its weights and its training-sample count (FedAvg's weight)."""
        counts = torch.tensor([client.num_train], dtype=torch.int64)
        return Weights(self.encode(self.local_weights(client)), counts).to_bytes(torch.float32)

    def client_receive(self, client: LocalClient, payload: bytes) -> None:
        self.take_weights(client, self.decode(Weights.from_bytes(payload).tensors))

    # -- server side ---------------------------------------------------------------------------------

    def validate_upload(self, payload: bytes) -> Weights:  # type: ignore[override]
        """Named float tensors of the federation's layout (once known), finite and bounded, with one
        positive sample count. What `encode` made is decoded first: the weights are checked, and kept, whole."""
        sent = Weights.from_bytes(payload)
        weights = Weights(self.decode(sent.tensors), sent.counts)
        weights.validate(self.layout, counts=1)
        return weights

    def server_steps(self, uploads: Mapping[str, bytes], round_index: int) -> Work[ServerUpdate]:
        if not uploads:
            raise PayloadError("no_uploads", "a round needs at least one upload to close")
        decoded = {cid: self.validate_upload(data) for cid, data in uploads.items()}
        mean = weighted_mean(decoded)
        self.layout = layout_of(mean)
        total = sum(w.num_samples for w in decoded.values())
        payload = Weights(self.encode(mean), torch.tensor([total], dtype=torch.int64)).to_bytes(torch.float32)
        return ServerUpdate(payload=payload, metrics={"averaged_tensors": float(len(mean))})
        yield  # a generator: the slice ends here

    # -- state: the layout the federation settled on --------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.layout is None or self.expected_layout() is not None:
            return {}
        # one int64 tensor per name holding its shape (an empty shape: a 0-d scalar's)
        return {f"layout.{k}": torch.tensor(shape, dtype=torch.int64) for k, shape in self.layout.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        found = {k.removeprefix("layout."): tuple(int(x) for x in v.tolist()) for k, v in tensors.items()}
        if found:
            self.layout = found


class SharedModelMethod(WeightsAverage):
    """FML and FedKD: beside its own model, each client trains a small *shared* model of one architecture
    for the whole federation (backbone `shared_backbone`, head to K, trainable classifier), by mutual
    distillation with its own; the server averages the shared models (FedAvg) and sends the mean back.
    Every client starts from the same shared model (the method's seed). The client's own model, with its
    trainable classifier, is the one evaluated."""

    # seeds a client's private module (`build_private`), with the client's id
    private_seed: ClassVar[str] = "private"

    def __init__(self, settings: MethodSettings, ctx: MethodContext) -> None:
        super().__init__(settings, ctx)
        self.shared: dict[str, ClientModel] = {}  # client id → its copy of the shared model
        self.private: dict[str, nn.Module] = {}  # client id → its private module (`build_private`)

    @classmethod
    def shared_backbone_of(cls, settings: MethodSettings) -> str:
        """The shared model's backbone that ``settings`` name."""
        raise NotImplementedError

    @classmethod
    def shared_dim_of(cls, settings: MethodSettings, proto_dim: int) -> int:
        """The shared model's head size, which its classifier reads (default: K, as the client's)."""
        return proto_dim

    def shared_backbone(self) -> str:
        return self.shared_backbone_of(self.settings)

    def build_private(self) -> nn.Module | None:
        """A client's private module, trained beside the shared model and never sent (FedKD's W_h, FedMRL's
        projector); None: none. Drawn from the global RNG, which `private_module` seeds."""
        return None

    def private_module(self, client: LocalClient) -> nn.Module | None:
        """The client's private module (`build_private`), created on first use from the method's seed and
        the client's id."""
        held = self.private.get(client.client_id)
        if held is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(self.ctx.seed, self.private_seed, client.client_id))
                built = self.build_private()
            if built is None:
                return None
            held = built.to(client.device)
            self.private[client.client_id] = held
        return held

    @classmethod
    def payload_floats(cls, settings: MethodSettings, shape: CostShape) -> int:
        """The shared model's floats, counted on the meta device (no memory) for 3 × 32 × 32 inputs, the
        larger of the built-in data sets'."""
        with torch.device("meta"):
            model = ClientModel.build(
                cls.shared_backbone_of(settings),
                num_channels=3,
                image_size=32,
                proto_dim=cls.shared_dim_of(settings, shape.proto_dim),
            )
            model.ensure_classifier(shape.num_classes)
        return sum(v.numel() for v in model.state_dict().values() if v.is_floating_point())

    def companion(self, client: LocalClient, shared: ClientModel) -> Companion:
        """The mutual-distillation loss of one batch and the parameters it trains beside the client's."""
        raise NotImplementedError

    def supervised_weight(self) -> float:
        """The weight of the client model's own cross-entropy."""
        return 1.0

    def shared_model(self, client: LocalClient) -> ClientModel:
        held = self.shared.get(client.client_id)
        if held is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(self.ctx.seed, "shared-model"))
                held = ClientModel.build(
                    self.shared_backbone(),
                    num_channels=client.data.num_channels,
                    image_size=client.data.image_size,
                    proto_dim=self.shared_dim_of(self.settings, self.ctx.proto_dim),
                )
            generator = torch.Generator().manual_seed(derive_seed(self.ctx.seed, "shared-classifier"))
            held.ensure_classifier(self.ctx.num_classes, generator=generator)
            held = held.to(client.device)
            self.shared[client.client_id] = held
        return held

    def local_weights(self, client: LocalClient) -> dict[str, torch.Tensor]:
        return floating_state(self.shared_model(client))

    def take_weights(self, client: LocalClient, tensors: Mapping[str, torch.Tensor]) -> None:
        model = self.shared_model(client)
        expected = floating_state(model)
        if layout_of(tensors) != layout_of(expected):
            raise PayloadError("layout", f"the broadcast is not a {self.shared_backbone()} shared model")
        model.load_state_dict(dict(tensors), strict=False)  # integer counters stay the client's

    def client_update(self, client: LocalClient, round_index: int) -> ClientUpdate:
        ensure_classifier(client, self.ctx.seed)
        shared = self.shared_model(client)
        shared.train()
        stats = client.train(
            companion=self.companion(client, shared), supervised_weight=self.supervised_weight()
        )
        return ClientUpdate(stats=stats, payload=self.weights_payload(client))

    def client_state(self, client: LocalClient) -> dict[str, torch.Tensor]:
        """The client's shared model and private module (every tensor of their state dicts, under
        ``shared.`` and ``private.``)."""
        out: dict[str, torch.Tensor] = {}
        for prefix, held in (("shared.", self.shared.get(client.client_id)),
                             ("private.", self.private.get(client.client_id))):  # fmt: skip
            if held is not None:
                out.update({prefix + k: v.detach().cpu().clone() for k, v in held.state_dict().items()})
        return out

    def load_client_state(self, client: LocalClient, tensors: Mapping[str, torch.Tensor]) -> None:
        shared = {k.removeprefix("shared."): v for k, v in tensors.items() if k.startswith("shared.")}
        private = {k.removeprefix("private."): v for k, v in tensors.items() if k.startswith("private.")}
        if len(shared) + len(private) != len(tensors):
            unknown = sorted(k for k in tensors if not k.startswith(("shared.", "private.")))
            raise ValueError(f"unknown {self.name} client state tensor(s) {unknown}")
        if shared:
            self.shared_model(client).load_state_dict(shared)
        else:
            self.shared.pop(client.client_id, None)
        if not private:
            self.private.pop(client.client_id, None)
            return
        module = self.private_module(client)
        if module is None:
            raise ValueError(f"{self.name} keeps no private module, got {sorted(private)}")
        module.load_state_dict(private)


def kl_to(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(target) ‖ softmax(logits)), mean over the batch, the target held fixed: ``logits``
    learn from the other model's predictions (deep mutual learning)."""
    return F.kl_div(
        F.log_softmax(logits, dim=1), F.softmax(target_logits.detach(), dim=1), reduction="batchmean"
    )
