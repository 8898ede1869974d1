"""Gradient features: what φ is, how it is projected, where it is kept, and how it is computed.

* :mod:`~datatrace.features.spec`: :class:`FeatureSpec`, the frozen settings of φ.
* :mod:`~datatrace.features.featurizer`: :class:`AbstractFeaturizer` and
  :class:`GradientFeatures` (factored, indexed, dense or projected per-example gradients).
* :mod:`~datatrace.features.products`: the inner products of factored and indexed layers.
* :mod:`~datatrace.features.projector`: :class:`AbstractProjector`, the seeded dense
  random projection and the per-layer Kronecker projection (one seed derivation).
* :mod:`~datatrace.features.store`: the resumable, fingerprinted on-disk feature store.
* :mod:`~datatrace.features.loop`: featurizing a data source into memory or a store.
* :mod:`~datatrace.features.placement`: where training features live (memory, disk, recompute).
"""

from .featurizer import AbstractFeaturizer, Features, GradientFeatures
from .projector import (
    AbstractProjector,
    KroneckerProjector,
    ProjectionSpec,
    RandomProjector,
    derive_seed,
)
from .spec import FeatureSpec

__all__ = [
    "AbstractFeaturizer",
    "AbstractProjector",
    "FeatureSpec",
    "Features",
    "GradientFeatures",
    "KroneckerProjector",
    "ProjectionSpec",
    "RandomProjector",
    "derive_seed",
]
