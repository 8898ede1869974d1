"""The preconditioner ``dt.Influence()`` uses when none is given: one chosen by problem size.

* up to :data:`EXACT_MAX_PARAMS` parameters: :class:`ExactHessian` (the reference; its
  ``p × p`` matrix is at most 400 MB in float32 there);
* above it, :class:`EKFAC` on the layers it supports (``nn.Linear``, ``nn.Conv2d``,
  transformers' ``Conv1D``) when they hold at least :data:`EKFAC_MIN_SHARE` of the selected
  parameters and the user did not ask for any other (``params=None``): a transformer's
  embeddings and LayerNorms are then left out of the scores, as ``dt.EKFAC()`` does;
* otherwise (the user's ``params`` name a parameter EK-FAC cannot take, or the supported
  layers hold too little of the model, e.g. an embedding-dominated one):
  :class:`ConjugateGradient`, matrix-free and exact up to its tolerance, on every selected
  parameter.

The choice and why (parameter counts, the supported share, what is left out) are logged at
INFO on the ``datatrace`` logger. The choice is made before any gradient pass
(:meth:`AutoPreconditioner.parameters`, which fixes the featurized parameters) and reused
by :meth:`AutoPreconditioner.fit`.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..core.errors import ConfigError
from .base import (
    AbstractFittedPreconditioner,
    AbstractPreconditioner,
    check_damping,
    check_positive,
)
from .cg import ConjugateGradient
from .context import FitContext
from .dense import ExactHessian
from .kfac import EKFAC
from .kfac_layers import kfac_layers

if TYPE_CHECKING:
    from ..core.data import ExampleSource
    from ..core.task import AbstractTask

log = logging.getLogger("datatrace")

#: Largest parameter count for which ``Influence()`` forms the exact Hessian. Measured with the
#: former ``bench/solver_defaults.py --sizes 32,104,160`` (commit a55edca; digits ReLU MLPs, 1,000
#: training examples, 500 queries, λ = 0.1, one thread, on a shared 2-core machine: noisy) as fit +
#: scores: 2,410 parameters exact 9 s / EK-FAC 1.6 s / CG 12 s; 7,810: 34 / 1.0 / 22 s; 12,010: 189
#: / 6 / 101 s (another, quieter run at 7,810: exact 6.5 s, CG 8.2 s). Exact grows as p³; block CG,
#: as exact to its tolerance, overtakes it between about 8k and 12k parameters: 10k.
EXACT_MAX_PARAMS = 10_000
#: EK-FAC is chosen (with ``params=None``) when its layers hold at least this share of the
#: selected parameters: "most of the model". A transformer's Linear/Conv1D layers hold
#: 75-95% (tiny BERT of the tests: 80%; GPT-2 small: 68% with its 38.6M-entry tied
#: embedding); an embedding-bag model's head holds a few percent, and CG is chosen there.
EKFAC_MIN_SHARE = 0.5


class Choice(enum.Enum):
    """What :class:`AutoPreconditioner` chose."""

    EXACT = "exact"
    EKFAC = "ekfac"
    CG = "cg"


@dataclass(frozen=True)
class AutoPreconditioner(AbstractPreconditioner):
    """Exact up to ``max_exact_params`` parameters, EK-FAC on its layers above it when they
    hold most of the model, else CG (module docstring).

    Args:
        damping: λ passed to the chosen preconditioner (``None``: its default).
        max_exact_params: the largest model solved exactly.
    """

    damping: float | str | None = None
    max_exact_params: int = EXACT_MAX_PARAMS
    #: the choice made by :meth:`parameters`, by the tuple of parameters kept (shared by
    #: ``dataclasses.replace`` copies, e.g. ``damping="auto"``'s refits; not a setting: a
    #: saved fit leaves it out, :mod:`datatrace.methods.codec`)
    _chosen: dict[tuple[str, ...], tuple[Choice, str]] = field(
        default_factory=dict, compare=False, repr=False, metadata={"saved": False}
    )

    def __post_init__(self) -> None:
        check_damping(self.damping)
        check_positive("max_exact_params", self.max_exact_params)

    def _make(self, kind: Choice) -> AbstractPreconditioner:
        """The chosen preconditioner with this damping (made anew: a refit's differs)."""
        if kind is Choice.EXACT:
            return ExactHessian(damping=self.damping, max_params=self.max_exact_params)
        if kind is Choice.EKFAC:
            return EKFAC(damping=self.damping)  # type: ignore[arg-type]
        return ConjugateGradient(damping=self.damping)  # type: ignore[arg-type]

    def decide(
        self,
        task: AbstractTask,
        names: list[str],
        requested: tuple[str, ...] | None,
        train: ExampleSource,
    ) -> tuple[Choice, list[str], str]:
        """``(choice, parameters kept, why)``."""
        sizes = {n: p.numel() for n, p in task.model.named_parameters()}
        p = sum(sizes[n] for n in names)
        limit = f"max_exact_params={self.max_exact_params:,}"
        if p <= self.max_exact_params:
            return Choice.EXACT, list(names), f"{p:,} parameters <= {limit}"
        try:
            kept = EKFAC().parameters(task, names, requested, train)
        except ConfigError as exc:  # a requested parameter EK-FAC cannot take, or none at all
            return Choice.CG, list(names), f"{p:,} parameters > {limit}, and EK-FAC cannot take " \
                f"every layer asked for ({exc})"  # fmt: skip
        share = sum(sizes[n] for n in kept) / p
        left = [n for n in names if n not in kept]
        shown = ", ".join(left[:6]) + (f", ... ({len(left)} in all)" if len(left) > 6 else "")
        if share < EKFAC_MIN_SHARE:
            return (
                Choice.CG,
                list(names),
                (
                    f"{p:,} parameters > {limit}, and EK-FAC cannot take every layer: its layers "
                    f"hold {share:.0%} < {EKFAC_MIN_SHARE:.0%} of them (left out: {shown})"
                ),
            )
        why = f"{p:,} parameters > {limit}; EK-FAC's layers hold {share:.0%} of them"
        return Choice.EKFAC, kept, why + (f" (left out of the scores: {shown})" if left else "")

    def parameters(
        self,
        task: AbstractTask,
        names: list[str],
        requested: tuple[str, ...] | None,
        train: ExampleSource,
    ) -> list[str]:
        kind, kept, why = self.decide(task, names, requested, train)
        self._chosen[tuple(kept)] = (kind, why)
        return kept

    def choose(self, ctx: FitContext) -> tuple[AbstractPreconditioner, str]:
        """The preconditioner for this problem, and why (as decided by :meth:`parameters`;
        without that call, from the problem's parameters alone)."""
        names = tuple(ctx.problem.names)
        if names in self._chosen:
            kind, why = self._chosen[names]
            return self._make(kind), why
        p = ctx.problem.p
        limit = f"max_exact_params={self.max_exact_params:,}"
        if p <= self.max_exact_params:
            return self._make(Choice.EXACT), f"{p:,} parameters <= {limit}"
        _, left_out = kfac_layers(ctx.problem.task.model, list(names))
        if left_out:
            why = "; ".join(f"{n!r}: {w}" for n, w in left_out.items())
            return self._make(Choice.CG), f"{p:,} parameters > {limit}, and EK-FAC cannot take " \
                f"every layer ({why})"  # fmt: skip
        return self._make(Choice.EKFAC), f"{p:,} parameters > {limit}, every layer K-FAC-able"

    def fit(self, ctx: FitContext) -> AbstractFittedPreconditioner:
        choice, why = self.choose(ctx)
        log.info("Influence: preconditioner %s (%s)", type(choice).__name__, why)
        return choice.fit(ctx)
