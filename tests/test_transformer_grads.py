"""Hook rules for transformer layers against torch.func / a per-example loop (float64):
Linear on (batch, tokens, features), transformers' Conv1D, Embedding (with padding_idx and
broadcast (1, T) ids), LayerNorm, tied embeddings, and whole tiny BERT and GPT-2 models
with padded batches (no vmap needed)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import datatrace as dt
from datatrace.features.featurizer import GradientFeatures
from datatrace.features.spec import FeatureSpec
from datatrace.grads.per_example import flatten_grads, per_example_grads_loop, select_parameters
from datatrace.grads.rules import Term, capture, form, form_into, hook_plan, hooked_grads

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402


class Blocks(nn.Module):
    """Every rule in one model: Embedding (padding_idx) + broadcast position Embedding,
    LayerNorm over 2 dims, Linear on 3-D input, Conv1D, and an output Linear tied to the
    token Embedding."""

    def __init__(self, vocab: int = 13, dim: int = 6) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim, padding_idx=0)
        self.pos = nn.Embedding(9, dim)
        self.norm = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm((3, dim))
        self.lin = nn.Linear(dim, dim)
        self.conv1d = Conv1D(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.tok.weight  # tied

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = self.pos(torch.arange(ids.shape[1])[None])  # (1, T, d): broadcast over the batch
        h = self.norm(self.tok(ids) + pos)
        h = torch.tanh(self.lin(h)) + self.conv1d(h)
        h = self.norm2(h.reshape(h.shape[0], -1, 3, h.shape[-1])).reshape(h.shape)
        return self.out(h).mean(1)  # (B, vocab)


def _model_and_batch():
    torch.manual_seed(0)
    model = Blocks().double().eval()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        for m in (model.norm, model.norm2):
            m.weight.add_(0.3 * torch.randn_like(m.weight))
            m.bias.add_(0.3 * torch.randn_like(m.bias))
    ids = torch.randint(0, 13, (5, 6))
    ids[1, 4:] = 0  # padding ids
    y = torch.randint(0, 13, (5,))
    return model, ids, y


def test_every_rule_equals_vmap_grad_per_example():
    """Embedding (padding_idx, broadcast ids), LayerNorm, Linear on 3-D input, Conv1D and a
    tied output Linear: the hooked per-example gradients equal torch.func's vmap(grad)."""
    model, ids, y = _model_and_batch()
    params = dict(model.named_parameters())
    assert "out.weight" not in params  # tied: one parameter, two layers

    def loss(p, i, t):
        logits = functional_call(model, p, (i[None],))
        return F.cross_entropy(logits, t[None])

    ref = vmap(grad(loss), in_dims=(None, 0, 0))(params, ids, y)
    task = dt.ClassificationTask(model)
    names = select_parameters(model, None)
    plan = hook_plan(model, names)
    assert set(plan.params) == set(names)
    assert plan.params["tok.weight"] == [("out", "weight"), ("tok", "weight")]
    modules = {lay: model.get_submodule(lay) for lay in plan.layers}
    calls, _ = capture(task, params, {}, (ids, y), modules)
    contrib = hooked_grads(plan, model, calls)
    for name in names:
        got = sum(form(c, params[name].shape) for c in contrib[name])
        torch.testing.assert_close(got, ref[name], rtol=1e-10, atol=1e-12, msg=name)
    # the Embedding's own contribution leaves the padding_idx row at 0 (the tied output
    # layer's does not)
    (emb,) = [c for c in contrib["tok.weight"] if c.indexed]
    assert torch.all(form(emb, (13, 6))[:, 0] == 0) and bool((ids == 0).any())


def test_a_tied_weight_gets_both_rules_summed_in_every_layout():
    model, ids, y = _model_and_batch()
    task = dt.ClassificationTask(model)
    params = dict(model.named_parameters())
    names = select_parameters(model, None)
    g, _ = per_example_grads_loop(task, params, {}, (ids, y), names)
    flat = flatten_grads(g, names)
    for spec in (FeatureSpec(), FeatureSpec(factored=False), FeatureSpec(params=("tok",))):
        feats = GradientFeatures(spec, task)
        f = feats.compute(params, {}, (ids, y), False, 0)
        assert not feats.vmap_names
        cols = torch.cat([torch.arange(*_span(names, params, n)) for n in feats.names])
        ref = flat[:, cols]
        torch.testing.assert_close(feats.pairwise(f, f), ref @ ref.T, rtol=1e-10, atol=1e-12)


def _span(names, params, name):
    start = sum(params[n].numel() for n in names[: names.index(name)])
    return start, start + params[name].numel()


def _explicit_projection(feats, grads, names, n):
    """The slow twin of a projected feature: the Kronecker projector's explicit path over
    each unit's formed gradient [(out, in) weight | bias], plus the dense matrix product."""
    out = torch.zeros(n, feats.projector.dim, dtype=torch.float64)
    if feats.dense_proj_names:
        out += flatten_grads(grads, feats.dense_proj_names) @ feats.projector.matrix()
    blocks = []
    for (w, b, rows, cols), lay in zip(feats.units, feats.kr_layers, strict=True):
        parts = []
        if w is not None:
            gw = grads[w].reshape(n, -1, grads[w].shape[-1])
            if feats.hooked[lay] == "conv1d":  # transformers' Conv1D: stored (in, out)
                gw = gw.transpose(1, 2)
            parts.append(gw.reshape(n, rows, cols))
        if b is not None:
            parts.append(grads[b].reshape(n, rows, 1))
        blocks.append(torch.cat(parts, 2).flatten(1))
    if blocks:
        out += feats.kronecker_projector(blocks)
    return out


@pytest.mark.parametrize("block", [1, 2])
def test_kronecker_projection_of_every_rule_equals_the_explicit_projection(block):
    """Linear (3-D), Conv1D (transposed), Embedding (indexed) and the tied weight are
    projected from their factors (LoGra), never forming a gradient: equal to projecting the
    explicit per-example gradients; LayerNorm goes through the dense projection."""
    model, ids, y = _model_and_batch()
    task = dt.ClassificationTask(model)
    params = dict(model.named_parameters())
    names = select_parameters(model, None)
    feats = GradientFeatures(FeatureSpec(projection_dim=20, kronecker_block=block), task)
    out = feats.compute(params, {}, (ids, y), False, 0)["proj"]
    assert set(feats.kr_layers) == {"tok", "pos", "lin", "conv1d"}  # tok: the tied unit
    assert set(feats.dense_proj_names) == {"norm.weight", "norm.bias", "norm2.weight", "norm2.bias"}
    g, _ = per_example_grads_loop(task, params, {}, (ids, y), names)
    ref = _explicit_projection(feats, g, names, len(ids))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def _bert():
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=37, max_position_embeddings=24, num_labels=3,
        attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).double().eval()
    ids = torch.randint(1, 100, (4, 7))
    mask = torch.ones_like(ids)
    mask[1, 3:] = 0  # padded examples
    mask[3, 5:] = 0
    ids = ids * mask  # pad id 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2, 1, 2])}
    return model, batch


def _gpt2():
    cfg = transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=16,
        attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    ids = torch.randint(0, 100, (3, 6))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    return model, {"input_ids": ids, "attention_mask": mask}


def _lm_loss(m, batch):
    """Per-example next-token cross-entropy over unpadded tokens."""
    logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    target = batch["input_ids"][:, 1:]
    keep = batch["attention_mask"][:, 1:].to(logits.dtype)
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), target, reduction="none")
    return (ce * keep).sum(1)


def _hf_case(kind):
    if kind == "bert":
        model, batch = _bert()
        return dt.ClassificationTask(model), batch
    model, batch = _gpt2()
    return dt.Task(model, _lm_loss, _lm_loss), batch


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_hugging_face_models_need_no_vmap_and_match_a_per_example_loop(kind):
    """Tiny BERT (sequence classification) and GPT-2 (LM head tied to the token embedding)
    with padded batches: every parameter gets its gradient from hook rules, and the
    features' inner products (factored, formed, projected) equal the per-example loop's."""
    task, batch = _hf_case(kind)
    model = task.model
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    names = select_parameters(model, None)
    g, _ = per_example_grads_loop(task, params, buffers, batch, names)
    flat = flatten_grads(g, names)
    n = len(flat)
    for spec in (FeatureSpec(), FeatureSpec(factored=True)):
        feats = GradientFeatures(spec, task)
        f = feats.compute(params, buffers, batch, False, 0)
        assert feats.vmap_names == []  # no vmap, no loop
        if kind == "bert":  # its own word embedding: ids and output gradients, not (V, d)
            assert "bert.embeddings.word_embeddings" in feats.indexed
            assert f["bert.embeddings.word_embeddings.i"].shape == (n, 7)
        torch.testing.assert_close(feats.pairwise(f, f), flat @ flat.T, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(feats.sqnorm(f), (flat**2).sum(1), rtol=1e-9, atol=1e-11)
    assert feats.tokens and max(feats.tokens.values()) > 1  # factored token-level layers
    proj = GradientFeatures(FeatureSpec(projection_dim=64), task)
    out = proj.compute(params, buffers, batch, False, 0)["proj"]
    assert proj.vmap_names == [] and proj.units
    ref = _explicit_projection(proj, g, names, n)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)


def test_padded_tokens_contribute_nothing():
    """An example's hooked gradient is the same padded to 7 tokens in a batch as alone and
    unpadded (3 tokens)."""
    task, batch = _hf_case("bert")
    model = task.model
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    feats = GradientFeatures(FeatureSpec(factored=False), task)
    padded = feats.compute(params, buffers, batch, False, 0)["dense"][1]
    alone = {k: v[1:2, :3] if v.dim() == 2 else v[1:2] for k, v in batch.items()}
    assert bool(alone["attention_mask"].all())
    short = GradientFeatures(FeatureSpec(factored=False), task)
    ref = short.compute(params, buffers, alone, False, 0)["dense"][0]
    torch.testing.assert_close(padded, ref, rtol=1e-9, atol=1e-11)


def test_the_per_example_loop_is_logged_at_warning_with_its_cost_and_fix(caplog):
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3, dtype=torch.float64))
            self.head = nn.Linear(3, 2).double()

        def forward(self, x):
            if float(x.sum().item()) > 1e9:  # .item(): vmap cannot trace this
                return x
            return self.head(x * self.scale)

    torch.manual_seed(0)
    model = Untraceable()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 2, (4,))
    task = dt.ClassificationTask(model)
    params = dict(model.named_parameters())
    feats = GradientFeatures(FeatureSpec(), task)
    with caplog.at_level(logging.WARNING, logger="datatrace"):
        f = feats.compute(params, {}, (x, y), False, 0)
    msg = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msg) == 1 and "per-example loop" in msg[0].getMessage()
    assert "scale" in msg[0].getMessage() and "params=" in msg[0].getMessage()
    names = select_parameters(model, None)
    g, _ = per_example_grads_loop(task, params, {}, (x, y), names)
    flat = flatten_grads(g, names)
    torch.testing.assert_close(feats.pairwise(f, f), flat @ flat.T, rtol=1e-10, atol=1e-12)


def test_token_level_factored_selections_and_a_longer_batch_is_refused():
    """Weight-only, bias-only and Conv1D selections kept factored per token equal the loop;
    a shorter later batch is zero-padded, a longer one refused with the fix named."""
    model, ids, y = _model_and_batch()
    task = dt.ClassificationTask(model)
    params = dict(model.named_parameters())
    for sel in (("lin.weight",), ("lin.bias",), ("conv1d",), ("lin.bias", "conv1d.weight")):
        feats = GradientFeatures(FeatureSpec(params=sel, factored=True), task)
        f = feats.compute(params, {}, (ids, y), False, 0)
        assert "dense" not in f and feats.tokens
        names = select_parameters(model, sel)
        g, _ = per_example_grads_loop(task, params, {}, (ids, y), names)
        flat = flatten_grads(g, names)
        torch.testing.assert_close(feats.pairwise(f, f), flat @ flat.T, rtol=1e-10, atol=1e-12)
        short = feats.compute(params, {}, (ids[:, :3], y), False, 0)
        assert {k: v.shape for k, v in short.items()} == {k: v.shape for k, v in f.items()}
        g4, _ = per_example_grads_loop(task, params, {}, (ids[:, :3], y), names)
        flat4 = flatten_grads(g4, names)
        torch.testing.assert_close(feats.pairwise(short, f), flat4 @ flat.T, rtol=1e-10, atol=1e-12)
    wide = torch.cat([ids, ids[:, :3]], 1)
    with pytest.raises(dt.DataError, match="padding='max_length'"):
        feats.compute(params, {}, (wide, y), False, 3)


@pytest.mark.parametrize("kind", ["blocks", "gpt2"])
def test_dense_features_formed_in_place_equal_the_per_example_loop(kind):
    """Unfactored features written straight into strided rows of a wider array (as into
    the memory store): every rule, the tied weight (its written and scattered parts), the
    untied Embedding (zeroed, then scattered), equal the per-example loop (float64, with
    padding), match the slow twin (each parameter formed, then concatenated) and touch
    nothing outside their columns."""
    if kind == "blocks":
        model, ids, y = _model_and_batch()
        task, batch = dt.ClassificationTask(model), (ids, y)
    else:
        task, batch = _hf_case("gpt2")
        model = task.model
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    names = select_parameters(model, None)
    g, _ = per_example_grads_loop(task, params, buffers, batch, names)
    flat = flatten_grads(g, names)
    feats = GradientFeatures(FeatureSpec(factored=False), task)
    first = feats.compute(params, buffers, batch, False, 0)  # probe and slow-path layout
    assert feats.dense_names == names and not feats.vmap_names
    n, width = flat.shape
    wide = torch.full((n, width + 5), float("nan"), dtype=torch.float64)
    out = {"dense": wide[:, 2 : 2 + width]}
    got = feats.compute(params, buffers, batch, False, 0, out=out)
    assert got["dense"].data_ptr() == out["dense"].data_ptr()
    torch.testing.assert_close(got["dense"], flat, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(first["dense"], flat, rtol=1e-10, atol=1e-12)
    assert wide[:, :2].isnan().all() and wide[:, 2 + width :].isnan().all()
    # the slow twin: each hooked parameter's parts formed and summed, then concatenated
    modules = {lay: model.get_submodule(lay) for lay in feats.plan.layers}
    calls, _ = capture(task, params, buffers, batch, modules)
    contrib = hooked_grads(feats.plan, model, calls)
    twin = {k: feats._formed(k, contrib[k], n) for k in names}
    torch.testing.assert_close(got["dense"], flatten_grads(twin, names), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("transposed", [False, True])
def test_forming_over_nonzero_rows_only_equals_the_full_sum(transposed):
    """Rows whose output gradient is exactly zero (padded tokens) are skipped per example
    when forming: the written and the added-onto results equal the einsum over every row
    (float64), an all-padding example gets zeros, and the strided destination's other
    columns are untouched."""
    g = torch.Generator().manual_seed(3)
    b, n, rows, cols = 4, 9, 5, 6
    e = torch.randn(b, n, rows, generator=g, dtype=torch.float64)
    a = torch.randn(b, n, cols, generator=g, dtype=torch.float64)
    e[0, 3:] = 0  # right padding
    e[1, :2] = 0  # left padding
    e[1, 6] = 0  # a zero row inside
    e[2] = 0  # nothing but padding
    term = Term(e, a, rows, transposed=transposed)
    other = Term(torch.randn(b, n, rows, generator=g, dtype=torch.float64), a, rows, transposed)
    shape = (cols, rows) if transposed else (rows, cols)
    for parts in ([term], [other, term], [term, other]):
        wide = torch.full((b, rows * cols + 3), float("nan"), dtype=torch.float64)
        dest = wide[:, 1 : 1 + rows * cols].view(b, *shape)
        form_into(dest, parts)
        ref = sum(form(p, shape) for p in parts)
        torch.testing.assert_close(dest, ref, rtol=1e-12, atol=1e-14)
        assert wide[:, 0].isnan().all() and wide[:, -2:].isnan().all()
    only = torch.full((b, *shape), float("nan"), dtype=torch.float64)
    form_into(only, [term])
    assert torch.equal(only[2], torch.zeros(shape, dtype=torch.float64))


class _ReadsPadding(nn.Module):
    """A sequence classifier that averages over every position, padding included (it
    ignores its attention mask): its outputs change when padding is cut."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(100, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, input_ids, attention_mask):
        return self.head(self.tok(input_ids).mean(1))


def _more_padding(batch, extra):
    pad = torch.zeros(len(batch["input_ids"]), extra, dtype=torch.long)
    return {"input_ids": torch.cat([batch["input_ids"], pad], 1),
            "attention_mask": torch.cat([batch["attention_mask"], pad], 1),
            "labels": batch["labels"]}  # fmt: skip


def _widths_seen(module):
    seen = []
    module.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    return seen


def test_trailing_padding_is_cut_only_where_the_model_masks_it(caplog):
    """A BERT batch padded with 4 more tokens is carried through the model at its longest
    sequence once the first cut batch's losses agree (the probe and that check see the
    full width), and its features' products equal the shorter batch's; a model that
    reads its padding is never cut (logged) and still gets exact gradients."""
    model, batch = _bert()
    task = dt.ClassificationTask(model)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    longer = _more_padding(batch, 4)
    ref = GradientFeatures(FeatureSpec(factored=False), task)
    r = ref.compute(params, buffers, batch, False, 0)
    for spec in (FeatureSpec(), FeatureSpec(factored=False)):
        feats = GradientFeatures(spec, task)
        seen = _widths_seen(model.bert.embeddings.word_embeddings)
        f = feats.compute(params, buffers, longer, False, 0)
        model.bert.embeddings.word_embeddings._forward_hooks.clear()
        assert seen[-1] == 7 and 11 in seen  # the features' pass ran on the cut batch
        assert feats._padding.verdict("loss") is True
        torch.testing.assert_close(feats.pairwise(f, f), ref.pairwise(r, r), rtol=1e-9, atol=1e-12)

    torch.manual_seed(0)
    reader = _ReadsPadding().double()
    task = dt.ClassificationTask(reader)
    params, buffers = dict(reader.named_parameters()), dict(reader.named_buffers())
    feats = GradientFeatures(FeatureSpec(factored=False), task)
    seen = _widths_seen(reader.tok)
    with caplog.at_level(logging.INFO, logger="datatrace"):
        f = feats.compute(params, buffers, longer, False, 0)
    assert feats._padding.verdict("loss") is False and seen[-1] == 11
    assert "the model reads its padding" in caplog.text
    names = select_parameters(reader, None)
    g, _ = per_example_grads_loop(task, params, buffers, longer, names)
    torch.testing.assert_close(f["dense"], flatten_grads(g, names), rtol=1e-12, atol=1e-14)


class _GatedPadding(nn.Module):
    """A masked mean plus ``gate ×`` an unmasked mean, the gate at zero (ReZero, LoRA's B):
    the losses do not read the padding at these parameters, the gate's gradient does."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.fc = nn.Embedding(11, 4), nn.Linear(4, 3)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        m = attention_mask.to(self.emb.weight.dtype)[..., None]
        h = self.emb(input_ids)
        return self.fc((h * m).sum(1) / m.sum(1) + self.gate * h.mean(1))


def test_padding_read_only_through_a_closed_gate_is_not_cut():
    """The padding check compares gradients as well as losses: cutting this model's padding
    leaves every loss unchanged but moves the gate's gradient (by 0.38 relative before the
    check compared gradients), so nothing is cut and the features equal the loop's."""
    torch.manual_seed(0)
    model = _GatedPadding().double()
    lengths = torch.tensor([3, 1, 4, 2, 3])
    mask = (torch.arange(8)[None, :] < lengths[:, None]).long()
    batch = {"input_ids": torch.randint(1, 11, (5, 8)) * mask, "attention_mask": mask,
             "labels": torch.tensor([0, 1, 2, 0, 1])}  # fmt: skip
    task = dt.ClassificationTask(model)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    feats = GradientFeatures(FeatureSpec(factored=False), task)
    f = feats.compute(params, buffers, batch, False, 0)
    assert feats._padding.verdict("loss") is False
    names = select_parameters(model, None)
    g, _ = per_example_grads_loop(task, params, buffers, batch, names)
    torch.testing.assert_close(f["dense"], flatten_grads(g, names), rtol=1e-12, atol=1e-14)


class _EncoderDecoder(nn.Module):
    """A masked-mean encoder and a decoder of ``labels.shape[1]`` positions: its labels are
    (batch, T_dec), which equals the encoder's T in some batches by chance."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.dpos = nn.Embedding(16, 8)
        self.head = nn.Linear(8, 30)

    def forward(self, input_ids, attention_mask, n_dec):
        h = self.emb(input_ids)
        m = attention_mask.to(h.dtype)[..., None]
        ctx = (h * m).sum(1) / m.sum(1)
        return self.head(torch.tanh(ctx[:, None, :] + self.dpos(torch.arange(n_dec))[None]))


def test_a_batch_that_would_cut_other_tensors_is_checked_anew():
    """Batches padded to their own lengths: the first (T_enc 10, T_dec 6) is cut and
    checked; in the second T_enc = T_dec = 6, so its decoder labels would be cut too: that
    batch is checked anew, not cut, and its gradients are exact."""
    torch.manual_seed(0)
    model = _EncoderDecoder().double()

    def loss(m, b):
        logits = m(b["input_ids"], b["attention_mask"], b["labels"].shape[1])
        return F.cross_entropy(logits.transpose(1, 2), b["labels"], reduction="none").sum(1)

    def batch(t_enc, lengths, seed):
        g = torch.Generator().manual_seed(seed)
        mask = (torch.arange(t_enc)[None, :] < torch.tensor(lengths)[:, None]).long()
        ids = torch.randint(1, 30, (len(lengths), t_enc), generator=g) * mask
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.randint(0, 30, (len(lengths), 6), generator=g)}  # fmt: skip

    task = dt.Task(model, loss, loss)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    feats = GradientFeatures(FeatureSpec(factored=False), task)
    feats.compute(params, buffers, batch(10, [3, 5, 2, 4], 1), False, 0)
    second = batch(6, [3, 2, 3, 1], 2)
    f = feats.compute(params, buffers, second, False, 4)
    assert feats._padding.verdict("loss") is False  # the second kind of batch disagreed
    names = select_parameters(model, None)
    g, _ = per_example_grads_loop(task, params, buffers, second, names)
    torch.testing.assert_close(f["dense"], flatten_grads(g, names), rtol=1e-12, atol=1e-14)


class _Gated(nn.Module):
    """Two Embedding+Linear paths; the second is used only when ``both`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.emb2 = nn.Embedding(50, 8), nn.Embedding(50, 8)
        self.lin, self.lin2 = nn.Linear(8, 3), nn.Linear(8, 3)
        self.both = False

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) + (self.emb2(input_ids) if self.both else 0)
        pooled = h.mean(1)
        return self.lin(pooled) + (self.lin2(pooled) if self.both else 0)


def test_layers_not_called_on_the_first_batch_are_formed_later():
    """An Embedding or Linear the first batch does not call has no layout to size: its
    gradient is formed, and a later batch that calls it gets exact features."""
    torch.manual_seed(0)
    model = _Gated().double()
    task = dt.ClassificationTask(model)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    ids = torch.randint(0, 50, (4, 5))
    data = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.tensor([0, 1, 2, 0]),
    }
    feats = GradientFeatures(FeatureSpec(), task)
    feats.compute(params, buffers, data, False, 0)
    assert "emb" in feats.indexed and "emb2" not in feats.indexed and "lin2" not in feats.layers
    model.both = True
    f = feats.compute(params, buffers, data, False, 0)
    names = select_parameters(model, None)
    g, _ = per_example_grads_loop(task, params, buffers, data, names)
    flat = flatten_grads(g, names)
    torch.testing.assert_close(feats.pairwise(f, f), flat @ flat.T, rtol=1e-10, atol=1e-12)


def test_embedding_ids_are_kept_only_where_every_dtype_holds_them_exactly():
    """A float32 embedding behind a bfloat16 first parameter (whose dtype stores and
    scoring use): its ids would be rounded there, so its gradient is formed."""
    model = nn.Sequential(nn.Linear(4, 3).to(torch.bfloat16), nn.Embedding(1000, 6))
    spec = GradientFeatures(FeatureSpec(params=("1",)), dt.ClassificationTask(model))
    assert spec.indexed == {}
    model32 = nn.Sequential(nn.Linear(4, 3), nn.Embedding(1000, 6))
    assert GradientFeatures(FeatureSpec(params=("1",)), dt.ClassificationTask(model32)).indexed
    bf16 = FeatureSpec(params=("1",), feature_dtype=torch.bfloat16)
    assert GradientFeatures(bf16, dt.ClassificationTask(model32)).indexed == {}


def _pad_each_batch(items):
    """A collate that pads each batch to its own longest sequence (Hugging Face's
    DataCollatorWithPadding does this)."""
    width = max(len(r["input_ids"]) for r in items)
    ids = torch.zeros(len(items), width, dtype=torch.long)
    mask = torch.zeros(len(items), width, dtype=torch.long)
    for i, r in enumerate(items):
        ids[i, : len(r["input_ids"])], mask[i, : len(r["input_ids"])] = r["input_ids"], 1
    return {"input_ids": ids, "attention_mask": mask,
            "labels": torch.stack([r["labels"] for r in items])}  # fmt: skip


def test_a_loader_that_pads_each_batch_to_its_own_length_is_attributed(tmp_path, caplog):
    """The factored layout was sized on the first example, so a batch with a longer one
    (the first batch here) was a DataError; it is now sized on the longest example, and
    queries padded to another length than the training examples are taken. Scores equal
    those of every example padded to the longest, in memory and in a store."""
    from torch.utils.data import DataLoader

    model, _ = _bert()
    torch.manual_seed(0)
    lengths = [3, 4, 3, 7, 5, 2, 6, 4]
    rows = [{"input_ids": torch.randint(1, 100, (n,)), "labels": torch.tensor(i % 3)}
            for i, n in enumerate(lengths)]  # fmt: skip
    padded = _pad_each_batch(rows)
    task, ckpts = dt.ClassificationTask(model), [dt.Checkpoint.from_module(model)]
    queries = DataLoader(rows[3:6], batch_size=3, collate_fn=_pad_each_batch)
    want = dt.GradDot().fit(task, ckpts, padded).attribute({k: v[3:6] for k, v in padded.items()})
    loader = DataLoader(rows, batch_size=2, collate_fn=_pad_each_batch)
    with caplog.at_level(logging.INFO, logger="datatrace"):
        fitted = dt.GradDot().fit(task, ckpts, loader, batch_size=2)
    assert "features sized on the longest training example (3)" in caplog.text
    torch.testing.assert_close(fitted.attribute(queries), want, rtol=1e-10, atol=1e-13)
    stored = dt.GradDot().fit(task, ckpts, loader, batch_size=2, store=tmp_path / "s")
    torch.testing.assert_close(stored.attribute(queries), want, rtol=1e-10, atol=1e-13)
