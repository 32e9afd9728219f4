"""Study controls (the ``study`` section): who trains each round, dropout and stragglers, how often the
federation is evaluated, early stop on a plateau, client weights from an earlier run, and repeats.

Every decision here is a pure function of the run seed, the round and the client index
(`ktl.seeding.derive_seed`), so ``ktl simulate`` and Flower draw the same clients for the same seed and a
run repeats exactly.

- **Participation.** Each round trains ``max(min_clients, round(join_ratio · N))`` clients (at most N),
  a seeded sample; with every client chosen nothing is drawn. Clients that do not train keep their state
  and still receive the round's broadcast.
- **Dropout.** A chosen client fails to report with probability ``dropout`` (a seeded draw per client and
  round): it neither trains nor uploads, and its state stays as it was.
- **Stragglers** (a ``round_budget`` in seconds). A client's simulated training time is its work — local
  epochs × its training samples × ``seconds_per_sample`` — times a speed factor ``exp(speed_sigma · ε)``,
  ε ~ N(0, 1) drawn per client and round (a log-normal device speed with median 1). A client over the
  budget misses the round as a dropped one does. The time is simulated, not measured, so it is the same on
  every machine.
- **Evaluation.** Rounds ``eval_every``, ``2·eval_every``, … and the last are evaluated; every client is
  scored, participants or not (each holds a model and a test split), so a round's accuracy is the same
  test-sample-weighted mean over all clients whatever the join ratio.
- **Global test set.** With ``data.global_test_size`` > 0 every client is also scored on a held-out set
  no client holds, in the evaluated rounds among the last ``global_eval_rounds``.
- **Early stop.** With ``patience`` P, the run ends after P evaluated rounds in a row that do not beat the
  best accuracy so far by more than ``min_delta``.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ktl.clients import LocalClient
from ktl.errors import ConfigError
from ktl.seeding import derive_seed

__all__ = [
    "CLIENT_WEIGHTS",
    "Plateau",
    "StudySettings",
    "client_weights_path",
    "is_evaluated",
    "is_globally_evaluated",
    "load_client_weights",
    "mean_std",
    "miss_reason",
    "participants",
    "save_client_weights",
]

CLIENT_WEIGHTS = "clients"
"""The run folder's sub-folder of client weights, one ``<client id>.safetensors`` per client."""


class StudySettings(BaseModel):
    """Study controls: participation, dropout, stragglers, evaluation, early stop, warm start, repeats.

    Defaults change nothing: every client trains and is evaluated every round, for every round.
    """

    model_config = ConfigDict(extra="forbid")

    join_ratio: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Fraction of the clients that train each round (a seeded sample; the others keep their "
        "state and still receive the broadcast). On Flower: of the connected nodes",
    )
    min_clients: int = Field(
        1, ge=1, description="At least this many clients train each round (capped at the number of clients)"
    )
    dropout: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Probability that a chosen client fails to report in a round (seeded per client and "
        "round): it neither trains nor uploads, its state stays as it was",
    )
    round_budget: float | None = Field(
        None,
        gt=0,
        description="Seconds a round waits for a client; a client whose simulated training time (epochs × "
        "training samples × study.seconds_per_sample × a seeded log-normal speed factor) exceeds it misses "
        "the round as a dropped one does. none = no stragglers",
    )
    seconds_per_sample: float = Field(
        0.001,
        gt=0,
        description="Simulated seconds one training sample takes per epoch on a device of speed 1",
    )
    speed_sigma: float = Field(
        0.5,
        ge=0,
        description="Spread of the devices' speed: the factor is exp(speed_sigma · N(0, 1)), drawn per client "
        "and round (0: every device has speed 1)",
    )
    eval_every: int = Field(
        1,
        ge=1,
        description="Evaluate every k rounds (and always the last); skipped rounds have accuracy none and "
        "evaluated false in metrics.jsonl",
    )
    global_eval_rounds: int | None = Field(
        3,
        ge=1,
        description="Score every client on the held-out global test set (data.global_test_size > 0) in the "
        "evaluated rounds among the last this many (3: the last-k mean of ktl bench accuracy; each client "
        "costs a forward pass over the whole set, so not every round); none = every evaluated round",
    )
    patience: int | None = Field(
        None,
        ge=1,
        description="Early stop: end the run after this many evaluated rounds in a row without beating the "
        "best accuracy by more than study.min_delta (summary.json says when and why); none = run every round",
    )
    min_delta: float = Field(0.0, ge=0, description="Early stop: the smallest gain in accuracy that counts")
    pretrained: Path | None = Field(
        None,
        description="Start each client from the weights an earlier run saved: its run folder (or its "
        "clients/ folder), one <client id>.safetensors per client; the models must match",
    )
    repeats: int = Field(
        1,
        ge=1,
        description="ktl simulate: run seeds seed … seed+repeats−1, each in a sub-folder of the run folder, "
        "and write the mean ± std of final and best accuracy to its summary.json",
    )


def participants(study: StudySettings, seed: int, round_index: int, num_clients: int) -> list[int]:
    """The indices (ascending) of the clients chosen to train in round ``round_index``."""
    k = min(num_clients, max(study.min_clients, round(study.join_ratio * num_clients)))
    if k >= num_clients:
        return list(range(num_clients))
    rng = random.Random(derive_seed(seed, "participants", round_index))
    return sorted(rng.sample(range(num_clients), k))


def miss_reason(
    study: StudySettings, seed: int, round_index: int, index: int, *, num_train: int, epochs: int
) -> str | None:
    """Why chosen client ``index`` misses round ``round_index`` (``"dropout"``, ``"straggler"``), or None
    when it reports."""
    if study.dropout > 0 and random.Random(derive_seed(seed, "dropout", index, round_index)).random() < (
        study.dropout
    ):
        return "dropout"
    if study.round_budget is not None:
        speed = math.exp(
            study.speed_sigma * random.Random(derive_seed(seed, "speed", index, round_index)).gauss(0.0, 1.0)
        )
        if epochs * num_train * study.seconds_per_sample * speed > study.round_budget:
            return "straggler"
    return None


def is_evaluated(study: StudySettings, round_index: int, rounds: int) -> bool:
    """Whether round ``round_index`` of ``rounds`` is evaluated (every ``eval_every``-th and the last)."""
    return round_index % study.eval_every == 0 or round_index == rounds


def is_globally_evaluated(study: StudySettings, round_index: int, rounds: int) -> bool:
    """Whether round ``round_index`` of ``rounds`` also scores the clients on the global test set: an
    evaluated round among the last ``global_eval_rounds``."""
    last = study.global_eval_rounds
    return is_evaluated(study, round_index, rounds) and (last is None or round_index > rounds - last)


@dataclass
class Plateau:
    """Early stop on a plateau of the evaluated accuracy (see `StudySettings.patience`)."""

    patience: int | None
    min_delta: float = 0.0
    best: float = -math.inf
    stale: int = 0
    history: list[float] = field(default_factory=list)

    def update(self, accuracy: float) -> bool:
        """Record an evaluated round's accuracy; True when the run should stop now."""
        self.history.append(accuracy)
        if accuracy > self.best + self.min_delta or self.best == -math.inf:
            self.best, self.stale = max(accuracy, self.best), 0
        else:
            self.stale += 1
        return self.patience is not None and self.stale >= self.patience

    def reason(self) -> str:
        return (
            f"no gain above {self.min_delta:g} in accuracy for {self.patience} evaluated rounds "
            f"(best {self.best:.4f})"
        )


# -- client weights -----------------------------------------------------------------------------------


def _weights(client: LocalClient) -> dict[str, torch.Tensor]:
    """The client's classifier (backbone and head; not the projector, which belongs to a generator)."""
    return {
        name: value.detach().cpu().clone(memory_format=torch.contiguous_format)
        for name, value in client.model.state_dict().items()
        if not name.startswith("projector.")
    }


def save_client_weights(clients: Sequence[LocalClient], run_dir: Path) -> Path:
    """Write each client's weights to ``run_dir/clients/<client id>.safetensors``; returns the folder."""
    folder = run_dir / CLIENT_WEIGHTS
    folder.mkdir(parents=True, exist_ok=True)
    for client in clients:
        save_file(_weights(client), str(folder / f"{client.client_id}.safetensors"))
    return folder


def client_weights_path(folder: Path, client_id: str) -> Path:
    """Where ``client_id``'s weights lie under ``folder`` (a run folder or its ``clients/``)."""
    base = Path(folder)
    if not base.is_dir():
        raise ConfigError(f"study.pretrained: {base} is not a folder")
    if (base / CLIENT_WEIGHTS).is_dir():
        base = base / CLIENT_WEIGHTS
    path = base / f"{client_id}.safetensors"
    if not path.is_file():
        raise ConfigError(
            f"study.pretrained: no weights for {client_id} in {base} (a run folder of the same clients and "
            "models is needed)"
        )
    return path


def load_client_weights(client: LocalClient, folder: Path) -> None:
    """Load ``client``'s weights saved by an earlier run; a mismatch is one `ConfigError` line."""
    path = client_weights_path(folder, client.client_id)
    try:
        saved = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"study.pretrained: cannot read {path}: {exc}") from None
    own = _weights(client)
    if sorted(saved) != sorted(own):
        raise ConfigError(f"study.pretrained: {path} holds other tensors than {client.client_id}'s model")
    bad = next((n for n, t in saved.items() if t.shape != own[n].shape), None)
    if bad is not None:
        raise ConfigError(
            f"study.pretrained: {path}: {bad} has shape {tuple(saved[bad].shape)}, the model's is "
            f"{tuple(own[bad].shape)}"
        )
    client.model.load_state_dict(saved, strict=False)


def mean_std(values: Sequence[float]) -> dict[str, float | list[float]]:
    """Mean and population standard deviation (as HtFLlib reports repeats) of ``values``."""
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values), "values": list(values)}
