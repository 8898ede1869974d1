"""Grad-Dot, Grad-Cos and TracIn against hand computations (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import MLP, perturbed

import datatrace as dt


def hand_grads(model_sd, x, y, names=None):
    """Per-example gradients by a plain loop of .backward() on a fresh copy of the model."""
    m = MLP().double()
    m.load_state_dict(model_sd)
    rows = []
    for i in range(len(x)):
        m.zero_grad()
        F.cross_entropy(m(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append(
            torch.cat(
                [
                    p.grad.flatten()
                    for n, p in m.named_parameters()
                    if names is None or n.split(".")[0] in names
                ]
            )
        )
    return torch.stack(rows)


@pytest.fixture
def two_checkpoints(mlp_data):
    model, x, y = mlp_data
    sd1, sd2 = perturbed(model, 0.3, 1), perturbed(model, 0.3, 2)
    ckpts = [
        dt.Checkpoint.from_state_dict(sd1, weight=0.5),
        dt.Checkpoint.from_state_dict(sd2, weight=0.1),
    ]
    return model, x, y, (sd1, sd2), ckpts


def test_tracin_equals_hand_computation_over_two_checkpoints(two_checkpoints):
    model, x, y, (sd1, sd2), ckpts = two_checkpoints
    xq, yq = x[:4] + 0.1, y[:4]
    fitted = dt.TracIn().fit(dt.ClassificationTask(model), ckpts, (x, y), progress=False)
    S = fitted.attribute((xq, yq))
    expected = 0.5 * hand_grads(sd1, xq, yq) @ hand_grads(sd1, x, y).T
    expected += 0.1 * hand_grads(sd2, xq, yq) @ hand_grads(sd2, x, y).T
    assert S.shape == (4, 23)
    torch.testing.assert_close(S, expected, rtol=1e-10, atol=1e-12)
    s = fitted.self_influence()
    g1, g2 = hand_grads(sd1, x, y), hand_grads(sd2, x, y)
    torch.testing.assert_close(s, 0.5 * (g1**2).sum(1) + 0.1 * (g2**2).sum(1))


def test_graddot_and_gradcos_use_the_final_checkpoint(two_checkpoints):
    model, x, y, (_, sd2), ckpts = two_checkpoints
    task = dt.ClassificationTask(model)
    gq, gt = hand_grads(sd2, x[:5], y[:5]), hand_grads(sd2, x, y)
    dot = dt.GradDot().fit(task, ckpts, (x, y), progress=False).attribute((x[:5], y[:5]))
    torch.testing.assert_close(dot, gq @ gt.T, rtol=1e-10, atol=1e-12)
    cos = dt.GradCos().fit(task, ckpts, (x, y), progress=False).attribute((x[:5], y[:5]))
    expected = (gq @ gt.T) / gq.norm(dim=1)[:, None] / gt.norm(dim=1)[None, :]
    torch.testing.assert_close(cos, expected, rtol=1e-10, atol=1e-12)


def test_last_layer_selection(two_checkpoints):
    model, x, y, (sd1, sd2), ckpts = two_checkpoints
    fitted = dt.TracIn(params=["fc2"]).fit(
        dt.ClassificationTask(model), ckpts, (x, y), progress=False
    )
    S = fitted.attribute((x, y))
    exp = 0.5 * hand_grads(sd1, x, y, ["fc2"]) @ hand_grads(sd1, x, y, ["fc2"]).T
    exp += 0.1 * hand_grads(sd2, x, y, ["fc2"]) @ hand_grads(sd2, x, y, ["fc2"]).T
    torch.testing.assert_close(S, exp, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", [dt.GradDot, dt.GradCos, dt.TracIn])
@pytest.mark.parametrize("projection_dim", [None, 8])
def test_self_influence_is_the_diagonal_of_attribute_train(two_checkpoints, method, projection_dim):
    model, x, y, _, ckpts = two_checkpoints
    fitted = method(projection_dim=projection_dim).fit(
        dt.ClassificationTask(model), ckpts, (x, y), progress=False
    )
    torch.testing.assert_close(
        fitted.self_influence(), fitted.attribute((x, y)).diagonal(), rtol=1e-10, atol=1e-12
    )


def test_invariance_to_batch_and_block_size(two_checkpoints):
    model, x, y, _, ckpts = two_checkpoints
    task = dt.ClassificationTask(model)
    ref = dt.TracIn().fit(task, ckpts, (x, y), progress=False).attribute((x[:6], y[:6]))
    for bs, block in ((1, 1), (5, 7), (64, 3), (7, 64)):
        for spec in (dt.TracIn(), dt.TracIn(params="fc2")):
            f = spec.fit(task, ckpts, (x, y), batch_size=bs, block_size=block, progress=False)
            S = f.attribute((x[:6], y[:6]))
            if spec.features.params is None:
                torch.testing.assert_close(S, ref, rtol=1e-10, atol=1e-12)
            vals, idx = f.top_k((x[:6], y[:6]), k=5)
            torch.testing.assert_close(vals, S.topk(5, dim=1).values, rtol=1e-12, atol=0)
            torch.testing.assert_close(S.gather(1, idx), vals, rtol=0, atol=0)


def test_top_k_proponents_and_opponents(two_checkpoints):
    model, x, y, _, ckpts = two_checkpoints
    f = dt.TracIn().fit(dt.ClassificationTask(model), ckpts, (x, y), block_size=4, progress=False)
    S = f.attribute((x[:3], y[:3]))
    vals, idx = f.top_k((x[:3], y[:3]), k=4)
    assert vals.shape == idx.shape == (3, 4)
    torch.testing.assert_close(idx, S.topk(4, dim=1).indices)
    ovals, oidx = f.top_k((x[:3], y[:3]), k=4, opponents=True)
    torch.testing.assert_close(oidx, S.topk(4, dim=1, largest=False).indices)
    assert (ovals <= vals[:, -1:]).all() and (ovals < 0).any()
    v_all, _ = f.top_k((x[:3], y[:3]), k=100)  # k > n_train: everything, sorted
    assert v_all.shape == (3, 23)


def test_dataset_and_dataloader_inputs_give_the_same_scores(two_checkpoints):
    model, x, y, _, ckpts = two_checkpoints
    task = dt.ClassificationTask(model)
    ref = dt.TracIn().fit(task, ckpts, (x, y), progress=False).attribute((x[:4], y[:4]))
    ds = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(ds, batch_size=5, shuffle=True)  # order is ignored
    for train in (ds, loader):
        S = dt.TracIn().fit(task, ckpts, train, progress=False).attribute((x[:4], y[:4]))
        torch.testing.assert_close(S, ref, rtol=1e-10, atol=1e-12)


def test_regression_task_closed_form_on_linear_model():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1).double()
    x, y = torch.randn(15, 4, dtype=torch.float64), torch.randn(15, dtype=torch.float64)
    fitted = dt.GradDot().fit(
        dt.RegressionTask(model), [dt.Checkpoint.from_module(model)], (x, y), progress=False
    )
    # loss (w·x + b − y)²: gradient 2 r [x, 1], so the dot product is 4 r r' (x·x' + 1)
    r = (model(x).squeeze(1) - y).detach()
    expected = 4 * r[:, None] * r[None, :] * (x @ x.T + 1)
    torch.testing.assert_close(fitted.attribute((x, y)), expected, rtol=1e-10, atol=1e-12)


def test_sign_training_on_a_proponent_lowers_the_query_loss(mlp_data):
    """S > 0 means proponent: one SGD step on example i lowers query j's loss by ≈ η S[j, i]."""
    model, x, y = mlp_data
    task = dt.ClassificationTask(model)
    S = (
        dt.GradDot()
        .fit(task, [dt.Checkpoint.from_module(model)], (x, y), progress=False)
        .attribute((x[:3], y[:3]))
    )
    eta = 1e-4
    for i in range(5):
        m = MLP().double()
        m.load_state_dict(model.state_dict())
        F.cross_entropy(m(x[i : i + 1]), y[i : i + 1]).backward()
        with torch.no_grad():
            for p in m.parameters():
                p -= eta * p.grad
        before = F.cross_entropy(model(x[:3]), y[:3], reduction="none")
        after = F.cross_entropy(m(x[:3]), y[:3], reduction="none")
        torch.testing.assert_close((before - after).detach(), eta * S[:, i], rtol=1e-3, atol=1e-9)


def test_merged_top_k_equals_one_pass():
    """Top-k lists of disjoint blocks, merged, equal one running pass (ties included)."""
    from datatrace.methods.topk import merge_top_k, running_top_k

    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (4, 37), generator=g).double()  # many ties
    blocks = [(s, scores[:, s : s + 5]) for s in range(0, 37, 5)]
    for largest in (True, False):
        want = running_top_k(blocks, 9, largest)
        parts = [running_top_k(blocks[r::3], 9, largest) for r in range(3)]
        got = merge_top_k(parts, 9, largest)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_batch_norm_models_fit_in_memory_and_in_a_store(tmp_path) -> None:
    """0-d buffers (num_batches_tracked) are fingerprinted like any tensor."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    model(torch.randn(8, 3))  # update running statistics
    model.eval()
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    ck = [dt.Checkpoint.from_module(model)]
    assert ck[0].state["1.num_batches_tracked"].dim() == 0
    task = dt.ClassificationTask(model)
    memory = dt.TracIn().fit(task, ck, (x, y), progress=False).attribute((x[:2], y[:2]))
    stored = dt.TracIn().fit(task, ck, (x, y), store=tmp_path, progress=False)
    torch.testing.assert_close(stored.attribute((x[:2], y[:2])), memory, rtol=0, atol=0)


def test_the_engine_slots_are_typed() -> None:
    import pytest

    with pytest.raises(dt.ConfigError, match="features must be a FeatureSpec, got NoneType"):
        dt.GradientAttributor(features=None)  # type: ignore[arg-type]
    with pytest.raises(dt.ConfigError, match="checkpoints must be a CheckpointWeights"):
        dt.GradientAttributor(checkpoints="last")  # type: ignore[arg-type]
    with pytest.raises(dt.ConfigError, match="preconditioner must be a AbstractPreconditioner"):
        dt.GradientAttributor(preconditioner=object())  # type: ignore[arg-type]
    with pytest.raises(dt.ConfigError, match="needs exact dense gradient features"):
        dt.GradientAttributor(
            dt.FeatureSpec(projection_dim=8, factored=False), preconditioner=dt.EKFAC()
        )
