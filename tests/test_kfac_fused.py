"""Fused K-FAC/EK-FAC influence (datatrace.methods.kronecker, no stored training features)
against its slow twins, in float64: the stored-feature path (features formed by the generic
featurizer, preconditioned by ``solve``), and the dense eigen-corrected Kronecker matrix."""

from __future__ import annotations

import pytest
import torch
from conftest import perturbed

import datatrace as dt
from datatrace.curvature.kfac_passes import example_sqnorms
from datatrace.methods.kronecker import FittedKroneckerInfluence


def _both(task, ckpts, train, spec, tmp_path, **kw):
    fused = dt.Influence(spec, **kw).fit(task, ckpts, train)
    stored = dt.Influence(spec, **kw).fit(task, ckpts, train, store=tmp_path / "s")
    assert isinstance(fused, FittedKroneckerInfluence)
    assert not isinstance(stored, FittedKroneckerInfluence)
    return fused, stored


@pytest.mark.parametrize("spec", [dt.EKFAC(), dt.KFAC(damping=0.05), dt.EKFAC(fisher="sampled")])
def test_fused_scores_equal_the_stored_feature_path_on_an_mlp(mlp_data, tmp_path, spec):
    model, x, y = mlp_data
    task = dt.ClassificationTask(model)
    ckpts = [
        dt.Checkpoint.from_state_dict(perturbed(model, 0.05, 3), weight=2.0),
        dt.Checkpoint.from_module(model, weight=1.0),
    ]
    fused, stored = _both(task, ckpts, (x, y), spec, tmp_path)
    # λ₀ measured in the factor pass (fused) = λ₀ from the stored features
    assert fused.lambda0 == pytest.approx(stored.lambda0, rel=1e-12)
    assert fused.damping == pytest.approx(stored.damping, rel=1e-12)
    q = (x[:4] + 0.1, y[:4])
    torch.testing.assert_close(fused.attribute(q), stored.attribute(q), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(
        fused.self_influence(), stored.self_influence(), rtol=1e-10, atol=1e-14
    )
    # blocks smaller than the data and batches that do not divide it
    small = dt.Influence(spec).fit(task, ckpts, (x, y), batch_size=5, block_size=7)
    torch.testing.assert_close(small.attribute(q), stored.attribute(q), rtol=1e-10, atol=1e-14)


def test_fused_scores_equal_the_stored_feature_path_on_a_cnn(cnn_data, tmp_path):
    model, x, y = cnn_data
    task = dt.ClassificationTask(model)
    fused, stored = _both(task, [dt.Checkpoint.from_module(model)], (x, y), dt.EKFAC(), tmp_path)
    q = (x[:3], y[:3])
    torch.testing.assert_close(fused.attribute(q), stored.attribute(q), rtol=1e-10, atol=1e-14)


def test_fused_ekfac_equals_the_dense_eigen_corrected_kronecker_solve(mlp_data):
    """S = (1/n) Q (G_E + λI)⁻¹ Gᵀ with G_E the explicit EK-FAC matrix and the per-example
    gradients from torch.func: the fused path's scores, to round-off."""
    model, x, y = mlp_data
    task = dt.ClassificationTask(model)
    fitted = dt.Influence(dt.EKFAC(damping=0.02)).fit(
        task, [dt.Checkpoint.from_module(model)], (x, y)
    )
    pc = fitted.preconditioners[0]
    G_E = pc.matrix()
    lam = pc.damping
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def per_example(xs, ys, measurement):
        def f(p, xi, yi):
            fn = task.measurement if measurement else task.loss
            return fn(
                lambda inp: torch.func.functional_call(model, p, (inp,)), (xi[None], yi[None])
            )[0]

        g = torch.func.vmap(torch.func.grad(f), in_dims=(None, 0, 0))(params, xs, ys)
        return torch.cat([g[n].reshape(len(xs), -1) for n in names], 1)

    xq, yq = x[:5] * 1.3, y[:5]
    Q, G = per_example(xq, yq, True), per_example(x, y, False)
    want = (
        Q @ torch.linalg.solve(G_E + lam * torch.eye(G_E.shape[0], dtype=G_E.dtype), G.T) / len(x)
    )
    torch.testing.assert_close(fitted.attribute((xq, yq)), want, rtol=1e-8, atol=1e-12)


def test_fused_scores_equal_the_stored_path_on_a_tiny_gpt2_with_padding(tmp_path):
    from test_language import padded_batch, tiny_gpt2

    model = tiny_gpt2()
    task = dt.LanguageModelingTask(model)
    train = padded_batch(8, 9, seed=1)
    queries = padded_batch(3, 9, seed=2)
    for spec in (dt.EKFAC(samples=2), dt.KFAC()):
        layers = ["transformer.h.0.mlp.c_fc", "transformer.h.1.attn.c_attn"]
        ckpts = [dt.Checkpoint.from_module(model)]
        fused, stored = _both(task, ckpts, train, spec, tmp_path, params=layers)
        assert fused.lambda0 == pytest.approx(stored.lambda0, rel=1e-10)
        torch.testing.assert_close(
            fused.attribute(queries), stored.attribute(queries), rtol=1e-9, atol=1e-13
        )


@pytest.mark.parametrize("shape", [(3, 1, 4, 5), (3, 2, 40, 50), (3, 30, 4, 5)])
def test_example_sqnorms_from_factors_equal_the_formed_gradients(shape):
    b, positions, n_in, n_out = shape
    g = torch.Generator().manual_seed(0)
    a = torch.randn(b, positions, n_in, generator=g, dtype=torch.float64)
    e = torch.randn(b, positions, n_out, generator=g, dtype=torch.float64)
    formed = torch.einsum("bpo,bpi->boi", e, a)
    torch.testing.assert_close(example_sqnorms(a, e), (formed**2).sum((1, 2)), rtol=1e-12, atol=0)
