"""Per-example gradients: vmap and the factored Linear path against a loop of .backward()."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import MLP, perturbed

import datatrace as dt
from datatrace.features.featurizer import GradientFeatures
from datatrace.features.spec import FeatureSpec
from datatrace.grads.per_example import (
    flatten_grads,
    per_example_grads,
    per_example_grads_loop,
    select_parameters,
)


def backward_loop(model, loss_of_example, n):
    """Reference: for each example, zero grads, loss.backward(), read .grad (float64)."""
    rows = []
    for i in range(n):
        model.zero_grad()
        loss_of_example(i).backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return torch.stack(rows)


def _params(model):
    return dict(model.named_parameters()), dict(model.named_buffers())


def test_vmap_matches_backward_on_mlp(mlp_data):
    model, x, y = mlp_data
    task = dt.ClassificationTask(model)
    names = select_parameters(model, None)
    grads, losses = per_example_grads(task, *_params(model), (x, y), names)
    ref = backward_loop(model, lambda i: F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), 23)
    torch.testing.assert_close(flatten_grads(grads, names), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(losses, F.cross_entropy(model(x), y, reduction="none"))


def test_vmap_matches_backward_on_cnn(cnn_data):
    model, x, y = cnn_data
    task = dt.ClassificationTask(model)
    names = select_parameters(model, None)
    grads, _ = per_example_grads(task, *_params(model), (x, y), names)
    ref = backward_loop(model, lambda i: F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), 9)
    torch.testing.assert_close(flatten_grads(grads, names), ref, rtol=1e-10, atol=1e-12)
    loop, _ = per_example_grads_loop(task, *_params(model), (x, y), names)
    torch.testing.assert_close(flatten_grads(loop, names), ref, rtol=1e-10, atol=1e-12)


def test_vmap_matches_backward_on_dict_batch(dict_data):
    model, batch = dict_data
    task = dt.ClassificationTask(model)  # dict batch: labels under "labels", rest as kwargs
    names = select_parameters(model, None)
    grads, _ = per_example_grads(task, *_params(model), batch, names)

    def loss(i):
        out = model(batch["input_ids"][i : i + 1], batch["attention_mask"][i : i + 1])
        return F.cross_entropy(out, batch["labels"][i : i + 1])

    ref = backward_loop(model, loss, 8)
    torch.testing.assert_close(flatten_grads(grads, names), ref, rtol=1e-10, atol=1e-12)


def test_generic_task_with_dict_batch(dict_data):
    model, batch = dict_data

    def loss_fn(m, b):
        logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        return F.cross_entropy(logits, b["labels"], reduction="none")

    def margin(m, b):  # a measurement other than the loss: the logit of class 1
        return m(input_ids=b["input_ids"], attention_mask=b["attention_mask"])[:, 1]

    task = dt.Task(model, loss_fn, margin)
    names = select_parameters(model, None)
    g_loss, _ = per_example_grads(task, *_params(model), batch, names)
    g_meas, vals = per_example_grads(task, *_params(model), batch, names, measurement=True)
    ref = backward_loop(
        model,
        lambda i: model(batch["input_ids"][i : i + 1], batch["attention_mask"][i : i + 1])[0, 1],
        8,
    )
    torch.testing.assert_close(flatten_grads(g_meas, names), ref, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(flatten_grads(g_loss, names), ref)
    torch.testing.assert_close(vals, model(batch["input_ids"], batch["attention_mask"])[:, 1])


def test_factored_linear_features_equal_dense_inner_products(mlp_data):
    model, x, y = mlp_data
    task = dt.ClassificationTask(model)
    params, buffers = _params(model)
    fact = GradientFeatures(FeatureSpec(), task)
    dense = GradientFeatures(FeatureSpec(factored=False), task)
    f = fact.compute(params, buffers, (x, y), False, 0)
    d = dense.compute(params, buffers, (x, y), False, 0)
    assert set(f) == {"fc1.a", "fc1.e", "fc2.a", "fc2.e"} and set(d) == {"dense"}
    assert f["fc1.a"].shape == (23, 6)  # 5 inputs + the bias column
    torch.testing.assert_close(fact.pairwise(f, f), dense.pairwise(d, d), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fact.sqnorm(f), dense.sqnorm(d), rtol=1e-10, atol=1e-12)


def test_mixed_factored_and_dense_on_cnn(cnn_data):
    model, x, y = cnn_data
    task = dt.ClassificationTask(model)
    params, buffers = _params(model)
    mixed = GradientFeatures(FeatureSpec(), task)
    f = mixed.compute(params, buffers, (x, y), False, 0)
    assert set(f) == {"dense", "fc.a", "fc.e"}  # conv stays dense, the Linear head factored
    names = select_parameters(model, None)
    g, _ = per_example_grads_loop(task, params, buffers, (x, y), names)
    flat = flatten_grads(g, names)
    torch.testing.assert_close(mixed.pairwise(f, f), flat @ flat.T, rtol=1e-10, atol=1e-12)


def test_layer_selection_by_module_and_parameter_name():
    model = MLP()
    assert select_parameters(model, ["fc2"]) == ["fc2.weight", "fc2.bias"]
    assert select_parameters(model, ["fc2.bias", "fc1.weight"]) == ["fc1.weight", "fc2.bias"]
    assert len(select_parameters(model, None)) == 4


def test_weight_only_and_bias_only_factored_selection(mlp_data):
    model, x, y = mlp_data
    task = dt.ClassificationTask(model)
    params, buffers = _params(model)
    for sel in (("fc2.weight",), ("fc2.bias",), ("fc1.bias", "fc2.weight")):
        fs = GradientFeatures(FeatureSpec(params=sel), task)
        f = fs.compute(params, buffers, (x, y), False, 0)
        names = select_parameters(model, sel)
        g, _ = per_example_grads_loop(task, params, buffers, (x, y), names)
        flat = flatten_grads(g, names)
        torch.testing.assert_close(fs.pairwise(f, f), flat @ flat.T, rtol=1e-10, atol=1e-12)


def test_checkpoint_state_is_used_not_the_module(mlp_data):
    model, x, y = mlp_data
    sd = perturbed(model, 0.5, seed=3)
    ck = dt.Checkpoint.from_state_dict(sd)
    params, buffers = ck.parameters_for(model)
    other = MLP().double()
    other.load_state_dict(sd)
    task = dt.ClassificationTask(model)
    names = select_parameters(model, None)
    g, _ = per_example_grads(task, params, buffers, (x, y), names)
    ref = backward_loop(other, lambda i: F.cross_entropy(other(x[i : i + 1]), y[i : i + 1]), 23)
    torch.testing.assert_close(flatten_grads(g, names), ref, rtol=1e-10, atol=1e-12)
    # the user's module still has its own weights
    assert not torch.allclose(model.fc1.weight, other.fc1.weight)


def test_hooked_conv_and_linear_gradients_equal_vmap(cnn_data):
    model, x, y = cnn_data
    task = dt.ClassificationTask(model)
    params, buffers = _params(model)
    for spec in (FeatureSpec(factored=False), FeatureSpec(projection_dim=16, kronecker=False)):
        hooked = GradientFeatures(spec, task)
        plain = GradientFeatures(
            FeatureSpec(factored=False, layer_hooks=False, projection_dim=spec.projection_dim),
            task,
        )
        assert set(hooked.hooked) == {"conv", "fc"} and not hooked.vmap_names
        assert plain.vmap_names == select_parameters(model, None)
        for measurement in (False, True):
            a = hooked.compute(params, buffers, (x, y), measurement, 0)
            b = plain.compute(params, buffers, (x, y), measurement, 0)
            assert a.keys() == b.keys()
            for k in a:
                torch.testing.assert_close(a[k], b[k], rtol=1e-10, atol=1e-12)


def test_a_layer_called_twice_falls_back_to_vmap():
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = torch.nn.Linear(4, 4)
            self.head = torch.nn.Linear(4, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))

    torch.manual_seed(0)
    model = Twice().double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    task = dt.ClassificationTask(model)
    params, buffers = _params(model)
    feats = GradientFeatures(FeatureSpec(), task)
    f = feats.compute(params, buffers, (x, y), False, 0)
    assert set(feats.hooked) == {"head"} and feats.vmap_names == ["shared.weight", "shared.bias"]
    names = select_parameters(model, None)
    g, _ = per_example_grads_loop(task, params, buffers, (x, y), names)
    flat = flatten_grads(g, names)
    torch.testing.assert_close(feats.pairwise(f, f), flat @ flat.T, rtol=1e-10, atol=1e-12)
    with pytest.raises(dt.ConfigError, match="factored=True does not apply"):
        forced = GradientFeatures(FeatureSpec(params=("shared",), factored=True), task)
        forced.compute(params, buffers, (x, y), False, 0)
