"""Small, real, offline attribution problems (scikit-learn's bundled datasets), trained to
convergence with L2 so that leave-one-out retraining is well defined; used by the quality
tests, the benchmarks and the evaluation runner.

* :func:`logistic_regression_problem`: strictly convex; influence is near exact.
* :func:`mlp_problem`: a one-hidden-layer tanh MLP; non-convex, warm-started retraining.

Each returns a :class:`Problem` whose ``train_fn(indices, seed)`` retrains from the
full-data optimum with full-batch L-BFGS (Koh and Liang's protocol). The L2 penalty
``α‖θ‖²`` makes ``2α`` the exact damping of influence functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import ConfigError

DATASETS = ("breast_cancer", "digits", "wine", "iris")


@dataclass
class Problem:
    """A trained model with its data and a way to retrain it."""

    name: str
    model: nn.Module
    train: tuple[torch.Tensor, torch.Tensor]
    queries: tuple[torch.Tensor, torch.Tensor]
    alpha: float
    train_fn: Callable[[torch.Tensor, int], nn.Module]


def load_sklearn(
    name: str, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardised features and integer labels of a bundled scikit-learn dataset."""
    try:
        from sklearn import datasets
    except ImportError as exc:
        raise ConfigError("built-in problems need scikit-learn: pip install scikit-learn") from exc
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    data = getattr(datasets, f"load_{name}")()
    x = torch.tensor(data.data, dtype=dtype)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    return x, torch.tensor(data.target, dtype=torch.long)


def lbfgs_fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    alpha: float,
    max_iter: int = 500,
    n_total: int | None = None,
) -> nn.Module:
    """Minimise ``(1/N) Σ cross-entropy + α‖θ‖²`` with full-batch L-BFGS (in place), where
    ``N = n_total`` (default ``len(x)``): retraining without some examples keeps N = the
    full training-set size, so removing an example removes exactly its term of the
    objective (what influence functions and scores predict), not also re-weighting α."""
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1,
        max_iter=max_iter,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        history_size=50,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y, reduction="sum") / (n_total or len(x))
        loss = loss + alpha * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return model


def _problem(
    name: str,
    dataset: str,
    make: Callable[[], nn.Module],
    n_train: int,
    n_query: int,
    alpha: float,
    seed: int,
) -> Problem:
    x, y = load_sklearn(dataset)
    if n_train + n_query > len(x):
        raise ConfigError(f"{dataset} has {len(x)} examples; n_train + n_query is too many")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:n_train], perm[n_train : n_train + n_query]
    xt, yt = x[tr], y[tr]
    torch.manual_seed(seed)
    full = lbfgs_fit(make(), xt, yt, alpha, max_iter=3000)

    def train_fn(indices: torch.Tensor, seed: int) -> nn.Module:
        model = make()
        model.load_state_dict(full.state_dict())
        return lbfgs_fit(model, xt[indices], yt[indices], alpha, n_total=n_train)

    return Problem(name, full, (xt, yt), (x[te], y[te]), alpha, train_fn)


def logistic_regression_problem(
    dataset: str = "breast_cancer",
    n_train: int = 300,
    n_query: int = 30,
    alpha: float = 1e-2,
    seed: int = 0,
) -> Problem:
    """Multinomial logistic regression with L2, float64."""
    x, y = load_sklearn(dataset)
    d, k = x.shape[1], int(y.max()) + 1
    return _problem(
        f"logreg-{dataset}",
        dataset,
        lambda: nn.Linear(d, k).double(),
        n_train,
        n_query,
        alpha,
        seed,
    )


def mlp_problem(
    dataset: str = "digits",
    hidden: int = 12,
    n_train: int = 300,
    n_query: int = 30,
    alpha: float = 1e-3,
    seed: int = 0,
) -> Problem:
    """A tanh MLP with one hidden layer and L2, float64."""
    x, y = load_sklearn(dataset)
    d, k = x.shape[1], int(y.max()) + 1

    def make() -> nn.Module:
        return nn.Sequential(nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, k)).double()

    return _problem(f"mlp-{dataset}", dataset, make, n_train, n_query, alpha, seed)
