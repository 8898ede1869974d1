"""Memory budget: features are sized before any work; batches and blocks follow from it;
features over it are streamed with a WARNING naming the projection that would fit."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import datatrace as dt
import datatrace.methods.chunks as chunks_module
from datatrace.features.featurizer import GradientFeatures
from datatrace.features.placement import MIN_SIZING_BUDGET, plan_sizes
from datatrace.features.spec import FeatureSpec


def _fit(mlp_data, method=None, **kw):
    model, x, y = mlp_data
    task = dt.ClassificationTask(model)
    ck = [dt.Checkpoint.from_module(model, weight=0.5)]
    method = method or dt.TracIn()
    return method.fit(task, ck, (x, y), progress=False, **kw), (x[:4], y[:4])


def test_a_tiny_budget_streams_with_small_batches_and_blocks_and_the_same_scores(mlp_data, caplog):
    ref_fit, queries = _fit(mlp_data)
    assert (ref_fit.batch_size, ref_fit.block_size) == (256, 8192)  # small model: defaults
    ref = ref_fit.attribute(queries)
    # features of one example: fc1 a (6) + e (7), fc2 a (8) + e (3) = 24 float64 = 192 bytes
    with caplog.at_level(logging.WARNING, logger="datatrace"):
        fitted, _ = _fit(mlp_data, max_memory_bytes=4 * 192 * 5, max_store_bytes=0)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "recomputed block by block" in warned[0]
    assert "projection_dim=1024" in warned[0] and "max_memory_bytes=3840" in warned[0]
    # batches and blocks are sized within at least 256 MiB: the same features, bit for bit
    assert fitted.store is None and (fitted.batch_size, fitted.block_size) == (256, 8192)
    torch.testing.assert_close(fitted.attribute(queries), ref, rtol=1e-12, atol=1e-14)


def test_over_the_budget_with_a_disk_store_allowed_streams_through_it(mlp_data, caplog):
    """A preconditioned method (whose fit reads the features more than once) streams them
    through a temporary disk store."""
    method = dt.Influence(dt.GaussNewton(damping=0.1))
    ref_fit, queries = _fit(mlp_data, method)
    with caplog.at_level(logging.WARNING, logger="datatrace"):
        fitted, _ = _fit(mlp_data, method, max_memory_bytes=1000)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "temporary disk store" in warned[0]
    assert fitted.store is not None and fitted.store.path is not None
    torch.testing.assert_close(
        fitted.attribute(queries), ref_fit.attribute(queries), rtol=1e-12, atol=1e-14
    )


def test_a_first_order_method_over_the_budget_recomputes_instead_of_spilling(mlp_data, caplog):
    """TracIn reads the training features once per scoring call: over the budget they are
    recomputed block by block (no disk store written and read back), same scores."""
    ref_fit, queries = _fit(mlp_data)
    assert ref_fit.store is not None  # in memory
    with caplog.at_level(logging.WARNING, logger="datatrace"):
        fitted, _ = _fit(mlp_data, max_memory_bytes=1000)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "recomputed block by block at every scoring call" in warned[0]
    assert fitted.store is None
    torch.testing.assert_close(
        fitted.attribute(queries), ref_fit.attribute(queries), rtol=1e-12, atol=1e-14
    )
    torch.testing.assert_close(
        fitted.self_influence(), ref_fit.self_influence(), rtol=1e-12, atol=1e-14
    )
    torch.testing.assert_close(
        fitted.attribute(queries), ref_fit.attribute(queries), rtol=1e-12, atol=1e-14
    )


def test_given_sizes_are_kept_and_defaults_follow_the_feature_size(mlp_data):
    model, x, y = mlp_data
    feats = GradientFeatures(FeatureSpec(factored=False), dt.ClassificationTask(model))
    feats.compute(dict(model.named_parameters()), {}, (x[:1], y[:1]), False, 0)
    width = feats.num_params  # 5·7 + 7 + 7·3 + 3 = 66 entries, formed twice + features
    assert sum(feats.layout().values()) == width == 66
    # formed gradients twice, the features, and twice the layers' inputs and output
    # gradients (fc1: 5 + 7, fc2: 7 + 3)
    work = 3 * width + 2 * (5 + 7 + 7 + 3)
    assert feats.work_entries() == work
    floor = MIN_SIZING_BUDGET
    # a budget of 4·8·(work·10 + pad) bytes: batches of 10, blocks of 10·work/width examples
    b = floor // (4 * 8 * work) + 1
    assert plan_sizes(feats, torch.float64, 4 * 8 * work * b, None, None, "t") == (
        min(256, b),
        min(8192, work * b // width),
    )
    assert plan_sizes(feats, torch.float64, 1, 7, 9, "t") == (7, 9)
    tiny = plan_sizes(feats, torch.float64, 0, None, None, "t")
    assert tiny == plan_sizes(feats, torch.float64, floor, None, None, "t")
    assert plan_sizes(feats, torch.float64, 1 << 40, None, None, "t") == (256, 8192)


def test_a_large_feature_gets_small_batches_and_blocks():
    """Features of ~8 MB per example (a 1M-parameter layer, unprojected): with the 256 MiB
    floor, blocks of 8 and batches of 2 instead of 8,192 and 256."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1000, 1000), torch.nn.Linear(1000, 2)).double()
    feats = GradientFeatures(FeatureSpec(factored=False), dt.ClassificationTask(model))
    x, y = torch.randn(1, 1000, dtype=torch.float64), torch.zeros(1, dtype=torch.long)
    feats.compute(dict(model.named_parameters()), {}, (x, y), False, 0)
    row = feats.num_params * 8
    assert row == sum(feats.layout().values()) * 8 == 8_024_016
    batch, block = plan_sizes(feats, torch.float64, 0, None, None, "t")
    assert block == MIN_SIZING_BUDGET // 4 // row == 8
    assert batch == MIN_SIZING_BUDGET // 4 // (feats.work_entries() * 8) == 2


@pytest.mark.parametrize(
    "method, kw",
    [
        (dt.TracIn(), {}),
        (dt.TracIn(), {"max_memory_bytes": 0}),  # recomputed per chunk
        (dt.GradCos(), {}),
        (dt.Influence(dt.GaussNewton(damping=0.1)), {}),
    ],
)
def test_queries_are_scored_in_chunks_within_the_block_budget(
    mlp_data, tmp_path, monkeypatch, method, kw
):
    """With blocks of 5 examples and 3 checkpoints, queries go in chunks of 5 // 3 = 1 (of
    5 with one checkpoint, or scored checkpoint by checkpoint when recomputed):
    attribute, top_k and attribute_to_file equal scoring every query at once (to float64
    rounding: BLAS sums a 1-row product in another order than a 7-row one)."""
    model, x, y = mlp_data
    task = dt.ClassificationTask(model)
    ck = [dt.Checkpoint.from_module(model, weight=0.5)]
    ck = [*ck, *(dt.Checkpoint.from_state_dict(
        {k: v + 0.01 * (i + 1) for k, v in model.state_dict().items()}, weight=0.3)
        for i in range(2))]  # fmt: skip
    monkeypatch.setattr(chunks_module, "MIN_SIZING_BUDGET", 0)  # else blocks ≥ 64 MiB
    fitted = method.fit(task, ck, (x, y), progress=False, block_size=5, **kw)
    queries = (x[:12], y[:12])
    # chunks of 5 when one checkpoint's query features are held: influence (the last
    # checkpoint only), or recomputed training features (scored checkpoint by checkpoint)
    by_checkpoint = fitted.store is None
    assert fitted._by_checkpoint(5) == by_checkpoint
    # 2 × 5 queries' scores (10 × 23) would exceed a block's share (5 rows of 24 features)
    assert not fitted._by_checkpoint(10)
    step = 5 if by_checkpoint or len(fitted.weights) == 1 else 1
    assert fitted.query_chunks(12) == [(a, min(a + step, 12)) for a in range(0, 12, step)]
    whole = torch.cat([s for _, s in fitted.score_blocks(queries)], dim=1)
    assert whole.shape == (12, 23)
    torch.testing.assert_close(fitted.attribute(queries), whole, rtol=1e-12, atol=1e-14)
    v, i = fitted.top_k(queries, k=4)
    ref = whole.topk(4, dim=1)
    torch.testing.assert_close(v, ref.values, rtol=1e-12, atol=1e-14)
    assert torch.equal(i, ref.indices)
    path = fitted.attribute_to_file(queries, tmp_path / "s.npy")
    torch.testing.assert_close(torch.from_numpy(np.load(path)), whole, rtol=1e-12, atol=1e-14)


def test_recomputed_training_features_are_scored_against_two_blocks_of_queries(
    mlp_data, monkeypatch
):
    """Recomputed training features (featurized again for every query chunk): one
    checkpoint's queries are held two blocks at a time when their scores fit (11 training
    examples: 10 × 11 scores within 5 rows of 24 features), so 12 queries cost 2
    featurizations of the training set per checkpoint, not 3; the scores equal scoring
    every query at once."""
    model, x, y = mlp_data
    task = dt.ClassificationTask(model)
    ck = [dt.Checkpoint.from_state_dict(
        {k: v + 0.01 * i for k, v in model.state_dict().items()}, weight=0.3 + i)
        for i in range(3)]  # fmt: skip
    monkeypatch.setattr(chunks_module, "MIN_SIZING_BUDGET", 0)
    fitted = dt.TracIn().fit(
        task, ck, (x[:11], y[:11]), progress=False, block_size=5, max_memory_bytes=0
    )
    assert fitted.store is None and sum(fitted.features.layout().values()) == 24
    assert fitted.query_chunks(12) == [(0, 10), (10, 12)]
    queries = (x[11:23], y[11:23])
    whole = torch.cat([s for _, s in fitted.score_blocks(queries)], dim=1)
    assert whole.shape == (12, 11)
    torch.testing.assert_close(fitted.attribute(queries), whole, rtol=1e-12, atol=1e-14)
