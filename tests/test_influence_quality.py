"""Influence vs true leave-one-out retraining on real data (scikit-learn), float64.

L2-regularised logistic regression (breast cancer) and a small tanh MLP trained to
convergence with L2 (digits); influence uses damping 2α, the Hessian of the penalty.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import datatrace as dt

pytestmark = pytest.mark.slow


def fit_lbfgs(model, x, y, alpha, iters=500):
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1,
        max_iter=iters,
        tolerance_grad=1e-11,
        tolerance_change=1e-14,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss = loss + alpha * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return model


def problem(name):
    from sklearn.datasets import load_breast_cancer, load_digits

    data = load_breast_cancer() if name == "logreg" else load_digits()
    x = torch.tensor(data.data, dtype=torch.float64)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    y = torch.tensor(data.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    tr, te = perm[:300], perm[300:330]
    torch.manual_seed(0)
    if name == "logreg":
        make, alpha = (lambda: nn.Linear(30, 2).double()), 1e-2
    else:
        make, alpha = (
            (lambda: nn.Sequential(nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10)).double()),
            1e-3,
        )
    init = make()
    full = fit_lbfgs(make_from(make, init), x[tr], y[tr], alpha, iters=2000)

    def train_fn(indices, seed):  # warm start at the optimum, as Koh and Liang do
        return fit_lbfgs(make_from(make, full), x[tr][indices], y[tr][indices], alpha)

    return full, train_fn, (x[tr], y[tr]), (x[te], y[te]), alpha


def make_from(make, source):
    m = make()
    m.load_state_dict(source.state_dict())
    return m


def loo_and_scores(name, methods, n_left_out=40):
    full, train_fn, train, queries, alpha = problem(name)
    task = dt.ClassificationTask(full)
    idx = torch.randperm(300, generator=torch.Generator().manual_seed(1))[:n_left_out]
    truth = dt.truth.leave_one_out(train_fn, task, train, queries, indices=idx)
    ckpts = [dt.Checkpoint.from_module(full)]
    out = {}
    for label, method in methods(2 * alpha).items():
        scores = method.fit(task, ckpts, train, progress=False).attribute(queries)[:, idx]
        out[label] = dt.metrics.agreement(scores, truth)
    return out


def test_logistic_regression_influence_matches_leave_one_out():
    res = loo_and_scores(
        "logreg",
        lambda lam: {
            "exact": dt.Influence(dt.ExactHessian(damping=lam)),
            "cg": dt.Influence(dt.ConjugateGradient(damping=lam, max_iter=200, tol=1e-10)),
        },
    )
    for label, agree in res.items():
        assert agree["pearson"][0] >= 0.95, (label, agree)


def test_mlp_influence_matches_leave_one_out():
    res = loo_and_scores(
        "mlp",
        lambda lam: {
            "exact": dt.Influence(dt.ExactHessian(damping=lam)),
            "cg": dt.Influence(dt.ConjugateGradient(damping=lam, max_iter=300, tol=1e-10)),
        },
    )
    for label, agree in res.items():
        assert agree["pearson"][0] >= 0.85, (label, agree)
