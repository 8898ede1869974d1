"""The iterative solvers' defaults (issue 12): block CG, LiSSA's minibatches, Arnoldi's
complement, each against ``torch.linalg.solve`` of the exact damped Hessian in float64."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from test_influence import _fit, exact_hessian, reference

import datatrace as dt
from datatrace.curvature.arnoldi import EigenPreconditioner
from datatrace.curvature.cg import CG_TOL, CGPreconditioner
from datatrace.curvature.dense import CholeskyPreconditioner
from datatrace.curvature.lissa import neumann_depth
from datatrace.curvature.matrix_free import MatrixFree, exact_is_cheaper


class _Dense:
    """A stand-in for the curvature problem: products with a given symmetric matrix."""

    def __init__(self, matrix: torch.Tensor) -> None:
        self.matrix = matrix

    def mean_product(self, vectors: torch.Tensor, gauss_newton: bool) -> torch.Tensor:
        return vectors @ self.matrix


def _spd(p: int, seed: int, spread: float = 1e3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64))
    evals = torch.logspace(0, torch.log10(torch.tensor(spread)).item(), p, dtype=torch.float64)
    return (q * evals) @ q.T / spread


def test_block_cg_matches_linalg_solve_for_many_right_hand_sides():
    p, m, lam = 60, 25, 1e-3
    H = _spd(p, 0)
    g = torch.Generator().manual_seed(1)
    V = torch.randn(m, p, generator=g, dtype=torch.float64)
    V[3] = 0.0  # a zero right-hand side solves to zero, not NaN
    V[4] *= 1e6  # the tolerance is relative to each right-hand side
    pc = CGPreconditioner(MatrixFree(_Dense(H), False, lam), None, 1e-10)  # type: ignore[arg-type]
    X = pc.solve(V)
    ref = torch.linalg.solve(H + lam * torch.eye(p, dtype=torch.float64), V.T).T
    torch.testing.assert_close(X, ref, rtol=1e-8, atol=1e-8 * ref.abs().max().item())
    assert X[3].abs().max() == 0
    # block CG is exact after ⌈p/m⌉ = 3 iterations in exact arithmetic; round-off costs a few
    assert pc.iterations <= 6, pc.iterations
    assert pc.residual <= 1e-10


def test_block_cg_needs_fewer_iterations_than_one_right_hand_side_at_a_time():
    p, lam = 80, 1e-4
    H = _spd(p, 2, spread=1e4)
    V = torch.randn(20, p, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    block = CGPreconditioner(MatrixFree(_Dense(H), False, lam), None, 1e-8)  # type: ignore[arg-type]
    block.solve(V)
    single = CGPreconditioner(MatrixFree(_Dense(H), False, lam), 500, 1e-8)  # type: ignore[arg-type]
    single.solve(V[:1])
    assert block.iterations <= 10 < single.iterations, (block.iterations, single.iterations)


def test_cg_default_iteration_on_the_model_matches_the_exact_damped_hessian(setup):
    """The default budget and tolerance (1e-6) of the iteration (max_exact_params=0: the
    small model would otherwise be solved exactly)."""
    model, x, y, xq, yq = setup
    pre = dt.ConjugateGradient(damping=0.5, max_exact_params=0)
    assert (pre.max_iter, pre.tol, CG_TOL) == (None, None, 1e-6)
    fitted = _fit(model, x, y, pre, batch_size=7)
    S = fitted.attribute((xq, yq))
    assert fitted.preconditioners[0].exact is None
    assert fitted.preconditioners[0].iterations > 0
    ref = reference(model, x, y, xq, yq, 0.5)
    torch.testing.assert_close(S, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert fitted.preconditioners[0].residual <= 1e-6


def test_cg_that_stops_before_converging_warns(setup):
    model, x, y, xq, yq = setup
    with pytest.warns(dt.InfluenceWarning, match=r"stopped after 1 iterations.*max_iter"):
        _fit(model, x, y, dt.ConjugateGradient(damping=0.5, max_iter=1)).attribute((xq, yq))


def test_eigen_solve_with_complement_is_the_inverse_of_the_truncated_hessian():
    """``U(Λ+λ)⁻¹Uᵀ + (I−UUᵀ)/λ = (UΛUᵀ + λI)⁻¹`` exactly, for any r."""
    p, r, lam = 30, 7, 0.3
    H = _spd(p, 4) - 0.2 * torch.eye(p, dtype=torch.float64)  # some negative eigenvalues
    evals, evecs = torch.linalg.eigh(H)
    top = evals.abs().argsort(descending=True)[:r]
    U, L = evecs[:, top], evals[top]
    V = torch.randn(4, p, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = EigenPreconditioner(L, U, lam).solve(V)
    Hr = (U * L) @ U.T
    ref = torch.linalg.solve(Hr + lam * torch.eye(p, dtype=torch.float64), V.T).T
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)


def test_arnoldi_is_exact_at_full_rank_and_degrades_gracefully(setup):
    model, x, y, xq, yq = setup
    p = sum(t.numel() for t in model.parameters())
    ref = reference(model, x, y, xq, yq, 0.5)
    errors = {}
    for rank in (5, 20, p):
        S = _fit(model, x, y, dt.Arnoldi(rank=rank, damping=0.5)).attribute((xq, yq))
        errors[rank] = float((S - ref).norm() / ref.norm())
    assert errors[p] < 1e-9, errors
    assert errors[5] > errors[20] > errors[p], errors
    # the rank-5 error is the complement's: H ≈ 0 on it. Without the complement (old
    # behaviour) the scores would miss every direction outside the top 5 entirely.
    assert errors[5] < 1.0, errors


def test_arnoldi_damping_has_an_effect_below_full_rank(setup):
    model, x, y, xq, yq = setup
    a = _fit(model, x, y, dt.Arnoldi(rank=5, damping=0.5)).attribute((xq, yq))
    b = _fit(model, x, y, dt.Arnoldi(rank=5, damping=2.0)).attribute((xq, yq))
    assert float((a - b).norm() / a.norm()) > 0.1


def test_lissa_defaults_minibatches_of_64_as_the_readme_says():
    pre = dt.LiSSA()
    assert pre.batch_size == 64
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    line = re.search(r"dt\.Influence\(dt\.LiSSA\((.*)\)\)", readme)
    assert line is not None
    settings = dict(kv.split("=") for kv in line.group(1).replace(" ", "").split(","))
    assert settings["batch_size"] == str(pre.batch_size)
    assert settings["depth"] == str(pre.depth)


def test_lissa_default_depth_converges_on_a_well_damped_problem(setup, caplog):
    """Full batch (n < 64) and the automatic depth: every eigencomponent of the solution is
    within 1% (the remainder bound (1 − λ/scale)^depth ≤ 1% of H + λI positive definite)."""
    model, x, y, xq, yq = setup
    H = exact_hessian(model, x, y)
    lam = 0.5
    evals = torch.linalg.eigvalsh(H)
    assert float(evals.min()) + lam > 0  # positive definite
    with caplog.at_level("INFO", logger="datatrace"):
        fitted = _fit(model, x, y, dt.LiSSA(damping=lam))
    pc = fitted.preconditioners[0]
    assert pc.depth == max(20, math.ceil(math.log(100) / -math.log1p(-lam / pc.scale)))
    assert (1 - lam / pc.scale) ** pc.depth <= 0.01
    assert f"depth {pc.depth}" in caplog.text
    S = fitted.attribute((xq, yq))
    ref = reference(model, x, y, xq, yq, lam)
    assert float((S - ref).norm() / ref.norm()) < 0.01


def test_lissa_default_solves_exactly_when_the_recursion_would_cost_more(setup, caplog):
    """A 66-parameter float64 MLP: the recursion's products (depth × batch × queries) exceed
    forming H (p × n), so the default solves exactly: equal to the exact damped solve to
    round-off, logged; depth=... or max_exact_params=0 run the recursion (an estimate)."""
    model, x, y, xq, yq = setup
    lam = 0.5
    ref = reference(model, x, y, xq, yq, lam)
    with caplog.at_level("INFO", logger="datatrace"):
        fitted = _fit(model, x, y, dt.LiSSA(damping=lam))
        S = fitted.attribute((xq, yq))
    pc = fitted.preconditioners[0]
    p, n = sum(v.numel() for v in model.parameters()), len(x)
    assert pc.depth * min(64, n) * len(xq) >= p * n and pc.exact is not None
    assert "solved exactly (the series' limit)" in caplog.text
    torch.testing.assert_close(S, ref, rtol=1e-9, atol=1e-12 * float(ref.abs().max()))
    for spec in (dt.LiSSA(damping=lam, max_exact_params=0), dt.LiSSA(damping=lam, depth=pc.depth)):
        rec = _fit(model, x, y, spec)
        R = rec.attribute((xq, yq))
        assert rec.preconditioners[0].exact is None
        err = float((R - ref).norm() / ref.norm())
        assert 1e-9 < err < 0.01  # the recursion: close, not equal
    with pytest.raises(dt.ConfigError, match="max_exact_params"):
        dt.LiSSA(max_exact_params=-1)


class _Sized:
    """A stand-in problem for the cost rule: p parameters, n examples, vector group g."""

    def __init__(self, p: int, n: int, g: int) -> None:
        self.p, self.n, self.g = p, n, g

    def _vector_group(self, minimum: int) -> int:
        return max(minimum, self.g)


def test_exact_is_cheaper_counts_products_in_vector_groups():
    """Iteration: passes × vectors (rounded up to whole groups) × examples per pass; the
    matrix: p (rounded up) × n; only for p <= max_exact_params."""
    prob = _Sized(p=100, n=50, g=10)  # forming H: 10 groups × 10 × 50 = 5,000 products
    assert exact_is_cheaper(prob, 10, 1, 50, 10_000)  # 10 passes × 1 group × 10 × 50
    assert not exact_is_cheaper(prob, 9, 1, 50, 10_000)  # one vector costs a whole group
    assert exact_is_cheaper(prob, 5, 11, 50, 10_000)  # 11 vectors: 2 groups
    assert not exact_is_cheaper(prob, 5, 10, 50, 10_000)
    assert not exact_is_cheaper(prob, 10, 1, 49, 10_000)  # minibatches of 49
    assert not exact_is_cheaper(prob, 10**6, 1, 50, 99)  # p above the limit
    assert not exact_is_cheaper(prob, 10**6, 1, 50, 0)  # 0: never


def test_cg_default_solves_exactly_when_cheaper(setup, caplog):
    """The default budget (2⌈p/m⌉ + 10 iterations of m products) exceeds forming H: the
    default equals the exact damped solve to round-off, logged; explicit max_iter, tol or
    max_exact_params=0 keep the iteration (close, not equal)."""
    model, x, y, xq, yq = setup
    lam = 0.5
    ref = reference(model, x, y, xq, yq, lam)
    with caplog.at_level("INFO", logger="datatrace"):
        fitted = _fit(model, x, y, dt.ConjugateGradient(damping=lam))
        S = fitted.attribute((xq, yq))
    pc = fitted.preconditioners[0]
    assert isinstance(pc.exact, CholeskyPreconditioner) and pc.iterations == 0
    assert "solved exactly (what CG converges to)" in caplog.text
    torch.testing.assert_close(S, ref, rtol=1e-9, atol=1e-12 * float(ref.abs().max()))
    for spec in (
        dt.ConjugateGradient(damping=lam, max_exact_params=0),
        dt.ConjugateGradient(damping=lam, max_iter=500),
        dt.ConjugateGradient(damping=lam, tol=1e-6),
    ):
        it = _fit(model, x, y, spec)
        R = it.attribute((xq, yq))
        assert it.preconditioners[0].exact is None and it.preconditioners[0].iterations > 0
        err = float((R - ref).norm() / ref.norm())
        assert 1e-12 < err < 1e-4, (spec, err)
    with pytest.raises(dt.ConfigError, match="max_exact_params"):
        dt.ConjugateGradient(max_exact_params=-1)


def test_arnoldi_default_solves_exactly_when_cheaper(setup, caplog):
    """A 66-parameter model: min(p, 2 × 50 + 20) = 66 single-vector products cost more than
    forming H, so the default factorizes ``H + λI`` (Arnoldi at full rank): equal to the
    exact damped solve and to explicit full-rank Arnoldi; explicit rank or n_iter, or
    max_exact_params=0, keep Arnoldi's eigenpairs."""
    model, x, y, xq, yq = setup
    lam = 0.5
    p = sum(t.numel() for t in model.parameters())
    ref = reference(model, x, y, xq, yq, lam)
    with caplog.at_level("INFO", logger="datatrace"):
        fitted = _fit(model, x, y, dt.Arnoldi(damping=lam))
        S = fitted.attribute((xq, yq))
    assert isinstance(fitted.preconditioners[0], CholeskyPreconditioner)
    assert "solved exactly (Arnoldi at full rank)" in caplog.text
    torch.testing.assert_close(S, ref, rtol=1e-9, atol=1e-12 * float(ref.abs().max()))
    full = _fit(model, x, y, dt.Arnoldi(rank=p, damping=lam))
    assert isinstance(full.preconditioners[0], EigenPreconditioner)
    A = full.attribute((xq, yq))
    torch.testing.assert_close(S, A, rtol=1e-8, atol=1e-10 * float(ref.abs().max()))
    for spec in (
        dt.Arnoldi(damping=lam, max_exact_params=0),
        dt.Arnoldi(damping=lam, n_iter=30),
        dt.Arnoldi(damping=lam, rank=50),
    ):
        it = _fit(model, x, y, spec)
        assert isinstance(it.preconditioners[0], EigenPreconditioner), spec
        assert it.preconditioners[0].evals.numel() == 50  # rank min(50, p); n_iter >= rank
    with pytest.raises(dt.ConfigError, match="max_exact_params"):
        dt.Arnoldi(max_exact_params=-1)


def test_lissa_depth_rule_is_clipped():

    assert neumann_depth(10.0, 1.0) == math.ceil(math.log(100) / -math.log1p(-0.1))  # 44
    assert neumann_depth(10.0, 0.0) == 1000
    assert neumann_depth(1e6, 1e-6) == 1000
    assert neumann_depth(1.0, 2.0) == 20


@pytest.fixture
def setup(mlp_data):
    model, x, y = mlp_data
    return model, x, y, x[:5] + 0.05, y[:5]


# -- dt.Influence() without a preconditioner ------------------------------------------------


def _auto(model, data, caplog, **auto):
    from datatrace.curvature.auto import AutoPreconditioner

    method = dt.Influence(AutoPreconditioner(**auto)) if auto else dt.Influence()
    task, ckpts = dt.ClassificationTask(model), [dt.Checkpoint.from_module(model)]
    with caplog.at_level("INFO", logger="datatrace"):
        fitted = method.fit(task, ckpts, data, progress=False)
    return fitted, task, ckpts


def test_influence_without_a_preconditioner_is_exact_on_a_small_model(setup, caplog):
    model, x, y, xq, yq = setup
    fitted, task, ckpts = _auto(model, (x, y), caplog)
    assert "preconditioner ExactHessian (66 parameters <= max_exact_params=10,000)" in caplog.text
    want = dt.Influence(dt.ExactHessian()).fit(task, ckpts, (x, y), progress=False)
    torch.testing.assert_close(fitted.attribute((xq, yq)), want.attribute((xq, yq)))
    assert fitted.damping == want.damping


def test_influence_without_a_preconditioner_is_ekfac_above_the_limit(setup, caplog):
    model, x, y, xq, yq = setup
    fitted, task, ckpts = _auto(model, (x, y), caplog, max_exact_params=50)
    assert "preconditioner EKFAC (66 parameters > max_exact_params=50" in caplog.text
    want = dt.Influence(dt.EKFAC()).fit(task, ckpts, (x, y), progress=False)
    torch.testing.assert_close(fitted.attribute((xq, yq)), want.attribute((xq, yq)))


def test_influence_without_a_preconditioner_is_cg_where_ekfac_cannot_take_a_layer(
    dict_data, caplog
):
    model, batch = dict_data  # an nn.Embedding: not a K-FAC layer
    fitted, task, ckpts = _auto(model, batch, caplog, max_exact_params=10)
    assert "preconditioner ConjugateGradient" in caplog.text
    assert "EK-FAC cannot take every layer" in caplog.text and "emb.weight" in caplog.text
    want = dt.Influence(dt.ConjugateGradient()).fit(task, ckpts, batch, progress=False)
    torch.testing.assert_close(fitted.attribute(batch), want.attribute(batch))
    # and CG there is the exact damped solve (to its tolerance)
    exact = dt.Influence(dt.ExactHessian(damping=fitted.damping[0])).fit(
        task, ckpts, batch, progress=False
    )
    ref = exact.attribute(batch)
    torch.testing.assert_close(
        fitted.attribute(batch), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item()
    )


def test_datatrace_forward_mode_ad_emits_no_third_party_warning():
    """A fresh process, every warning an error: Gauss-Newton products, the exact Hessian's
    Kronecker block (jacfwd) and EK-FAC's output Hessians run forward-mode AD first."""
    import subprocess
    import sys

    from conftest import single_process_env

    code = """
import warnings
warnings.simplefilter("error")
import torch
import datatrace as dt
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
x, y = torch.randn(30, 4), torch.randint(0, 3, (30,))
task, ck = dt.ClassificationTask(model), [dt.Checkpoint.from_module(model)]
for pre in (dt.ExactHessian(damping=1.0), dt.GaussNewton(damping=1.0), dt.EKFAC()):
    dt.Influence(pre).fit(task, ck, (x, y), progress=False).attribute((x[:2], y[:2]))
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=single_process_env()
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_influence_without_a_preconditioner_is_ekfac_on_a_transformers_supported_layers(caplog):
    """Tiny BERT and GPT-2 (built from configs): 22-30k parameters, embeddings/LayerNorms
    not K-FAC layers. With params=None ``Influence()`` takes EK-FAC on the Linear/Conv1D
    layers (most of the parameters), not CG on everything; the scores are dt.EKFAC()'s.
    Only a requested parameter EK-FAC cannot take sends it to CG."""
    from test_kfac_models import _bert, _bert_data, _fit_bert, _fit_lm, _gpt2, _lm_data

    from datatrace.core.data import ExampleSource
    from datatrace.curvature.auto import AutoPreconditioner, Choice

    model, batch = _bert(), _bert_data(8, seed=2)
    with caplog.at_level("INFO", logger="datatrace"):
        fitted = _fit_bert(model, batch, None)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    p = sum(sizes.values())
    kept = [n for n in sizes if "embeddings" not in n and "LayerNorm" not in n]
    share = sum(sizes[n] for n in kept) / p
    assert p == 22_595 and round(share, 2) == 0.80
    assert (
        f"preconditioner EKFAC ({p:,} parameters > max_exact_params=10,000; EK-FAC's layers "
        f"hold {share:.0%} of them (left out of the scores: bert.embeddings.word_embeddings"
    ) in caplog.text
    assert fitted.features.names == kept
    queries = {k: v[:3] for k, v in batch.items()}
    want = _fit_bert(model, batch, dt.EKFAC())
    torch.testing.assert_close(fitted.attribute(queries), want.attribute(queries))

    caplog.clear()
    gpt = _gpt2()
    with caplog.at_level("INFO", logger="datatrace"):
        _fit_lm(gpt, _lm_data(), None)
    assert "preconditioner EKFAC (29," in caplog.text and "transformer.wte.weight" in caplog.text

    # the user asks for an embedding: EK-FAC cannot take it, so CG on what was asked for
    task = dt.ClassificationTask(model)
    asked = ("bert.embeddings.word_embeddings.weight", "classifier.weight")
    kind, names, why = AutoPreconditioner(max_exact_params=100).decide(
        task, list(asked), asked, ExampleSource(batch, "training data")
    )
    assert kind is Choice.CG and names == list(asked)
    assert "EK-FAC cannot take every layer asked for" in why and "word_embeddings" in why


def test_auto_choice_is_cg_when_the_supported_layers_hold_too_little(dict_data):
    from datatrace.core.data import ExampleSource
    from datatrace.curvature.auto import EKFAC_MIN_SHARE, AutoPreconditioner, Choice

    model, batch = dict_data  # embedding 44 parameters, head 10: 19% < 50%
    kind, names, why = AutoPreconditioner(max_exact_params=10).decide(
        dt.ClassificationTask(model), ["emb.weight", "head.weight", "head.bias"], None,
        ExampleSource(batch, "training data"),
    )  # fmt: skip
    assert EKFAC_MIN_SHARE == 0.5
    assert kind is Choice.CG and len(names) == 3 and "hold 19% < 50%" in why


def test_lissa_counts_a_recursion_step_as_lissa_step_cost_products(setup, monkeypatch):
    """The exact switch counts each recursion step's products LISSA_STEP_COST times (small
    sequential minibatches cost more per product than forming H in vmapped chunks)."""
    from datatrace.curvature import lissa

    model, x, y, xq, yq = setup
    seen = []

    def spy(problem, passes, vectors, examples, max_exact_params):  # type: ignore[no-untyped-def]
        seen.append((passes, vectors, examples))
        return False

    monkeypatch.setattr(lissa, "exact_is_cheaper", spy)
    fitted = _fit(model, x, y, dt.LiSSA(damping=0.5, repeat=2))
    fitted.attribute((xq, yq))
    pc = fitted.preconditioners[0]
    assert lissa.LISSA_STEP_COST == 4
    assert seen and seen[0] == (4 * 2 * pc.depth, len(xq), min(64, len(x)))
