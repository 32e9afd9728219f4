"""ktl on Flower: a ServerApp and a ClientApp that drive the same `ktl.methods.Method` steps as
``ktl simulate`` and ``ktl serve`` (see docs/flower.md). Needs the ``flower`` extra (``flwr[simulation]``)."""
