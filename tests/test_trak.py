"""TRAK against its unprojected Gram-inverse formula (float64)."""

from __future__ import annotations

import pytest
import torch
from conftest import MLP, perturbed

import datatrace as dt


def margin_grads(state, x, y):
    m = MLP().double()
    m.load_state_dict(state)
    rows, probs = [], []
    for i in range(len(x)):
        m.zero_grad()
        logits = m(x[i : i + 1])[0]
        p = torch.softmax(logits, 0)[y[i]]
        margin = torch.log(p) - torch.log(1 - p)
        margin.backward()
        rows.append(torch.cat([q.grad.flatten() for q in m.parameters()]))
        probs.append(p.detach())
    return torch.stack(rows), torch.stack(probs)


@pytest.fixture
def data():
    torch.manual_seed(0)
    model = MLP().double()
    x = torch.randn(120, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (120,))
    return model, x, y


def trak_reference(state, x, y, xq, yq):
    phi, p = margin_grads(state, x, y)
    phi_q, _ = margin_grads(state, xq, yq)
    n = len(x)
    return phi_q @ torch.linalg.solve(phi.T @ phi / n, phi.T) * (1 - p)[None, :] / n


def test_trak_with_projection_at_least_the_parameter_count_is_the_exact_formula(data):
    model, x, y = data
    p = sum(t.numel() for t in model.parameters())  # 66 < 120 examples: Gram is invertible
    fitted = dt.TRAK(projection_dim=p + 14, damping=0.0).fit(
        dt.ClassificationTask(model), [dt.Checkpoint.from_module(model)], (x, y), progress=False
    )
    S = fitted.attribute((x[:5], y[:5]))
    ref = trak_reference(model.state_dict(), x, y, x[:5], y[:5])
    torch.testing.assert_close(S, ref, rtol=1e-6, atol=1e-9 * ref.abs().max().item())
    exact = dt.TRAK(projection_dim=None, damping=0.0).fit(
        dt.ClassificationTask(model), [dt.Checkpoint.from_module(model)], (x, y), progress=False
    )
    torch.testing.assert_close(exact.attribute((x[:5], y[:5])), ref, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(
        fitted.self_influence(), fitted.attribute((x, y)).diagonal(), rtol=1e-9, atol=1e-12
    )


def test_trak_averages_checkpoints(data):
    model, x, y = data
    sd1, sd2 = perturbed(model, 0.2, 1), perturbed(model, 0.2, 2)
    ckpts = [
        dt.Checkpoint.from_state_dict(sd1, weight=0.9),
        dt.Checkpoint.from_state_dict(sd2, weight=0.1),
    ]
    S = (
        dt.TRAK(projection_dim=None, damping=0.0)
        .fit(dt.ClassificationTask(model), ckpts, (x, y), progress=False)
        .attribute((x[:3], y[:3]))
    )
    ref = trak_reference(sd1, x, y, x[:3], y[:3]) + trak_reference(sd2, x, y, x[:3], y[:3])
    torch.testing.assert_close(S, ref / 2, rtol=1e-8, atol=1e-12)


def test_trak_needs_a_classification_task(data):
    model, x, _ = data
    with pytest.raises(dt.ConfigError, match="ClassificationTask"):
        dt.TRAK().fit(dt.RegressionTask(model), [dt.Checkpoint.from_module(model)], (x, x[:, :3]))
