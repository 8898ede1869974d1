"""The unprojected float64 TRAK reference, computed without any of the libraries compared.

In kernel form, per checkpoint c, with margin gradients Phi_c (n x p) from ``torch.func``:
``S = (1/C) sum_c Phi_q,c Phi_c^T (Phi_c Phi_c^T + n lam I)^{-1} diag(1 - p_c)``, an n x n
solve (exact for lam > 0, where p >> n makes the p x p form singular without a ridge).
:func:`datatrace_unprojected` is datatrace's own ``TRAK(projection_dim=None)``, the check of
this formula (on the last layer, where its p x p eigendecomposition is cheap).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
from peers.traker_peer import batches
from torch import nn

import datatrace as dt


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log p_y - log(1 - p_y) of logits (..., classes) and labels (...)."""
    correct = logits.gather(-1, y[..., None])[..., 0]
    others = logits.scatter(-1, y[..., None], float("-inf"))
    return correct - torch.logsumexp(others, dim=-1)


@dataclass
class Kernels:
    """Per checkpoint: K = Phi Phi^T (n, n), Kq = Phi_q Phi^T (m, n), Q = 1 - p (n,); lam0 =
    the mean squared gradient entry at the last checkpoint (datatrace's damping unit)."""

    K: list[torch.Tensor]
    Kq: list[torch.Tensor]
    Q: list[torch.Tensor]
    lam0: float
    seconds: float

    def scores(self, damping: float) -> torch.Tensor:
        """S (n_test, n_train) = (1/C) sum_c Kq_c (K_c + n lam I)^{-1} diag(Q_c)."""
        n = self.K[0].shape[0]
        total = torch.zeros_like(self.Kq[0])
        for K, Kq, Q in zip(self.K, self.Kq, self.Q, strict=True):
            L = torch.linalg.cholesky(K + n * damping * torch.eye(n, dtype=K.dtype))
            total += torch.cholesky_solve(Kq.T, L).T * Q[None, :]
        return total / len(self.K)


def margin_gradients(model: nn.Module, state: dict, data: tuple, params: tuple | None = None,
                     batch: int = 250) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per-example margin gradients (n, p) and 1 - p_y (n,), float64."""
    state = {k: v.double() for k, v in state.items()}
    names = [k for k, _ in model.named_parameters() if params is None or k.split(".")[0] in params]
    fixed = {k: v for k, v in state.items() if k not in names}

    def f(w: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = torch.func.functional_call(model, {**fixed, **w}, (x[None],))
        return margin(logits, y[None])[0]

    per_example = torch.func.vmap(torch.func.grad(f), in_dims=(None, 0, 0))
    w = {k: state[k] for k in names}
    grads, q = [], []
    for xb, yb in batches(data, batch):
        g = per_example(w, xb.double(), yb)
        grads.append(torch.cat([g[k].reshape(len(yb), -1) for k in names], dim=1))
        with torch.no_grad():
            logits = torch.func.functional_call(model, state, (xb.double(),))
        q.append(1.0 - torch.softmax(logits, dim=1).gather(1, yb[:, None])[:, 0])
    return torch.cat(grads), torch.cat(q)


def kernels(wl, params: tuple[str, ...] | None = None) -> Kernels:
    t0 = time.perf_counter()
    model = copy.deepcopy(wl.model).double().eval()
    K, Kq, Q = [], [], []
    for sd, _ in wl.ckpts:
        G, q = margin_gradients(model, sd, wl.train, params)
        Gq, _ = margin_gradients(model, sd, wl.test, params)
        K.append(G @ G.T)
        Kq.append(Gq @ G.T)
        Q.append(q)
        lam0 = float(G.pow(2).mean())
    return Kernels(K, Kq, Q, lam0, time.perf_counter() - t0)


def datatrace_unprojected(wl, damping: float, params: tuple[str, ...] | None = None):
    """datatrace's own TRAK without projection, float64."""
    model = copy.deepcopy(wl.model).double()
    ckpts = [dt.Checkpoint.from_state_dict({k: v.double() for k, v in sd.items()})
             for sd, _ in wl.ckpts]  # fmt: skip
    train = (wl.train[0].double(), wl.train[1])
    test = (wl.test[0].double(), wl.test[1])
    fitted = dt.TRAK(projection_dim=None, damping=damping, params=params).fit(
        dt.ClassificationTask(model), ckpts, train, batch_size=500, progress=False
    )
    return fitted.attribute(test)
