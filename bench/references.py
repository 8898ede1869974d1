"""float64 references the agreement columns compare against, computed without the peers
(influence: exact-Hessian and Gauss-Newton, checked by an independent ``torch.func`` Hessian;
TRAK: unprojected, in kernel form, checked by datatrace's own unprojected TRAK on the last
layer; see bench/README.md)."""

from __future__ import annotations

import copy
import gc
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from harness import max_rel_err, per_query_pearson
from torch import nn
from workloads import batches

import datatrace as dt


def float64(wl: Any) -> tuple[nn.Module, tuple, tuple]:
    """The workload's model and data in float64."""
    model = copy.deepcopy(wl.model).double()
    return model, (wl.train[0].double(), wl.train[1]), (wl.test[0].double(), wl.test[1])


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


def per_example_grads(model: nn.Module, state: dict, f: Any, names: list[str] | None = None) -> Any:
    """``(x, y) -> (n, p)``: per-example gradients (``vmap(grad)``) of ``f(logits of one
    example, its label)`` over the parameters ``names`` (all by default), the rest of
    ``state`` held fixed."""
    names = names or [k for k, _ in model.named_parameters()]
    fixed = {k: v for k, v in state.items() if k not in names}

    def one(w: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return f(torch.func.functional_call(model, {**fixed, **w}, (x[None],)), y[None])

    per_example = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))
    w = {k: state[k] for k in names}
    return lambda x, y: torch.cat([g.reshape(len(y), -1) for g in per_example(w, x, y).values()], 1)


def independent(wl: Any, batch: int = 50) -> Independent:
    from torch.func import functional_call, hessian

    t0 = time.perf_counter()
    model, (X, y), (Xq, yq) = float64(wl)
    named = list(model.named_parameters())
    sizes = [q.numel() for _, q in named]
    theta = torch.cat([q.detach().reshape(-1) for _, q in named])

    def loss(t: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        parts = torch.split(t, sizes)
        params = {n: v.reshape(q.shape) for (n, q), v in zip(named, parts, strict=True)}
        return F.cross_entropy(functional_call(model, params, (x,)), y, reduction="sum")

    H = torch.zeros(theta.numel(), theta.numel(), dtype=torch.float64)
    for s in range(0, len(y), batch):
        H += hessian(loss)(theta, X[s : s + batch], y[s : s + batch])
    H /= len(y)
    H = (H + H.T) / 2

    flat = per_example_grads(
        model, {k: v.detach() for k, v in model.state_dict().items()}, F.cross_entropy
    )
    G, Q = flat(X, y), flat(Xq, yq)
    return Independent(H, G, Q, torch.linalg.eigvalsh(H), time.perf_counter() - t0)


def check_influence_reference(wl: Any, lam: float, evals: torch.Tensor, check: torch.Tensor):
    """S of ``ExactHessian`` ("H") and ``GaussNewton`` ("GN") influence in float64 at ``lam``
    and what is known of them: the spectrum of H, the warnings, r(GN vs H) and the
    independent check (:func:`independent`'s scores)."""
    model, train, test = float64(wl)
    task, ck = dt.ClassificationTask(model), [dt.Checkpoint.from_module(model)]
    ref: dict[str, Any] = {"seconds": {}}
    for key, label, solver in (
        ("H", "exact_f64", dt.ExactHessian),
        ("GN", "gn_f64", dt.GaussNewton),
    ):
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            fitted = dt.Influence(solver(damping=lam)).fit(
                task, ck, train, batch_size=100, progress=False
            )
            ref[key] = fitted.attribute(test).float()
        ref[f"{key}_warnings"] = sorted({str(x.message).split(":")[0] for x in w})
        ref["seconds"][label] = time.perf_counter() - t0
        del fitted
        gc.collect()
    H = ref["H"]
    info = {"hessian_eig_min": float(evals.min()), "hessian_eig_max": float(evals.max()),
            "n_eig_below_minus_lam": int((evals + lam <= 0).sum()), "ref_seconds": ref["seconds"],
            "ref_warnings": ref["H_warnings"], "pearson_GN_vs_H": per_query_pearson(ref["GN"], H)[0],
            "independent_pearson": per_query_pearson(check, H)[0], "independent_max_rel_err": max_rel_err(check, H)}  # fmt: skip
    print(f"reference lam={lam:g} (float64, untimed): {info}", flush=True)
    return ref, info


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
    flat, grads, q = per_example_grads(model, state, lambda z, y: margin(z, y)[0], names), [], []
    for xb, yb in batches(data, batch):
        grads.append(flat(xb.double(), yb))
        with torch.no_grad():
            logits = torch.func.functional_call(model, state, (xb.double(),))
        q.append(1.0 - torch.softmax(logits, dim=1).gather(1, yb[:, None])[:, 0])
    return torch.cat(grads), torch.cat(q)


def kernels(wl: Any, params: tuple[str, ...] | None = None) -> Kernels:
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


def datatrace_unprojected(wl: Any, damping: float, params: tuple[str, ...] | None = None):
    """datatrace's own TRAK without projection, float64."""
    model, train, test = float64(wl)
    ckpts = [dt.Checkpoint.from_state_dict({k: v.double() for k, v in sd.items()})
             for sd, _ in wl.ckpts]  # fmt: skip
    fitted = dt.TRAK(projection_dim=None, damping=damping, params=params).fit(
        dt.ClassificationTask(model), ckpts, train, batch_size=500, progress=False
    )
    return fitted.attribute(test)
