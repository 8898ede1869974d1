"""Memory budget: features are sized before any work; batches and blocks follow from it;
features over it are streamed with a WARNING naming the projection that would fit."""

from __future__ import annotations

import logging

import torch

import datatrace as dt
from datatrace.features.featurizer import GradientFeatures
from datatrace.features.placement import plan_sizes
from datatrace.features.spec import FeatureSpec


def _fit(mlp_data, **kw):
    model, x, y = mlp_data
    task = dt.ClassificationTask(model)
    ck = [dt.Checkpoint.from_module(model, weight=0.5)]
    return dt.TracIn().fit(task, ck, (x, y), progress=False, **kw), (x[:4], y[:4])


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
    assert fitted.store is None and fitted.block_size == 5  # a quarter of the budget each
    assert fitted.batch_size < 23
    torch.testing.assert_close(fitted.attribute(queries), ref, rtol=1e-12, atol=1e-14)


def test_over_the_budget_with_a_disk_store_allowed_streams_through_it(mlp_data, caplog):
    ref_fit, queries = _fit(mlp_data)
    with caplog.at_level(logging.WARNING, logger="datatrace"):
        fitted, _ = _fit(mlp_data, max_memory_bytes=1000)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "temporary disk store" in warned[0]
    assert fitted.store is not None and fitted.store.path is not None
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
    assert plan_sizes(feats, torch.float64, 4 * 8 * work * 10, None, None, "t") == (10, 36)
    assert plan_sizes(feats, torch.float64, 1, 7, 9, "t") == (7, 9)
    assert plan_sizes(feats, torch.float64, 1, None, None, "t") == (1, 1)
    assert plan_sizes(feats, torch.float64, 1 << 40, None, None, "t") == (256, 8192)
