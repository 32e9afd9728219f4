"""Server-side alignment of client prototypes to a generator's latent space (``ktl.aligner``)."""

from ktl.aligner.aligner import Aligner, AlignerSettings, AlignResult, class_centroids
from ktl.aligner.mmd import PriorKernel, mmd2_rbf, prior_bandwidths, squared_distances
from ktl.aligner.transformer import FeatureTransformer

__all__ = [
    "Aligner",
    "AlignerSettings",
    "AlignResult",
    "FeatureTransformer",
    "PriorKernel",
    "class_centroids",
    "mmd2_rbf",
    "prior_bandwidths",
    "squared_distances",
]
