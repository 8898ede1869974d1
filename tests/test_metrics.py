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
