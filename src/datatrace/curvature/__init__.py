"""Curvature preconditioners ``(H + λI)⁻¹`` for influence functions.

* ``ExactHessian`` / ``GaussNewton``: form and eigendecompose (small models; the reference).
* ``ConjugateGradient``: matrix-free, all queries at once; exact up to ``tol``.
* ``LiSSA``: stochastic Neumann series; cheap per step, noisy.
* ``Arnoldi``: top-r eigenpairs; good when the spectrum decays fast.
* ``KFAC`` / ``EKFAC``: Kronecker-factored Gauss–Newton for Linear (any input rank, e.g.
  tokens), Conv2d and transformers' Conv1D layers; scale to large models. EK-FAC is the
  better of the two. ``Fisher``: how their output-side factor is formed (exact, sampled
  labels, empirical).
* ``DataInfPreconditioner``: DataInf's closed form (per layer, from training gradients).
"""

from .arnoldi import Arnoldi
from .base import (
    AbstractFittedPreconditioner,
    AbstractPreconditioner,
    InfluenceWarning,
    mean_squared_entry,
)
from .cg import ConjugateGradient
from .context import FitContext
from .datainf import DataInfPreconditioner
from .dense import ExactHessian, GaussNewton
from .fisher import Fisher
from .gram import GramInverse
from .kfac import EKFAC, KFAC
from .lissa import LiSSA
from .problem import CurvatureProblem

__all__ = [
    "EKFAC",
    "KFAC",
    "AbstractFittedPreconditioner",
    "AbstractPreconditioner",
    "Arnoldi",
    "ConjugateGradient",
    "CurvatureProblem",
    "DataInfPreconditioner",
    "ExactHessian",
    "Fisher",
    "FitContext",
    "GaussNewton",
    "GramInverse",
    "InfluenceWarning",
    "LiSSA",
    "mean_squared_entry",
]
