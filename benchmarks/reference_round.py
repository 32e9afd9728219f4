"""A faithful re-run of the reference FedKTL server's alignment loop (TsingZ0/FedKTL,
``system/flcore/servers/serverktl_stylegan_xl.py``: ``align``, ``set_Centroids``, ``MMD``,
``Feature_Transformer``), written anew for `ktl bench server`. It reproduces the reference's behaviour and
cost, defects included — that is its purpose; nothing in ktl runs it.

What is reproduced
------------------
* F: ``Linear(K, K) → BatchNorm1d(K) → ReLU → Linear(K, W)`` (hidden width K; raises on a batch of one in
  training mode), and a trainable ``nn.Embedding(C, W)`` of approximate class centroids.
* Defaults of ``system/main.py``: server lr 0.01, server batch 100, 100 server epochs, λ (``lamda``) 1.0.
* Each round (``align``): load F, the centroids and the uploads back from whole-module ``torch.save``
  files, set the centroids (a shuffled DataLoader pass, per-row ``.item()`` grouping, plain means), then
  100 epochs of a new ``DataLoader(uploads, 100, shuffle=True)`` over a Python list of (device tensor,
  device label) tuples (default collate stacks them each step); prior draws as ``gen_utils.get_w_from_seed``
  makes them (a fresh ``np.random.RandomState``, float64 normals copied to the device); loss = the
  reference MMD (RBF, fixed bandwidths 10, 15, 20, 50, biased, equal batch sizes) + λ·MSE to the
  embedding rows; two Adam optimisers, both gradients clipped at 100; the loss read back with
  ``.item()`` every step; centroids set again; everything saved with ``torch.save``.
* The files are our own, written by this process into a temporary work folder, which is the only reason
  ``torch.load(weights_only=False)`` is acceptable here. ktl itself never unpickles.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ktl.aligner.mmd import mmd2_rbf

__all__ = [
    "ReferenceFeatureTransformer",
    "ReferenceServer",
    "ReferenceSettings",
    "alignment_loss",
    "numpy_normal_prior",
    "reference_mmd",
]

logger = logging.getLogger("ktl.bench.reference")

MMDFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ReferenceSettings:
    """The reference's server defaults (``system/main.py``)."""

    epochs: int = 100  # --server_epochs
    batch_size: int = 100  # --server_batch_size
    lr: float = 0.01  # --server_learning_rate
    lam: float = 1.0  # --lamda
    clip: float = 100.0  # clip_grad_norm_ in align()


class ReferenceFeatureTransformer(nn.Module):
    """The reference F: ``Linear(K, K) → BatchNorm1d(K) → ReLU → Linear(K, W)`` for 2 layers."""

    def __init__(self, in_features: int, out_features: int, num_layers: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(num_layers - 1):
            layers += [nn.Linear(in_features, in_features), nn.BatchNorm1d(in_features), nn.ReLU()]
        layers.append(nn.Linear(in_features, out_features))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


def reference_mmd(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The reference's ``MMD(x, y, 'rbf')``: biased, bandwidths 10, 15, 20, 50, needs ``len(x) == len(y)``."""
    xx, yy, zz = x @ x.t(), y @ y.t(), x @ y.t()
    rx = xx.diag().unsqueeze(0).expand_as(xx)
    ry = yy.diag().unsqueeze(0).expand_as(yy)
    dxx = rx.t() + rx - 2.0 * xx
    dyy = ry.t() + ry - 2.0 * yy
    dxy = rx.t() + ry - 2.0 * zz
    big_xx, big_yy, big_xy = (torch.zeros(xx.shape, device=x.device) for _ in range(3))
    for a in (10, 15, 20, 50):
        big_xx += torch.exp(-0.5 * dxx / a)
        big_yy += torch.exp(-0.5 * dyy / a)
        big_xy += torch.exp(-0.5 * dxy / a)
    return torch.mean(big_xx + big_yy - 2.0 * big_xy)


def numpy_normal_prior(
    latent_dim: int, device: torch.device | str, seed: int = 0
) -> Callable[[int], torch.Tensor]:
    """A prior sampler as ``get_w_from_seed`` draws z: a fresh ``np.random.RandomState`` per call, float64
    normals copied to the device (seeded from a counter here, so a run is reproducible)."""
    calls = iter(range(seed, 2**31))

    def sample(n: int) -> torch.Tensor:
        z = np.random.RandomState(next(calls)).randn(n, latent_dim)
        return torch.from_numpy(z).to(device).float()

    return sample


def _save(item: object, folder: Path, name: str) -> None:
    torch.save(item, folder / f"Server_{name}.pt")


def _load(folder: Path, name: str) -> object:
    # Our own file, written above by this process (see the module docstring); never a client's bytes.
    return torch.load(folder / f"Server_{name}.pt", weights_only=False)


class ReferenceServer:
    """The reference server's alignment state and round, for side-by-side timing.

    Parameters
    ----------
    num_classes, proto_dim, latent_dim
        C, K and W.
    sample_prior
        ``sample_prior(n) -> (n, W)`` latents on ``device`` (see `numpy_normal_prior`).
    device
        Where F trains.
    workdir
        Folder for the whole-module ``torch.save`` files.
    settings
        The reference's defaults.
    seed
        Initialises F and the centroid embedding; seeds the DataLoader shuffles.
    mmd_fn
        The MMD used in training; the reference's `reference_mmd` by default.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        proto_dim: int,
        latent_dim: int,
        sample_prior: Callable[[int], torch.Tensor],
        device: torch.device | str,
        workdir: Path,
        settings: ReferenceSettings | None = None,
        seed: int = 0,
        mmd_fn: MMDFn | None = None,
    ) -> None:
        self.settings = settings or ReferenceSettings()
        self.device = torch.device(device)
        self.num_classes = num_classes
        self.sample_prior = sample_prior
        self.mmd_fn = mmd_fn or reference_mmd
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.step_losses: list[float] = []
        self._shuffle = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            f = ReferenceFeatureTransformer(proto_dim, latent_dim).to(self.device)
            centroids = nn.Embedding(num_classes, latent_dim).to(self.device)
        _save(f, self.workdir, "F")
        _save(centroids, self.workdir, "Centroids")
        self.mse = nn.MSELoss()

    def _loader(self, uploads: list[tuple[torch.Tensor, torch.Tensor]]) -> DataLoader:
        return DataLoader(
            uploads,  # type: ignore[arg-type]  # a list of tuples, as the reference passes it
            self.settings.batch_size,
            drop_last=False,
            shuffle=True,
            generator=self._shuffle,
        )

    @torch.no_grad()
    def _set_centroids(
        self, uploads: list[tuple[torch.Tensor, torch.Tensor]], f: nn.Module, centroids: nn.Embedding
    ) -> None:
        groups: dict[int, list[torch.Tensor]] = defaultdict(list)
        f.eval()
        for p, y in self._loader(uploads):
            q = f(p).detach()
            for i, yy in enumerate(y):
                groups[yy.item()].append(q[i, :].data)
        for c, rows in groups.items():
            mean = rows[0] if len(rows) == 1 else sum(r.data for r in rows) / len(rows)
            centroids.weight.data[c] = mean.clone()

    def align(self, uploads: list[tuple[torch.Tensor, int]]) -> torch.Tensor:
        """One round: ``(prototype, class)`` uploads → ``(C, W)`` latent centroids (the embedding rows)."""
        s = self.settings
        items = [
            (p.to(self.device), torch.tensor(y, dtype=torch.int64, device=self.device)) for p, y in uploads
        ]
        _save(items, self.workdir, "uploaded_protos")  # receive_protos()
        items = _load(self.workdir, "uploaded_protos")  # type: ignore[assignment]
        f: nn.Module = _load(self.workdir, "F")  # type: ignore[assignment]
        centroids: nn.Embedding = _load(self.workdir, "Centroids")  # type: ignore[assignment]
        self._set_centroids(items, f, centroids)
        opt_f = torch.optim.Adam(f.parameters(), lr=s.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)
        opt_c = torch.optim.Adam(
            centroids.parameters(), lr=s.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0
        )
        f.train()
        centroids.train()
        self.step_losses = []
        for _ in range(s.epochs):
            for p, y in self._loader(items):
                q = f(p)
                latents = self.sample_prior(p.shape[0]).detach()
                loss = self.mmd_fn(q, latents)
                loss = loss + self.mse(q, centroids(y)) * s.lam
                opt_f.zero_grad()
                opt_c.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(f.parameters(), s.clip)
                nn.utils.clip_grad_norm_(centroids.parameters(), s.clip)
                opt_f.step()
                opt_c.step()
                self.step_losses.append(loss.item())
                logger.debug("reference step loss %.4f", self.step_losses[-1])
        self._set_centroids(items, f, centroids)
        latent_centroids = centroids(torch.arange(self.num_classes, device=self.device)).detach().data
        _save(f, self.workdir, "F")
        _save(centroids, self.workdir, "Centroids")
        _save(latent_centroids, self.workdir, "latent_centroids")
        return latent_centroids

    @torch.no_grad()
    def transform(self, vectors: torch.Tensor) -> torch.Tensor:
        """F in eval mode (as saved after the last round) applied to ``(n, K)`` vectors."""
        f: nn.Module = _load(self.workdir, "F")  # type: ignore[assignment]
        return f.eval()(vectors.to(self.device))


def alignment_loss(
    aligned: torch.Tensor, class_ids: torch.Tensor, prior: torch.Tensor, bandwidths: torch.Tensor, lam: float
) -> dict[str, float]:
    """The alignment objective, evaluated the same way for any server on *all* aligned prototypes.

    ``mmd`` = unbiased MMD² under the prior-scaled RBF mixture against a fixed prior sample; ``mse`` = mean
    squared distance of each row to its class's plain mean; ``loss = mmd + lam · mse``.
    """
    aligned = aligned.float()
    c = int(class_ids.max()) + 1
    sums = aligned.new_zeros(c, aligned.shape[1]).index_add(0, class_ids, aligned)
    counts = aligned.new_zeros(c).index_add(0, class_ids, torch.ones_like(class_ids, dtype=aligned.dtype))
    means = sums / counts.clamp_min(1.0)[:, None]
    mse = float((aligned - means[class_ids]).pow(2).mean())
    mmd = float(mmd2_rbf(aligned, prior.to(aligned), bandwidths))
    return {"mmd": mmd, "mse": mse, "loss": mmd + lam * mse}
