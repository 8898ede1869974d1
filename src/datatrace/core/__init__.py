"""The bottom layer: what every other layer builds on.

* :mod:`~datatrace.core.task`: what is trained (loss) and what is explained (measurement).
* :mod:`~datatrace.core.checkpoint`: parameters where gradients are taken, with weights.
* :mod:`~datatrace.core.data`: example sources (tensors, Datasets, DataLoaders) and batches.
* :mod:`~datatrace.core.loop`: THE loop over data (device moves, progress, non-finite checks).
* :mod:`~datatrace.core.errors`: one error type per kind of failure.
* :mod:`~datatrace.core.distributed`: torchrun ranks, sharding, deterministic merges.
* :mod:`~datatrace.core.runtime`: eval mode, devices, progress bars.
"""
