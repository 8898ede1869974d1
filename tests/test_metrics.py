"""Metrics against scipy and hand-checked cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr

import datatrace as dt
from datatrace.metrics import agreement, detection_auc, detection_curve, found_at


def test_agreement_matches_scipy_with_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(7, 40, generator=g, dtype=torch.float64)
    b = 0.5 * a + torch.randn(7, 40, generator=g, dtype=torch.float64)
    a[0, :5] = 1.0  # ties
    b[2, 10:20] = 0.0
    r = agreement(a, b)
    sp = [spearmanr(a[i], b[i]).statistic for i in range(7)]
    pe = [pearsonr(a[i], b[i]).statistic for i in range(7)]
    cos = [float(a[i] @ b[i] / (a[i].norm() * b[i].norm())) for i in range(7)]
    assert r["spearman"][0] == pytest.approx(np.mean(sp), abs=1e-12)
    assert r["pearson"][0] == pytest.approx(np.mean(pe), abs=1e-12)
    assert r["cosine"][0] == pytest.approx(np.mean(cos), abs=1e-12)
    assert r["pearson"][1] == pytest.approx(np.std(pe, ddof=1) / np.sqrt(7), abs=1e-12)
    with pytest.raises(dt.DataError):
        agreement(a, b[:, :3])


def test_detection_curve_hand_case():
    scores = torch.tensor([0.9, 0.1, 0.8, 0.3])
    corrupted = torch.tensor([True, False, False, True])
    inspected, found = detection_curve(scores, corrupted)
    assert found.tolist() == [0.0, 0.5, 0.5, 1.0, 1.0]
    assert inspected.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert found_at(scores, corrupted, [0.25, 0.5, 1.0]) == [0.5, 0.5, 1.0]
    # trapezoid area: 0.25*(0+0.5)/2 + 0.25*(0.5+0.5)/2 + 0.25*(0.5+1)/2 + 0.25*(1+1)/2
    assert detection_auc(scores, corrupted) == pytest.approx(0.625)
    with pytest.raises(dt.DataError, match="no example is marked"):
        detection_curve(scores, torch.zeros(4, dtype=torch.bool))
    with pytest.raises(dt.DataError, match="non-finite"):
        detection_curve(torch.tensor([0.0, float("nan")]), torch.tensor([True, False]))


def test_damping_sweep_reuses_the_store_and_reports_dampings(mlp_data, tmp_path):
    model, x, y = mlp_data
    task = dt.ClassificationTask(model)
    ckpts = [dt.Checkpoint.from_module(model)]
    truth = (
        dt.Influence(dt.GaussNewton(damping=0.05))
        .fit(task, ckpts, (x, y), progress=False)
        .attribute((x[:4], y[:4]))
    )
    lam0 = dt.mean_squared_gradient(task, ckpts[0], (x, y))
    points = dt.damping_sweep(
        lambda d: dt.Influence(dt.GaussNewton(damping=d)),
        task,
        ckpts,
        (x, y),
        (x[:4], y[:4]),
        multipliers=(0.05 / lam0, 100.0),
        truth=truth,
        store=tmp_path / "s",
        progress=False,
    )
    assert points[0].damping == pytest.approx(0.05)
    assert points[0].agreement["pearson"][0] == pytest.approx(1.0)
    assert points[1].agreement["pearson"][0] < 1.0


def test_lds_perfect_linear_datamodel_is_one_and_random_is_zero():
    g = torch.Generator().manual_seed(1)
    n, q, m = 60, 30, 80
    scores = torch.randn(q, n, generator=g, dtype=torch.float64)
    masks = dt.truth.subset_masks(n, m, 0.5, seed=0)
    base = torch.randn(q, generator=g, dtype=torch.float64)
    outputs = base + (~masks).double() @ scores.T  # exactly the scores' linear prediction
    res = dt.metrics.lds(scores, masks, outputs)
    assert res.mean == pytest.approx(1.0, abs=1e-12)
    assert res.per_query.shape == (q,)
    rand = dt.metrics.lds(torch.randn(q, n, generator=g, dtype=torch.float64), masks, outputs)
    assert abs(rand.mean) < 4 * rand.se + 0.05
    flipped = dt.metrics.lds(-scores, masks, outputs)
    assert flipped.mean == pytest.approx(-1.0, abs=1e-12)


def test_lds_matches_scipy_and_rejects_bad_shapes():
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(5, 20, generator=g, dtype=torch.float64)
    masks = torch.rand(12, 20, generator=g) < 0.5
    outputs = torch.randn(12, 5, generator=g, dtype=torch.float64)
    res = dt.metrics.lds(scores, masks, outputs)
    pred = (~masks).double() @ scores.T
    want = [spearmanr(pred[:, j], outputs[:, j]).statistic for j in range(5)]
    np.testing.assert_allclose(res.per_query.numpy(), want, atol=1e-12)
    assert res.mean == pytest.approx(np.mean(want), abs=1e-12)
    with pytest.raises(dt.DataError, match="shapes"):
        dt.metrics.lds(scores, masks, outputs.T)
    outputs[:, 0] = 1.0  # constant: undefined for that query
    with pytest.warns(RuntimeWarning, match="constant"):
        res = dt.metrics.lds(scores, masks, outputs)
    assert torch.isnan(res.per_query[0]) and res.mean == pytest.approx(np.mean(want[1:]))


def test_top_k_overlap_hand_case():
    truth = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    scores = torch.tensor([[5.0, 0.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    mean, se = dt.metrics.top_k_overlap(scores, truth, k=2)
    assert mean == pytest.approx(0.75)  # query 0: {0, 2} vs {0, 1}; query 1: all
    assert se == pytest.approx(np.std([0.5, 1.0], ddof=1) / np.sqrt(2))
    low, _ = dt.metrics.top_k_overlap(scores, truth, k=2, largest=False)
    assert low == pytest.approx(0.75)  # query 0: {1, 4} vs {3, 4}
    with pytest.raises(dt.DataError):
        dt.metrics.top_k_overlap(scores, truth, k=6)
