"""Influence functions: every solver against torch.linalg.solve of the exact Hessian (float64)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import MLP, perturbed
from torch.func import functional_call, hessian

import datatrace as dt
from datatrace.core.data import ExampleSource
from datatrace.curvature.problem import CurvatureProblem


def flat_grads(model, x, y, state=None):
    m = MLP().double()
    m.load_state_dict(state or model.state_dict())
    rows = []
    for i in range(len(x)):
        m.zero_grad()
        F.cross_entropy(m(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    return torch.stack(rows)


def exact_hessian(model, x, y, state=None):
    """Independent twin: torch.func.hessian of the mean loss w.r.t. the flat parameters."""
    state = state or dict(model.state_dict())
    names = [n for n, _ in model.named_parameters()]
    shapes = [state[n].shape for n in names]
    theta = torch.cat([state[n].flatten() for n in names])

    def mean_loss(t):
        parts = torch.split(t, [s.numel() for s in shapes])
        params = {n: p.reshape(s) for n, p, s in zip(names, parts, shapes, strict=True)}
        return F.cross_entropy(functional_call(model, params, (x,)), y)

    return hessian(mean_loss)(theta)


def reference(model, x, y, xq, yq, damping, state=None):
    H = exact_hessian(model, x, y, state)
    G, Q = flat_grads(model, x, y, state), flat_grads(model, xq, yq, state)
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    return Q @ torch.linalg.solve(H + damping * eye, G.T) / len(x)


@pytest.fixture
def setup(mlp_data):
    model, x, y = mlp_data
    return model, x, y, x[:5] + 0.05, y[:5]


def _fit(model, x, y, pre, ckpts=None, **kw):
    ckpts = ckpts or [dt.Checkpoint.from_module(model)]
    return dt.Influence(pre).fit(dt.ClassificationTask(model), ckpts, (x, y), progress=False, **kw)


@pytest.mark.parametrize(
    "pre",
    [
        dt.ExactHessian(damping=0.5),
        dt.ConjugateGradient(damping=0.5, max_iter=500, tol=1e-12),
        dt.LiSSA(damping=0.5, depth=400),
        dt.Arnoldi(rank=59, damping=0.5),  # full rank: 7·5+7 + 3·7+3 = 66 ≥ 59? see below
    ],
    ids=["exact", "cg", "lissa", "arnoldi"],
)
def test_solvers_match_linalg_solve_of_the_exact_hessian(setup, pre):
    model, x, y, xq, yq = setup
    p = sum(t.numel() for t in model.parameters())
    if isinstance(pre, dt.Arnoldi):
        pre = dt.Arnoldi(rank=p, damping=0.5)
    fitted = _fit(model, x, y, pre, batch_size=7)
    S = fitted.attribute((xq, yq))
    ref = reference(model, x, y, xq, yq, 0.5)
    tol = 1e-6 if isinstance(pre, dt.LiSSA) else 1e-9
    torch.testing.assert_close(S, ref, rtol=tol, atol=tol * ref.abs().max().item())
    assert fitted.damping == [0.5]


def test_gauss_newton_matches_its_definition(setup):
    model, x, y, _, _ = setup
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    problem = CurvatureProblem(
        dt.ClassificationTask(model), names, params, {}, ExampleSource((x, y)), batch_size=6
    )
    G = problem.gauss_newton()
    theta = problem.theta
    ref = torch.zeros_like(G)
    for i in range(len(x)):
        jac = torch.autograd.functional.jacobian(
            lambda t, i=i: problem.outputs(t, (x[i : i + 1], y[i : i + 1]))[0], theta
        )
        p = torch.softmax(model(x[i : i + 1])[0], 0).detach()
        h_out = torch.diag(p) - torch.outer(p, p)  # Hessian of cross-entropy in the logits
        ref += jac.T @ h_out @ jac
    torch.testing.assert_close(G, ref / len(x), rtol=1e-10, atol=1e-12)
    assert torch.linalg.eigvalsh(G).min() > -1e-12  # PSD
    V = torch.randn(3, problem.p, dtype=torch.float64)
    torch.testing.assert_close(problem.mean_product(V, True), V @ G, rtol=1e-10, atol=1e-12)
    fitted = _fit(model, x, y, dt.GaussNewton(damping=0.1))
    Q, Gr = flat_grads(model, x[:3], y[:3]), flat_grads(model, x, y)
    eye = torch.eye(problem.p, dtype=torch.float64)
    expected = Q @ torch.linalg.solve(G + 0.1 * eye, Gr.T) / len(x)
    torch.testing.assert_close(fitted.attribute((x[:3], y[:3])), expected, rtol=1e-9, atol=1e-12)


def test_gauss_newton_cg_and_arnoldi_match_gauss_newton(setup):
    model, x, y, xq, yq = setup
    ref = _fit(model, x, y, dt.GaussNewton(damping=0.05)).attribute((xq, yq))
    cg = _fit(
        model, x, y, dt.ConjugateGradient(damping=0.05, max_iter=400, tol=1e-12, gauss_newton=True)
    ).attribute((xq, yq))
    torch.testing.assert_close(cg, ref, rtol=1e-8, atol=1e-10)


def _problem(model, x, y):
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    return CurvatureProblem(
        dt.ClassificationTask(model), names, params, {}, ExampleSource((x, y)), batch_size=5
    )


def _kfac_matrix(model, x, y, spec):
    from datatrace.curvature.context import FitContext

    problem = _problem(model, x, y)
    pc = spec.fit(FitContext(problem, 1.0, None, lambda: iter(())))
    return pc.matrix(), problem


def test_kfac_is_exact_gauss_newton_for_one_example_and_one_layer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).double()  # softmax regression
    x, y = torch.randn(1, 4, dtype=torch.float64), torch.tensor([2])
    K, problem = _kfac_matrix(model, x, y, dt.KFAC(damping=1e-3))
    torch.testing.assert_close(K, problem.gauss_newton(), rtol=1e-8, atol=1e-10)


def test_kfac_blocks_are_exact_for_one_example_on_an_mlp():
    torch.manual_seed(1)
    model = MLP().double()
    x, y = torch.randn(1, 5, dtype=torch.float64), torch.tensor([1])
    K, problem = _kfac_matrix(model, x, y, dt.KFAC(damping=1e-3))
    G = problem.gauss_newton()
    sizes = [0, 7 * 5 + 7, 7 * 5 + 7 + 3 * 7 + 3]  # layer boundaries (weights then bias)
    for a, b in itertools.pairwise(sizes):
        torch.testing.assert_close(K[a:b, a:b], G[a:b, a:b], rtol=1e-7, atol=1e-9)
    assert K[: sizes[1], sizes[1] :].abs().max() < 1e-9  # block-diagonal


def test_ekfac_is_never_further_from_gauss_newton_than_kfac(mlp_data):
    model, x, y = mlp_data
    K, problem = _kfac_matrix(model, x, y, dt.KFAC(damping=1e-3))
    E, _ = _kfac_matrix(model, x, y, dt.EKFAC(damping=1e-3))
    G = problem.gauss_newton()
    assert (E - G).norm() <= (K - G).norm() + 1e-10
    # within the layer blocks (what both approximate) EK-FAC is strictly closer
    blocks = [(0, 42), (42, 66)]
    dk = sum((K[a:b, a:b] - G[a:b, a:b]).norm() ** 2 for a, b in blocks) ** 0.5
    de = sum((E[a:b, a:b] - G[a:b, a:b]).norm() ** 2 for a, b in blocks) ** 0.5
    assert de < 0.99 * dk, (de, dk)


def test_kfac_on_a_cnn_runs_and_ekfac_improves(cnn_data):
    model, x, y = cnn_data
    K, problem = _kfac_matrix(model, x, y, dt.KFAC(damping=1e-3))
    E, _ = _kfac_matrix(model, x, y, dt.EKFAC(damping=1e-3))
    G = problem.gauss_newton()
    assert (E - G).norm() <= (K - G).norm() + 1e-10
    corr = torch.corrcoef(torch.stack([E.flatten(), G.flatten()]))[0, 1]
    assert corr > 0.5


def test_ekfac_factors_are_cached_in_the_store(setup, tmp_path, monkeypatch):
    from datatrace.curvature import kfac

    model, x, y, xq, yq = setup
    first = _fit(model, x, y, dt.EKFAC(damping=0.1), store=tmp_path / "s")
    assert (tmp_path / "s" / "curvature-c0-ekfac.safetensors").exists()

    def refuse(*args):
        raise AssertionError("factors should have been loaded from the store")

    monkeypatch.setattr(kfac, "_fit_factors", refuse)
    again = _fit(model, x, y, dt.EKFAC(damping=0.1), store=tmp_path / "s")
    torch.testing.assert_close(
        again.attribute((xq, yq)), first.attribute((xq, yq)), rtol=1e-12, atol=1e-15
    )


def test_datainf_matches_its_formula(setup):
    model, x, y, xq, yq = setup
    fitted = dt.DataInf().fit(
        dt.ClassificationTask(model),
        [dt.Checkpoint.from_module(model)],
        (x, y),
        progress=False,
        block_size=4,
    )
    G, Q = flat_grads(model, x, y), flat_grads(model, xq, yq)
    n = len(x)
    layers = [(0, 42), (42, 66)]  # fc1 (weight+bias), fc2
    expected = torch.zeros(len(xq), n, dtype=torch.float64)
    lam = dt.curvature.damping.GN_FACTOR * (G**2).mean()  # one λ: the Gauss-Newton rule's
    assert fitted.damping == [pytest.approx(float(lam), rel=1e-12)]
    for a, b in layers:
        gl, ql = G[:, a:b], Q[:, a:b]
        for j in range(len(xq)):
            v = ql[j]
            inv_v = sum(v - (gl[i] @ v) / (lam + gl[i] @ gl[i]) * gl[i] for i in range(n))
            inv_v = inv_v / (n * lam)
            expected[j] += inv_v @ gl.T / n
    torch.testing.assert_close(fitted.attribute((xq, yq)), expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "pre", [dt.ExactHessian(damping=0.3), dt.EKFAC(damping=0.3), dt.KFAC(damping=0.3)]
)
def test_influence_self_influence_is_the_diagonal(setup, pre):
    model, x, y, _, _ = setup
    fitted = _fit(model, x, y, pre)
    torch.testing.assert_close(
        fitted.self_influence(), fitted.attribute((x, y)).diagonal(), rtol=1e-9, atol=1e-12
    )


def test_several_checkpoints_are_weighted_and_summed(setup):
    model, x, y, xq, yq = setup
    sd1, sd2 = perturbed(model, 0.2, 1), perturbed(model, 0.2, 2)
    ckpts = [
        dt.Checkpoint.from_state_dict(sd1, weight=0.7),
        dt.Checkpoint.from_state_dict(sd2, weight=0.3),
    ]
    S = _fit(model, x, y, dt.ExactHessian(damping=1.0), ckpts=ckpts).attribute((xq, yq))
    expected = 0.7 * reference(model, x, y, xq, yq, 1.0, sd1)
    expected += 0.3 * reference(model, x, y, xq, yq, 1.0, sd2)
    torch.testing.assert_close(S, expected, rtol=1e-9, atol=1e-12)


def test_default_damping_is_a_multiple_of_mean_squared_gradient(setup):
    model, x, y, _, _ = setup
    lambda0 = (flat_grads(model, x, y) ** 2).mean().item()
    # the exact GN: a fraction of the Hessian rule, itself at least HESSIAN_FLOOR × λ₀
    exact = _fit(model, x, y, dt.GaussNewton()).damping[0]
    floor = dt.curvature.damping.GN_HESSIAN_FRACTION * dt.curvature.damping.HESSIAN_FLOOR * lambda0
    assert exact >= floor * (1 - 1e-9)


def test_linear_regression_closed_form_and_leave_one_out():
    """Influence with damping 2α on least squares + α‖w‖² equals the closed form and predicts
    exact leave-one-out retraining within 1%."""
    torch.manual_seed(0)
    n, d, alpha = 1000, 4, 0.01
    x = torch.randn(n, d, dtype=torch.float64)
    w_true = torch.randn(d, dtype=torch.float64)
    y = x @ w_true + 0.5 * torch.randn(n, dtype=torch.float64)

    def solve(mask):  # argmin (1/n) Σ_{k in mask} (w·x_k − y_k)² + α‖w‖²
        xm, ym = x[mask], y[mask]
        return torch.linalg.solve(
            2 * xm.T @ xm / n + 2 * alpha * torch.eye(d, dtype=x.dtype), 2 * xm.T @ ym / n
        )

    w = solve(torch.ones(n, dtype=torch.bool))
    model = torch.nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w[None])
    xq, yq = torch.randn(6, d, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    fitted = dt.Influence(dt.ExactHessian(damping=2 * alpha)).fit(
        dt.RegressionTask(model), [dt.Checkpoint.from_module(model)], (x, y), progress=False
    )
    idx = list(range(40))
    S = fitted.attribute((xq, yq))[:, idx]
    # closed form: g_i = 2 r_i x_i, q_j = 2 r_j x_j, H = 2 XᵀX / n
    r, rq = x @ w - y, xq @ w - yq
    h = 2 * x.T @ x / n + 2 * alpha * torch.eye(d, dtype=x.dtype)
    closed = (2 * rq[:, None] * xq) @ torch.linalg.solve(h, (2 * r[idx, None] * x[idx]).T) / n
    torch.testing.assert_close(S, closed, rtol=1e-9, atol=1e-14)
    actual = torch.zeros_like(S)
    for k, i in enumerate(idx):
        mask = torch.ones(n, dtype=torch.bool)
        mask[i] = False
        w_i = solve(mask)
        actual[:, k] = (xq @ w_i - yq) ** 2 - (xq @ w - yq) ** 2
    rel = ((S - actual).norm() / actual.norm()).item()
    assert rel < 0.01, rel


def test_bad_influence_settings():
    with pytest.raises(dt.ConfigError, match="damping must be >= 0"):
        dt.ExactHessian(damping=-1.0)
    for cls in (dt.ConjugateGradient, dt.LiSSA, dt.KFAC, dt.EKFAC, dt.GaussNewton):
        with pytest.raises(dt.ConfigError, match="damping"):
            cls(damping=-0.1)
    with pytest.raises(dt.ConfigError, match="max_iter"):
        dt.ConjugateGradient(max_iter=0)
    with pytest.raises(dt.ConfigError, match="preconditioner"):
        dt.Influence("exact")


def test_rank_larger_than_parameter_count(setup):
    model, x, y, _, _ = setup
    with pytest.raises(dt.ConfigError, match=r"rank 1000 is larger than the number of "):
        _fit(model, x, y, dt.Arnoldi(rank=1000, damping=0.1))


def test_lissa_divergence_says_increase_scale(setup):
    model, x, y, xq, yq = setup
    with pytest.raises(dt.ConfigError, match=r"LiSSA diverged.*increase scale"):
        _fit(model, x, y, dt.LiSSA(damping=0.1, scale=1e-3, depth=200)).attribute((xq, yq))


def test_unsupported_module_for_kfac(dict_data, caplog):
    """params=None: every supported layer, the rest listed in the log; an unsupported
    parameter named explicitly is an error (before any gradient pass)."""
    model, batch = dict_data
    task, ckpts = dt.ClassificationTask(model), [dt.Checkpoint.from_module(model)]
    with pytest.raises(dt.ConfigError, match=r"'emb.weight' \(Embedding is not a K-FAC layer"):
        dt.Influence(dt.EKFAC(), params=["emb.weight", "head"]).fit(
            task, ckpts, batch, progress=False
        )
    with caplog.at_level("INFO", logger="datatrace"):
        every = dt.Influence(dt.EKFAC(damping=0.1)).fit(task, ckpts, batch, progress=False)
    assert "left out of the scores" in caplog.text and "emb.weight (Embedding" in caplog.text
    assert every.features.names == ["head.weight", "head.bias"]
    head = dt.Influence(dt.EKFAC(damping=0.1), params=["head"]).fit(
        task, ckpts, batch, progress=False
    )
    S = head.attribute(batch)
    assert S.shape == (8, 8) and S.abs().max() > 0
    torch.testing.assert_close(every.attribute(batch), S, rtol=1e-12, atol=0.0)


def test_hessian_too_large_for_the_exact_path(setup):
    model, x, y, _, _ = setup
    with pytest.raises(dt.ConfigError, match=r"66 parameters.*GB.*max_params=10"):
        _fit(model, x, y, dt.ExactHessian(damping=0.1, max_params=10))


def test_not_positive_definite_hessian_warns(setup):
    model, x, y, _, _ = setup  # random init: not a minimum, H has negative eigenvalues
    assert torch.linalg.eigvalsh(exact_hessian(model, x, y)).min() < 0
    with pytest.warns(dt.InfluenceWarning, match="not positive definite.*GaussNewton"):
        _fit(model, x, y, dt.ExactHessian(damping=0.0))
    with pytest.warns(dt.InfluenceWarning, match="negative curvature"):
        _fit(model, x, y, dt.ConjugateGradient(damping=0.0, max_iter=50)).attribute((x[:2], y[:2]))


def test_stochastic_lissa_on_a_dataset_approximates_exact(setup):
    model, x, y, xq, yq = setup
    ds = torch.utils.data.TensorDataset(x, y)
    task = dt.ClassificationTask(model)
    ckpts = [dt.Checkpoint.from_module(model)]
    exact = dt.Influence(dt.ExactHessian(damping=0.5)).fit(task, ckpts, ds, progress=False)
    lissa = dt.Influence(dt.LiSSA(damping=0.5, depth=300, repeat=4, batch_size=8)).fit(
        task, ckpts, ds, progress=False
    )
    a, b = exact.attribute((xq, yq)), lissa.attribute((xq, yq))
    assert torch.isfinite(b).all()
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.95


def test_indefinite_hessian_is_still_inverted_exactly(setup):
    model, x, y, xq, yq = setup
    from datatrace.curvature.dense import smallest_eigenvalue

    H = exact_hessian(model, x, y)
    true_min = torch.linalg.eigvalsh(H).min().item()
    assert smallest_eigenvalue(H) == pytest.approx(true_min, rel=0.05)
    lam = -true_min / 2  # H + λI indefinite but invertible
    negative = int((torch.linalg.eigvalsh(H) + lam < 0).sum())
    with pytest.warns(dt.InfluenceWarning, match=f"not positive definite \\({negative} of 66"):
        fitted = _fit(model, x, y, dt.ExactHessian(damping=lam))
    ref = reference(model, x, y, xq, yq, lam)
    torch.testing.assert_close(
        fitted.attribute((xq, yq)), ref, rtol=1e-8, atol=1e-10 * ref.abs().max().item()
    )


class TwiceLinear(torch.nn.Module):
    """The same Linear applied twice: its block has no Kronecker closed form."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = torch.nn.Linear(5, 5)
        self.out = torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


class SequenceLinear(torch.nn.Module):
    """A Linear on (batch, time, features): not the per-example-vector case."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(5, 8)
        self.out = torch.nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.proj(x.view(len(x), 1, 5).expand(len(x), 2, 5) * 0.7))
        return self.out(h.mean(1))


@pytest.mark.parametrize(
    ("kind", "layer"),
    [("mlp", "fc1"), ("mlp-weights-only", "fc1"), ("cnn", "fc"), ("twice", "out"),
     ("sequence", "out")],  # proj sees 3-D inputs: not eligible
)  # fmt: skip
def test_structured_hessian_equals_products_and_func_hessian(kind, layer, cnn_data):
    torch.manual_seed(3)
    if kind == "cnn":
        model, x, y = cnn_data
    else:
        model = {"twice": TwiceLinear, "sequence": SequenceLinear}.get(kind, MLP)().double()
        x, y = torch.randn(11, 5, dtype=torch.float64), torch.randint(0, 3, (11,))
    params = dict(model.named_parameters())
    names = [n for n in params if not (kind == "mlp-weights-only" and n == "fc1.bias")]
    problem = CurvatureProblem(
        dt.ClassificationTask(model),
        names,
        {k: v.detach() for k, v in params.items()},
        {},
        ExampleSource((x, y)),
        batch_size=4,
    )
    chosen = problem._kronecker_layer()
    assert (chosen[0] if chosen else None) == layer
    fast = problem.hessian()
    slow = problem.hessian_by_products()
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-12)
    if kind != "mlp-weights-only":
        state = {k: v.detach() for k, v in params.items()}
        torch.testing.assert_close(fast, exact_hessian(model, x, y, state), rtol=1e-9, atol=1e-11)


def test_ldl_inertia_counts_negative_eigenvalues():
    from datatrace.curvature.dense import ldl_inertia

    g = torch.Generator().manual_seed(0)
    for p, shift in [(7, 0.0), (40, 0.3), (40, -0.3), (64, 2.0), (64, -2.0)]:
        a = torch.randn(p, p, generator=g, dtype=torch.float64)
        m = (a + a.T) / 2 + shift * torch.eye(p, dtype=torch.float64)
        factors, pivots = torch.linalg.ldl_factor(m)
        assert ldl_inertia(factors, pivots) == int((torch.linalg.eigvalsh(m) < 0).sum())


def test_kfac_batched_column_pullbacks_equal_one_backward_per_column():
    from torch import nn

    from datatrace.curvature.kfac_passes import _pull_back_columns

    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(5, 7).double(), nn.Linear(7, 3).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    h = lin1(x)
    out = lin2(torch.tanh(h))
    columns = torch.randn(3, 4, 3, dtype=torch.float64)  # (C, *out.shape)
    got = _pull_back_columns(out, [h, out], columns)
    for c in range(3):
        want = torch.autograd.grad(out, [h, out], columns[c], retain_graph=True)
        for i in range(2):
            torch.testing.assert_close(got[i][c], want[i], rtol=1e-12, atol=1e-14)
