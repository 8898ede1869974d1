"""The damping rules (issue 12): from the curvature (Lanczos λ_min, λ₀), TRAK's Gram rule,
and ``damping="auto"`` against a brute-force search with the same gold standard."""

from __future__ import annotations

import logging
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import MLP
from torch.func import functional_call, hessian

import datatrace as dt
from datatrace.core.errors import ConfigError
from datatrace.curvature import base
from datatrace.curvature.base import (
    GN_FACTOR,
    HESSIAN_FLOOR,
    NEGATIVE_FACTOR,
    check_damping,
    curvature_damping,
    lanczos_extremes,
)
from datatrace.curvature.gram import GRAM_FACTOR
from datatrace.methods import autodamp


def _fake_ctx(matrix: torch.Tensor, lambda0: float) -> SimpleNamespace:
    """A FitContext stand-in whose 'Hessian' is ``matrix`` (products only, as the rule uses)."""
    problem = SimpleNamespace(
        theta=torch.zeros(matrix.shape[0], dtype=matrix.dtype),
        mean_product=lambda v, gauss_newton: v @ matrix,
    )
    return SimpleNamespace(problem=problem, lambda0=lambda0)


def _indefinite(p: int, n_negative: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))
    evals = torch.rand(p, generator=g, dtype=torch.float64) * 3 + 0.01
    evals[:n_negative] = -torch.rand(n_negative, generator=g, dtype=torch.float64) * 0.5
    return (q * evals) @ q.T


def test_lanczos_extremes_match_eigvalsh_in_float64() -> None:
    m = _indefinite(30, 4, seed=0)
    true = torch.linalg.eigvalsh(m)
    small, large = lanczos_extremes(lambda v: m @ v, m[0], n_iter=30)  # full Krylov space
    assert small == pytest.approx(float(true[0]), rel=1e-9, abs=1e-10)
    assert large == pytest.approx(float(true[-1]), rel=1e-9, abs=1e-10)
    # a short run: Ritz values lie inside the spectrum (smallest from above)
    m = _indefinite(200, 10, seed=1)
    true = torch.linalg.eigvalsh(m)
    small, large = lanczos_extremes(lambda v: m @ v, m[0], n_iter=20)
    assert float(true[0]) - 1e-12 <= small < 0
    assert large <= float(true[-1]) + 1e-12
    assert large == pytest.approx(float(true[-1]), rel=0.05)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rule_lifts_the_smallest_eigenvalue_of_an_indefinite_toy_hessian(seed: int) -> None:
    m = _indefinite(60, 5, seed)
    choice = curvature_damping(_fake_ctx(m, lambda0=1e-4), gauss_newton=False)  # type: ignore[arg-type]
    lifted = torch.linalg.eigvalsh(m + choice.value * torch.eye(60, dtype=m.dtype))
    assert float(lifted[0]) > 0
    smallest = float(torch.linalg.eigvalsh(m)[0])
    assert choice.value <= NEGATIVE_FACTOR * abs(smallest) + 1e-12  # not more than the rule says
    assert "λ_min" in choice.reason


def test_rule_keeps_the_floor_on_a_positive_definite_hessian_and_gn() -> None:
    m = _indefinite(40, 0, seed=3)  # positive definite
    ctx = _fake_ctx(m, lambda0=0.5)
    assert curvature_damping(ctx, gauss_newton=False).value == HESSIAN_FLOOR * 0.5  # type: ignore[arg-type]
    assert curvature_damping(ctx, gauss_newton=True).value == GN_FACTOR * 0.5  # type: ignore[arg-type]
    assert curvature_damping(_fake_ctx(m, 0.0), False).value == base.DAMPING_FLOOR  # type: ignore[arg-type]


def _mean_loss_hessian(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])

    def loss(t: torch.Tensor) -> torch.Tensor:
        parts = torch.split(t, [s.numel() for s in shapes])
        params = {n: q.reshape(s) for n, q, s in zip(names, parts, shapes, strict=True)}
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    return hessian(loss)(theta)


def test_exact_hessian_default_is_the_rule_and_is_logged(mlp_data, caplog) -> None:
    model, x, y = mlp_data  # random weights: far from a minimum, the Hessian is indefinite
    true = torch.linalg.eigvalsh(_mean_loss_hessian(model, x, y))
    assert float(true[0]) < 0
    task = dt.ClassificationTask(model)
    with caplog.at_level(logging.INFO, logger="datatrace"):
        fitted = dt.Influence(dt.ExactHessian()).fit(
            task, [dt.Checkpoint.from_module(model)], (x, y), progress=False
        )
    (lam,) = fitted.damping
    assert float(true[0]) + lam > 0  # H + λI positive definite: no warning was raised
    g2 = sum(float((g**2).sum()) for g in _per_example_grads(model, x, y))
    lambda0 = g2 / (len(x) * true.numel())
    assert lam >= HESSIAN_FLOOR * lambda0 - 1e-15
    assert any("λ_min" in r.getMessage() and f"{lam:.3g}" in r.getMessage() for r in caplog.records)


def _per_example_grads(model, x, y):
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        yield torch.cat([p.grad.flatten() for p in model.parameters()])


def test_gauss_newton_default_is_gn_factor_times_lambda0(mlp_data) -> None:
    model, x, y = mlp_data
    fitted = dt.Influence(dt.GaussNewton()).fit(
        dt.ClassificationTask(model), [dt.Checkpoint.from_module(model)], (x, y), progress=False
    )
    g2 = sum(float((g**2).sum()) for g in _per_example_grads(model, x, y))
    p = sum(q.numel() for q in model.parameters())
    assert fitted.damping[0] == pytest.approx(GN_FACTOR * g2 / (len(x) * p), rel=1e-10)


def test_trak_default_is_gram_factor_times_mean_eigenvalue(mlp_data) -> None:
    model, x, y = mlp_data
    fitted = dt.TRAK(projection_dim=None).fit(
        dt.ClassificationTask(model), [dt.Checkpoint.from_module(model)], (x, y), progress=False
    )
    (pc,) = fitted.preconditioners
    mean_eig = float(pc.evals.mean())  # type: ignore[attr-defined]
    assert fitted.damping[0] == pytest.approx(GRAM_FACTOR * mean_eig, rel=1e-9)


def test_check_damping_accepts_auto_only_as_the_one_string() -> None:
    check_damping("auto")
    with pytest.raises(ConfigError, match="'auto'"):
        check_damping("autp")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        autodamp.AutoDamping(multipliers=(1.0, 0.0))


def _trained_mlp() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    model = MLP(d_in=4, hidden=6, classes=3).double()
    x = torch.randn(40, 4, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model, x, y


def test_auto_picks_the_grid_point_of_a_brute_force_search() -> None:
    model, x, y = _trained_mlp()
    task = dt.ClassificationTask(model)
    ckpts = [dt.Checkpoint.from_module(model)]
    fitted = dt.Influence(dt.ExactHessian(damping="auto")).fit(task, ckpts, (x, y), progress=False)
    res = fitted.auto_damping  # type: ignore[attr-defined]
    assert fitted.damping == [res.damping]
    settings = autodamp.DEFAULTS
    rule = dt.Influence(dt.ExactHessian()).fit(task, ckpts, (x, y), progress=False).damping[0]
    grid = [rule * m for m in settings.multipliers]
    assert res.grid == pytest.approx(grid, rel=1e-12)
    # brute force: the same sample and further training, a fresh fit per grid point
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(settings.seed))
    left, queries = perm[:20].sort().values, perm[20:40].sort().values  # min(32, n//2)
    assert torch.equal(res.left_out, left) and torch.equal(res.queries, queries)
    gold = dt.truth.further_training(
        task, ckpts[0], (x, y), (x[queries], y[queries]), left, epochs=settings.epochs,
        seeds=settings.seeds, lr=settings.lr, batch_size=settings.batch_size, progress=False,
    )[-1]  # fmt: skip
    agree = []
    for lam in grid:
        with warnings.catch_warnings():  # small grid points leave H + λI indefinite
            warnings.simplefilter("ignore", dt.InfluenceWarning)
            f = dt.Influence(dt.ExactHessian(damping=lam)).fit(task, ckpts, (x, y), progress=False)
        s = f.attribute((x[queries], y[queries]))[:, left]
        agree.append(dt.metrics.agreement(s, gold)["spearman"][0])
    assert res.spearman == pytest.approx(agree, abs=1e-9)
    best = max(range(len(grid)), key=lambda k: (agree[k], grid[k]))
    assert res.damping == grid[best]
    # reproducible: the same seed, the same choice and agreements
    again = dt.Influence(dt.ExactHessian(damping="auto")).fit(task, ckpts, (x, y), progress=False)
    assert again.auto_damping.spearman == res.spearman  # type: ignore[attr-defined]


def test_auto_refits_other_preconditioners_at_the_chosen_grid_point() -> None:
    model, x, y = _trained_mlp()
    task, ckpts = dt.ClassificationTask(model), [dt.Checkpoint.from_module(model)]
    fitted = dt.Influence(dt.EKFAC(damping="auto")).fit(task, ckpts, (x, y), progress=False)
    res = fitted.auto_damping  # type: ignore[attr-defined]
    assert res.damping in res.grid and fitted.damping == [res.damping]
    fixed = dt.Influence(dt.EKFAC(damping=res.damping)).fit(task, ckpts, (x, y), progress=False)
    q = (x[:5], y[:5])
    torch.testing.assert_close(fitted.attribute(q), fixed.attribute(q), rtol=1e-10, atol=1e-12)


def test_auto_refuses_several_checkpoints(mlp_data) -> None:
    model, x, y = mlp_data
    ckpts = [dt.Checkpoint.from_module(model), dt.Checkpoint.from_module(model)]
    method = dt.GradientAttributor(
        dt.FeatureSpec(factored=False),
        preconditioner=dt.ExactHessian(damping="auto"),
        checkpoints=dt.CheckpointWeights.MEAN,
    )
    with pytest.raises(ConfigError, match="one checkpoint"):
        method.fit(dt.ClassificationTask(model), ckpts, (x, y), progress=False)


def test_kfac_default_damping_is_never_below_round_off(monkeypatch):
    """The rule's λ comes from the mean curvature; a stiff layer's float32 eigenvalues can
    make it round-off there (MiniLM's pooler). The default is then raised to
    NUMERICAL_MARGIN × that layer's round-off level (logged); an explicit λ is refused."""
    from datatrace.curvature import base, kfac

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x, y = torch.randn(40, 6) * 30, torch.randint(0, 3, (40,))
    task = dt.ClassificationTask(model)
    ckpt = [dt.Checkpoint.from_module(model)]
    monkeypatch.setattr(base, "GN_FACTOR", 1e-12)  # a rule that lands below round-off
    fitted = dt.Influence(dt.EKFAC()).fit(task, ckpt, (x, y))
    layers = fitted.preconditioners[0].layers
    floor = max(kfac._numerical_floor(lay) for lay in layers)
    assert fitted.damping[0] == pytest.approx(kfac.NUMERICAL_MARGIN * floor, rel=1e-12)
    assert torch.isfinite(fitted.attribute((x[:3], y[:3]))).all()
    with pytest.raises(dt.ConfigError, match="singular"):
        dt.Influence(dt.EKFAC(damping=floor / 100)).fit(task, ckpt, (x, y))


@pytest.mark.parametrize(
    "make",
    [
        lambda d: dt.ExactHessian(damping=d),
        lambda d: dt.GaussNewton(damping=d),
        lambda d: dt.ConjugateGradient(damping=d, tol=1e-12),
        lambda d: dt.Arnoldi(rank=20, damping=d),
        lambda d: dt.LiSSA(damping=d),
        lambda d: dt.EKFAC(damping=d),
    ],
    ids=["exact", "gauss_newton", "cg", "arnoldi", "lissa", "ekfac"],
)
def test_auto_grid_reuses_the_curvature_and_equals_fresh_fits(make, monkeypatch) -> None:
    """damping="auto" tries its grid without re-forming the curvature (the Hessian is formed
    once; CG is warm-started): each grid point's scores equal a fresh fit at that damping
    (float64), and the agreements equal the brute-force ones."""
    from datatrace.curvature.problem import CurvatureProblem

    model, x, y = _trained_mlp()
    task, ckpts = dt.ClassificationTask(model), [dt.Checkpoint.from_module(model)]
    formed = {"hessian": 0, "gauss_newton": 0}
    for name in formed:
        original = getattr(CurvatureProblem, name)

        def counted(self, *a, _name=name, _original=original, **k):  # type: ignore[no-untyped-def]
            formed[_name] += 1
            return _original(self, *a, **k)

        monkeypatch.setattr(CurvatureProblem, name, counted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dt.InfluenceWarning)
        fitted = dt.Influence(make("auto")).fit(task, ckpts, (x, y), progress=False)
    assert sum(formed.values()) <= 1  # exact, Gauss-Newton, LiSSA's exact solve: once
    res = fitted.auto_damping  # type: ignore[attr-defined]
    assert len(res.grid) == 3 and res.damping in res.grid
    q = (x[res.queries], y[res.queries])
    gold = autodamp.gold_standard(
        task, ckpts[0], (x, y), res.left_out, res.queries, autodamp.DEFAULTS
    )
    for lam, rho in zip(res.grid, res.spearman, strict=True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", dt.InfluenceWarning)
            fresh = dt.Influence(make(lam)).fit(task, ckpts, (x, y), progress=False)
            s = fresh.attribute(q)[:, res.left_out]
        assert dt.metrics.agreement(s, gold)["spearman"][0] == pytest.approx(rho, abs=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dt.InfluenceWarning)
        fixed = dt.Influence(make(res.damping)).fit(task, ckpts, (x, y), progress=False)
        got, want = fitted.attribute(q), fixed.attribute(q)
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9 * float(want.abs().max()))
    for pc in fitted.preconditioners:  # what was kept for the grid is released
        assert getattr(pc, "undamped", None) is None and getattr(pc, "last", None) is None


def test_cg_warm_start_at_another_damping_equals_a_cold_solve() -> None:
    from datatrace.curvature.iterative import CGPreconditioner, _MatrixFree

    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 30, generator=g, dtype=torch.float64)
    matrix = a @ a.T / 30

    class _Dense:
        def mean_product(self, v: torch.Tensor, gauss_newton: bool) -> torch.Tensor:
            return v @ matrix

    v = torch.randn(4, 30, generator=g, dtype=torch.float64)
    cold = CGPreconditioner(_MatrixFree(_Dense(), False, 0.5), None, 1e-12)  # type: ignore[arg-type]
    cold.keep_last = True
    cold.solve(v)
    cold_iters = cold.iterations
    warm = cold.with_damping(0.6)
    x = warm.solve(v)
    want = torch.linalg.solve(matrix + 0.6 * torch.eye(30, dtype=torch.float64), v.T).T
    torch.testing.assert_close(x, want, rtol=1e-9, atol=1e-11)
    fresh = CGPreconditioner(_MatrixFree(_Dense(), False, 0.6), None, 1e-12)  # type: ignore[arg-type]
    fresh.solve(v)
    assert warm.iterations <= fresh.iterations <= cold_iters + 2
