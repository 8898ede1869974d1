"""Methods (recipes over the gradient attributor): GradDot, GradCos, TracIn."""

from .gradient import FittedGradientAttributor, GradientAttributor
from .influence import DataInf, Influence
from .recipes import GradCos, GradDot, TracIn

__all__ = [
    "DataInf",
    "FittedGradientAttributor",
    "GradCos",
    "GradDot",
    "GradientAttributor",
    "Influence",
    "TracIn",
]
