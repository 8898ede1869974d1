"""``damping="auto"``: the damping that agrees best with further training on a sample.

Wei et al. (2024)'s further training needs only the final model, so a fitted influence
method can check itself: on a seeded random sample of ``n_examples`` training examples left
out × ``n_queries`` other training examples as queries, :func:`~.further.further_training`
(``epochs`` short epochs of SGD, stacked runs) gives the gold standard once; each damping
of a log grid around the default rule's value (``multipliers``) reuses the fitted
curvature (``with_damping``: the exact Hessian is formed once and refactorized, K-FAC/EK-FAC
factors and Arnoldi eigenpairs serve every damping, CG is warm-started; other
preconditioners are refitted) and scores the sample. The rule's damping is kept unless
another grid point agrees clearly better (mean per-query Spearman higher by more than
``margin_se`` paired standard errors) and, if larger, is not explained by the further
training's horizon (:func:`horizon_damping`, :func:`choose`): short further training is a
damped influence itself, with damping about ``1/(η·T)``, so its agreement rises towards
that damping whatever the model wants. The fit log (INFO) lists every grid point's
agreement, the choice, why, and the seconds spent (further training, refits);
:attr:`AutoDampingResult` holds the same.

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
    damping). Measured (bench/defaults.py, full size, exact Hessian, agreement over the
    rule's ×0.01..×1000): breast cancer (horizon 1/(ηT) = 0.154 = 25 λ₀) peaks at 32 λ₀
    with 2 epochs at lr 0.25, at 10 λ₀ with 4 epochs, while the LDS peaks at 1.8 λ₀; the
    momentum + weight decay MLP (horizon 186 λ₀) peaks at 100 λ₀ with 2 epochs, at 32 λ₀
    with 8 (LDS: 18 λ₀). A rate from the curvature (1/λ_max, 15× longer horizon on breast
    cancer) made the agreements noise (0.01-0.3). Picking the most agreeing grid point chose
    ×10 on breast cancer (LDS 0.757 vs the rule's 0.855) and on the MLP (0.560 vs 0.655);
    with the margin and the horizon test (``margin_se``, ``horizon_factor``) the rule's
    damping is kept on all five suite tasks (bench/RESULTS.md), and grid points that the
    horizon test would refuse are not tried (a refit saved), nor are those where the damped
    Hessian is known to be indefinite (below minus the fit's Lanczos bound on its smallest
    eigenvalue: influence there is unreliable, and a restored fit would not repeat the
    warning; on the digits MLPs this is the ×0.1 point, whose LDLᵀ refit was the
    calibration's largest cost).

    Cost (issue 12: ≤ the fit's): full-size suite tasks (400 examples, exact Hessian, one
    thread on a loaded machine), further training 0.16-2.0 s and at most two refits (one
    factorization of the kept Hessian each): 0.25-1.7× the fit (bench/RESULTS.md).
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
    #: a grid point replaces the rule's damping only if its mean agreement is higher by more
    #: than this many paired standard errors (:func:`choose`)
    margin_se: float = 2.0
    #: and, if larger than the rule's, only if at least this many times the further
    #: training's horizon damping ``1/(η·T)`` (:func:`horizon_damping`)
    horizon_factor: float = 3.0
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
        if 1.0 not in self.multipliers:
            raise ConfigError(
                "AutoDamping.multipliers must contain 1.0 (the rule's damping, kept unless "
                f"another grid point is clearly better), got {self.multipliers!r}"
            )
        for name in ("margin_se", "horizon_factor"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ConfigError(f"AutoDamping.{name} must be a number >= 0, got {v!r}")


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


def spearman_per_query(scores: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Each query's Spearman correlation of its scores with the truth (n_query,), float64:
    :func:`datatrace.metrics.agreement`'s per-query values, before their mean."""
    from ..metrics import _ranks, _rowwise_pearson

    agreement(scores, truth)  # its shape checks
    return _rowwise_pearson(_ranks(scores), _ranks(truth))


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


def horizon_damping(n: int, settings: AutoDamping) -> float:
    """``1/(η·T)``: the damping that further training of ``T`` steps at rate ``η`` resembles
    (from the start, the trajectories with and without an example differ by
    ``[I − (I − ηH)^T] H⁻¹ g / n``, whose filter ``(1 − (1 − ηλ)^T)/λ`` is flat at ``ηT``
    for curvature ``λ`` below ``1/(ηT)``: those directions have not moved yet, as under a
    damping of about ``1/(ηT)``). Agreement with it cannot tell dampings below this apart,
    and favours the ones near it."""
    steps = settings.epochs * -(-n // settings.batch_size)
    return 1.0 / (settings.lr * steps)


def choose(
    grid: list[float],
    per_query: list[torch.Tensor],
    start: float,
    horizon: float,
    settings: AutoDamping,
) -> tuple[float, str]:
    """The choice and why, from each grid point's per-query Spearman agreements.

    The rule's damping ``start`` (a grid point) is kept unless the grid point of highest
    mean agreement beats it (a) by more than ``settings.margin_se`` standard errors of the
    per-query differences (paired: the same queries and further training) and (b), when it
    is larger, by a damping that the horizon does not explain: at least
    ``settings.horizon_factor × horizon`` (:func:`horizon_damping`)."""
    means = [float(r.mean()) if r.numel() else float("-inf") for r in per_query]
    means = [m if m == m else float("-inf") for m in means]
    at = min(range(len(grid)), key=lambda k: abs(grid[k] - start))
    best = max(range(len(grid)), key=lambda k: (means[k], -abs(grid[k] - start)))
    if best == at:
        return grid[at], "the rule's damping agrees best"
    if means[at] == float("-inf"):
        return grid[best], "the rule's damping has no finite agreement"
    diff = (per_query[best] - per_query[at]).double()
    diff = diff[torch.isfinite(diff)]
    se = float(diff.std() / diff.numel() ** 0.5) if diff.numel() > 1 else float("inf")
    gain = means[best] - means[at]
    if not gain > settings.margin_se * se:
        return grid[at], (
            f"kept the rule's: {grid[best]:.3g} agrees better by {gain:.3f}, within "
            f"{settings.margin_se:g} standard errors ({se:.3f})"
        )
    if grid[best] > start and grid[best] < settings.horizon_factor * horizon:
        return grid[at], (
            f"kept the rule's: {grid[best]:.3g} agrees better by {gain:.3f} (± {se:.3f}), "
            f"but the further training's horizon 1/(η·T) = {horizon:.3g} explains a "
            f"preference for dampings below {settings.horizon_factor:g} × that"
        )
    return grid[best], f"agrees better than the rule's by {gain:.3f} (± {se:.3f})"


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
    indefinite_below: Callable[[], float] | None = None,
) -> AutoDampingResult:
    """Pick the damping of ``fitted`` (a fitted influence method) by agreement with further
    training; ``refit(λ)`` refits its preconditioner with damping λ; ``start`` is the
    default rule's damping (the grid's centre); ``settings``: :data:`DEFAULTS` unless
    given. ``keep()`` / ``restore(kept)``, when given, hold on to the best grid point's fit
    so that it is restored at the end instead of refitted. ``indefinite_below()``, asked
    after the rule's point is scored: grid points below it leave the damped curvature
    indefinite (known from the fit) and are not tried: influence there is unreliable, and a
    chance agreement must not choose it. Leaves ``fitted`` at the choice."""
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
    per_query: list[torch.Tensor] = [torch.empty(0)] * len(grid)
    t1 = time.perf_counter()
    current, refits = float(start), 0
    kept: dict[float, Any] = {}  # damping -> its fit, where the caller can keep one
    best: tuple[float, float] | None = None
    best_at = float(start)
    horizon = horizon_damping(n, settings)
    # grid points above the rule's but below horizon_factor × the horizon could not be
    # chosen (:func:`choose`), nor points where the damped curvature is indefinite: not
    # tried (their agreement stays NaN)
    skipped: dict[int, str] = {}
    # the point already fitted (the rule's, ×1) first: no refit for it
    for k in sorted(range(len(grid)), key=lambda k: grid[k] != current):
        if grid[k] != start:
            floor = indefinite_below() if indefinite_below is not None else 0.0
            if grid[k] < floor:
                skipped[k] = f"not tried (indefinite below {floor:.3g})"
                continue
            if start < grid[k] < settings.horizon_factor * horizon:
                skipped[k] = "not tried (below the horizon's bias)"
                continue
        if grid[k] != current:
            with warnings.catch_warnings():  # a too-small grid point may be indefinite
                warnings.simplefilter("ignore", InfluenceWarning)
                refit(grid[k])
            current, refits = grid[k], refits + 1
        scores = fitted.attribute(query_data)[:, left_out]
        per_query[k] = spearman_per_query(scores, gold.to(scores.dtype))
        rho = float(per_query[k].mean())
        spearman[k] = rho if rho == rho else float("-inf")
        if keep is not None:  # hold the rule's fit and the best so far (the only choices)
            rank = (spearman[k], -abs(grid[k] - start))
            if grid[k] == start or best is None or rank > best:
                if best is not None and best_at != start:
                    kept.pop(best_at, None)
                kept[grid[k]] = keep()
                if grid[k] != start or best is None:
                    best, best_at = rank, grid[k]
    if all(not r > float("-inf") for r in spearman):
        raise NonFiniteError(
            "damping='auto': no grid point has a finite agreement with further training (did "
            f"further training at lr {settings.lr} diverge?); use "
            "datatrace.methods.autodamp.calibrate_damping with a smaller AutoDamping(lr=...) "
            "or give a damping"
        )
    chosen, why = choose(grid, per_query, float(start), horizon, settings)
    if chosen != current:
        if chosen in kept and restore is not None:
            restore(kept[chosen])
        else:
            refit(chosen)
            refits += 1
    refit_s = time.perf_counter() - t1
    table = ", ".join(
        f"{lam:.3g}: {skipped[k]}" if k in skipped else f"{lam:.3g}: {spearman[k]:.3f}"
        for k, lam in enumerate(grid)
    )
    log.info(
        "damping='auto': %.3g, %s (Spearman agreement with further training on %d left "
        "out × %d queries, %d epoch(s), %d seeds, horizon 1/(η·T) %.3g; grid {%s}); cost "
        "%.2f s further training + %.2f s for %d refits",
        chosen, why, left_out.numel(), queries.numel(), settings.epochs, len(settings.seeds),
        horizon, table, gold_s, refit_s, refits,
    )  # fmt: skip
    return AutoDampingResult(
        chosen, grid, spearman, gold_s, refit_s, left_out, queries,
        {"reason": why, "horizon": horizon, "per_query": per_query},
    )  # fmt: skip
