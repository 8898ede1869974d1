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
from datatrace.curvature import damping as rule
from datatrace.curvature.base import check_damping
from datatrace.curvature.damping import (
    GN_FACTOR,
    GN_HESSIAN_FRACTION,
    HESSIAN_FLOOR,
    NEGATIVE_FACTOR,
    TRACE_FACTOR,
    curvature_damping,
    lanczos_extremes,
)
from datatrace.curvature.dense import LDLPreconditioner
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
    true = torch.linalg.eigvalsh(m)
    # the largest of the rule's three terms (Lanczos λ_min >= the true one; the mean by
    # Hutchinson, within 4 standard errors of trace/p)
    mean, p = float(true.mean()), 60
    se = (2 * float((m**2).sum() - (m.diagonal() ** 2).sum()) / rule.TRACE_VECTORS) ** 0.5 / p
    bound = max(NEGATIVE_FACTOR * abs(float(true[0])), TRACE_FACTOR * (mean + 4 * se))
    assert choice.value <= bound + 1e-12
    assert "λ_min" in choice.reason


def test_hutchinson_mean_eigenvalue_is_exact_on_a_diagonal_and_unbiased() -> None:
    d = torch.linspace(-1.0, 5.0, 50, dtype=torch.float64)
    est = rule.hutchinson_mean_eigenvalue(lambda v: v * d, d, n_vectors=3, seed=7)
    assert est == pytest.approx(float(d.mean()), rel=1e-12)  # v_i² = 1 for Rademacher v
    m = _indefinite(40, 6, seed=4)
    mean = float(torch.linalg.eigvalsh(m).mean())
    est = rule.hutchinson_mean_eigenvalue(lambda v: v @ m, m[0], n_vectors=4000, seed=0)
    se = (2 * float((m**2).sum() - (m.diagonal() ** 2).sum()) / 4000) ** 0.5 / 40
    assert abs(est - mean) < 4 * se
    again = rule.hutchinson_mean_eigenvalue(lambda v: v @ m, m[0], n_vectors=4000, seed=0)
    assert again == est  # seeded


def test_hutchinson_goes_in_groups_on_a_large_model(monkeypatch) -> None:
    """Past HUTCHINSON_ENTRIES the vectors go in groups: no pass holds more rows than fit,
    and the estimate is the same estimator (exact on a diagonal, unbiased on a matrix)."""
    monkeypatch.setattr(rule, "HUTCHINSON_ENTRIES", 100)  # 2 rows of p = 50 per pass
    d = torch.linspace(-1.0, 5.0, 50, dtype=torch.float64)
    rows: list[int] = []

    def apply(v: torch.Tensor) -> torch.Tensor:
        rows.append(v.shape[0])
        return v * d

    est = rule.hutchinson_mean_eigenvalue(apply, d, n_vectors=5, seed=7)
    assert rows == [2, 2, 1]
    assert est == pytest.approx(float(d.mean()), rel=1e-12)
    m = _indefinite(40, 6, seed=4)
    mean = float(torch.linalg.eigvalsh(m).mean())
    est = rule.hutchinson_mean_eigenvalue(lambda v: v @ m, m[0], n_vectors=4000, seed=0)
    se = (2 * float((m**2).sum() - (m.diagonal() ** 2).sum()) / 4000) ** 0.5 / 40
    assert abs(est - mean) < 4 * se


def test_rule_takes_the_largest_term_floor_negative_or_mean_eigenvalue() -> None:
    g = torch.Generator().manual_seed(5)
    # diagonal: Hutchinson is exact, so every term is known exactly
    d = torch.rand(40, generator=g, dtype=torch.float64) * 0.2 + 0.01  # mean ≈ 0.11
    ctx = _fake_ctx(torch.diag(d), lambda0=0.5)
    choice = curvature_damping(ctx, gauss_newton=False)  # type: ignore[arg-type]
    assert choice.value == HESSIAN_FLOOR * 0.5 and "floor" in choice.reason
    ctx = _fake_ctx(torch.diag(d), lambda0=1e-3)
    choice = curvature_damping(ctx, gauss_newton=False)  # type: ignore[arg-type]
    assert choice.value == pytest.approx(TRACE_FACTOR * float(d.mean()), rel=1e-12)
    assert "mean eigenvalue" in choice.reason
    d[3] = -1.0  # one strongly negative direction: λ_min decides (Lanczos finds it exactly)
    choice = curvature_damping(_fake_ctx(torch.diag(d), 1e-3), gauss_newton=False)  # type: ignore[arg-type]
    assert choice.value == pytest.approx(NEGATIVE_FACTOR * 1.0, rel=1e-9)
    assert "|λ_min|" in choice.reason
    # the factored Gauss-Newton approximations (K-FAC, EK-FAC, DataInf): λ₀ only
    assert curvature_damping(ctx, True, factored=True).value == GN_FACTOR * 1e-3  # type: ignore[arg-type]
    assert curvature_damping(_fake_ctx(torch.diag(d), 0.0), False).value == base.DAMPING_FLOOR  # type: ignore[arg-type]


def test_exact_gauss_newton_rule_is_a_fraction_of_the_hessian_rule() -> None:
    """``GN_HESSIAN_FRACTION × max(3 λ₀, 2 |λ_min|, 3 trace(H)/p)`` in closed form (float64,
    a diagonal 'Hessian': Lanczos and Hutchinson are exact), each term deciding in turn."""
    g = torch.Generator().manual_seed(7)
    d = torch.rand(30, generator=g, dtype=torch.float64) * 0.2 + 0.01
    cases = [
        (d, 0.5, HESSIAN_FLOOR * 0.5),  # the floor decides
        (d, 1e-3, TRACE_FACTOR * float(d.mean())),  # the mean eigenvalue
        (torch.cat([d, torch.tensor([-2.0], dtype=torch.float64)]), 1e-3, NEGATIVE_FACTOR * 2.0),
    ]
    for diag, lambda0, hessian_rule in cases:
        ctx = _fake_ctx(torch.diag(diag), lambda0)
        assert curvature_damping(ctx, False).value == pytest.approx(hessian_rule, rel=1e-9)  # type: ignore[arg-type]
        choice = curvature_damping(ctx, gauss_newton=True)  # type: ignore[arg-type]
        assert choice.value == pytest.approx(GN_HESSIAN_FRACTION * hessian_rule, rel=1e-9)
        assert choice.extremes is None  # the Hessian's extremes are not the GN's (LiSSA)
        assert f"{GN_HESSIAN_FRACTION:g} × the Hessian's rule" in choice.reason
    assert GN_HESSIAN_FRACTION * NEGATIVE_FACTOR == 1.0  # damping |λ_min|: the residual term
    assert curvature_damping(_fake_ctx(torch.diag(d), 0.0), True).value == base.DAMPING_FLOOR  # type: ignore[arg-type]


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


def test_gauss_newton_default_is_a_fraction_of_the_hessian_rule(mlp_data) -> None:
    model, x, y = mlp_data
    args = (dt.ClassificationTask(model), [dt.Checkpoint.from_module(model)], (x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dt.InfluenceWarning)  # an indefinite Hessian
        hessian = dt.Influence(dt.ExactHessian()).fit(*args, progress=False)
    fitted = dt.Influence(dt.GaussNewton()).fit(*args, progress=False)
    expected = GN_HESSIAN_FRACTION * hessian.damping[0]
    assert fitted.damping[0] == pytest.approx(expected, rel=1e-10)
    # the matrix-free solvers of the same matrix take the same default
    cg = dt.Influence(dt.ConjugateGradient(gauss_newton=True)).fit(*args, progress=False)
    assert cg.damping[0] == pytest.approx(expected, rel=1e-10)


def test_datainf_default_is_gn_factor_times_lambda0(mlp_data) -> None:
    model, x, y = mlp_data
    args = (dt.ClassificationTask(model), [dt.Checkpoint.from_module(model)], (x, y))
    g2 = sum(float((g**2).sum()) for g in _per_example_grads(model, x, y))
    p = sum(q.numel() for q in model.parameters())
    fitted = dt.DataInf().fit(*args, progress=False)
    assert fitted.damping[0] == pytest.approx(GN_FACTOR * g2 / (len(x) * p), rel=1e-5)


def _gauss_newton_trace(model, x) -> float:
    """``trace(G)`` of the softmax cross-entropy's Gauss–Newton matrix, by hand in float64:
    ``(1/n) Σ_i tr(J_iᵀ H_i J_i)``, J_i the logits' Jacobian, ``H_i = diag(p_i) - p_i p_iᵀ``."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def logits(prm, xi):
        return functional_call(model, prm, (xi[None],))[0]

    jac = torch.func.vmap(torch.func.jacrev(logits), in_dims=(None, 0))(params, x)
    J = torch.cat([j.reshape(len(x), j.shape[1], -1) for j in jac.values()], 2)  # (n, o, p)
    prob = torch.softmax(torch.func.vmap(logits, in_dims=(None, 0))(params, x), -1)
    h = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]
    return float(torch.einsum("nab,nbp,nap->", h, J, J)) / len(x)


def test_kfac_family_default_is_the_mean_of_its_own_eigenvalues(mlp_data, caplog) -> None:
    """K-FAC: KRONECKER_FACTOR × mean(eig S ⊗ eig A) = Σ_l tr S_l tr A_l / p; EK-FAC with
    the exact Fisher: KRONECKER_FACTOR × trace(G)/p of the Gauss–Newton matrix (its refitted
    eigenvalues keep G's diagonal in their basis), checked against G formed by hand."""
    model, x, y = mlp_data
    args = (dt.ClassificationTask(model), [dt.Checkpoint.from_module(model)], (x, y))
    p = sum(q.numel() for q in model.parameters())
    kfac = dt.Influence(dt.KFAC(fisher="exact")).fit(*args, progress=False)
    layers = kfac.preconditioners[0].layers
    traces = sum(float(lay.S.trace() * lay.A.trace()) for lay in layers)
    assert kfac.damping[0] == pytest.approx(rule.KRONECKER_FACTOR * traces / p, rel=1e-10)
    with caplog.at_level(logging.INFO, logger="datatrace"):
        ekfac = dt.Influence(dt.EKFAC(fisher="exact")).fit(*args, progress=False)
    want = rule.KRONECKER_FACTOR * _gauss_newton_trace(model, x) / p
    assert ekfac.damping[0] == pytest.approx(want, rel=1e-10)
    assert any("mean eigenvalue of the EKFAC" in r.getMessage() for r in caplog.records)
    assert ekfac.lambda0 == [None]  # measured nowhere: the rule needs no gradient pass
    # a given number is used as is
    assert dt.Influence(dt.EKFAC(damping=0.25)).fit(*args, progress=False).damping[0] == 0.25


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


def _untrained_mlp() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    model = MLP(d_in=4, hidden=6, classes=3).double()
    x = torch.randn(40, 4, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return model, x, y


def _sgd(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.nn.Module:
    """60 full-batch SGD steps at lr 0.3 on the cross-entropy."""
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def _trained_mlp() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    model, x, y = _untrained_mlp()
    return _sgd(model, x, y), x, y


def _trained_linear() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A multinomial logistic regression on the same data: a positive semi-definite
    Hessian, so that every grid point of damping="auto" can be tried (none is
    indefinite)."""
    _, x, y = _untrained_mlp()
    torch.manual_seed(3)
    return _sgd(torch.nn.Linear(4, 3).double(), x, y), x, y


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
    agree, per_query, indefinite = [], [], []
    for lam in grid:
        with warnings.catch_warnings():  # small grid points leave H + λI indefinite
            warnings.simplefilter("ignore", dt.InfluenceWarning)
            f = dt.Influence(dt.ExactHessian(damping=lam)).fit(task, ckpts, (x, y), progress=False)
        indefinite.append(isinstance(f.preconditioners[0], LDLPreconditioner))  # no Cholesky
        s = f.attribute((x[queries], y[queries]))[:, left]
        agree.append(dt.metrics.agreement(s, gold)["spearman"][0])
        # per-query Spearman, by hand (no ties here): Pearson of argsort ranks
        rs, rg = s.argsort(1).argsort(1).double(), gold.argsort(1).argsort(1).double()
        rs, rg = rs - rs.mean(1, keepdim=True), rg - rg.mean(1, keepdim=True)
        per_query.append((rs * rg).sum(1) / (rs.norm(dim=1) * rg.norm(dim=1)))
    # the decision, by hand: grid points where H + λI is indefinite, and those above the
    # rule's but below 3 × the horizon 1/(η·T), are not tried; the best tried one replaces
    # the rule's only if better by more than 2 paired standard errors
    horizon = 1 / (settings.lr * settings.epochs * -(-40 // settings.batch_size))
    assert res.details["horizon"] == pytest.approx(horizon, rel=1e-12)
    assert indefinite[0] and not indefinite[1]  # this toy has a grid point to skip
    tried = [
        k for k in range(3)
        if not indefinite[k] and not rule < grid[k] < settings.horizon_factor * horizon
    ]  # fmt: skip
    for k in range(3):
        if k in tried:
            assert res.spearman[k] == pytest.approx(agree[k], abs=1e-9)
        else:
            assert res.spearman[k] != res.spearman[k]  # NaN: not tried
    at, best = grid.index(rule), max(tried, key=lambda k: agree[k])
    diff = per_query[best] - per_query[at]
    se = float(diff.std() / len(diff) ** 0.5)
    clearly = float(diff.mean()) > settings.margin_se * se
    expected = grid[best] if best != at and clearly else rule
    assert res.damping == expected
    # reproducible: the same seed, the same choice and agreements
    again = dt.Influence(dt.ExactHessian(damping="auto")).fit(task, ckpts, (x, y), progress=False)
    assert again.auto_damping.spearman == pytest.approx(res.spearman, nan_ok=True, rel=0, abs=0)  # type: ignore[attr-defined]


def _choose(means: list[float], ses: float, grid: list[float], horizon: float) -> float:
    """autodamp.choose on per-query agreements built to have the given means, with paired
    differences of standard error ``ses`` against the rule's (grid[1])."""
    q = 16
    noise = torch.tensor([1.0, -1.0] * (q // 2), dtype=torch.float64) * ses * q**0.5
    noise = noise * ((q - 1) / q) ** 0.5  # std (Bessel) of ±a is a·√(q/(q−1))
    base_rho = torch.full((q,), means[1], dtype=torch.float64)
    per = [base_rho + (m - means[1]) + (noise if k != 1 else 0) for k, m in enumerate(means)]
    return autodamp.choose(grid, per, grid[1], horizon, autodamp.DEFAULTS)[0]


def test_auto_choice_keeps_the_rule_unless_clearly_better_and_not_the_horizon() -> None:
    grid = [0.1, 1.0, 10.0]
    # better by 0.05 with paired standard error 0.01: clearly better; far above the horizon
    assert _choose([0.5, 0.5, 0.55], 0.01, grid, horizon=0.1) == 10.0
    # the same gain within 2 standard errors (0.03): the rule's kept
    assert _choose([0.5, 0.5, 0.55], 0.03, grid, horizon=0.1) == 1.0
    # clearly better but the larger damping is below 3 × the horizon 1/(η·T) = 4: kept
    assert _choose([0.5, 0.5, 0.55], 0.01, grid, horizon=4.0) == 1.0
    # a smaller damping clearly better: taken whatever the horizon (it works against it)
    assert _choose([0.6, 0.5, 0.4], 0.01, grid, horizon=4.0) == 0.1
    # the rule's damping best: kept
    assert _choose([0.4, 0.5, 0.45], 0.0, grid, horizon=0.1) == 1.0


def test_auto_settings_need_the_rule_in_the_grid() -> None:
    with pytest.raises(ConfigError, match=r"1\.0"):
        autodamp.AutoDamping(multipliers=(0.1, 10.0))
    with pytest.raises(ConfigError, match="margin_se"):
        autodamp.AutoDamping(margin_se=-1.0)


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
    from datatrace.curvature import damping as gn_rule
    from datatrace.curvature import kfac

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x, y = torch.randn(40, 6) * 30, torch.randint(0, 3, (40,))
    task = dt.ClassificationTask(model)
    ckpt = [dt.Checkpoint.from_module(model)]
    monkeypatch.setattr(gn_rule, "KRONECKER_FACTOR", 1e-12)  # a rule below round-off
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
        lambda d: dt.Arnoldi(rank=10, damping=d),
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

    model, x, y = _trained_linear()
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
    assert sum(rho == rho for rho in res.spearman) >= 2  # the rule's and at least one more
    for lam, rho in zip(res.grid, res.spearman, strict=True):
        if rho != rho:  # not tried (above the rule's, inside the horizon's bias)
            assert res.damping != lam  # an untried point is never the choice
            continue
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
    from datatrace.curvature.cg import CGPreconditioner
    from datatrace.curvature.matrix_free import MatrixFree

    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 30, generator=g, dtype=torch.float64)
    matrix = a @ a.T / 30

    class _Dense:
        def mean_product(self, v: torch.Tensor, gauss_newton: bool) -> torch.Tensor:
            return v @ matrix

    v = torch.randn(4, 30, generator=g, dtype=torch.float64)
    cold = CGPreconditioner(MatrixFree(_Dense(), False, 0.5), None, 1e-12)  # type: ignore[arg-type]
    cold.keep_last = True
    cold.solve(v)
    cold_iters = cold.iterations
    warm = cold.with_damping(0.6)
    x = warm.solve(v)
    want = torch.linalg.solve(matrix + 0.6 * torch.eye(30, dtype=torch.float64), v.T).T
    torch.testing.assert_close(x, want, rtol=1e-9, atol=1e-11)
    fresh = CGPreconditioner(MatrixFree(_Dense(), False, 0.6), None, 1e-12)  # type: ignore[arg-type]
    fresh.solve(v)
    assert warm.iterations <= fresh.iterations <= cold_iters + 2


def test_lissa_scale_reuses_the_rules_lanczos_run(monkeypatch) -> None:
    """With the default damping on the Hessian, LiSSA's scale comes from the rule's Lanczos
    extremes (no 30-product power iteration): it bounds H + λI's largest magnitude (float64)."""
    from datatrace.curvature import lissa

    model, x, y = _trained_mlp()
    task, ckpts = dt.ClassificationTask(model), [dt.Checkpoint.from_module(model)]

    def refuse(*a, **k):  # type: ignore[no-untyped-def]
        raise AssertionError("power iteration run although the rule's Lanczos run had λ_max")

    monkeypatch.setattr(lissa, "power_iteration", refuse)
    fitted = dt.Influence(dt.LiSSA(max_exact_params=0, depth=5)).fit(
        task, ckpts, (x, y), progress=False
    )
    (pc,) = fitted.preconditioners
    lam = pc.damping
    h = _mean_loss_hessian(model, x, y)
    evals = torch.linalg.eigvalsh(h + lam * torch.eye(h.shape[0], dtype=h.dtype))
    true_top = float(evals.abs().max())
    assert pc.largest == pytest.approx(true_top, rel=1e-3)  # type: ignore[attr-defined]
    assert pc.scale == pytest.approx(1.5 * pc.largest, rel=1e-12)  # type: ignore[attr-defined]
    # a given damping: no rule, the power iteration (here refused) estimates the scale
    with pytest.raises(AssertionError, match="power iteration"):
        dt.Influence(dt.LiSSA(damping=0.1)).fit(task, ckpts, (x, y), progress=False)


def test_auto_grid_runs_the_exact_hessians_lanczos_check_once(monkeypatch) -> None:
    """The refits of damping="auto"'s grid reuse the first fit's Lanczos bound on the
    Hessian's smallest eigenvalue (the seeded run would repeat it): a 30-step run once, and
    the longer one at most once more (after a failed Cholesky); the scores are those of a
    fresh fit at the chosen damping (float64)."""
    from datatrace.curvature import dense

    model, x, y = _trained_linear()
    task, ckpts = dt.ClassificationTask(model), [dt.Checkpoint.from_module(model)]
    calls: list[int] = []
    original = dense.smallest_eigenvalue

    def counted(matrix: torch.Tensor, n_iter: int = 80) -> float:
        calls.append(n_iter)
        return original(matrix, n_iter)

    monkeypatch.setattr(dense, "smallest_eigenvalue", counted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dt.InfluenceWarning)
        fitted = dt.Influence(dt.ExactHessian(damping="auto")).fit(
            task, ckpts, (x, y), progress=False
        )
    res = fitted.auto_damping  # type: ignore[attr-defined]
    assert sum(rho == rho for rho in res.spearman) >= 2  # at least one refit happened
    assert calls.count(30) == 1 and calls.count(80) <= 1 and len(calls) <= 2
    monkeypatch.setattr(dense, "smallest_eigenvalue", original)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dt.InfluenceWarning)
        fixed = dt.Influence(dt.ExactHessian(damping=res.damping)).fit(
            task, ckpts, (x, y), progress=False
        )
    got, want = fitted.attribute((x[:5], y[:5])), fixed.attribute((x[:5], y[:5]))
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9 * float(want.abs().max()))


def test_release_drops_what_the_auto_grid_kept_and_solves_the_same() -> None:
    """``release()`` (called once ``damping="auto"`` has chosen): the undamped matrix of a
    dense fit, CG's last solutions and the matrix of an iterative solver's exact switch are
    dropped; every solve is unchanged (float64), and re-damping a dense fit then needs a
    refit (``None``). A preconditioner that keeps nothing (the base's default) solves as
    before."""
    from datatrace.curvature.arnoldi import EigenPreconditioner
    from datatrace.curvature.cg import CGPreconditioner
    from datatrace.curvature.dense import _fit_dense
    from datatrace.curvature.lissa import LiSSAPreconditioner
    from datatrace.curvature.matrix_free import MatrixFree

    g = torch.Generator().manual_seed(0)
    a = torch.randn(20, 20, generator=g, dtype=torch.float64)
    matrix = a @ a.T / 20
    v = torch.randn(3, 20, generator=g, dtype=torch.float64)
    want = torch.linalg.solve(matrix + 0.5 * torch.eye(20, dtype=torch.float64), v.T).T

    class _Dense:
        n = 20

        def mean_product(self, x: torch.Tensor, gauss_newton: bool) -> torch.Tensor:
            return x @ matrix

    def exact():  # type: ignore[no-untyped-def]
        out = _fit_dense(matrix.clone(), 0.5, True, "auto")
        assert out.undamped is not None
        return out

    dense = exact()
    before = dense.solve(v)
    dense.release()
    assert dense.undamped is None and dense.with_damping(0.6) is None
    assert torch.equal(dense.solve(v), before)
    torch.testing.assert_close(before, want, rtol=1e-10, atol=1e-12)

    op = MatrixFree(_Dense(), False, 0.5)  # type: ignore[arg-type]
    cg = CGPreconditioner(op, None, 1e-12)
    cg.keep_last = True
    before = cg.solve(v)
    assert cg.last is not None
    cg.release()
    assert cg.last is None and not cg.keep_last
    after = cg.solve(v)
    assert cg.last is None  # not kept again
    torch.testing.assert_close(after, before, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(after, want, rtol=1e-9, atol=1e-11)

    for solver in (CGPreconditioner(op, None, 1e-12),
                   LiSSAPreconditioner(dt.LiSSA(damping=0.5), op, 10.0, 10.0, 5)):  # fmt: skip
        solver.exact = exact()
        before = solver.solve(v)
        solver.release()
        assert solver.exact.undamped is None
        assert torch.equal(solver.solve(v), before)
        torch.testing.assert_close(before, want, rtol=1e-10, atol=1e-12)

    evals, evecs = torch.linalg.eigh(matrix)
    eigen = EigenPreconditioner(evals, evecs, 0.5)
    before = eigen.solve(v)
    eigen.release()  # the base's no-op: nothing was kept
    assert torch.equal(eigen.solve(v), before)
    torch.testing.assert_close(before, want, rtol=1e-10, atol=1e-12)


def test_a_preconditioner_says_whether_it_calibrates_its_damping() -> None:
    """``calibrates_damping()``: ``damping="auto"`` and nothing else; a contributed
    preconditioner without a damping setting never does."""
    from datatrace.curvature.auto import AutoPreconditioner

    assert dt.ExactHessian(damping="auto").calibrates_damping()
    assert dt.ConjugateGradient(damping="auto").calibrates_damping()  # type: ignore[arg-type]
    assert AutoPreconditioner(damping="auto").calibrates_damping()
    assert not dt.ExactHessian().calibrates_damping()
    assert not dt.EKFAC(damping=0.1).calibrates_damping()

    class Identity(dt.AbstractPreconditioner):  # no damping setting at all
        def fit(self, ctx):  # type: ignore[no-untyped-def]
            raise NotImplementedError

    assert not Identity().calibrates_damping()


def test_kronecker_damping_rule_given_auto_and_the_floor() -> None:
    assert rule.kronecker_damping(0.3, 5.0, "K") == 0.3  # a number is used as is
    assert rule.kronecker_damping(None, 5.0, "K") == rule.KRONECKER_FACTOR * 5.0
    assert rule.kronecker_damping("auto", 5.0, "K") == rule.KRONECKER_FACTOR * 5.0  # its start
    assert rule.kronecker_damping(None, 0.0, "K") == base.DAMPING_FLOOR  # no curvature at all
