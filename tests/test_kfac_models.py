"""K-FAC/EK-FAC on real models: tiny Hugging Face BERT and GPT-2 (built from configs), token
factors against float64 brute force with padding excluded, eval mode, the Fisher choices."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import MLP

import datatrace as dt
from datatrace.core.data import ExampleSource
from datatrace.curvature.context import FitContext
from datatrace.curvature.problem import CurvatureProblem

transformers = pytest.importorskip("transformers")
# transformers' mask code cannot be vmapped: dense features fall back to a per-example loop
pytestmark = pytest.mark.filterwarnings("ignore:vmap could not trace:RuntimeWarning")

T, VOCAB = 7, 100


def _padded_ids(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, T), generator=g)
    lengths = torch.randint(3, T + 1, (n,), generator=g)
    lengths[0] = T  # one example without padding
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    return ids * mask, mask


def _bert(dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, num_labels=3,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        attn_implementation="eager", initializer_range=0.3,
    )  # fmt: skip
    return transformers.BertForSequenceClassification(config).double().eval()


def _bert_data(n: int = 6, seed: int = 1) -> dict[str, torch.Tensor]:
    ids, mask = _padded_ids(n, seed)
    labels = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _layer(fitted, name):
    (lay,) = [lay for lay in fitted.preconditioners[0].layers if lay.name == name]
    return lay


def _brute_force(model, batch, layer, columns, inputs):
    """Per example alone, with plain autograd: A = Σ m ã ãᵀ / Σ m, S = (1/n) Σ_c Σ m e eᵀ,
    and the per-example [W | b] gradients of every output column (weight as (out, in))."""
    mod = model.get_submodule(layer)
    n = len(batch["input_ids"])
    A = S = 0.0
    count = 0.0
    grads = []
    for i in range(n):
        ex = {k: v[i : i + 1] for k, v in batch.items()}
        seen: dict[str, torch.Tensor] = {}
        hook = mod.register_forward_hook(
            lambda m, inp, out, seen=seen: seen.update(x=inp[0], y=out)
        )
        out = inputs(model, ex)[0]
        hook.remove()
        m = ex["attention_mask"][0].double()[:, None]
        a = torch.cat([seen["x"][0], torch.ones(T, 1, dtype=torch.float64)], 1)
        A = A + (a * m).T @ a
        count += float(m.sum())
        for r in columns(out, ex):
            e = torch.autograd.grad((out * r).sum(), seen["y"], retain_graph=True)[0][0]
            S = S + (e * m).T @ (e * m)
            gw, gb = torch.autograd.grad((out * r).sum(), [mod.weight, mod.bias], retain_graph=True)
            gw = gw.T if gw.shape[0] != gb.shape[0] else gw  # Conv1D keeps W as (in, out)
            grads.append(torch.cat([gw, gb[:, None]], 1))
    return A / count, S / n, grads


def _hessian_columns(logits, ex):
    p = torch.softmax(logits.detach(), -1)
    evals, evecs = torch.linalg.eigh(torch.diag(p) - torch.outer(p, p))
    return list((evecs * evals.clamp_min(0).sqrt()).T)


def _bert_inputs(model, ex):
    return model(input_ids=ex["input_ids"], attention_mask=ex["attention_mask"]).logits


def _fit_bert(model, batch, pre, **kw):
    task = dt.ClassificationTask(model)
    return dt.Influence(pre, **kw).fit(
        task, [dt.Checkpoint.from_module(model)], batch, progress=False, batch_size=4
    )


def test_bert_token_factors_equal_brute_force_with_padding_excluded(caplog):
    model, batch = _bert(), _bert_data()
    assert (batch["attention_mask"] == 0).any()
    with caplog.at_level(logging.INFO, logger="datatrace"):
        fitted = _fit_bert(model, batch, dt.EKFAC(damping=0.1, fisher="exact"))
    names = fitted.features.names
    assert "bert.encoder.layer.0.intermediate.dense.weight" in names  # a Linear on (B, T, d)
    assert not any("embeddings" in n or "LayerNorm" in n for n in names)
    assert "bert.embeddings.word_embeddings.weight (Embedding is not a K-FAC layer)" in caplog.text
    assert "LayerNorm.weight (LayerNorm is not a K-FAC layer)" in caplog.text
    for layer in (
        "bert.encoder.layer.0.intermediate.dense",
        "bert.encoder.layer.1.attention.self.query",
    ):
        lay = _layer(fitted, layer)
        A, S, grads = _brute_force(model, batch, layer, _hessian_columns, _bert_inputs)
        torch.testing.assert_close(lay.A, A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(lay.S, S, rtol=1e-9, atol=1e-14)
        lam = sum((lay.us.T @ g @ lay.ua) ** 2 for g in grads) / len(batch["labels"])
        torch.testing.assert_close(lay.lam, lam, rtol=1e-9, atol=1e-16)
        assert float(S.abs().max()) > 1e-8
    # more padding changes nothing: every example padded with 4 more tokens
    longer = _fit_bert(model, _padded_more(batch, 4), dt.EKFAC(damping=0.1, fisher="exact"))
    for lay in fitted.preconditioners[0].layers:
        ref = _layer(longer, lay.name)
        torch.testing.assert_close(lay.A, ref.A, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(lay.S, ref.S, rtol=1e-8, atol=1e-14)


def _padded_more(batch, extra):
    pad = torch.zeros(len(batch["input_ids"]), extra, dtype=torch.long)
    return {
        "input_ids": torch.cat([batch["input_ids"], pad], 1),
        "attention_mask": torch.cat([batch["attention_mask"], pad], 1),
        "labels": batch["labels"],
    }


def test_influence_ekfac_runs_end_to_end_on_a_tiny_bert_classifier():
    model, batch = _bert(), _bert_data(8, seed=2)
    fitted = _fit_bert(model, batch, dt.EKFAC())
    queries = {k: v[:3] for k, v in batch.items()}
    S = fitted.attribute(queries)
    assert S.shape == (3, 8) and bool(torch.isfinite(S).all())
    # self-influence is the diagonal, and training examples are their own top proponents
    torch.testing.assert_close(fitted.self_influence()[:3], S.diagonal(), rtol=1e-9, atol=1e-15)
    assert (S.argmax(1) == torch.arange(3)).all()


def test_curvature_is_fitted_in_eval_mode_and_the_mode_is_restored():
    model, batch = _bert(dropout=0.3), _bert_data()
    model.train()
    model.bert.encoder.layer[1].eval()  # a mixed state, restored exactly
    flags = {name: m.training for name, m in model.named_modules()}
    first = _fit_bert(model, batch, dt.EKFAC(damping=0.1))
    second = _fit_bert(model, batch, dt.EKFAC(damping=0.1))
    assert {name: m.training for name, m in model.named_modules()} == flags
    model.eval()
    in_eval = _fit_bert(model, batch, dt.EKFAC(damping=0.1))
    for lay in first.preconditioners[0].layers:
        for other in (second, in_eval):
            twin = _layer(other, lay.name)
            assert torch.equal(lay.A, twin.A) and torch.equal(lay.S, twin.S)
            assert torch.equal(lay.lam, twin.lam)


# -- GPT-2: Conv1D, tied embeddings, a language-modelling loss with padding ----------------


def _gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="eager",
        initializer_range=0.3,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).double().eval()


def _lm_logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _lm_loss(logits, batch):
    """Summed next-token NLL over real tokens (padding ignored)."""
    target = batch["input_ids"][:, 1:]
    keep = (batch["attention_mask"][:, 1:] * batch["attention_mask"][:, :-1]).to(logits.dtype)
    nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), target, reduction="none")
    return (nll * keep).sum(1)


def _lm_task(model):
    return dt.Task(
        model,
        lambda m, b: _lm_loss(_lm_logits(m, b), b),
        output_fn=_lm_logits,
        output_loss_fn=_lm_loss,
    )


def _lm_data(n=6, seed=3):
    ids, mask = _padded_ids(n, seed)
    return {"input_ids": ids, "attention_mask": mask}


def _fit_lm(model, batch, pre):
    return dt.Influence(pre).fit(
        _lm_task(model), [dt.Checkpoint.from_module(model)], batch, progress=False, batch_size=4
    )


def test_gpt2_conv1d_factors_equal_brute_force_and_tied_embeddings_are_left_out(caplog):
    model, batch = _gpt2(), _lm_data()
    assert model.lm_head.weight is model.transformer.wte.weight
    with caplog.at_level(logging.INFO, logger="datatrace"):
        fitted = _fit_lm(model, batch, dt.EKFAC(damping=0.1, fisher="empirical"))
    assert (
        "transformer.wte.weight (tied: shared by transformer.wte.weight (Embedding), "
        "lm_head.weight (Linear)" in caplog.text
    )
    assert "empirical Fisher" in caplog.text
    names = fitted.features.names
    assert (
        "transformer.h.0.mlp.c_fc.weight" in names and "transformer.h.1.attn.c_attn.bias" in names
    )
    assert not any("wte" in n or "wpe" in n or "ln_" in n for n in names)

    def empirical(out, ex):  # the gradient of the actual loss, one column
        o = out.detach().requires_grad_(True)
        return [torch.autograd.grad(_lm_loss(o[None], ex).sum(), o)[0]]

    layer = "transformer.h.0.mlp.c_fc"  # Conv1D 32 -> 128 on (B, T, 32)
    lay = _layer(fitted, layer)
    A, S, grads = _brute_force(model, batch, layer, empirical, _lm_logits)
    torch.testing.assert_close(lay.A, A, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lay.S, S, rtol=1e-9, atol=1e-14)
    lam = sum((lay.us.T @ g @ lay.ua) ** 2 for g in grads) / len(batch["input_ids"])
    torch.testing.assert_close(lay.lam, lam, rtol=1e-9, atol=1e-16)
    # the solve reads the Conv1D weight as (in, out): compare with the explicit matrix
    pc = fitted.preconditioners[0]
    s, e = pc.offsets[f"{layer}.weight"]
    bs, be = pc.offsets[f"{layer}.bias"]
    v = torch.randn(2, pc.problem.p, dtype=torch.float64)
    got = pc.solve(v)
    d_in, d_out = model.get_submodule(layer).weight.shape
    block = torch.cat([v[:, s:e].reshape(2, d_in, d_out).transpose(1, 2), v[:, bs:be, None]], 2)
    basis = torch.kron(lay.us, lay.ua)
    matrix = basis @ torch.diag(lay.lam.flatten()) @ basis.T + pc.damping * torch.eye(len(basis))
    x = torch.linalg.solve(matrix, block.reshape(2, -1).T).T.reshape(2, d_out, d_in + 1)
    torch.testing.assert_close(got[:, s:e], x[:, :, :-1].transpose(1, 2).reshape(2, -1))
    torch.testing.assert_close(got[:, bs:be], x[:, :, -1])


def test_gpt2_defaults_to_sampled_labels_seeded(caplog):
    model, batch = _gpt2(), _lm_data()
    with caplog.at_level(logging.INFO, logger="datatrace"):
        first = _fit_lm(model, batch, dt.EKFAC(damping=0.1))
    assert "sampled Fisher" in caplog.text  # T·V = 700 outputs per example > 100
    again = _fit_lm(model, batch, dt.EKFAC(damping=0.1))
    other = _fit_lm(model, batch, dt.EKFAC(damping=0.1, seed=1))
    queries = {k: v[:2] for k, v in batch.items()}
    S, S2, S3 = (f.attribute(queries) for f in (first, again, other))
    assert torch.equal(S, S2) and not torch.equal(S, S3)
    assert bool(torch.isfinite(S).all()) and S.abs().max() > 0
    with pytest.raises(dt.ConfigError, match=r"fisher='exact' needs a 700 × 700.*sampled"):
        from datatrace.curvature import fisher

        old, fisher.EXACT_LIMIT = fisher.EXACT_LIMIT, 100
        try:
            _fit_lm(model, batch, dt.EKFAC(damping=0.1, fisher="exact"))
        finally:
            fisher.EXACT_LIMIT = old


# -- sampled labels converge to the exact Gauss-Newton factors -----------------------------


def _factors(model, x, y, fisher, samples=1, seed=0):
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    problem = CurvatureProblem(
        dt.ClassificationTask(model), names, params, {}, ExampleSource((x, y)), batch_size=8
    )
    pre = dt.EKFAC(damping=1e-3, fisher=fisher, samples=samples, seed=seed)
    pc = pre.fit(FitContext(problem, 1.0, None, lambda: iter(())))
    return pc.layers, pc.matrix()


def test_sampled_label_fisher_converges_to_the_exact_gauss_newton_factors(mlp_data):
    """The sampled S is a mean of n·K independent terms whose expectation is the exact S
    (E[(p − e_ŷ)(p − e_ŷ)ᵀ] = diag p − p pᵀ), so its relative error falls like 1/√K:
    the RMS error over 4 seeds and both layers at K = 100 is 2-8× that at K = 1,600 (4
    expected; 2.9-6.4 measured over three sets of seeds), and K = 16,000 is within 1%
    (0.05-0.16% measured). The input side A does not depend on labels: equal exactly."""
    model, x, y = mlp_data
    exact, G_exact = _factors(model, x, y, "exact")

    def rms_error(k):
        sq = 0.0
        for seed in range(4):
            sampled, _ = _factors(model, x, y, "sampled", samples=k, seed=seed)
            for lay, ref in zip(sampled, exact, strict=True):
                assert torch.equal(lay.A, ref.A)
                sq += float((lay.S - ref.S).norm() ** 2 / ref.S.norm() ** 2)
        return (sq / 8) ** 0.5

    ratio = rms_error(100) / rms_error(1600)
    assert 2 < ratio < 8, ratio
    sampled, G_sampled = _factors(model, x, y, "sampled", samples=16000)
    for lay, ref in zip(sampled, exact, strict=True):
        assert float((lay.S - ref.S).norm() / ref.S.norm()) < 0.01
    rel = float((G_sampled - G_exact).norm() / G_exact.norm())  # EK-FAC's whole matrix
    assert rel < 0.02, rel


def test_sampled_labels_need_a_softmax_cross_entropy_loss():
    torch.manual_seed(0)
    model = MLP().double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    with pytest.raises(dt.ConfigError, match=r"fisher='sampled'.*softmax.*'empirical'"):
        _factors_regression(model, x, y)
    with pytest.raises(dt.ConfigError, match="fisher must be"):
        dt.EKFAC(fisher="true")
    with pytest.raises(dt.ConfigError, match="samples"):
        dt.KFAC(samples=0)


def _factors_regression(model, x, y):
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    problem = CurvatureProblem(
        dt.RegressionTask(model), names, params, {}, ExampleSource((x, y)), batch_size=8
    )
    return dt.EKFAC(damping=1e-3, fisher="sampled").fit(
        FitContext(problem, 1.0, None, lambda: iter(()))
    )


# -- which layers, decided before any gradient pass ----------------------------------------


class _Reused(torch.nn.Module):
    """``shared`` is called twice per forward, ``unused`` never."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = torch.nn.Linear(4, 4)
        self.unused = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def test_layers_are_chosen_before_any_gradient_pass(monkeypatch, caplog):
    from datatrace.methods import engine

    def no_gradients(*args, **kwargs):
        raise AssertionError("a gradient pass ran before the layer check")

    torch.manual_seed(0)
    model = _Reused().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    task, ckpts = dt.ClassificationTask(model), [dt.Checkpoint.from_module(model)]
    with monkeypatch.context() as patched:
        patched.setattr(engine, "featurize", no_gradients)
        with pytest.raises(dt.ConfigError, match=r"'shared.weight' \(called 2 times per forward"):
            dt.Influence(dt.EKFAC(), params=["shared.weight", "head"]).fit(task, ckpts, (x, y))
        with pytest.raises(dt.ConfigError, match=r"'unused.bias' \(not called by the loss"):
            dt.Influence(dt.KFAC(), params=["unused.bias"]).fit(task, ckpts, (x, y))
    with caplog.at_level(logging.INFO, logger="datatrace"):
        fitted = dt.Influence(dt.EKFAC(damping=0.1)).fit(task, ckpts, (x, y), progress=False)
    assert fitted.features.names == ["head.weight", "head.bias"]
    assert "shared.weight (called 2 times per forward)" in caplog.text
    assert "unused.weight (not called by the loss)" in caplog.text


def test_token_mask_default():
    task = dt.ClassificationTask(MLP())
    mask = torch.tensor([[1, 1, 0]])
    assert task.token_mask({"input_ids": mask, "attention_mask": mask}) is mask
    assert task.token_mask({"input_ids": mask}) is None
    assert task.token_mask((torch.zeros(1, 5), torch.zeros(1))) is None


def test_sampled_columns_of_a_masked_scaled_token_loss_average_to_its_output_hessian():
    """Per-token cross-entropy with a mask and a scale c (a mean over counted tokens):
    E[Σ_c r_c r_cᵀ] over sampled labels equals the exact output Hessian, block by block,
    and uncounted tokens get nothing. Monte Carlo error with 100,000 samples: 0.6-1% of the
    largest entry (measured over seeds at 40,000: 1-1.5%, falling like 1/√K); asserted 3%."""
    from datatrace.curvature.fisher import Fisher, output_columns

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    batch = {
        "labels": torch.tensor([[1, 3, 0], [2, 2, 1]]),
        "keep": torch.tensor([[1, 0, 1], [1, 1, 1]]),
    }

    def loss(out, b):
        nll = F.cross_entropy(out.transpose(1, 2), b["labels"], reduction="none")
        keep = b["keep"].to(out.dtype)
        return (nll * keep).sum(1) / keep.sum(1)

    task = dt.Task(
        MLP(), lambda m, b: loss(m(b), b), output_fn=lambda m, b: m(b), output_loss_fn=loss
    )
    exact = output_columns(task, logits, batch, Fisher.EXACT, 1, None)  # (12, 2, 3, 4)
    sampled = output_columns(task, logits, batch, Fisher.SAMPLED, 100_000, g)
    for i in range(2):
        h_exact = torch.einsum("ca,cb->ab", exact[:, i].flatten(1), exact[:, i].flatten(1))
        h_sampled = torch.einsum("ca,cb->ab", sampled[:, i].flatten(1), sampled[:, i].flatten(1))
        torch.testing.assert_close(
            h_sampled, h_exact, rtol=0, atol=0.03 * float(h_exact.abs().max())
        )
    assert float(sampled[:, 0, 1].abs().max()) == 0.0  # the masked token


class _Grouped(torch.nn.Module):
    """A Linear on tokens (masked) and one on a (batch, 2, d) input without the token axis."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, 4)
        self.tok = torch.nn.Linear(4, 4)
        self.grp = torch.nn.Linear(2, 3)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.tok(self.emb(input_ids))) * attention_mask[..., None]
        pooled = h.sum(1) / attention_mask.sum(1, keepdim=True)
        return self.head(self.grp(pooled.reshape(-1, 2, 2)).flatten(1))


def test_an_input_without_the_token_axis_is_warned_about_once(caplog):
    torch.manual_seed(0)
    model = _Grouped().double()
    batch = _bert_data(9, seed=4)
    with caplog.at_level(logging.INFO, logger="datatrace"):
        fitted = _fit_bert(model, batch, dt.EKFAC(damping=0.1))
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "'grp'" in r.message]
    assert len(warned) == 1 and "padded positions (if any) are counted" in warned[0].message
    tok = _layer(fitted, "tok")
    m = batch["attention_mask"].double()
    a = torch.cat([model.emb(batch["input_ids"]), torch.ones(9, T, 1, dtype=torch.float64)], 2)
    A = torch.einsum("bti,btj->ij", a * m[..., None], a) / m.sum()
    torch.testing.assert_close(tok.A, A.detach(), rtol=1e-12, atol=1e-14)
