"""No NaN or inf score without a word: every method either returns finite, self-consistent
scores or raises a DatatraceError naming the cause."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import datatrace as dt
from datatrace.curvature.base import DAMPING_FLOOR, symmetric_eigh
from datatrace.curvature.kfac import mean_eigenvalue

PRECONDITIONERS = {
    "exact": lambda: dt.ExactHessian(),
    "gauss_newton": lambda: dt.GaussNewton(),
    "kfac": lambda: dt.KFAC(),
    "ekfac": lambda: dt.EKFAC(),
    "cg": lambda: dt.ConjugateGradient(max_iter=10),
}


def _zero_gradient_problem():
    """Regression targets equal to the model's outputs: every per-example gradient is 0."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(12, 3, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)
    return dt.RegressionTask(model), [dt.Checkpoint.from_module(model)], (x, y)


@pytest.mark.parametrize("name", sorted(PRECONDITIONERS))
def test_all_zero_gradients_give_zero_scores_not_nan(name: str) -> None:
    task, ck, train = _zero_gradient_problem()
    fitted = dt.Influence(PRECONDITIONERS[name]()).fit(task, ck, train, progress=False)
    if name in ("kfac", "ekfac"):  # their rule reads the Gauss-Newton curvature, not 0 here
        pc = fitted.preconditioners[0]
        assert fitted.damping == [pytest.approx(mean_eigenvalue(pc.layers), rel=1e-12)]
        assert fitted.damping[0] > 0
    else:
        assert fitted.damping == [DAMPING_FLOOR]  # λ₀ = 0: the documented floor, not 10 × 0
    S = fitted.attribute(train)
    assert torch.equal(S, torch.zeros_like(S))
    torch.testing.assert_close(fitted.self_influence(), torch.diagonal(S), rtol=0, atol=0)


def test_scores_that_overflow_float32_raise_naming_the_cause() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(8, 3) * 1e19, torch.randint(0, 2, (8,))
    fitted = dt.TracIn().fit(
        dt.ClassificationTask(model), [dt.Checkpoint.from_module(model)], (x, y), progress=False
    )
    with pytest.raises(dt.NonFiniteError, match="overflowed"):
        fitted.attribute((x, y))
    with pytest.raises(dt.NonFiniteError, match="overflowed"):
        fitted.self_influence()


def test_eigendecomposition_failures_are_datatrace_errors() -> None:
    bad = torch.eye(3)
    bad[0, 1] = float("nan")
    with pytest.raises(dt.NonFiniteError, match="Gram"):
        symmetric_eigh(bad, "the Gram matrix")
    good = torch.diag(torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64))
    evals, _ = symmetric_eigh(good, "a matrix")
    assert evals.tolist() == [1.0, 2.0, 3.0]
