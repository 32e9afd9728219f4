"""``fedgen``: FedGen (Zhu et al., ICML 2021) in its heterogeneous form (HtFLlib's ``servergen``).

Each client trains its heterogeneous model with a trainable linear classifier ``K → C`` (cross-entropy,
`ktl.methods.heads`) plus, once it holds the server's feature generator, cross-entropy of its classifier
on generated features of labels drawn from the federation's label distribution. It uploads its classifier
and its per-class training-sample counts.

The server keeps a lightweight generator ``(noise, one-hot label) → K-dim feature`` across rounds and, each
round, trains it with Adam so that the sample-weighted ensemble of the uploaded classifiers labels its
features correctly (``fedgen.server_steps`` steps, a fresh optimiser each round as in HtFLlib), then sends
back the generator, the sample-weighted mean classifier and the federation's label counts; every client
replaces its classifier with the mean.

Noise is Gaussian, as in the FedGen paper (HtFLlib draws it uniform in [0, 1) while calling it Gaussian).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ktl.clients import LocalClient, Regularizer
from ktl.errors import PayloadError
from ktl.methods.base import (
    ClientUpdate,
    CostShape,
    Method,
    MethodContext,
    MethodSettings,
    ServerCost,
    ServerUpdate,
    register_method,
)
from ktl.methods.heads import (
    classifier_layout,
    classifier_tensors,
    ensure_classifier,
    load_classifier,
    weighted_mean,
)
from ktl.records import Weights
from ktl.seeding import derive_seed
from ktl.work import Work

__all__ = ["FeatureGenerator", "FedGen", "FedGenMethodSettings", "FedGenSettings"]

_HEAD = "head."
_GEN = "generator."


class FedGenSettings(BaseModel):
    """FedGen's generator and its training (HtFLlib's defaults)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    noise_dim: int = Field(32, ge=1, le=4096, description="Dimension of the generator's noise input.")
    hidden_dim: int = Field(256, ge=1, le=65_536, description="Width of the generator's hidden layer.")
    server_lr: float = Field(0.005, gt=0, le=10, description="Adam learning rate of the generator.")
    server_steps: int = Field(100, ge=1, le=100_000, description="Generator training steps per round.")
    batch_size: int = Field(
        10,
        ge=2,
        le=100_000,
        description="Generated features per step, on the server and in each client step (HtFLlib: the "
        "client batch size; ≥ 2 for the generator's BatchNorm).",
    )
    weight: float = Field(
        1.0, ge=0, le=1e6, description="Weight of the clients' loss on generated features (HtFLlib: 1)."
    )


class FedGenMethodSettings(MethodSettings):
    fedgen: FedGenSettings = Field(
        default_factory=FedGenSettings, description="FedGen: the server's feature generator."
    )


class FeatureGenerator(nn.Module):
    """``(noise, one-hot label) → hidden (BatchNorm, ReLU) → K-dim feature``, FedGen's generator."""

    def __init__(self, noise_dim: int, num_classes: int, hidden_dim: int, feature_dim: int) -> None:
        super().__init__()
        self.noise_dim, self.num_classes = noise_dim, num_classes
        self.hidden = nn.Sequential(
            nn.Linear(noise_dim + num_classes, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU()
        )
        self.out = nn.Linear(hidden_dim, feature_dim)

    def forward(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(labels.shape[0], self.noise_dim, generator=generator).to(labels.device)
        one_hot = F.one_hot(labels, self.num_classes).float()
        return self.out(self.hidden(torch.cat([noise, one_hot], dim=1)))


def draw_labels(counts: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` labels drawn with probability proportional to ``counts`` ``(C,)`` (HtFLlib's qualified labels)."""
    return torch.multinomial(counts.double().cpu(), n, replacement=True, generator=generator)


@register_method("fedgen")
class FedGen(Method):
    """FedGen: classifiers up; a feature generator trained on their ensemble, and their mean, down."""

    settings_model = FedGenMethodSettings
    broadcast_file = "generator.safetensors"
    settings: FedGenMethodSettings

    def __init__(self, settings: MethodSettings, ctx: MethodContext) -> None:
        super().__init__(settings, ctx)
        with torch.random.fork_rng(devices=[]):  # its initial weights from the method's seed alone
            torch.manual_seed(derive_seed(ctx.seed, "fedgen-generator"))
            self.generator = self._new_generator().to(ctx.device)
        # client id → (its copy of the generator, the federation's label counts) from the last broadcast
        self.received: dict[str, tuple[FeatureGenerator, torch.Tensor]] = {}

    def _new_generator(self) -> FeatureGenerator:
        s = self.settings.fedgen
        return FeatureGenerator(s.noise_dim, self.ctx.num_classes, s.hidden_dim, self.ctx.proto_dim)

    # -- client side ---------------------------------------------------------------------------------

    def client_update(self, client: LocalClient, round_index: int) -> ClientUpdate:
        classifier = ensure_classifier(client, self.ctx.seed)
        stats = client.train(regularizer=self._regularizer(client, round_index))
        weights = Weights(classifier_tensors(classifier), client.class_counts())
        return ClientUpdate(stats=stats, payload=weights.to_bytes(torch.float32))

    def _regularizer(self, client: LocalClient, round_index: int) -> Regularizer | None:
        held = self.received.get(client.client_id)
        weight = self.settings.fedgen.weight
        if held is None or weight == 0:
            return None
        generator, counts = held
        classifier = ensure_classifier(client, self.ctx.seed)
        draws = torch.Generator().manual_seed(
            derive_seed(self.ctx.seed, "fedgen", client.client_id, round_index)
        )
        n = self.settings.fedgen.batch_size

        def generated(head_out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            y = draw_labels(counts, n, draws).to(client.device)
            with torch.no_grad():
                z = generator(y, draws)
            return weight * F.cross_entropy(classifier(z), y)

        return generated

    def client_receive(self, client: LocalClient, payload: bytes) -> None:
        weights = Weights.from_bytes(payload)
        tensors = weights.tensors
        load_classifier(
            ensure_classifier(client, self.ctx.seed),
            {k.removeprefix(_HEAD): v for k, v in tensors.items() if k.startswith(_HEAD)},
        )
        self._hold(client, {k: v for k, v in tensors.items() if k.startswith(_GEN)}, weights.counts)

    def _hold(self, client: LocalClient, tensors: Mapping[str, torch.Tensor], counts: torch.Tensor) -> None:
        generator = self._new_generator()
        state = generator.state_dict()
        state.update({k.removeprefix(_GEN): v for k, v in tensors.items()})
        generator.load_state_dict(state)
        # train mode: BatchNorm normalises with each generated batch's statistics, as the server trained it
        generator.to(client.device).train()
        self.received[client.client_id] = (generator, counts.clone())

    def client_state(self, client: LocalClient) -> dict[str, torch.Tensor]:
        """The generator and label counts the client last received (nothing before the first broadcast)."""
        held = self.received.get(client.client_id)
        if held is None:
            return {}
        generator, counts = held
        out = {_GEN + k: v.detach().cpu().clone() for k, v in generator.state_dict().items()}
        out["counts"] = counts.cpu().clone()
        return out

    def load_client_state(self, client: LocalClient, tensors: Mapping[str, torch.Tensor]) -> None:
        if not tensors:
            self.received.pop(client.client_id, None)
            return
        unknown = [k for k in tensors if k != "counts" and not k.startswith(_GEN)]
        if unknown or "counts" not in tensors:
            raise ValueError(f"fedgen client state holds {sorted(tensors)}: expected generator.* and counts")
        self._hold(client, {k: v for k, v in tensors.items() if k != "counts"}, tensors["counts"])

    # -- server side ---------------------------------------------------------------------------------

    def validate_upload(self, payload: bytes) -> Weights:  # type: ignore[override]
        """A classifier ``weight`` ``(C, K)``, ``bias`` ``(C,)`` (finite, bounded) and ``(C,)`` per-class
        sample counts."""
        weights = Weights.from_bytes(payload)
        weights.validate(
            classifier_layout(self.ctx.num_classes, self.ctx.proto_dim), counts=self.ctx.num_classes
        )
        return weights

    @classmethod
    def server_cost(cls, settings: MethodSettings, shape: CostShape) -> ServerCost:
        """The generator with gradients and Adam moments, and every uploaded classifier applied to a batch."""
        if not isinstance(settings, FedGenMethodSettings):
            raise TypeError("FedGen.server_cost takes FedGenMethodSettings")
        s = settings.fedgen
        c, k = shape.num_classes, shape.proto_dim
        heads = max(shape.rows, 1)
        gen = (s.noise_dim + c) * s.hidden_dim + 3 * s.hidden_dim + s.hidden_dim * k + k
        floats = 4 * gen + heads * (c * k + c) + s.batch_size * (s.hidden_dim + k + heads * c) * 3
        flops = 6.0 * s.batch_size * (gen + heads * c * k)
        return ServerCost(memory_bytes=4 * floats, steps=s.server_steps, flops_per_step=flops)

    def server_steps(self, uploads: Mapping[str, bytes], round_index: int) -> Work[ServerUpdate]:
        """Train the generator against the sample-weighted ensemble of the uploaded classifiers (yielding
        after every step), then broadcast it with the mean classifier and the label counts."""
        if not uploads:
            raise PayloadError("no_uploads", "a round needs at least one upload to close")
        decoded = {cid: self.validate_upload(data) for cid, data in uploads.items()}
        total = sum(w.num_samples for w in decoded.values())
        heads = [
            (w.tensors["weight"].float().to(self.ctx.device), w.tensors["bias"].float().to(self.ctx.device),
             w.num_samples / total)
            for w in decoded.values()
        ]  # fmt: skip
        counts = torch.stack([w.counts for w in decoded.values()]).sum(dim=0)
        s = self.settings.fedgen
        draws = torch.Generator().manual_seed(derive_seed(self.ctx.seed, "fedgen-server", round_index))
        optimizer = torch.optim.Adam(self.generator.parameters(), lr=s.server_lr)
        self.generator.train()
        loss = torch.zeros(())
        for _ in range(s.server_steps):
            y = draw_labels(counts, s.batch_size, draws).to(self.ctx.device)
            z = self.generator(y, draws)
            logits = torch.zeros(z.shape[0], self.ctx.num_classes, device=z.device)
            for weight, bias, w in heads:
                logits = logits + w * F.linear(z, weight, bias)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            yield
        tensors = {_HEAD + k: v for k, v in weighted_mean(decoded).items()}
        tensors.update({_GEN + k: v.detach().float().cpu() for k, v in self._floating_generator().items()})
        return ServerUpdate(
            payload=Weights(tensors, counts).to_bytes(torch.float32),
            metrics={"generator_loss": float(loss.detach())},
        )

    def _floating_generator(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.generator.state_dict().items() if v.is_floating_point()}

    # -- state: the generator ---------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {_GEN + k: v for k, v in self.generator.state_dict().items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.generator.load_state_dict({k.removeprefix(_GEN): v for k, v in tensors.items()})
