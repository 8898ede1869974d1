"""Fuzzing the public API over shapes, dtypes, values and settings: every outcome is either a
DatatraceError or finite, self-consistent results (top_k agrees with attribute,
self_influence with the diagonal of attribute on the training data).

A short profile runs with the tests; ``pytest -m slow tests/test_fuzz.py`` runs a long one."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import datatrace as dt

METHODS = {
    "tracin": lambda damping, k: dt.TracIn(projection_dim=k),
    "gradcos": lambda damping, k: dt.GradCos(projection_dim=k),
    "ekfac": lambda damping, k: dt.Influence(dt.EKFAC(damping=damping)),
    "cg": lambda damping, k: dt.Influence(
        dt.ConjugateGradient(damping=damping, max_iter=200, tol=1e-10)
    ),
    "trak": lambda damping, k: dt.TRAK(projection_dim=k, damping=damping),
}

cases = st.fixed_dictionaries(
    {
        "method": st.sampled_from(sorted(METHODS)),
        "n": st.integers(1, 9),
        "d": st.integers(1, 4),
        "hidden": st.integers(1, 4),
        "classes": st.integers(2, 4),
        "checkpoints": st.integers(1, 2),
        "dtype": st.sampled_from([torch.float32, torch.float64]),
        "label_dtype": st.sampled_from([torch.int64, torch.int32, torch.int8, torch.uint8]),
        "scale": st.sampled_from([0.0, 1e-3, 1.0, 30.0, 1e19]),
        "damping": st.sampled_from([None, 0.0, 1e-3, 1.0]),
        "projection": st.sampled_from([None, 1, 8]),
        "block_size": st.integers(1, 10),
        "seed": st.integers(0, 2**16),
    }
)


def _run(case: dict) -> None:
    g = torch.Generator().manual_seed(case["seed"])
    torch.manual_seed(case["seed"])
    dtype = case["dtype"]
    model = nn.Sequential(
        nn.Linear(case["d"], case["hidden"]), nn.Tanh(), nn.Linear(case["hidden"], case["classes"])
    ).to(dtype)
    x = (torch.randn(case["n"], case["d"], generator=g) * case["scale"]).to(dtype)
    y = torch.randint(0, case["classes"], (case["n"],), generator=g).to(case["label_dtype"])
    ckpts = []
    for c in range(case["checkpoints"]):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * c * torch.randn(p.shape, generator=g).to(dtype))
        ckpts.append(dt.Checkpoint.from_module(model, weight=0.5 + c))
    task = dt.ClassificationTask(model)
    with warnings.catch_warnings(record=True) as caught:
        # An InfluenceWarning (an indefinite or singular Hessian met by CG or the exact
        # solve) is a word, not silence: the scores are declared unreliable, so only their
        # finiteness is checked then.
        warnings.simplefilter("always", dt.InfluenceWarning)
        _check(case, task, ckpts, x, y, dtype, caught)


def _check(case: dict, task, ckpts, x, y, dtype, caught: list) -> None:
    try:
        method = METHODS[case["method"]](case["damping"], case["projection"])
        fitted = method.fit(task, ckpts, (x, y), block_size=case["block_size"], progress=False)
        S = fitted.attribute((x, y))
        values, idx = fitted.top_k((x, y), k=min(3, case["n"]))
        s = fitted.self_influence()
    except dt.DatatraceError:
        return  # a clear, typed error is an allowed outcome
    assert S.shape == (case["n"], case["n"])
    assert bool(torch.isfinite(S).all()) and bool(torch.isfinite(s).all())
    if any(issubclass(w.category, dt.InfluenceWarning) for w in caught):
        return
    tol = 1e-3 if dtype == torch.float32 else 1e-7
    scale = float(S.abs().max()) + float(s.abs().max()) + 1e-30
    # top_k: the same values as sorting the full matrix, and the indices point at them
    want = torch.sort(S, dim=1, descending=True).values[:, : values.shape[1]]
    torch.testing.assert_close(values, want, rtol=tol, atol=tol * scale)
    torch.testing.assert_close(S.gather(1, idx), values, rtol=tol, atol=tol * scale)
    # self-influence: the diagonal of the training data attributed to itself
    torch.testing.assert_close(s, torch.diagonal(S), rtol=tol * 10, atol=tol * 10 * scale)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases)
def test_fuzz_short(case: dict) -> None:
    _run(case)


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases)
def test_fuzz_long(case: dict) -> None:
    _run(case)
