"""Influence vs true leave-one-out retraining on real data (scikit-learn), float64.

L2-regularised logistic regression (breast cancer) and a small tanh MLP trained to
convergence with L2 (digits); influence uses damping 2α, the Hessian of the penalty.
``bench/cpu.py loo`` reports every method on the same problems.
"""

from __future__ import annotations

import pytest
import torch

import datatrace as dt
from datatrace.app.problems import logistic_regression_problem, mlp_problem

pytestmark = pytest.mark.slow


def agreement_with_loo(problem, methods, n_left_out=40):
    task = dt.ClassificationTask(problem.model)
    idx = torch.randperm(len(problem.train[0]), generator=torch.Generator().manual_seed(1))[
        :n_left_out
    ]
    truth = dt.truth.leave_one_out(
        problem.train_fn, task, problem.train, problem.queries, indices=idx
    )
    ckpts = [dt.Checkpoint.from_module(problem.model)]
    out = {}
    for label, method in methods.items():
        fitted = method.fit(task, ckpts, problem.train, progress=False)
        out[label] = dt.metrics.agreement(fitted.attribute(problem.queries)[:, idx], truth)
    return out


def _methods(lam):
    return {
        "exact": dt.Influence(dt.ExactHessian(damping=lam)),
        "cg": dt.Influence(dt.ConjugateGradient(damping=lam, max_iter=300, tol=1e-10)),
    }


def test_logistic_regression_influence_matches_leave_one_out():
    problem = logistic_regression_problem()
    for label, agree in agreement_with_loo(problem, _methods(2 * problem.alpha)).items():
        assert agree["pearson"][0] >= 0.95, (label, agree)


def test_mlp_influence_matches_leave_one_out():
    problem = mlp_problem()
    for label, agree in agreement_with_loo(problem, _methods(2 * problem.alpha)).items():
        assert agree["pearson"][0] >= 0.85, (label, agree)
