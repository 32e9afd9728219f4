"""``lg-fedavg``: LG-FedAvg (Liang et al., 2020) — local representations, one global classifier.

Each client trains its own heterogeneous model with a trainable linear classifier ``K → C`` (cross-entropy,
`ktl.methods.heads`), uploads only the classifier and its training-sample count; the server averages the
classifiers, weighted by samples (FedAvg), and every client replaces its classifier with the average
(HtFLlib's ``serverlg``/``clientlg``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ktl.clients import LocalClient
from ktl.methods.base import ClientUpdate, register_method
from ktl.methods.heads import (
    Layout,
    WeightsAverage,
    classifier_layout,
    classifier_tensors,
    ensure_classifier,
    load_classifier,
)

__all__ = ["LGFedAvg"]


@register_method("lg-fedavg")
class LGFedAvg(WeightsAverage):
    """LG-FedAvg: the classifier is averaged over clients; everything below it stays local."""

    broadcast_file = "classifier.safetensors"

    def expected_layout(self) -> Layout:
        return classifier_layout(self.ctx.num_classes, self.ctx.proto_dim)

    def local_weights(self, client: LocalClient) -> dict[str, torch.Tensor]:
        return classifier_tensors(ensure_classifier(client, self.ctx.seed))

    def take_weights(self, client: LocalClient, tensors: Mapping[str, torch.Tensor]) -> None:
        load_classifier(ensure_classifier(client, self.ctx.seed), tensors)

    def client_update(self, client: LocalClient, round_index: int) -> ClientUpdate:
        ensure_classifier(client, self.ctx.seed)
        stats = client.train()
        return ClientUpdate(stats=stats, payload=self.weights_payload(client))
