"""float64 references for the influence benchmark.

* :func:`references`: datatrace ``ExactHessian`` and ``GaussNewton`` influence in float64
  (public API only): ``r(H)`` and ``r(GN)`` compare against these.
* :func:`independent`: the Hessian of the mean training loss and per-example gradients by
  ``torch.func`` alone; checks the exact reference (``torch.linalg.solve``) and gives the
  spectrum (LiSSA's scale, the count of eigenvalues with eig + lam <= 0).
"""

from __future__ import annotations

import copy
import gc
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

import datatrace as dt


def references(wl, damping: float, batch: int = 100) -> dict[str, Any]:
    model = copy.deepcopy(wl.model).double()
    train, test = (wl.train[0].double(), wl.train[1]), (wl.test[0].double(), wl.test[1])
    task, ck = dt.ClassificationTask(model), [dt.Checkpoint.from_module(model)]
    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fh = dt.Influence(dt.ExactHessian(damping=damping)).fit(
            task, ck, train, batch_size=batch, progress=False
        )
        out["H"] = fh.attribute(test).float()
    out["H_warnings"] = sorted({str(x.message).split(":")[0] for x in w})
    del fh
    gc.collect()
    t1 = time.perf_counter()
    fg = dt.Influence(dt.GaussNewton(damping=damping)).fit(
        task, ck, train, batch_size=batch, progress=False
    )
    out["GN"] = fg.attribute(test).float()
    out["seconds"] = {"exact_f64": t1 - t0, "gn_f64": time.perf_counter() - t1}
    return out


@dataclass
class Independent:
    H: torch.Tensor | None  # (p, p), undamped; dropped after use (740 MB for the MLP)
    G: torch.Tensor  # (n, p) training-loss gradients
    Q: torch.Tensor  # (m, p) test-loss gradients
    evals: torch.Tensor  # eigenvalues of H, ascending
    seconds: float

    def scores(self, damping: float) -> torch.Tensor:
        p = self.H.shape[0]
        sol = torch.linalg.solve(self.H + damping * torch.eye(p, dtype=self.H.dtype), self.Q.T)
        return (sol.T @ self.G.T / self.G.shape[0]).float()


def independent(wl, batch: int = 50) -> Independent:
    from torch.func import functional_call, grad, hessian, vmap

    t0 = time.perf_counter()
    model = copy.deepcopy(wl.model).double()
    named = list(model.named_parameters())
    sizes = [q.numel() for _, q in named]
    theta = torch.cat([q.detach().reshape(-1) for _, q in named])

    def loss(t: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        parts = torch.split(t, sizes)
        params = {n: v.reshape(q.shape) for (n, q), v in zip(named, parts, strict=True)}
        return F.cross_entropy(functional_call(model, params, (x,)), y, reduction="sum")

    X, y = wl.train[0].double(), wl.train[1]
    H = torch.zeros(theta.numel(), theta.numel(), dtype=torch.float64)
    for s in range(0, len(y), batch):
        H += hessian(loss)(theta, X[s : s + batch], y[s : s + batch])
    H /= len(y)
    H = (H + H.T) / 2

    def one(t: torch.Tensor, x: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
        return grad(loss)(t, x[None], yy[None])

    G = vmap(one, in_dims=(None, 0, 0))(theta, X, y)
    Q = vmap(one, in_dims=(None, 0, 0))(theta, wl.test[0].double(), wl.test[1])
    return Independent(H, G, Q, torch.linalg.eigvalsh(H), time.perf_counter() - t0)
