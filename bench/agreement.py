"""How far one score matrix (n_test, n_train) is from another: the agreement columns.

* :func:`pearson`: of the flattened matrices (same definition, other library: ~1).
* :func:`per_query_pearson`: mean over queries of the correlation over training examples,
  the usual attribution metric (a projection or an approximation changes the scale per query).
* :func:`max_rel_err` and :func:`lsq_scale`: size of the difference, and the least-squares
  slope (~1 when a peer's sign and scale conversions are right).
"""

from __future__ import annotations

import torch


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    x = a.detach().double().flatten().cpu()
    y = b.detach().double().flatten().cpu()
    x, y = x - x.mean(), y - y.mean()
    return float((x @ y) / (x.norm() * y.norm()))


def max_rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref|."""
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    return float((a - ref).abs().max() / ref.abs().max())


def per_query_pearson(S: torch.Tensor, R: torch.Tensor) -> tuple[float, int]:
    """(mean over queries of the Pearson correlation over training examples, number of
    queries left out because their row of S has a non-finite entry)."""
    a, b = S.double(), R.double()
    ok = torch.isfinite(a).all(1)
    a, b = a[ok], b[ok]
    if a.shape[0] == 0:
        return float("nan"), int((~ok).sum())
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    r = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)
    return float(r.mean()), int((~ok).sum())


def lsq_scale(S: torch.Tensor, R: torch.Tensor) -> float:
    """Least-squares slope of S on R over the finite entries (1 = same sign and scale)."""
    a, b = S.double().flatten(), R.double().flatten()
    ok = torch.isfinite(a)
    a, b = a[ok], b[ok]
    return float((a @ b) / (b @ b)) if a.numel() else float("nan")
