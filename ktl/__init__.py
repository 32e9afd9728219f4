"""ktl: generator-based knowledge transfer for heterogeneous federated learning (FedKTL).

The package is light to import: submodules are imported where they are used.
"""

__version__ = "0.1.0"
