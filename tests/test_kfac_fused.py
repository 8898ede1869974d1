"""Fused K-FAC/EK-FAC influence (datatrace.methods.kronecker, no stored training features)
against its slow twins, in float64: the stored-feature path (features formed by the generic
featurizer, preconditioned by ``solve``), and the dense eigen-corrected Kronecker matrix."""

from __future__ import annotations

import pytest
import torch
from conftest import perturbed

import datatrace as dt
from datatrace.curvature.kfac_layers import live_positions, nonzero_rows
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
    # no gradient pass for λ₀ without stored features: the default damping needs none
    assert fused.lambda0 == [None, None] and None not in stored.lambda0
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
    """The slow twin, built independently with torch.func: per-example output Hessian roots
    R_i, pseudo-gradients G_ic = Σ_o R_i[o, c] ∂f_o/∂θ, EK-FAC eigenvalues
    Λ = (1/n) Σ_ic (U_Sᵀ G_ic U_A)² in the fit's Kronecker eigenbasis, the dense matrix
    (U_S ⊗ U_A) diag(Λ) (U_S ⊗ U_A)ᵀ per layer, and S = (1/n) Q (G_E + λI)⁻¹ Gᵀ."""
    model, x, y = mlp_data
    task = dt.ClassificationTask(model)
    lam = 0.02
    fitted = dt.Influence(dt.EKFAC(damping=lam, fisher="exact")).fit(
        task, [dt.Checkpoint.from_module(model)], (x, y)
    )
    layers = {lay.name: lay for lay in fitted.preconditioners[0].layers}
    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(params)

    def logits(p, xi):
        return torch.func.functional_call(model, p, (xi[None],))[0]

    jac = torch.func.vmap(torch.func.jacrev(logits), in_dims=(None, 0))(params, x)  # (n, 3, ...)
    prob = torch.softmax(torch.func.vmap(logits, in_dims=(None, 0))(params, x), -1)
    h_out = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]
    evals, evecs = torch.linalg.eigh(h_out)
    roots = evecs * evals.clamp_min(0).sqrt()[:, None, :]  # (n, outputs, columns)
    n = len(x)
    blocks = []
    for name, lay in layers.items():
        w = torch.einsum("noc,noij->ncij", roots, jac[f"{name}.weight"])
        b = torch.einsum("noc,noi->nci", roots, jac[f"{name}.bias"])
        G = torch.cat([w, b[..., None]], -1)  # (n, columns, out, in + 1)
        rot = lay.us.T @ G @ lay.ua
        eig = (rot**2).sum((0, 1)) / n
        torch.testing.assert_close(lay.lam, eig, rtol=1e-10, atol=1e-14)
        K = torch.kron(lay.us, lay.ua)  # vec(U_S X U_Aᵀ) = K vec(X), row-major
        dense = K @ torch.diag(eig.flatten()) @ K.T  # in [W | b] row-major order
        d_out, d_in = lay.module.weight.shape
        idx = torch.arange(d_out * (d_in + 1)).view(d_out, d_in + 1)
        order = torch.cat([idx[:, :d_in].flatten(), idx[:, d_in]])  # W row-major, then b
        blocks.append(dense[order][:, order])
    G_E = torch.block_diag(*blocks)

    def per_example(xs, ys, measurement):
        fn = task.measurement if measurement else task.loss

        def f(p, xi, yi):
            return fn(
                lambda inp: torch.func.functional_call(model, p, (inp,)), (xi[None], yi[None])
            )[0]

        g = torch.func.vmap(torch.func.grad(f), in_dims=(None, 0, 0))(params, xs, ys)
        return torch.cat([g[k].reshape(len(xs), -1) for k in names], 1)

    xq, yq = x[:5] * 1.3, y[:5]
    Q, G = per_example(xq, yq, True), per_example(x, y, False)
    eye = torch.eye(G_E.shape[0], dtype=G_E.dtype)
    want = Q @ torch.linalg.solve(G_E + lam * eye, G.T) / n
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
        assert fused.damping == pytest.approx(stored.damping, rel=1e-10)
        torch.testing.assert_close(
            fused.attribute(queries), stored.attribute(queries), rtol=1e-9, atol=1e-13
        )


def test_fused_scores_in_query_chunks_equal_scoring_all_queries_at_once(mlp_data):
    """``attribute`` scores the queries in the chunks of the memory plan
    (``score_blocks(rows=...)``); the fused path fills each chunk's rows exactly."""
    model, x, y = mlp_data
    task = dt.ClassificationTask(model)
    fused = dt.Influence(dt.EKFAC()).fit(task, [dt.Checkpoint.from_module(model)], (x, y))
    q = (x[:7] + 0.1, y[:7])
    whole = torch.cat([s for _, s in fused.score_blocks(q)], dim=1)
    for a, b in [(0, 3), (3, 7), (5, 6)]:
        part = torch.cat([s for _, s in fused.score_blocks(q, rows=(a, b))], dim=1)
        torch.testing.assert_close(part, whole[a:b], rtol=1e-12, atol=1e-15)


def test_fused_query_chunks_follow_the_memory_budget_and_score_the_same(mlp_data):
    """The fused path's query chunks are sized by what the budget leaves after the factors,
    parameters and batches (one chunk, one pass over the training data, when the queries
    fit); a budget that fits 3 queries per chunk gives equal chunks covering every query,
    and the same scores to round-off."""
    model, x, y = mlp_data
    task = dt.ClassificationTask(model)
    ckpt = [dt.Checkpoint.from_module(model)]
    roomy = dt.Influence(dt.EKFAC()).fit(task, ckpt, (x, y))
    tight = dt.Influence(dt.EKFAC()).fit(task, ckpt, (x, y), batch_size=roomy.batch_size)
    assert isinstance(roomy, FittedKroneckerInfluence)
    assert isinstance(tight, FittedKroneckerInfluence)
    q = (x[:7] + 0.1, y[:7])
    assert roomy.query_chunks(7) == [(0, 7)]
    factors = sum(
        t.numel() * 8 for lay in roomy._kron(0).layers for t in (lay.A, lay.S, lay.ua, lay.us)
    )
    assert roomy.held_bytes() > factors
    row = roomy.query_row_bytes()
    assert row == sum(p.numel() for p in model.parameters()) * 8  # every layer is K-FAC's
    tight.memory_budget = 0
    fixed = tight.held_bytes()  # parameters and factors; batches take budget // 20 on top
    tight.memory_budget = (fixed + 3 * row + row // 2) * 20 // 19 + 1
    assert tight.query_chunks(7) == [(0, 3), (3, 6), (6, 7)]
    assert tight.query_chunks(8) == [(0, 3), (3, 6), (6, 8)]
    assert tight.query_chunks(0) == []
    torch.testing.assert_close(tight.attribute(q), roomy.attribute(q), rtol=1e-10, atol=1e-13)


def test_fused_scores_of_blocks_of_several_batches_equal_one_batch_per_block(mlp_data):
    """A training block's gradient blocks are gathered over its batches and dotted with the
    queries once; the scores equal those of one batch per block (and of uneven blocks)."""
    model, x, y = mlp_data
    task = dt.ClassificationTask(model)
    ckpt = [dt.Checkpoint.from_module(model)]
    q = (x[:5] + 0.1, y[:5])
    one = dt.Influence(dt.EKFAC()).fit(task, ckpt, (x, y), batch_size=4, block_size=4)
    many = dt.Influence(dt.EKFAC()).fit(task, ckpt, (x, y), batch_size=3, block_size=10)
    assert isinstance(many, FittedKroneckerInfluence)
    assert one.batch_size == 4 and many.batch_size == 3 and many.block_size == 10
    torch.testing.assert_close(many.attribute(q), one.attribute(q), rtol=1e-10, atol=1e-13)


def test_live_positions_cut_only_positions_dead_in_every_example():
    """Positions that are zero in every example of a batch (padding) are cut; the
    per-example sums Σ_p e_p ãᵀ_p are those of the uncut factors, and a batch without a
    live position gives zero sums."""
    g = torch.Generator().manual_seed(0)
    b, positions = 5, 9
    lengths = torch.tensor([2, 6, 3, 6, 1])
    live = torch.arange(positions)[None] < lengths[:, None]
    live[1, 0] = False  # a hole (left padding) in one example: still live in the others
    a = torch.randn(b, positions, 4, generator=g, dtype=torch.float64) * live[..., None]
    e = torch.randn(b, positions, 3, generator=g, dtype=torch.float64) * live[..., None]
    assert (nonzero_rows(e) == live).all()
    e2, a2, live2 = live_positions(nonzero_rows(e), e, a)
    assert e2.shape == (b, 6, 3) and a2.shape == (b, 6, 4) and (live2 == live[:, :6]).all()
    full = torch.einsum("bpo,bpi->boi", e, a)
    torch.testing.assert_close(torch.bmm(e2.transpose(1, 2), a2), full, rtol=1e-14, atol=0)
    dead = torch.zeros(b, positions, dtype=torch.bool)
    e3, a3, _ = live_positions(dead, e * 0, a)
    assert e3.shape == (b, 0, 3)
    assert float(torch.bmm(e3.transpose(1, 2), a3).abs().sum()) == 0.0


@pytest.mark.parametrize("fisher", ["empirical", "exact"])
def test_fused_scores_equal_the_stored_path_on_a_padded_bert(tmp_path, fisher, monkeypatch):
    """BERT masks padding out of attention: its output gradients are exactly 0 at padded
    tokens, which the fused passes cut (batches of several lengths); the scores and the
    damping are the stored path's, whose features are formed by the generic featurizer.
    The factor pass pulls back the Fisher's columns only (the empirical Fisher's one, the
    exact Fisher's three): no loss-gradient column, as the default damping needs no λ₀."""
    from test_kfac_models import _bert, _bert_data

    from datatrace.curvature import kfac_passes

    pulled: list[int] = []
    pull = kfac_passes._pull_back_columns

    def counting(out, outs, columns):
        pulled.append(columns.shape[0])
        return pull(out, outs, columns)

    monkeypatch.setattr(kfac_passes, "_pull_back_columns", counting)
    model = _bert()
    task = dt.ClassificationTask(model)
    train, queries = _bert_data(7, seed=1), _bert_data(3, seed=5)
    ckpts = [dt.Checkpoint.from_module(model)]
    spec = dt.EKFAC(fisher=fisher)
    fused = dt.Influence(spec).fit(task, ckpts, train, batch_size=3)
    stored = dt.Influence(spec).fit(task, ckpts, train, store=tmp_path / "s", batch_size=3)
    assert isinstance(fused, FittedKroneckerInfluence)
    # factor pass then eigenvalue pass, 3 batches each, the same columns
    assert pulled[:6] == ([1] * 6 if fisher == "empirical" else [3] * 6)
    assert fused.damping == pytest.approx(stored.damping, rel=1e-10)
    torch.testing.assert_close(
        fused.attribute(queries), stored.attribute(queries), rtol=1e-9, atol=1e-13
    )
    torch.testing.assert_close(
        fused.self_influence(), stored.self_influence(), rtol=1e-9, atol=1e-13
    )


def test_fused_passes_cut_extra_padding_and_score_the_same():
    """Four more padding tokens on every training example and query: the factor passes
    and the fused scoring pass cut them (each checked once: the losses and measurements
    agree), and the damping and scores are those without them."""
    from test_kfac_models import _bert, _bert_data, _padded_more

    model = _bert()
    task = dt.ClassificationTask(model)
    train, queries = _bert_data(7, seed=1), _bert_data(3, seed=5)
    ckpts = [dt.Checkpoint.from_module(model)]
    ref = dt.Influence(dt.EKFAC()).fit(task, ckpts, train, batch_size=3)
    fused = dt.Influence(dt.EKFAC()).fit(task, ckpts, _padded_more(train, 4), batch_size=3)
    assert isinstance(fused, FittedKroneckerInfluence)
    assert fused.damping == pytest.approx(ref.damping, rel=1e-10)
    scores = fused.attribute(_padded_more(queries, 4))
    assert fused._padding.verdict("loss") is True and fused._padding.verdict("measurement") is True
    torch.testing.assert_close(scores, ref.attribute(queries), rtol=1e-9, atol=1e-13)


def test_fused_fit_names_an_out_of_range_label_before_any_pass():
    """The fused passes read sequences in length-sorted groups: the task's checks run first,
    in index order, so the error is the task's and names the example."""
    from test_kfac_models import _bert, _bert_data

    model = _bert()
    train = _bert_data(7, seed=1)
    train["labels"][4] = 5  # 3 classes
    with pytest.raises(dt.DataError, match=r"out of range .* at examples \[4\]"):
        dt.Influence(dt.EKFAC()).fit(
            dt.ClassificationTask(model), [dt.Checkpoint.from_module(model)], train, batch_size=3
        )


@pytest.mark.parametrize("spec", [dt.KFAC(damping=0.05), dt.EKFAC(damping=0.05)])
def test_padding_a_model_reads_counts_in_its_factors(spec, caplog, tmp_path):
    """A model that pools over every position (its attention_mask unused) reads its padding:
    the padded positions are part of its gradient, so they are part of its curvature.
    Scores with the batch's ``attention_mask`` equal those with the same tensor under a key
    the token mask does not read (every position counted), on the fused and stored paths;
    they differed by up to 0.88 (relative) when the mask was trusted."""
    import logging

    from torch import nn

    class PoolsEverything(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.h, self.fc = nn.Embedding(11, 3), nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, input_ids, attention_mask=None, unused=None):
            return self.fc(torch.tanh(self.h(self.emb(input_ids))).mean(1))

    torch.manual_seed(0)
    model = PoolsEverything().double()
    lengths = torch.randint(1, 5, (12,))
    mask = (torch.arange(6)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, 11, (12, 6)) * mask
    y = torch.randint(0, 3, (12,))
    masked = {"input_ids": ids, "attention_mask": mask, "labels": y}
    renamed = {"input_ids": ids, "unused": mask, "labels": y}
    task, ckpts = dt.ClassificationTask(model), [dt.Checkpoint.from_module(model)]
    for store in (None, tmp_path / "a"):
        with caplog.at_level(logging.INFO, logger="datatrace"):
            got = dt.Influence(spec).fit(task, ckpts, masked, batch_size=4, store=store)
        want = dt.Influence(spec).fit(
            task, ckpts, renamed, batch_size=4, store=None if store is None else tmp_path / "b"
        )
        q = {k: v[:3] for k, v in masked.items()}
        qr = {k: v[:3] for k, v in renamed.items()}
        torch.testing.assert_close(got.attribute(q), want.attribute(qr), rtol=1e-9, atol=1e-12)
    assert "padded positions reach the loss through layer 'h'" in caplog.text


@pytest.mark.parametrize("spec", [dt.KFAC(damping=0.05), dt.EKFAC(damping=0.05)])
def test_a_class_masked_to_minus_inf_is_a_finite_output(spec):
    """A classifier that masks a class with -inf has finite losses and gradients: the
    passes' non-finite check refuses NaN and +inf outputs only, and the scores equal those
    with the class masked by -1e4 (a probability of exactly 0 in float64 either way)."""
    from torch import nn

    class Masked(nn.Module):
        def __init__(self, fill: float) -> None:
            super().__init__()
            self.fc1, self.fc2, self.fill = nn.Linear(4, 5), nn.Linear(5, 3), fill

        def forward(self, x):
            out = self.fc2(torch.tanh(self.fc1(x)))
            return out.masked_fill(torch.tensor([False, False, True]), self.fill)

    torch.manual_seed(0)
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 2, (10,))
    scores = []
    for fill in (float("-inf"), -1e4):
        torch.manual_seed(1)
        model = Masked(fill).double()
        task = dt.ClassificationTask(model)
        fitted = dt.Influence(spec).fit(task, [dt.Checkpoint.from_module(model)], (x, y))
        scores.append(fitted.attribute((x[:3], y[:3])))
    assert bool(torch.isfinite(scores[0]).all())
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-10, atol=1e-12)
