"""Units: influence-family and TRAK scores are in leave-one-out units whatever the checkpoint
weights; only TracIn multiplies by them (its learning rates)."""

from __future__ import annotations

import pytest
import torch
from conftest import perturbed

import datatrace as dt


def _least_squares(n=60, d=4, alpha=0.05):
    """L2 least squares at its minimum: data, the fitted model, the query set, α."""
    torch.manual_seed(3)
    x = torch.randn(n, d, dtype=torch.float64)
    y = x @ torch.randn(d, dtype=torch.float64) + 0.3 * torch.randn(n, dtype=torch.float64)
    h = 2 * x.T @ x / n + 2 * alpha * torch.eye(d, dtype=torch.float64)
    w = torch.linalg.solve(h, 2 * x.T @ y / n)
    model = torch.nn.Linear(d, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w[None])
    xq, yq = torch.randn(5, d, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    return model, x, y, xq, yq, alpha, h, w


def _scores(method, model, ckpts, x, y, xq, yq, task_cls=dt.RegressionTask):
    fitted = method.fit(task_cls(model), ckpts, (x, y), progress=False)
    return fitted.attribute((xq, yq)), fitted.self_influence()


def test_influence_ignores_a_single_checkpoint_weight_and_equals_the_closed_form():
    model, x, y, xq, yq, alpha, h, w = _least_squares()
    method = dt.Influence(dt.ExactHessian(damping=2 * alpha))
    tiny = [dt.Checkpoint.from_module(model, weight=7.9e-7)]  # a learning rate, for TracIn
    one = [dt.Checkpoint.from_module(model, weight=1.0)]
    S_tiny, s_tiny = _scores(method, model, tiny, x, y, xq, yq)
    S_one, s_one = _scores(method, model, one, x, y, xq, yq)
    assert torch.equal(S_tiny, S_one) and torch.equal(s_tiny, s_one)
    # closed form: g_i = 2 r_i x_i, q_j = 2 r_j x_j, S = (1/n) q_jᵀ H⁻¹ g_i
    r, rq = x @ w - y, xq @ w - yq
    closed = (2 * rq[:, None] * xq) @ torch.linalg.solve(h, (2 * r[:, None] * x).T) / len(x)
    torch.testing.assert_close(S_one, closed, rtol=1e-10, atol=1e-15)
    assert S_one.abs().max() > 1e-3  # not trivially zero


@pytest.mark.parametrize("make", [lambda: dt.Influence(dt.EKFAC(damping=0.1)), dt.DataInf])
def test_other_influence_methods_ignore_a_single_checkpoint_weight(make):
    model, x, y, xq, yq, *_ = _least_squares()
    S_tiny, _ = _scores(make(), model, [dt.Checkpoint.from_module(model, 7.9e-7)], x, y, xq, yq)
    S_one, _ = _scores(make(), model, [dt.Checkpoint.from_module(model, 1.0)], x, y, xq, yq)
    torch.testing.assert_close(S_tiny, S_one, rtol=1e-12, atol=0.0)
    assert S_one.abs().max() > 1e-4


def test_several_influence_checkpoints_are_an_ensemble_normalised_to_sum_one(mlp_data):
    model, x, y = mlp_data
    sd1, sd2 = perturbed(model, 0.2, 1), perturbed(model, 0.2, 2)
    method = dt.Influence(dt.ExactHessian(damping=1.0))
    task = dt.ClassificationTask(model)

    def single(sd):
        ck = [dt.Checkpoint.from_state_dict(sd)]
        return method.fit(task, ck, (x, y), progress=False).attribute((x[:4], y[:4]))

    lr = [dt.Checkpoint.from_state_dict(sd1, 3e-4), dt.Checkpoint.from_state_dict(sd2, 1e-4)]
    S = method.fit(task, lr, (x, y), progress=False).attribute((x[:4], y[:4]))
    torch.testing.assert_close(S, 0.75 * single(sd1) + 0.25 * single(sd2), rtol=1e-9, atol=1e-13)


def test_tracin_alone_multiplies_by_the_learning_rates(mlp_data):
    model, x, y = mlp_data
    task = dt.ClassificationTask(model)
    lr = [dt.Checkpoint.from_module(model, weight=7.9e-7)]
    one = [dt.Checkpoint.from_module(model, weight=1.0)]
    S_lr = dt.TracIn().fit(task, lr, (x, y), progress=False).attribute((x[:3], y[:3]))
    S_one = dt.TracIn().fit(task, one, (x, y), progress=False).attribute((x[:3], y[:3]))
    torch.testing.assert_close(S_lr, 7.9e-7 * S_one, rtol=1e-12, atol=0.0)
    S_trak = dt.TRAK(projection_dim=None).fit(task, lr, (x, y), progress=False)
    S_trak1 = dt.TRAK(projection_dim=None).fit(task, one, (x, y), progress=False)
    torch.testing.assert_close(
        S_trak.attribute((x[:3], y[:3])), S_trak1.attribute((x[:3], y[:3])), rtol=1e-12, atol=0.0
    )


def test_ensemble_weights_must_be_non_negative_and_not_all_zero(mlp_data):
    model, x, y = mlp_data
    bad = [dt.Checkpoint.from_module(model, weight=-1.0), dt.Checkpoint.from_module(model, 1.0)]
    with pytest.raises(dt.CheckpointError, match=r"ensemble weights.*>= 0"):
        dt.Influence(dt.ExactHessian(damping=1.0)).fit(
            dt.ClassificationTask(model), bad, (x, y), progress=False
        )
