"""Random projection: E[PᵀP] = I, inner products within the JL bound, streaming == dense."""

from __future__ import annotations

import math

import pytest
import torch

import datatrace as dt
from datatrace.features.featurizer import GradientFeatures
from datatrace.features.projector import ProjectionSpec, RandomProjector
from datatrace.features.spec import FeatureSpec
from datatrace.grads.per_example import flatten_grads, per_example_grads_loop, select_parameters


@pytest.mark.parametrize("rademacher", [False, True])
def test_expected_gram_is_identity(rademacher):
    p, k, trials = 6, 50, 400
    acc = torch.zeros(p, p, dtype=torch.float64)
    for seed in range(trials):
        P = RandomProjector(ProjectionSpec(k, seed, rademacher), [p]).matrix()  # (p, k) = Pᵀ
        acc += P @ P.T
    mean = acc / trials
    # each entry of PᵀP averages k*trials products of unit-variance/k terms: sd ≈ 1/sqrt(k*trials)
    assert (mean - torch.eye(p, dtype=torch.float64)).abs().max() < 6 / math.sqrt(k * trials)


def test_inner_products_within_the_jl_bound():
    torch.manual_seed(0)
    n, p, k, eps = 30, 2_000, 1_024, 0.25
    x = torch.randn(n, p, dtype=torch.float64)
    proj = RandomProjector(ProjectionSpec(k, seed=3), [p])
    px = proj([x])
    # JL: k >= 8 ln(n) / eps² (= 435 here) keeps all pairwise inner products within
    # eps·‖x‖‖y‖ with high probability
    assert k >= 8 * math.log(n) / eps**2
    err = (px @ px.T - x @ x.T).abs()
    norms = x.norm(dim=1)
    assert (err <= eps * norms[:, None] * norms[None, :]).all()
    rel = (err / (norms[:, None] * norms[None, :])).max().item()
    assert rel < 0.2


def test_streamed_blocks_equal_the_dense_matrix():
    torch.manual_seed(1)
    sizes = [37, 5, 100]
    blocks = [torch.randn(4, s, dtype=torch.float64) for s in sizes]
    small = RandomProjector(
        ProjectionSpec(16, seed=9), sizes, max_block_elems=16 * 7, cache_bytes=0
    )  # slices of 7 rows, regenerated every call
    dense = torch.cat(blocks, dim=1) @ small.matrix()
    torch.testing.assert_close(small(blocks), dense, rtol=1e-12, atol=1e-12)
    big = RandomProjector(ProjectionSpec(16, seed=9), sizes, max_block_elems=16 * 7)
    torch.testing.assert_close(big(blocks), dense, rtol=1e-12, atol=1e-12)  # same P, cached


def test_a_partly_cached_projection_equals_the_dense_matrix_at_every_call():
    """Slices beyond the cache budget are regenerated from their seeds (never the dense
    p × k matrix at once); every call equals the float64 dense product."""
    torch.manual_seed(2)
    sizes = [37, 5, 100]
    blocks = [torch.randn(4, s, dtype=torch.float64) for s in sizes]
    slice_bytes = 7 * 16 * 8  # 7 rows of k = 16 float64
    proj = RandomProjector(
        ProjectionSpec(16, seed=9), sizes, max_block_elems=16 * 7, cache_bytes=3 * slice_bytes
    )
    twin = RandomProjector(ProjectionSpec(16, seed=9), sizes, max_block_elems=16 * 7)
    dense = torch.cat(blocks, dim=1) @ twin.matrix()
    first = proj(blocks)
    assert len(proj._cache) == 3 and proj.regenerated == 142 * 16 - 3 * 7 * 16
    torch.testing.assert_close(first, dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(proj(blocks), dense, rtol=1e-12, atol=1e-12)
    assert len(proj._cache) == 3


def test_projection_is_seeded():
    a = RandomProjector(ProjectionSpec(8, seed=1), [10]).matrix()
    b = RandomProjector(ProjectionSpec(8, seed=1), [10]).matrix()
    c = RandomProjector(ProjectionSpec(8, seed=2), [10]).matrix()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_projected_features_equal_projected_gradients(mlp_data):
    """The factored path projects outer products with the same P as the dense gradient."""
    model, x, y = mlp_data
    task = dt.ClassificationTask(model)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    spec = FeatureSpec(projection_dim=12, projection_seed=4, kronecker=False)
    feats = GradientFeatures(spec, task)
    out = feats.compute(params, buffers, (x, y), False, 0)["proj"]
    names = select_parameters(model, None)
    g, _ = per_example_grads_loop(task, params, buffers, (x, y), names)
    torch.testing.assert_close(
        out, flatten_grads(g, names) @ feats.projector.matrix(), rtol=1e-10, atol=1e-12
    )


def test_projected_tracin_approximates_exact_tracin(mlp_data):
    model, x, y = mlp_data
    task = dt.ClassificationTask(model)
    ck = [dt.Checkpoint.from_module(model)]
    exact = dt.TracIn().fit(task, ck, (x, y), progress=False).attribute((x, y))
    approx = dt.TracIn(projection_dim=2048).fit(task, ck, (x, y), progress=False).attribute((x, y))
    corr = torch.corrcoef(torch.stack([exact.flatten(), approx.flatten()]))[0, 1]
    assert corr > 0.97


def _explicit_kronecker(feats, model, names, k):
    """The (p, k) matrix the Kronecker path applies: rows u_r ⊗ v_r / √k over each hooked
    layer's [weight | bias] gradient (the factors come with U already divided by √k), the
    dense projector's rows over everything else."""
    shapes = dict(model.named_parameters())
    cols = {}
    dense = feats.projector.matrix() if feats.dense_proj_names else None
    offset = 0
    for n in feats.dense_proj_names:
        size = shapes[n].numel()
        cols[n] = dense[offset : offset + size]
        offset += size
    for j, (wname, bname, out_dim, in_dim) in enumerate(feats.units):
        w, b = wname is not None, bname is not None
        u, v = feats.kronecker_projector.factors(j, torch.float64, torch.device("cpu"))
        # rows u_{c,i} ⊗ v_{c,j} of each block c, the first k of them in (c, i, j) order
        m = feats.spec.kronecker_block
        uc, vc = u.view(-1, m, out_dim), v.view(-1, m, in_dim + b)
        rows = torch.einsum("cio,cjn->cijon", uc, vc).reshape(-1, out_dim, in_dim + b)[:k]
        full = rows.permute(1, 2, 0)  # (out, in', k)
        if w:
            cols[wname] = full[:, :in_dim].reshape(out_dim * in_dim, k)
        if b:
            cols[bname] = full[:, -1]
    return torch.cat([cols[n] for n in names])


@pytest.mark.parametrize("block", [1, 3])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "cnn-weights-only"])
def test_kronecker_projection_equals_its_explicit_matrix(kind, block, mlp_data, cnn_data):
    """Factored layers are projected from (a, e) without forming e aᵀ; the result equals the
    explicit Kronecker-row matrix applied to the float64 per-example gradients."""
    model, x, y = cnn_data if kind.startswith("cnn") else mlp_data
    task = dt.ClassificationTask(model)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    sel = ("conv.weight", "fc") if kind == "cnn-weights-only" else None
    feats = GradientFeatures(
        FeatureSpec(
            params=sel, projection_dim=24, projection_seed=3, kronecker=True, kronecker_block=block
        ),
        task,
    )
    assert feats.kr_layers  # the Kronecker path is taken
    out = feats.compute(params, buffers, (x, y), False, 0)["proj"]
    names = select_parameters(model, sel)
    g, _ = per_example_grads_loop(task, params, buffers, (x, y), names)
    P = _explicit_kronecker(feats, model, names, 24)
    torch.testing.assert_close(out, flatten_grads(g, names) @ P, rtol=1e-10, atol=1e-12)


def test_kronecker_projection_preserves_inner_products_on_average(mlp_data):
    """E[φ(z)·φ(z')] = g·g': the mean over 300 seeds is within a few percent."""
    model, x, y = mlp_data
    task = dt.ClassificationTask(model)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    names = select_parameters(model, None)
    g, _ = per_example_grads_loop(task, params, buffers, (x[:4], y[:4]), names)
    exact = flatten_grads(g, names) @ flatten_grads(g, names).T
    total = torch.zeros_like(exact)
    for seed in range(300):
        feats = GradientFeatures(FeatureSpec(projection_dim=32, projection_seed=seed), task)
        phi = feats.compute(params, buffers, (x[:4], y[:4]), False, 0)["proj"]
        total += phi @ phi.T
    err = (total / 300 - exact).abs().max() / exact.abs().max()
    assert err < 0.05, err


def test_each_checkpoint_gets_an_independent_projection(mlp_data):
    """Projection errors average out over checkpoints: 8 copies of one checkpoint (weight
    1/8 each) estimate the exact scores with about 1/√8 of one projection's error."""
    model, x, y = mlp_data
    task = dt.ClassificationTask(model)
    q = (x[:6], y[:6])
    exact = dt.TracIn().fit(task, [dt.Checkpoint.from_module(model)], (x, y), progress=False)
    S = exact.attribute(q)
    errors = {}
    for copies in (1, 8):
        ckpts = [dt.Checkpoint.from_module(model, weight=1 / copies)] * copies
        errs = []
        for seed in range(4):
            fitted = dt.TracIn(projection_dim=16, projection_seed=seed).fit(
                task, ckpts, (x, y), progress=False
            )
            errs.append(float((fitted.attribute(q) - S).norm() / S.norm()))
        errors[copies] = sum(errs) / len(errs)
    assert errors[8] < 0.6 * errors[1], errors
    specs = [f.spec for f in fitted.checkpoint_features]
    assert len({s.projection_seed for s in specs}) == 8 and specs[0].projection_seed == 3
