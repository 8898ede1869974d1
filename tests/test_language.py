"""dt.LanguageModelingTask against hand-computed negative log-likelihoods (float64), on a
tiny GPT-2 built from a config (hidden 32, 2 layers, vocabulary 100) and a plain module."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import datatrace as dt

transformers = pytest.importorskip("transformers")

VOCAB = 100


def tiny_gpt2(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    config._attn_implementation = "eager"  # its mask code is vmap-traceable (sdpa's is not)
    model = transformers.GPT2LMHeadModel(config).double().eval()
    return model


def padded_batch(n: int = 6, T: int = 9, seed: int = 1) -> dict[str, torch.Tensor]:
    """Right-padded sequences of lengths 3..T (pad id 0), prompts of 1-2 tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, T), generator=g)
    lengths = torch.tensor([3 + (i * 5) % (T - 2) for i in range(n)])
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    ids = ids * mask
    prompt = torch.tensor([1 + i % 2 for i in range(n)])
    return {"input_ids": ids, "attention_mask": mask, "prompt_length": prompt}


def hand_nll(model: nn.Module, batch: dict, prompt: bool) -> torch.Tensor:
    """Σ_t −log p(x_t | x_<t) over real tokens t ≥ 1 (t ≥ prompt_length with ``prompt``),
    one sequence at a time, without padding."""
    out = []
    for i in range(len(batch["input_ids"])):
        length = int(batch["attention_mask"][i].sum())
        ids = batch["input_ids"][i, :length]
        logits = model(input_ids=ids[None])
        logits = getattr(logits, "logits", logits)[0]
        start = int(batch["prompt_length"][i]) if prompt else 1
        total = torch.zeros((), dtype=torch.float64)
        for t in range(max(start, 1), length):
            total = total - torch.log_softmax(logits[t - 1], -1)[ids[t]]
        out.append(total)
    return torch.stack(out)


def test_loss_is_the_summed_token_nll_of_each_sequence_without_its_padding():
    model, batch = tiny_gpt2(), padded_batch()
    task = dt.LanguageModelingTask(model)
    with torch.no_grad():
        loss = task.loss(model, batch)
        ref = hand_nll(model, batch, prompt=False)
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    # Hugging Face's own loss (mean over counted tokens) times the token count, per sequence
    # (it computes the cross-entropy in float32, hence the tolerance)
    for i in range(len(loss)):
        length = int(batch["attention_mask"][i].sum())
        ids = batch["input_ids"][i : i + 1, :length]
        with torch.no_grad():
            hf = model(input_ids=ids, labels=ids).loss * (length - 1)
        assert math.isclose(float(hf), float(loss[i]), rel_tol=1e-6)


def test_measurement_masks_the_prompt_given_as_length_mask_or_labels():
    model, batch = tiny_gpt2(), padded_batch()
    task = dt.LanguageModelingTask(model)
    with torch.no_grad():
        ref = hand_nll(model, batch, prompt=True)
        by_length = task.measurement(model, batch)
        T = batch["input_ids"].shape[1]
        completion = (torch.arange(T)[None, :] >= batch["prompt_length"][:, None]).long()
        by_mask = task.measurement(
            model,
            {k: v for k, v in batch.items() if k != "prompt_length"}
            | {"completion_mask": completion},
        )
        labels = batch["input_ids"].masked_fill(
            (completion == 0) | (batch["attention_mask"] == 0), -100
        )
        with_labels = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                       "labels": labels}  # fmt: skip
        by_labels = task.measurement(model, with_labels)
        loss_with_labels = task.loss(model, with_labels)  # -100 labels count nowhere
    for got in (by_length, by_mask, by_labels, loss_with_labels):
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    counts = torch.tensor(
        [
            int(m.sum()) - int(p)
            for m, p in zip(batch["attention_mask"], batch["prompt_length"], strict=True)
        ],
        dtype=torch.float64,
    )
    normalised = dt.LanguageModelingTask(model, length_normalised=True)
    with torch.no_grad():
        torch.testing.assert_close(
            normalised.measurement(model, batch), ref / counts, rtol=1e-10, atol=0
        )
        # the training loss stays summed
        torch.testing.assert_close(normalised.loss(model, batch), task.loss(model, batch))


class TinyLM(nn.Module):
    """A plain module returning logits (no Hugging Face): embedding, a causal mix, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        h = torch.tanh(self.emb(input_ids)).cumsum(1)
        return self.head(h)


def test_plain_module_and_gradients_match_a_float64_brute_force():
    torch.manual_seed(0)
    model = TinyLM().double()
    batch = padded_batch(n=8, T=7, seed=3)
    queries = padded_batch(n=3, T=7, seed=4)
    task = dt.LanguageModelingTask(model)

    def grads(fn, data):
        rows = []
        for i in range(len(data["input_ids"])):
            model.zero_grad()
            fn({k: v[i : i + 1] for k, v in data.items()}).sum().backward()
            rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        return torch.stack(rows)

    g = grads(lambda b: hand_nll(model, b, False), batch)
    q = grads(lambda b: hand_nll(model, b, True), queries)
    fitted = dt.GradDot().fit(task, [dt.Checkpoint.from_module(model)], batch, progress=False)
    torch.testing.assert_close(fitted.attribute(queries), q @ g.T, rtol=1e-9, atol=1e-12)


def test_gpt2_grad_dot_with_padding_and_other_query_lengths_matches_per_sequence_gradients():
    model = tiny_gpt2()
    # queries: another length than the training sequences, and a key of their own
    batch, queries = padded_batch(n=5, T=8, seed=5), padded_batch(n=2, T=6, seed=6)
    del batch["prompt_length"]
    task = dt.LanguageModelingTask(model, length_normalised=True)
    names = ["transformer.h.1.mlp.c_proj.weight", "transformer.h.1.ln_2.bias"]
    params = dict(model.named_parameters())

    def grads(data, prompt):
        per = hand_nll(model, data, prompt)
        if prompt:  # length-normalised measurement
            per = per / (data["attention_mask"].sum(1) - data["prompt_length"])
        rows = []
        for v in per:
            gs = torch.autograd.grad(v, [params[n] for n in names], retain_graph=True)
            rows.append(torch.cat([x.flatten() for x in gs]))
        return torch.stack(rows)

    fitted = dt.GradDot(params=names).fit(
        task, [dt.Checkpoint.from_module(model)], batch, progress=False
    )
    ref = grads(queries, True) @ grads(batch, False).T
    torch.testing.assert_close(fitted.attribute(queries), ref, rtol=1e-8, atol=1e-12)


def test_queries_longer_than_every_training_sequence_get_wider_factored_features():
    """Factored layers are laid out for the training sequences' tokens; a query batch with
    longer sequences (after a shorter one) widens the queries' arrays with zero tokens, and
    the scores still equal per-sequence gradients' products (float64)."""
    model = tiny_gpt2()
    batch = padded_batch(n=5, T=8, seed=5)
    del batch["prompt_length"]
    queries = padded_batch(n=4, T=12, seed=6)
    lengths = torch.tensor([4, 3, 11, 12])
    queries["attention_mask"] = (torch.arange(12)[None, :] < lengths[:, None]).long()
    queries["input_ids"] = queries["input_ids"] * queries["attention_mask"]
    task = dt.LanguageModelingTask(model)
    names = ["transformer.h.1.mlp.c_proj.weight", "transformer.h.0.attn.c_attn.weight"]
    params = dict(model.named_parameters())

    def grads(data, prompt):
        rows = []
        for v in hand_nll(model, data, prompt):
            gs = torch.autograd.grad(v, [params[n] for n in names], retain_graph=True)
            rows.append(torch.cat([x.flatten() for x in gs]))
        return torch.stack(rows)

    fitted = dt.GradDot(params=names).fit(
        task, [dt.Checkpoint.from_module(model)], batch, progress=False, batch_size=2
    )
    assert fitted.features.tokens["transformer.h.1.mlp.c_proj"] == 8  # factored, 8 tokens
    ref = grads(queries, True) @ grads(batch, False).T
    torch.testing.assert_close(fitted.attribute(queries), ref, rtol=1e-8, atol=1e-12)


def test_bad_batches_are_named():
    model = tiny_gpt2()
    task = dt.LanguageModelingTask(model)
    ckpt = [dt.Checkpoint.from_module(model)]
    with pytest.raises(dt.DataError, match="input_ids"):
        dt.GradDot().fit(task, ckpt, {"tokens": torch.zeros(2, 4, dtype=torch.long)})
    with pytest.raises(dt.DataError, match="integer token ids"):
        dt.GradDot().fit(task, ckpt, {"input_ids": torch.zeros(2, 4)})
    ids = torch.ones(3, 4, dtype=torch.long)
    with pytest.raises(dt.DataError, match=r"examples \[1\] have no token"):
        mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
        dt.GradDot().fit(task, ckpt, {"input_ids": ids, "attention_mask": mask})
    with pytest.raises(dt.DataError, match=r"out of range \[0, 100\) in examples \[2\]"):
        bad = ids.clone()
        bad[2, 1] = VOCAB
        dt.GradDot().fit(task, ckpt, {"input_ids": bad}, progress=False)
    with pytest.raises(dt.ConfigError, match="length_normalised"):
        dt.LanguageModelingTask(model, length_normalised="yes")


def test_a_dataloader_gets_the_checks_tensors_get():
    """The whole-data checks ran only on tensors: through a DataLoader an all-padding
    training row scored a column of zeros and a query whose prompt covers it a row of
    zeros; now every batch is checked, and the error names the example."""
    from torch.utils.data import DataLoader

    torch.manual_seed(0)
    model = TinyLM().double()
    task = dt.LanguageModelingTask(model)
    ckpt = [dt.Checkpoint.from_module(model)]
    ids = torch.randint(0, VOCAB, (6, 5))
    mask = torch.ones(6, 5, dtype=torch.long)
    mask[4] = 0
    rows = [{"input_ids": ids[i], "attention_mask": mask[i]} for i in range(6)]
    with pytest.raises(dt.DataError, match=r"examples \[4\] have no token"):
        dt.GradDot().fit(task, ckpt, DataLoader(rows, batch_size=2))
    fitted = dt.GradDot().fit(task, ckpt, DataLoader(rows[:4], batch_size=2))
    queries = [{"input_ids": ids[i], "prompt_length": torch.tensor(p)} for i, p in ((0, 2), (1, 5))]
    with pytest.raises(dt.DataError, match=r"examples \[1\] have no token"):
        fitted.attribute(DataLoader(queries, batch_size=2))
    halves = [{"input_ids": ids[0], "prompt_length": torch.tensor(1.5)}]
    with pytest.raises(dt.DataError, match="prompt_length must be one integer"):
        fitted.attribute(DataLoader(halves, batch_size=1))


def test_gauss_newton_influence_uses_the_logits_and_matches_a_hand_built_matrix():
    torch.manual_seed(0)
    model = TinyLM().double()
    batch = padded_batch(n=6, T=5, seed=3)
    del batch["prompt_length"]
    queries = padded_batch(n=2, T=5, seed=4)
    task = dt.LanguageModelingTask(model)
    names = [n for n, _ in model.named_parameters()]
    theta = {n: p.detach() for n, p in model.named_parameters()}

    def flat_logits(flat, ids):  # the logits as a function of the flattened parameters
        sizes = [theta[n].numel() for n in names]
        params = {n: v.view_as(theta[n]) for n, v in zip(names, flat.split(sizes), strict=True)}
        return torch.func.functional_call(model, params, (ids,))

    flat = torch.cat([theta[n].flatten() for n in names])
    G = torch.zeros(len(flat), len(flat), dtype=torch.float64)
    for i in range(len(batch["input_ids"])):
        length = int(batch["attention_mask"][i].sum())
        ids = batch["input_ids"][i : i + 1, :length]
        J = torch.autograd.functional.jacobian(lambda f, ids=ids: flat_logits(f, ids)[0], flat)
        p = torch.softmax(flat_logits(flat, ids)[0], -1)
        for t in range(length - 1):  # position t predicts token t + 1: H = diag(p) − p pᵀ
            H = torch.diag(p[t]) - torch.outer(p[t], p[t])
            G += J[t].T @ H @ J[t]
    n, damping = len(batch["input_ids"]), 0.05
    G = G / n + damping * torch.eye(len(flat), dtype=torch.float64)

    def grads(data, prompt):
        rows = []
        for v in hand_nll(model, data, prompt):
            gs = torch.autograd.grad(v, list(model.parameters()), retain_graph=True)
            rows.append(torch.cat([x.flatten() for x in gs]))
        return torch.stack(rows)

    ref = grads(queries, True) @ torch.linalg.solve(G, grads(batch, False).T) / n
    ckpt = [dt.Checkpoint.from_module(model)]
    cg = dt.ConjugateGradient(damping=damping, gauss_newton=True, max_iter=400, tol=1e-14)
    for pc in (dt.GaussNewton(damping=damping), cg):
        S = dt.Influence(pc).fit(task, ckpt, batch, progress=False).attribute(queries)
        torch.testing.assert_close(S, ref, rtol=1e-6, atol=1e-9 * float(ref.abs().max()))


def test_declared_cross_entropy_rows_draw_the_labels_the_checked_gradient_draws():
    """The sampled Fisher skips the loss's output gradient for a language model (its loss
    is a weight-1 cross-entropy at each counted token, by construction): the same rows,
    the same sampled labels for the same seed, scale 1, as the gradient-checked draw;
    labels of -100 and padding count nowhere."""
    from datatrace.curvature.fisher import draw_at_rows, draw_labels, loss_gradient

    model = tiny_gpt2()
    task = dt.LanguageModelingTask(model)
    batch = padded_batch(5, 9, seed=3)
    batch["labels"] = batch["input_ids"].clone()
    batch["labels"][1, 3] = -100
    out = task.outputs(lambda **kw: model(**kw), batch).detach()
    rows = task.cross_entropy_rows(out, batch)
    checked = draw_labels(out, loss_gradient(task, out, batch), 4, torch.Generator().manual_seed(7))
    declared = draw_at_rows(out, rows, 4, torch.Generator().manual_seed(7))
    assert torch.equal(declared.rows, checked.rows) and torch.equal(declared.labels, checked.labels)
    torch.testing.assert_close(checked.scale, declared.scale, rtol=1e-10, atol=0)
    _, keep = task.targets(batch, completion=False)
    assert len(rows) == int(keep.sum()) and 1 * 9 + 2 not in rows.tolist()  # labels -100
