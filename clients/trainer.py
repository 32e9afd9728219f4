"""The client side of FedKTL: local training against the fixed ETF, prototypes, distillation, evaluation."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from ktl.clients.inputs import adapt_images, normalize_pixels
from ktl.clients.losses import distillation_loss, etf_cosines, margin_loss
from ktl.clients.model import ClientModel
from ktl.errors import ConfigError
from ktl.records import Pairs, Prototypes

__all__ = [
    "LR_SCHEDULES",
    "ClientSettings",
    "LocalData",
    "TrainStats",
    "LocalClient",
    "Regularizer",
    "Companion",
    "batchnorm_stats_frozen",
    "scheduled_lr",
]

Regularizer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""An extra loss on a batch's head outputs ``(B, K)`` and labels ``(B,)``, already weighted (baselines
such as FedProto pull features towards global prototypes with one)."""


@dataclass(frozen=True)
class Companion:
    """A second model trained beside the client's, on the same batches (FML's and FedKD's shared model).

    ``loss(images, head_out, labels)`` is added to each step's loss (already weighted; ``images`` are the
    normalised pixels of the batch, ``head_out`` the client model's head outputs) and ``parameters`` are
    stepped by the same optimiser as the client's model, at the round's learning rate."""

    loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    parameters: list[nn.Parameter]


logger = logging.getLogger(__name__)


@contextmanager
def batchnorm_stats_frozen(module: nn.Module) -> Iterator[None]:
    """Inside, BatchNorm layers in training mode still normalise with the batch's statistics but leave
    their running statistics (what evaluation uses) untouched.

    Generated images are a different distribution from a client's data; letting their forward pass move
    the running statistics makes real test images be normalised with a real/synthetic mixture (the
    reference did so; on cpu-small it cost MobileNetV2 clients 35 points of accuracy, see docs/results.md).
    """
    norms = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    saved = [
        (m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
        for m in norms
    ]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0)·running + 0·batch
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved, strict=True):
            m.momentum = momentum
            if tracked is not None and m.num_batches_tracked is not None:
                m.num_batches_tracked.copy_(tracked)


class ClientSettings(BaseModel):
    """Local training hyperparameters (defaults: the FedKTL paper's)."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(0.01, gt=0, description="SGD learning rate (paper: 0.01)")
    batch_size: int = Field(
        10, ge=2, description="Local batch size (paper: 10); ≥ 2 because BatchNorm backbones need 2 samples"
    )
    epochs: int = Field(1, ge=1, description="Local epochs per round (paper: 1)")
    momentum: float = Field(0.0, ge=0, lt=1, description="SGD momentum (paper: 0, plain SGD)")
    weight_decay: float = Field(0.0, ge=0, description="SGD weight decay")
    # Clipping the global gradient norm keeps the margin loss (scale 64) and the distillation MSE finite
    # on every backbone; in an independent check it also lifted training alone from 90.6 % to 96.1 %.
    clip_grad_norm: float = Field(
        5.0,
        gt=0,
        description="Global gradient-norm clip on every client step; keeps the margin loss (scale 64) and "
        "the distillation MSE finite on every backbone",
    )
    margin: float = Field(0.5, ge=0, lt=3.14, description="ArcFace angular margin m (reference: 0.5)")
    scale: float = Field(64.0, gt=0, description="ArcFace scale s (reference: 64)")
    distill_batch_size: int | None = Field(
        None, ge=2, description="Generated pairs per local distillation step; none = client.batch_size"
    )
    pairs_memory: int = Field(
        1,
        ge=1,
        le=100,
        description="Rounds of server pairs kept for distillation (1 = the latest only, as the reference). "
        "A pair (G(z), z) stays a true input-output pair of the frozen generator in later rounds, so older "
        "pairs remain valid targets and enlarge the distillation set",
    )
    eval_batch_size: int = Field(
        512, ge=1, description="Batch size of forward-only passes (prototypes, evaluation)"
    )
    lr_schedule: str = Field(
        "constant",
        description="Learning rate per round: constant (client.lr every round), step (× client.lr_gamma "
        "every client.lr_step_rounds rounds) or cosine (from client.lr down to client.lr_min over "
        "client.lr_rounds rounds); recorded as lr in metrics.jsonl",
    )
    lr_gamma: float = Field(0.1, gt=0, le=1, description="step schedule: the factor applied at each step")
    lr_step_rounds: int = Field(10, ge=1, description="step schedule: rounds between steps")
    lr_min: float = Field(0.0, ge=0, description="cosine schedule: the learning rate it ends at")
    lr_rounds: int | None = Field(
        None,
        ge=1,
        description="cosine schedule: rounds it spans; none = the run's rounds (a client of a server "
        "(ktl client run) needs it set)",
    )

    @field_validator("lr_schedule")
    @classmethod
    def _known_schedule(cls, name: str) -> str:
        if name not in LR_SCHEDULES:
            raise ValueError(f"unknown lr schedule {name!r}; available: {', '.join(sorted(LR_SCHEDULES))}")
        return name


LrSchedule = Callable[[ClientSettings, int, int | None], float]
"""The learning rate of round ``r`` (from 1) of a run of ``total`` rounds (None: unknown)."""


def _constant(s: ClientSettings, r: int, total: int | None) -> float:
    return s.lr


def _step(s: ClientSettings, r: int, total: int | None) -> float:
    return s.lr * s.lr_gamma ** ((r - 1) // s.lr_step_rounds)


def _cosine(s: ClientSettings, r: int, total: int | None) -> float:
    span = s.lr_rounds or total
    if span is None:
        raise ConfigError("the cosine lr schedule needs client.lr_rounds (the run's rounds are unknown)")
    progress = min(r - 1, span) / span
    return s.lr_min + 0.5 * (s.lr - s.lr_min) * (1.0 + math.cos(math.pi * progress))


LR_SCHEDULES: dict[str, LrSchedule] = {"constant": _constant, "step": _step, "cosine": _cosine}
"""The client learning-rate schedules by name (``client.lr_schedule``)."""


def scheduled_lr(settings: ClientSettings, round_index: int, total_rounds: int | None = None) -> float:
    """The learning rate ``settings`` give round ``round_index`` (from 1) of ``total_rounds``."""
    return LR_SCHEDULES[settings.lr_schedule](settings, round_index, total_rounds)


@dataclass
class LocalData:
    """One client's private data: images as float in [0, 1], ``(n, C, H, W)``, labels int64."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def num_channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])

    def to(self, device: torch.device) -> LocalData:
        return LocalData(*(t.to(device) for t in (self.train_x, self.train_y, self.test_x, self.test_y)))


@dataclass(frozen=True)
class _HeldPairs:
    """Pairs in the client's input space: images ``x``, latents ``z`` and their RMS (the target scale)."""

    x: torch.Tensor
    z: torch.Tensor
    rms: torch.Tensor


def _held(x: torch.Tensor, z: torch.Tensor) -> _HeldPairs:
    return _HeldPairs(x=x, z=z, rms=z.pow(2).mean().sqrt().clamp_min(1e-8))


def _held_all(received: list[tuple[torch.Tensor, torch.Tensor]]) -> _HeldPairs:
    """The pairs of every received round together, oldest first."""
    return _held(torch.cat([x for x, _ in received]), torch.cat([z for _, z in received]))


@dataclass(frozen=True)
class TrainStats:
    """What one round of local training did. Losses are means over the steps taken."""

    steps: int
    skipped: int  # steps whose loss was not finite (their update was not applied)
    supervised_loss: float
    distill_loss: float  # the knowledge-transfer term: distillation on pairs, or a method's regulariser


class LocalClient:
    """One FedKTL client: its model, its data, the shared ETF and the pairs it last received.

    Parameters
    ----------
    client_id
        A name for logs.
    model
        The client's heterogeneous model.
    data
        Its private data.
    etf
        ``(K, C)`` fixed classifier, identical on every client.
    settings
        Local training hyperparameters.
    device
        Where the model trains and the data lives.
    seed
        Seeds the client's batch order.
    """

    def __init__(
        self,
        *,
        client_id: str,
        model: ClientModel,
        data: LocalData,
        etf: torch.Tensor,
        settings: ClientSettings | None = None,
        device: torch.device | str = "cpu",
        seed: int = 0,
    ) -> None:
        self.client_id = client_id
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.data = data.to(self.device)
        self.etf = F.normalize(etf.float(), dim=0).to(self.device)
        self.settings = settings or ClientSettings()
        self.lr = self.settings.lr  # this round's learning rate (`start_round`)
        self.num_classes = int(etf.shape[1])
        self._rng = torch.Generator().manual_seed(seed)  # batch order
        self._init_rng = torch.Generator().manual_seed((seed + 1) % 2**63)  # the projector's weights
        self._pairs: _HeldPairs | None = None
        self._received: list[tuple[torch.Tensor, torch.Tensor]] = []  # the last `pairs_memory` rounds
        # (C, W) class latents behind `_received` when it came from `receive_latent_targets` (NaN rows:
        # classes not sent): a client's state stores these instead of its own images paired with them
        self._targets: torch.Tensor | None = None

    @property
    def num_train(self) -> int:
        return int(self.data.train_y.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.data.test_y.shape[0])

    # -- receiving the server's pairs ---------------------------------------------------------------

    def receive_latent_targets(self, latents: torch.Tensor, class_ids: torch.Tensor) -> None:
        """Distil towards class latents on the client's *own* images (the "no generator" ablation): each
        local training image of a class the server sent is paired with that class's latent. Replaces any
        held pairs (older rounds' targets are dropped); the projector is the one `receive_pairs` uses."""
        z_by_class = torch.full((self.num_classes, latents.shape[1]), float("nan"))
        z_by_class[class_ids.cpu()] = latents.float().cpu()
        self._hold_latent_targets(z_by_class)
        if self._pairs is not None:
            self.model.ensure_projector(int(self._pairs.z.shape[1]), generator=self._init_rng)

    def _hold_latent_targets(self, z_by_class: torch.Tensor) -> None:
        """Pair each local training image with its class's row of ``z_by_class`` ``(C, W)`` (NaN rows:
        classes without a target) and hold those pairs alone."""
        z = z_by_class.to(self.device)[self.data.train_y]
        keep = torch.isfinite(z).all(dim=1)
        if not bool(keep.any()):
            self._pairs, self._received, self._targets = None, [], None
            return
        x, z = normalize_pixels(self.data.train_x[keep]), z[keep]
        self._received = [(x, z)]
        self._targets = z_by_class
        self._pairs = _held(x, z)

    def receive_pairs(self, pairs: Pairs | None) -> None:
        """Keep the server's image-vector pairs for the distillation task of the next `train` calls,
        together with those of the previous ``pairs_memory - 1`` rounds."""
        self._targets = None
        if pairs is None or len(pairs) == 0:  # nothing to distil from (e.g. a new federation): forget all
            self._pairs, self._received = None, []
            return
        x = adapt_images(
            pairs.images.to(self.device), num_channels=self.data.num_channels, image_size=self.data.image_size
        )
        z = pairs.latents.to(self.device, torch.float32)
        if self._received and self._received[-1][1].shape[1] != z.shape[1]:
            self._received.clear()  # a different generator: older latents are another space
        self._received = [*self._received, (x, z)][-self.settings.pairs_memory :]
        self._pairs = _held_all(self._received)
        self.model.ensure_projector(int(z.shape[1]), generator=self._init_rng)

    # -- local training -----------------------------------------------------------------------------

    def start_round(self, round_index: int, total_rounds: int | None = None) -> float:
        """Set the learning rate of round ``round_index`` (of ``total_rounds``) from the settings' schedule
        (``client.lr_schedule``); a transport calls this before the method's client step. Returns it."""
        self.lr = scheduled_lr(self.settings, round_index, total_rounds)
        return self.lr

    def train(
        self,
        *,
        mu: float = 0.0,
        regularizer: Regularizer | None = None,
        companion: Companion | None = None,
        supervised_weight: float = 1.0,
    ) -> TrainStats:
        """One round of local training: ``supervised_weight`` × the supervised loss on private data +
        μ·distillation on held pairs (+ ``regularizer(head_outputs, labels)`` and the `Companion`'s loss
        when a method gives them). The supervised loss is the margin loss against the fixed ETF, or, once
        the model has a trainable classifier (`ClientModel.ensure_classifier`), cross-entropy on its logits.

        A step whose loss is not finite is skipped (counted in ``TrainStats.skipped``), so one bad batch
        cannot poison the model; with the clamped margin loss, the RMS-scaled targets and gradient
        clipping this does not happen in the tests.
        """
        s = self.settings
        model = self.model
        model.train()
        distillation = self._distillation() if mu > 0 else None
        params = [p for p in model.parameters() if p.requires_grad]
        if companion is not None:
            params += [p for p in companion.parameters if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=self.lr, momentum=s.momentum, weight_decay=s.weight_decay)
        sup_total = torch.zeros((), device=self.device)
        dist_total = torch.zeros((), device=self.device)
        steps = skipped = 0
        for _ in range(s.epochs):
            order = torch.randperm(self.num_train, generator=self._rng).to(self.device)
            for batch in order.split(s.batch_size):
                if batch.numel() < 2:  # BatchNorm cannot train on one sample
                    continue
                x = normalize_pixels(self.data.train_x[batch])
                y = self.data.train_y[batch]
                out = model(x)
                sup = self._supervised_loss(out, y)
                loss = supervised_weight * sup
                dist = torch.zeros((), device=self.device)
                if distillation is not None:
                    dist = distillation()
                    loss = sup + mu * dist
                if regularizer is not None:
                    dist = regularizer(out, y)
                    loss = loss + dist
                if companion is not None:
                    dist = companion.loss(x, out, y)
                    loss = loss + dist
                if not bool(torch.isfinite(loss)):
                    skipped += 1
                    continue
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, s.clip_grad_norm)
                optimizer.step()
                sup_total += sup.detach()
                dist_total += dist.detach()
                steps += 1
        if skipped:
            logger.warning("client %s: skipped %d step(s) with a non-finite loss", self.client_id, skipped)
        denom = max(steps, 1)
        return TrainStats(steps, skipped, float(sup_total) / denom, float(dist_total) / denom)

    def _supervised_loss(self, head_out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        classifier = self.model.classifier
        if classifier is not None:
            return F.cross_entropy(classifier(head_out), labels)
        s = self.settings
        return margin_loss(head_out, self.etf, labels, margin=s.margin, scale=s.scale)

    def _distillation(self) -> Callable[[], torch.Tensor] | None:
        """The distillation term as a closure over the held pairs: each call takes the next pair batch."""
        held, projector = self._pairs, self.model.projector
        if held is None or projector is None:
            return None
        batches = self._pair_batches(held)

        def loss() -> torch.Tensor:
            idx = next(batches)
            with batchnorm_stats_frozen(self.model.backbone):
                features = self.model.features(held.x[idx])
            return distillation_loss(projector(features), held.z[idx], held.rms)

        return loss

    def _pair_batches(self, held: _HeldPairs) -> Iterator[torch.Tensor]:
        """Endless mini-batches of pair indices, reshuffled each pass (≥ 2 rows for BatchNorm)."""
        m = int(held.x.shape[0])
        size = min(self.settings.distill_batch_size or self.settings.batch_size, m)
        while True:
            order = torch.randperm(m, generator=self._rng)
            if m == 1:
                order = order.repeat(2)
            for chunk in order.split(max(size, 2)):
                if chunk.numel() >= 2:
                    yield chunk.to(self.device)

    # -- what the client uploads and how it is scored -------------------------------------------------

    @torch.no_grad()
    def _head_outputs(self, images: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        outs = [self.model(normalize_pixels(x)) for x in images.split(self.settings.eval_batch_size)]
        return torch.cat(outs) if outs else images.new_zeros(0, self.etf.shape[0])

    def prototypes(self, *, noise_std: float = 0.0, generator: torch.Generator | None = None) -> Prototypes:
        """Per-class prototypes: the mean of L2-normalised head outputs over local training data,
        renormalised. Classes without local samples are not sent; ``counts`` says how many samples each
        row stands for.

        With ``noise_std`` > 0 this is the Gaussian mechanism of `ktl.clients.privacy`: N(0, noise_std²)
        is added to each class's *sum* of unit vectors (L2 sensitivity 1 when one sample is added or
        removed) before renormalising, and ``counts`` are all sent as 1 (the true counts would leak).
        """
        h = F.normalize(self._head_outputs(self.data.train_x), dim=1)
        y = self.data.train_y
        sums = h.new_zeros(self.num_classes, h.shape[1]).index_add_(0, y, h)
        counts = torch.bincount(y, minlength=self.num_classes)
        present = counts > 0
        sums, counts = sums[present].cpu(), counts[present].cpu()
        if noise_std > 0:
            sums = sums + noise_std * torch.randn(sums.shape, generator=generator)
            counts = torch.ones_like(counts)
        return Prototypes(
            vectors=F.normalize(sums, dim=1),
            class_ids=present.nonzero().flatten().cpu(),
            counts=counts,
        )

    def mean_cosines(self) -> Prototypes:
        """Per-class mean of the ETF cosines (the client's "logits", FedDistill's upload), in the same
        per-class table as `prototypes` (rows are not unit vectors)."""
        return self._class_means(etf_cosines(self._head_outputs(self.data.train_x), self.etf))

    def mean_features(self) -> Prototypes:
        """Per-class mean of the raw head outputs over the local training data (FedGH's prototypes: not
        normalised, the classifier's inputs as they are)."""
        return self._class_means(self._head_outputs(self.data.train_x))

    def class_counts(self) -> torch.Tensor:
        """``(C,)`` int64: the local training samples of each class."""
        return torch.bincount(self.data.train_y, minlength=self.num_classes).cpu()

    def _class_means(self, values: torch.Tensor) -> Prototypes:
        """Per-class means of per-sample ``values`` ``(n, D)`` over the training data, classes present only."""
        y = self.data.train_y
        sums = values.new_zeros(self.num_classes, values.shape[1]).index_add_(0, y, values)
        counts = torch.bincount(y, minlength=self.num_classes)
        present = counts > 0
        return Prototypes(
            vectors=(sums[present] / counts[present, None]).cpu(),
            class_ids=present.nonzero().flatten().cpu(),
            counts=counts[present].cpu(),
        )

    def evaluate(self) -> tuple[int, int]:
        """``(correct, total)`` on the local test split (`evaluate_on`)."""
        return self.evaluate_on(self.data.test_x, self.data.test_y)

    def evaluate_on(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
        """``(correct, total)`` on ``images`` (float in [0, 1]) and ``labels``: the class of the nearest ETF
        column, or the trainable classifier's argmax when the model has one. Forward passes only, in eval
        mode: no state of the client changes."""
        if labels.shape[0] == 0:
            return 0, 0
        out = self._head_outputs(images.to(self.device))
        classifier = self.model.classifier
        if classifier is not None:
            with torch.no_grad():
                pred = classifier(out).argmax(dim=1)
        else:
            pred = etf_cosines(out, self.etf).argmax(dim=1)
        return int((pred == labels.to(pred.device)).sum()), int(labels.shape[0])

    # -- state between rounds -------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Everything of this client that changes across rounds, as flat-named CPU tensors that
        safetensors can save as they are (contiguous copies, no shared storage). A client built the same
        way (same model, data, ETF, settings, seed) and given them with `load_state_tensors` is
        indistinguishable from this one: a transport whose client processes do not live between rounds
        computes what ``ktl simulate`` does.

        - ``model.<name>``: every parameter and buffer of the model (BatchNorm running statistics and
          ``num_batches_tracked`` included), the projector's and the trainable classifier's once they
          exist;
        - ``rng.batches``, ``rng.projector``: the states of the batch-order and projector-init generators;
        - the pairs held for distillation: ``received.<i>.x``, ``received.<i>.z`` for each round kept,
          oldest first, or, after `receive_latent_targets`, only ``targets.latents`` ``(C, W)`` (NaN
          rows: classes without a target), from which the pairs on the client's own images are rebuilt.

        What never changes (data, ETF, settings, ids) is not included.
        """
        out = {f"model.{name}": value for name, value in self.model.state_dict().items()}
        out["rng.batches"] = self._rng.get_state()
        out["rng.projector"] = self._init_rng.get_state()
        if self._targets is not None:
            out["targets.latents"] = self._targets
        else:
            for i, (x, z) in enumerate(self._received):
                out[f"received.{i}.x"], out[f"received.{i}.z"] = x, z
        return {
            name: value.detach().cpu().clone(memory_format=torch.contiguous_format)
            for name, value in out.items()
        }

    def load_state_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore what `state_tensors` returned (on any client built like the one that saved it).

        Raises ``ValueError`` on a name it does not know and ``RuntimeError`` (from ``load_state_dict``)
        when the model's parameters do not match.
        """
        model: dict[str, torch.Tensor] = {}
        received: dict[int, dict[str, torch.Tensor]] = {}
        rngs: dict[str, torch.Tensor] = {}
        targets: torch.Tensor | None = None
        for name, value in tensors.items():
            group, _, rest = name.partition(".")
            if group == "model":
                model[rest] = value
            elif group == "rng" and rest in ("batches", "projector"):
                rngs[rest] = value
            elif name == "targets.latents":
                targets = value
            elif group == "received" and rest.count(".") == 1 and rest.split(".")[1] in ("x", "z"):
                index, part = rest.split(".")
                received.setdefault(int(index), {})[part] = value
            else:
                raise ValueError(f"unknown client state tensor {name!r}")
        if sorted(rngs) != ["batches", "projector"]:
            raise ValueError("client state needs rng.batches and rng.projector")
        if targets is not None and received:
            raise ValueError("client state holds both targets.latents and received pairs")
        if sorted(received) != list(range(len(received))) or any(
            sorted(parts) != ["x", "z"] for parts in received.values()
        ):
            raise ValueError(
                "client state's received pairs must be received.0 … received.<n-1>, each x and z"
            )

        # The projector exists iff it was saved; its initial weights are overwritten below, so it is made
        # from a throwaway generator (neither the client's nor the global one moves).
        projector = model.get("projector.weight")
        if projector is not None:
            self.model.ensure_projector(int(projector.shape[0]), generator=torch.Generator())
        elif self.model.projector is not None:
            self.model.projector = None
        classifier = model.get("classifier.weight")
        if classifier is not None:
            self.model.ensure_classifier(int(classifier.shape[0]), generator=torch.Generator())
        else:
            self.model.classifier = None
        self.model.load_state_dict(model)

        if targets is not None:
            self._hold_latent_targets(targets.float().cpu().clone())
        else:
            self._targets = None
            self._received = [
                (received[i]["x"].to(self.device), received[i]["z"].to(self.device))
                for i in range(len(received))
            ]
            self._pairs = _held_all(self._received) if self._received else None
        self._rng.set_state(rngs["batches"].cpu().contiguous())
        self._init_rng.set_state(rngs["projector"].cpu().contiguous())
