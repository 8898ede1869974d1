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


def loss_grads(model, fn, rows):
    """Per-example gradients of ``fn(model, one_example)`` by plain autograd, (n, p)."""
    out = []
    for r in rows:
        model.zero_grad()
        fn(model, r).sum().backward()
        out.append(torch.cat([q.grad.flatten() for q in model.parameters() if q.grad is not None]))
    return torch.stack(out)


def test_trak_on_regression_differentiates_the_loss_with_unit_weights(data):
    model, x, _ = data
    y = torch.randn(120, 3, dtype=torch.float64)
    sq = lambda m, r: ((m(r[0]) - r[1]) ** 2).sum()  # noqa: E731
    phi = loss_grads(model, sq, [(x[i : i + 1], y[i : i + 1]) for i in range(120)])
    phi_q = phi[:4]
    n = len(x)
    ref = phi_q @ torch.linalg.solve(phi.T @ phi / n, phi.T) / n  # weights 1: ∂ℓ/∂f = 1
    ckpt = [dt.Checkpoint.from_module(model)]
    fitted = dt.TRAK(projection_dim=None, damping=0.0).fit(
        dt.RegressionTask(model), ckpt, (x, y), progress=False
    )
    torch.testing.assert_close(fitted.attribute((x[:4], y[:4])), ref, rtol=1e-7, atol=1e-11)
    torch.testing.assert_close(
        fitted.self_influence(), fitted.attribute((x, y)).diagonal(), rtol=1e-9, atol=1e-12
    )


def test_trak_on_a_language_model_uses_loss_for_training_and_measurement_for_queries():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=100, n_positions=12, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    config._attn_implementation = "eager"
    model = transformers.GPT2LMHeadModel(config).double().eval()
    g = torch.Generator().manual_seed(1)
    n, T = 24, 8
    ids = torch.randint(1, 100, (n, T), generator=g)
    lengths = 3 + torch.arange(n) % (T - 2)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    train = {"input_ids": ids * mask, "attention_mask": mask}
    queries = {"input_ids": ids[:3] * mask[:3], "attention_mask": mask[:3],
               "prompt_length": torch.tensor([2, 1, 2])}  # fmt: skip
    # a small parameter subset (18 < 24 examples) keeps the Gram matrix invertible
    names = ["transformer.h.1.ln_2.weight"]
    damping = 1e-3
    task = dt.LanguageModelingTask(model)
    fitted = dt.TRAK(projection_dim=None, damping=damping, params=names).fit(
        task, [dt.Checkpoint.from_module(model)], train, progress=False
    )
    param = dict(model.named_parameters())[names[0]]

    def grads(data, completion):  # NLL written out token by token
        rows = []
        for i in range(len(data["input_ids"])):
            length = int(data["attention_mask"][i].sum())
            seq = data["input_ids"][i, :length]
            logp = torch.log_softmax(model(input_ids=seq[None]).logits[0], -1)
            start = int(data["prompt_length"][i]) if completion else 1
            nll = -sum(logp[t - 1, seq[t]] for t in range(max(start, 1), length))
            rows.append(torch.autograd.grad(nll, param)[0].flatten())
        return torch.stack(rows)

    phi, phi_q = grads(train, False), grads(queries, True)
    eye = torch.eye(phi.shape[1], dtype=torch.float64)
    ref = phi_q @ torch.linalg.solve(phi.T @ phi / n + damping * eye, phi.T) / n
    torch.testing.assert_close(fitted.attribute(queries), ref, rtol=1e-7, atol=1e-11)
