"""Methods (recipes over the gradient attributor): GradDot, GradCos, TracIn."""

from .gradient import FittedGradientAttributor, GradientAttributor
from .recipes import GradCos, GradDot, TracIn

__all__ = ["FittedGradientAttributor", "GradCos", "GradDot", "GradientAttributor", "TracIn"]
