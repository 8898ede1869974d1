"""The preconditioner ``dt.Influence()`` uses when none is given: one chosen by problem size.

* up to :data:`EXACT_MAX_PARAMS` parameters: :class:`ExactHessian` (the reference; its
  ``p × p`` matrix is at most 400 MB in float32 there);
* above it, when every selected parameter is in a layer K-FAC supports: :class:`EKFAC`;
* otherwise (e.g. an embedding): :class:`ConjugateGradient`, matrix-free and exact up to its
  tolerance.

The choice and why are logged at INFO on the ``datatrace`` logger.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..core.errors import ConfigError
from .base import (
    AbstractFittedPreconditioner,
    AbstractPreconditioner,
    check_damping,
    check_positive,
)
from .context import FitContext
from .dense import ExactHessian
from .iterative import ConjugateGradient
from .kfac import EKFAC
from .kfac_layers import problem_layers as kfac_layers

log = logging.getLogger("datatrace")

#: Largest parameter count for which ``Influence()`` forms the exact Hessian. Measured with
#: ``bench/solver_defaults.py --sizes 32,104,160`` (digits ReLU MLPs, 1,000 training
#: examples, 500 queries, λ = 0.1, one thread, on a shared 2-core machine: noisy) as
#: fit + scores: 2,410 parameters exact 9 s / EK-FAC 1.6 s / CG 12 s; 7,810: 34 / 1.0 / 22 s;
#: 12,010: 189 / 6 / 101 s (another, quieter run at 7,810: exact 6.5 s, CG 8.2 s). Exact
#: grows as p³; block CG, as exact to its tolerance, overtakes it between about 8k and
#: 12k parameters: 10k.
EXACT_MAX_PARAMS = 10_000


@dataclass(frozen=True)
class AutoPreconditioner(AbstractPreconditioner):
    """Exact below ``max_exact_params`` parameters, EK-FAC above it, CG where EK-FAC cannot
    take every selected layer.

    Args:
        damping: λ passed to the chosen preconditioner (``None``: its default).
        max_exact_params: the largest model solved exactly.
    """

    damping: float | None = None
    max_exact_params: int = EXACT_MAX_PARAMS

    def __post_init__(self) -> None:
        check_damping(self.damping)
        check_positive("max_exact_params", self.max_exact_params)

    def choose(self, ctx: FitContext) -> tuple[AbstractPreconditioner, str]:
        """The preconditioner for this problem, and why."""
        p = ctx.problem.p
        if p <= self.max_exact_params:
            why = f"{p:,} parameters <= max_exact_params={self.max_exact_params:,}"
            return ExactHessian(damping=self.damping, max_params=self.max_exact_params), why
        try:
            kfac_layers(ctx.problem)
        except ConfigError as exc:
            why = (
                f"{p:,} parameters > max_exact_params={self.max_exact_params:,}, and EK-FAC "
                f"cannot take every layer ({exc})"
            )
            return ConjugateGradient(damping=self.damping), why
        why = (
            f"{p:,} parameters > max_exact_params={self.max_exact_params:,}, every layer K-FAC-able"
        )
        return EKFAC(damping=self.damping), why

    def fit(self, ctx: FitContext) -> AbstractFittedPreconditioner:
        choice, why = self.choose(ctx)
        log.info("Influence: preconditioner %s (%s)", type(choice).__name__, why)
        return choice.fit(ctx)
