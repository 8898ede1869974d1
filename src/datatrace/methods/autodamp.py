"""``damping="auto"``: the damping that agrees best with further training on a sample.

Wei et al. (2024)'s further training needs only the final model, so a fitted influence
method can check itself: on a seeded random sample of ``n_examples`` training examples left
out × ``n_queries`` other training examples as queries, :func:`~.further.further_training`
(``epochs`` short epochs of SGD, stacked runs) gives the gold standard once; each damping
of a log grid around the default rule's value (``multipliers``) reuses the fitted
curvature (``with_damping``: the exact Hessian is formed once and refactorized, K-FAC/EK-FAC
factors and Arnoldi eigenpairs serve every damping, CG is warm-started; other
preconditioners are refitted) and scores the sample; the damping with the
highest mean per-query Spearman agreement wins (ties: the larger damping, the more stable
one). The fit log (INFO) lists every grid point's agreement, the choice and the seconds spent
(further training, refits); :attr:`AutoDampingResult` holds the same.

``Influence(dt.ExactHessian(damping="auto"))`` and every preconditioner that takes a damping
use :data:`DEFAULTS`; :func:`calibrate_damping` takes other settings.

It lives in ``methods`` (above ``truth``, whose further training it uses); the engine
calls :func:`calibrate_damping` after fitting a preconditioner with ``damping="auto"``.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..core.checkpoint import Checkpoint
from ..core.errors import ConfigError, NonFiniteError
from ..core.task import AbstractTask
from ..curvature.base import InfluenceWarning
from ..metrics import agreement
from ..truth.further import further_training

log = logging.getLogger("datatrace")


@dataclass(frozen=True)
class AutoDamping:
    """Settings of the calibration (module docstring).

    Args:
        n_examples: training examples left out (the sample's columns).
        n_queries: other training examples whose loss is measured (the sample's rows).
        epochs: further-training epochs over the full training set.
        seeds: further-training batch orders averaged (Wei et al.'s averaging).
        lr, batch_size, momentum, weight_decay: further training's SGD.
        multipliers: the grid, as multiples of the default rule's damping.
        seed: the sample's seed (the calibration is reproducible with it).

    The further-training horizon decides the answer: ``T`` steps at rate η agree best with
    a damping near ``1/(η T)`` (short further training is first order: it favours large
    damping). bench/defaults.py --quick, exact Hessian, the choice over the rule's ×0.01..×100
    (LDS of the choice): 1 epoch at lr 0.01 chose ×100 on both tasks (digits MLP 0.770 vs
    the rule's 0.804; breast cancer 0.566 vs 0.701); 5 epochs at lr 0.1 chose ×1 on the MLP
    (0.804) and ×10 on breast cancer (0.593).

    Cost (issue 12: ≤ the fit's). Full-size suite tasks (400 examples, exact Hessian; one
    thread on a shared machine): 5 epochs × 4 seeds at 0.1 cost 0.23-0.85 s of further
    training, and each of the 5 refits over ×1e-3..×100 one factorization of the cached
    Hessian (≈ 0.3 s at 2,410 parameters): 3.6-5× the fit. 2 epochs × 2 seeds at 0.25
    (the same horizon η·T as 5 epochs at 0.1) chose the same grid point as 5 × 4 at 0.1 on
    breast cancer, the SGD digits MLP and the momentum + weight decay MLP (×10, ×1, ×10;
    their agreements within 0.15) for 0.05-0.18 s; 1 epoch at 0.5 chose ×100 on the SGD
    MLP (LDS 0.58 vs 0.67). No run chose ×1e-3, ×1e-2 or ×100 with these settings, so the
    grid is ×0.1, ×1, ×10: two refits, the best point kept rather than refitted.
    A diverged further training is rerun at a lower rate (``backoff``), logged; if it still
    diverges the calibration is an error saying what to set.
    """

    n_examples: int = 32
    n_queries: int = 32
    epochs: int = 2
    seeds: Sequence[int] = (0, 1)
    lr: float = 0.25
    batch_size: int = 32
    momentum: float = 0.0
    weight_decay: float = 0.0
    multipliers: Sequence[float] = (0.1, 1.0, 10.0)
    seed: int = 0
    #: a further training that diverges (non-finite losses) is rerun with the rate divided
    #: by this and as many times more epochs (the same horizon η·T), at most twice
    backoff: int = 4

    def __post_init__(self) -> None:
        for name in ("n_examples", "n_queries", "epochs", "batch_size", "backoff"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"AutoDamping.{name} must be an integer >= 1, got {v!r}")
        if not self.multipliers or any(not m > 0 for m in self.multipliers):
            raise ConfigError(f"AutoDamping.multipliers must be > 0, got {self.multipliers!r}")


DEFAULTS = AutoDamping()


@dataclass
class AutoDampingResult:
    """What the calibration chose and saw: ``damping`` (chosen), ``grid`` (the dampings
    tried), ``spearman`` (mean per-query agreement at each), ``gold_seconds`` /
    ``refit_seconds`` (cost: at most ``len(grid)`` refits, the rule's point is the first
    fit), ``left_out`` / ``queries`` (the sample's indices)."""

    damping: float
    grid: list[float]
    spearman: list[float]
    gold_seconds: float
    refit_seconds: float
    left_out: torch.Tensor
    queries: torch.Tensor
    details: dict[str, Any] = field(default_factory=dict)


def sample(n: int, settings: AutoDamping) -> tuple[torch.Tensor, torch.Tensor]:
    """The seeded sample: (left-out indices, query indices), disjoint."""
    if n < 4:
        raise ConfigError(f"damping='auto' needs at least 4 training examples, got {n}")
    k = min(settings.n_examples, n // 2)
    q = min(settings.n_queries, n - k)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(settings.seed))
    return perm[:k].sort().values, perm[k : k + q].sort().values


def gold_standard(
    task: AbstractTask,
    checkpoint: Checkpoint,
    train: Any,
    left_out: torch.Tensor,
    queries: torch.Tensor,
    settings: AutoDamping,
) -> torch.Tensor:
    """Further training on the sample, (n_queries, n_examples)."""
    from ..core.data import ExampleSource

    source = ExampleSource(train, "training data")
    epochs, lr = settings.epochs, settings.lr
    for attempt in range(3):
        gold = further_training(
            task, checkpoint, source, source.take(queries), left_out, epochs=epochs,
            seeds=settings.seeds, lr=lr, batch_size=settings.batch_size,
            momentum=settings.momentum, weight_decay=settings.weight_decay, progress=False,
        )[-1]  # fmt: skip
        if bool(torch.isfinite(gold).all()) or attempt == 2:
            return gold
        log.info(
            "damping='auto': further training at lr %.3g diverged; rerun at lr %.3g for %d "
            "epochs (the same horizon)",
            lr, lr / settings.backoff, epochs * settings.backoff,
        )  # fmt: skip
        epochs, lr = epochs * settings.backoff, lr / settings.backoff
    return gold


def choose(grid: list[float], spearman: list[float]) -> float:
    """The grid point of highest agreement; ties go to the larger damping."""
    best = max(range(len(grid)), key=lambda k: (spearman[k], grid[k]))
    return grid[best]


def calibrate_damping(
    fitted: Any,
    task: AbstractTask,
    checkpoint: Checkpoint,
    train: Any,
    refit: Callable[[float], None],
    start: float,
    settings: AutoDamping | None = None,
    keep: Callable[[], Any] | None = None,
    restore: Callable[[Any], None] | None = None,
) -> AutoDampingResult:
    """Pick the damping of ``fitted`` (a fitted influence method) by agreement with further
    training; ``refit(λ)`` refits its preconditioner with damping λ; ``start`` is the
    default rule's damping (the grid's centre); ``settings``: :data:`DEFAULTS` unless
    given. ``keep()`` / ``restore(kept)``, when given, hold on to the best grid point's fit
    so that it is restored at the end instead of refitted. Leaves ``fitted`` at the
    choice."""
    settings = DEFAULTS if settings is None else settings
    from ..core.data import ExampleSource

    n = len(ExampleSource(train, "training data"))
    left_out, queries = sample(n, settings)
    t0 = time.perf_counter()
    gold = gold_standard(task, checkpoint, train, left_out, queries, settings)
    gold_s = time.perf_counter() - t0
    query_data = ExampleSource(train, "training data").take(queries)
    grid = [float(start) * m for m in settings.multipliers]
    spearman: list[float] = [float("nan")] * len(grid)
    t1 = time.perf_counter()
    current, refits = float(start), 0
    best: tuple[float, float, Any] | None = None  # (agreement, damping, kept fit)
    # the point already fitted (the rule's, ×1) first: no refit for it
    for k in sorted(range(len(grid)), key=lambda k: grid[k] != current):
        if grid[k] != current:
            with warnings.catch_warnings():  # a too-small grid point may be indefinite
                warnings.simplefilter("ignore", InfluenceWarning)
                refit(grid[k])
            current, refits = grid[k], refits + 1
        scores = fitted.attribute(query_data)[:, left_out]
        rho = agreement(scores, gold.to(scores.dtype))["spearman"][0]
        spearman[k] = rho if rho == rho else float("-inf")
        if keep is not None and (best is None or (spearman[k], grid[k]) > best[:2]):
            best = (spearman[k], grid[k], keep())
    if all(r == float("-inf") for r in spearman):
        raise NonFiniteError(
            "damping='auto': no grid point has a finite agreement with further training (did "
            f"further training at lr {settings.lr} diverge?); use "
            "datatrace.methods.autodamp.calibrate_damping with a smaller AutoDamping(lr=...) "
            "or give a damping"
        )
    chosen = choose(grid, spearman)
    if chosen != current:
        if best is not None and restore is not None and best[1] == chosen:
            restore(best[2])
        else:
            refit(chosen)
            refits += 1
    refit_s = time.perf_counter() - t1
    table = ", ".join(f"{lam:.3g}: {r:.3f}" for lam, r in zip(grid, spearman, strict=True))
    log.info(
        "damping='auto': %.3g (Spearman agreement with further training on %d left out × %d "
        "queries, %d epoch(s), %d seeds; grid {%s}); cost %.2f s further training + %.2f s "
        "for %d refits",
        chosen, left_out.numel(), queries.numel(), settings.epochs, len(settings.seeds), table,
        gold_s, refit_s, refits,
    )  # fmt: skip
    return AutoDampingResult(chosen, grid, spearman, gold_s, refit_s, left_out, queries)
