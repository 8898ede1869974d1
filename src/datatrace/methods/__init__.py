"""Methods: the one engine (:mod:`.engine`), the recipes over it (:mod:`.recipes`), the
Distilled Datamodel (:mod:`.datamodel`) and damping sweeps (:mod:`.sweep`)."""

from .datamodel import (
    DistilledDatamodel,
    FittedDistilledDatamodel,
    Recorder,
    kmeans_groups,
)
from .engine import GradientAttributor
from .fitted import FittedGradientAttributor
from .recipes import TRAK, DataInf, GradCos, GradDot, Influence, TracIn
from .slots import AbstractExampleWeights, AbstractOutput, CheckpointWeights
from .sweep import SweepPoint, damping_sweep, mean_squared_gradient

__all__ = [
    "TRAK",
    "AbstractExampleWeights",
    "AbstractOutput",
    "CheckpointWeights",
    "DataInf",
    "DistilledDatamodel",
    "FittedDistilledDatamodel",
    "FittedGradientAttributor",
    "GradCos",
    "GradDot",
    "GradientAttributor",
    "Influence",
    "Recorder",
    "SweepPoint",
    "TracIn",
    "damping_sweep",
    "kmeans_groups",
    "mean_squared_gradient",
]
