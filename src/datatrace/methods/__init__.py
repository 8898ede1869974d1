"""Methods (recipes over the gradient attributor): GradDot, GradCos, TracIn."""

from .datamodel import (
    DistilledDatamodel,
    FittedDistilledDatamodel,
    Recorder,
    kmeans_groups,
)
from .gradient import FittedGradientAttributor, GradientAttributor
from .influence import DataInf, Influence
from .recipes import GradCos, GradDot, TracIn
from .sweep import SweepPoint, damping_sweep, mean_squared_gradient
from .trak import TRAK

__all__ = [
    "TRAK",
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
