"""Methods (recipes over the gradient attributor): GradDot, GradCos, TracIn."""

from .gradient import FittedGradientAttributor, GradientAttributor
from .influence import DataInf, Influence
from .recipes import GradCos, GradDot, TracIn
from .sweep import SweepPoint, damping_sweep, mean_squared_gradient
from .trak import TRAK

__all__ = [
    "TRAK",
    "DataInf",
    "FittedGradientAttributor",
    "GradCos",
    "GradDot",
    "GradientAttributor",
    "Influence",
    "SweepPoint",
    "TracIn",
    "damping_sweep",
    "mean_squared_gradient",
]
