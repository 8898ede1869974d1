"""Per-example gradients: vmap and the factored Linear path against a loop of .backward()."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import MLP, perturbed

import datatrace as dt
from datatrace.features import products
from datatrace.features.featurizer import GradientFeatures
from datatrace.features.projector import KroneckerProjector, ProjectionSpec
from datatrace.features.spec import FeatureSpec
from datatrace.grads.layers import conv_grads, conv_patches, flat_offsets, layer_calls
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


def _token_factors(n, tokens, n_out, n_in, generator):
    """Factors (n, N·out), (n, N·in) of sequences: right-padded, one left-padded (its live
    rows not a prefix), one with a zero gradient."""
    e = torch.randn(n, tokens, n_out, generator=generator, dtype=torch.float64)
    a = torch.randn(n, tokens, n_in, generator=generator, dtype=torch.float64)
    lengths = torch.randint(1, tokens + 1, (n,), generator=generator)
    live = torch.arange(tokens)[None, :] < lengths[:, None]
    live[1] = live[1].flip(0)  # left padding
    live[2] = False  # every row padding: a zero gradient
    return (e * live[..., None]).reshape(n, -1), a.reshape(n, -1)


@pytest.mark.parametrize("scratch", [None, 3 * 12 * 8])
def test_both_routes_of_factored_products_equal_formed_gradients(monkeypatch, scratch):
    """A factored layer's products by token pairs and by gradients formed in cache (also
    with a scratch so small that queries and training examples are formed a few at a time)
    equal the dot products of the formed per-example gradients, in float64, with padding."""
    if scratch is not None:
        monkeypatch.setattr(products, "FORM_SCRATCH", scratch)
    g = torch.Generator().manual_seed(0)
    n_out, n_in = 4, 3
    for tq, tg in ((6, 6), (9, 6)):  # queries longer than the training layout: more tokens
        qe, qa = _token_factors(5, tq, n_out, n_in, g)
        ge, ga = _token_factors(7, tg, n_out, n_in, g)

        def formed(e, a):
            n = e.shape[0]
            return torch.einsum("nto,nti->noi", e.view(n, -1, n_out), a.view(n, -1, n_in))

        ref = formed(qe, qa).flatten(1) @ formed(ge, ga).flatten(1).T
        for route in (
            products.token_products,
            products.formed_products,
            products.layer_products,
        ):
            torch.testing.assert_close(route(qe, ge, qa, ga, tq, tg), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scratch", [None, 2 * 4 * 5 * 8])
def test_indexed_embedding_products_equal_formed_gradients(monkeypatch, scratch):
    """An Embedding's products from ids and output gradients (repeated ids in a sequence,
    padding as id -1 with a zero gradient, training ids no query uses, query tokens ≠
    training tokens; also with a scratch so small that both sides go a few at a time)
    equal the dot products of the scattered (rows × dim) gradients, in float64."""
    if scratch is not None:
        monkeypatch.setattr(products, "FORM_SCRATCH", scratch)
    g = torch.Generator().manual_seed(0)
    rows, dim = 11, 5

    def sequences(n, tokens, top):
        ids = torch.randint(0, top, (n, tokens), generator=g)
        e = torch.randn(n, tokens, dim, generator=g, dtype=torch.float64)
        ids[0, -2:], e[0, -2:] = -1, 0.0  # padding
        ids[1, :] = ids[1, 0]  # one id repeated
        return ids.double(), e.reshape(n, -1)

    qi, qe = sequences(5, 4, 6)  # queries use ids 0..5 only
    gi, ge = sequences(7, 6, rows)

    def formed(ids, e, tokens):
        out = torch.zeros(len(ids), rows, dim, dtype=torch.float64)
        for k in range(len(ids)):
            for t in range(tokens):
                if ids[k, t] >= 0:
                    out[k, int(ids[k, t])] += e.view(len(ids), tokens, dim)[k, t]
        return out.flatten(1)

    ref = formed(qi, qe, 4) @ formed(gi, ge, 6).T
    got = products.indexed_products(qi, qe, gi, ge, 4, 6)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_wide_layers_of_long_sequences_take_the_formed_route(monkeypatch):
    """Token pairs cost N²(out + in') per pair, formed gradients out·in' plus the forming:
    for a 384-wide layer over 64 tokens (MiniLM's) the second, for 4 tokens the first."""
    taken = []
    for name in ("token_products", "formed_products"):
        real = getattr(products, name)
        monkeypatch.setattr(
            products, name, lambda *a, _r=real, _n=name, **k: taken.append(_n) or _r(*a, **k)
        )
    g = torch.Generator().manual_seed(0)
    for tokens in (64, 4):
        qe, qa = _token_factors(8, tokens, 384, 385, g)
        ge, ga = _token_factors(16, tokens, 384, 385, g)
        products.layer_products(qe.float(), ge.float(), qa.float(), ga.float(), tokens, tokens)
    assert taken == ["formed_products", "token_products"]


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


class Twice(torch.nn.Module):
    """A Linear layer called twice per forward: its gradient is the sum over both calls."""

    def __init__(self):
        super().__init__()
        self.shared = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


def test_a_layer_called_twice_gets_the_sum_of_both_calls_rules():
    torch.manual_seed(0)
    model = Twice().double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    task = dt.ClassificationTask(model)
    params, buffers = _params(model)
    names = select_parameters(model, None)
    g, _ = per_example_grads_loop(task, params, buffers, (x, y), names)
    flat = flatten_grads(g, names)
    for spec in (FeatureSpec(), FeatureSpec(factored=True), FeatureSpec(factored=False)):
        feats = GradientFeatures(spec, task)
        f = feats.compute(params, buffers, (x, y), False, 0)
        assert set(feats.hooked) == {"shared", "head"} and not feats.vmap_names
        torch.testing.assert_close(feats.pairwise(f, f), flat @ flat.T, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(feats.sqnorm(f), (flat**2).sum(1), rtol=1e-10, atol=1e-12)
    # factored=True keeps both calls as two tokens: 2 × (4 inputs + bias)
    forced = GradientFeatures(FeatureSpec(factored=True), task)
    ff = forced.compute(params, buffers, (x, y), False, 0)
    assert forced.tokens == {"shared": 2, "head": 1} and ff["shared.a"].shape == (6, 10)


@pytest.mark.parametrize(
    ("stride", "padding", "dilation"),
    [(1, 0, 1), (2, 1, 1), (1, 2, 2), ((2, 1), (0, 1), (1, 2)), (3, "valid", 1)],
)
def test_one_conv_unfold_gives_the_per_example_gradient_of_a_loop(stride, padding, dilation):
    """conv_patches (the one unfold) and conv_grads against one backward pass per example,
    float64, for stride/padding/dilation variations and a non-square kernel."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 3, (3, 2), stride=stride, padding=padding, dilation=dilation)
    conv = conv.double()
    x = torch.randn(5, 2, 9, 8, dtype=torch.float64)
    r = torch.randn_like(conv(x))  # a different output weighting per example

    def loss(out, i):  # a nonlinear per-example loss of the layer's output
        return (torch.tanh(out) * r[i]).sum()

    # output gradients e from one batched pass (examples are independent)
    out = conv(x)
    e = torch.autograd.grad(sum(loss(out[i], i) for i in range(5)), out)[0]
    weight, bias = conv_grads(conv, x, e)
    for i in range(5):
        conv.zero_grad()
        loss(conv(x[i : i + 1])[0], i).backward()
        torch.testing.assert_close(weight[i], conv.weight.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(bias[i], conv.bias.grad, rtol=1e-10, atol=1e-12)
    # the patches reproduce the convolution itself, position by position
    patches = conv_patches(conv, x)  # (batch, in·kh·kw, positions)
    again = conv.weight.flatten(1) @ patches + conv.bias[:, None]
    torch.testing.assert_close(again.view_as(out), out, rtol=1e-10, atol=1e-12)


def test_conv_patches_rejects_implicit_same_padding():
    conv = torch.nn.Conv2d(1, 2, 3, padding="same")
    with pytest.raises(dt.ConfigError, match="explicit padding"):
        conv_patches(conv, torch.randn(1, 1, 5, 5))


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_a_conv_padding_other_than_zeros_gets_exact_gradients(mode):
    """F.unfold pads with zeros: a Conv2d padding by reflection, replication or wrapping
    had its patches (and so its per-example gradients, K-FAC factors) built from zeros
    (GradDot off by 0.4-1.1 relative). Such a layer now takes vmap's exact gradients, and
    K-FAC leaves it out."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 2, 3, padding=1, padding_mode=mode), torch.nn.Tanh(),
        torch.nn.Flatten(), torch.nn.Linear(2 * 5 * 5, 3),
    ).double()  # fmt: skip
    x, y = torch.randn(6, 2, 5, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    task = dt.ClassificationTask(model)
    ckpts = [dt.Checkpoint.from_module(model)]
    got = dt.GradDot(params=["0.weight", "0.bias"]).fit(task, ckpts, (x, y)).attribute((x, y))

    def grad(i):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, list(model[0].parameters()))
        return torch.cat([g.flatten() for g in grads])

    g = torch.stack([grad(i) for i in range(6)])
    torch.testing.assert_close(got, g @ g.T, rtol=1e-10, atol=1e-12)
    kfac = dt.Influence(dt.KFAC()).fit(task, ckpts, (x, y))
    assert not any(n.startswith("0.") for n in kfac.features.names)


def test_layer_calls_records_every_call_and_a_probe_gives_the_output_gradient():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    with layer_calls({"lin": lin}) as calls:
        lin(x)
        lin(2 * x)
    assert len(calls["lin"]) == 2 and torch.equal(calls["lin"][1][0], 2 * x)
    assert not lin._forward_hooks  # removed on exit
    probe = torch.zeros(4, 2, dtype=torch.float64, requires_grad=True)
    with layer_calls({"lin": lin}, probes={"lin": probe}) as calls:
        out = torch.sin(lin(x)).sum()
    (grad,) = torch.autograd.grad(out, probe)
    torch.testing.assert_close(grad, torch.cos(lin(x)), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(calls["lin"][0][1], lin(x))  # the output before the probe


def test_layer_calls_per_example_broadcasts_batch_one_calls_and_collects_refusals():
    """With ``batch``: a (1, ...) call is expanded to the batch (the model then uses the
    expanded output, so its gradient is per example), a call of another batch size is
    refused (not recorded), and a probe is added to the expanded output."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    refused: list = []
    with layer_calls({"lin": lin}, batch=4, refusals=refused) as calls:
        full = lin(x)
        wide = lin(x[:1])
        lin(x[:2])
    assert len(calls["lin"]) == 2 and wide.shape == (4, 2)
    assert torch.equal(calls["lin"][1][0], x[:1].expand(4, 3)) and torch.equal(wide[3], full[0])
    assert [r.layer for r in refused] == ["lin"] and "batch of 4" in str(refused[0])
    probe = torch.zeros(4, 2, dtype=torch.float64, requires_grad=True)
    with layer_calls({"lin": lin}, probes={"lin": probe}, batch=4, refusals=refused) as calls:
        out = (lin(x[:1]) * torch.arange(4.0, dtype=torch.float64)[:, None]).sum()
    (grad,) = torch.autograd.grad(out, probe)  # per example: row b is b
    assert torch.equal(grad, torch.arange(4.0, dtype=torch.float64)[:, None].expand(4, 2))
    assert not lin._forward_hooks


def test_flat_offsets_place_parameters_end_to_end():
    assert flat_offsets(["a", "b", "c"], [3, 0, 4]) == {"a": (0, 3), "b": (3, 3), "c": (3, 7)}


@pytest.mark.parametrize("block", [1, 2])
@pytest.mark.parametrize(("weight", "bias"), [(True, True), (True, False), (False, True)])
def test_kronecker_projector_from_factors_equals_its_slow_twin(block, weight, bias):
    """KroneckerProjector.project_factors (never forming G) equals projecting the explicit
    per-example Conv2d and Linear gradients [W | b] (float64)."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(2, 3, 3, stride=2, padding=1).double()
    x = torch.randn(6, 2, 7, 7, dtype=torch.float64)
    e_conv = torch.randn_like(conv(x))
    a_lin, e_lin = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    gw, gb = conv_grads(conv, x, e_conv)
    explicit = [
        torch.cat(([gw.flatten(2)] if weight else []) + ([gb[:, :, None]] if bias else []), 2),
        torch.cat(
            ([e_lin[:, :, None] * a_lin[:, None, :]] if weight else [])
            + ([e_lin[:, :, None]] if bias else []),
            2,
        ),
    ]
    k = 10
    proj = KroneckerProjector(
        ProjectionSpec(k, seed=5), [(3, 18 * weight, bias), (5, 4 * weight, bias)], block
    )
    fast = proj.project_factors(0, conv_patches(conv, x), e_conv.flatten(2))
    fast = proj.project_factors(1, a_lin[:, :, None], e_lin[:, :, None], fast)
    slow = proj([g.flatten(1) for g in explicit])
    assert slow.shape == (6, k)
    torch.testing.assert_close(fast.view(6, -1)[:, :k], slow, rtol=1e-10, atol=1e-12)


def test_a_layer_called_twice_is_kronecker_projected_from_both_calls():
    """With a projection, a layer called twice is projected from the factors of both calls:
    equal to the Kronecker slow twin applied to its explicit (summed) gradient."""
    torch.manual_seed(0)
    model = Twice().double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    task = dt.ClassificationTask(model)
    params, buffers = _params(model)
    feats = GradientFeatures(FeatureSpec(projection_dim=8), task)
    out = feats.compute(params, buffers, (x, y), False, 0)["proj"]
    assert feats.kr_layers == ["shared", "head"] and feats.dense_proj_names == []
    names = select_parameters(model, None)
    g, _ = per_example_grads_loop(task, params, buffers, (x, y), names)
    explicit = [
        torch.cat([g[f"{lay}.weight"], g[f"{lay}.bias"][:, :, None]], dim=2).flatten(1)
        for lay in ("shared", "head")
    ]
    assert feats.kronecker_projector is not None
    torch.testing.assert_close(out, feats.kronecker_projector(explicit), rtol=1e-10, atol=1e-12)
