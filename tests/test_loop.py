"""THE data loop: ranges, device moves, eval mode, progress, non-finite checks; and that every
pass routed through it (featurize, the store, curvature, TRAK's probabilities, measuring)
gives the numbers of a float64 direct computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import MLP
from torch import nn

import datatrace as dt
from datatrace.core.data import ExampleSource
from datatrace.core.loop import (
    batch_ranges,
    check_finite,
    cut_positions,
    length_groups,
    naming_every_nonfinite,
    over_batches,
    over_groups,
    over_ranges,
)
from datatrace.curvature.problem import CurvatureProblem
from datatrace.features.featurizer import GradientFeatures
from datatrace.features.loop import featurize, featurize_into_store
from datatrace.features.memory import MemoryFeatureStore
from datatrace.features.spec import FeatureSpec
from datatrace.grads.per_example import flatten_grads, per_example_grads_loop, select_parameters
from datatrace.methods.trak import true_label_probability
from datatrace.retrain import measure, measure_stacked


class Dropper(nn.Module):
    """An MLP with dropout, to see train/eval flags."""

    def __init__(self) -> None:
        super().__init__()
        self.body = MLP()
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.drop(x))


def _flags(module: nn.Module) -> list[bool]:
    return [m.training for m in module.modules()]


def _source(n: int = 23) -> tuple[ExampleSource, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return ExampleSource((x, y), "training data"), x, y


def test_batch_ranges_cover_exactly_the_range_in_batches_of_the_given_size():
    assert batch_ranges(5, 3, 21) == [(3, 8), (8, 13), (13, 18), (18, 21)]
    assert batch_ranges(4, 0, 8) == [(0, 4), (4, 8)]
    assert batch_ranges(10, 7, 7) == []
    with pytest.raises(ValueError, match="batch_size"):
        batch_ranges(0, 0, 3)


def test_over_batches_yields_every_example_of_the_range_once_in_order():
    source, x, y = _source()
    seen = list(over_batches(source, 5, 3, 21))
    assert [(s, e) for s, e, _ in seen] == [(3, 8), (8, 13), (13, 18), (18, 21)]
    assert [len(b[0]) for _, _, b in seen] == [5, 5, 5, 3]
    assert torch.equal(torch.cat([b[0] for _, _, b in seen]), x[3:21])
    assert torch.equal(torch.cat([b[1] for _, _, b in seen]), y[3:21])
    whole = list(over_batches(source, 10))  # stop=None: to the end
    assert [(s, e) for s, e, _ in whole] == [(0, 10), (10, 20), (20, 23)]
    # explicit ranges (a store's unfinished chunks) come back in the order given
    picked = list(over_ranges(source, [(20, 23), (0, 4)]))
    assert [(s, e) for s, e, _ in picked] == [(20, 23), (0, 4)]
    assert torch.equal(picked[0][2][0], x[20:23]) and torch.equal(picked[1][2][0], x[0:4])


def test_over_batches_moves_every_tensor_of_a_batch_to_the_device():
    x = torch.randn(7, 3)
    source = ExampleSource({"input_ids": x, "labels": torch.arange(7)})
    meta = torch.device("meta")  # a device every machine has
    batches = [b for _, _, b in over_batches(source, 3, device=meta)]
    assert [b["input_ids"].shape[0] for b in batches] == [3, 3, 1]
    assert all(t.device == meta for b in batches for t in b.values())
    kept = [b for _, _, b in over_batches(source, 3)]  # device=None: left where it is
    assert all(t.device == x.device for b in kept for t in b.values())


@pytest.mark.parametrize("leave_by", ["end", "break", "error"])
def test_eval_mode_during_the_pass_and_every_flag_restored(leave_by):
    model = Dropper()
    model.train()
    model.body.fc2.eval()  # mixed flags must come back exactly
    before = _flags(model)
    source, _, _ = _source()
    during = []
    try:
        for s, _, _ in over_batches(source, 5, eval_module=model):
            during.append(_flags(model))
            if s == 10 and leave_by == "break":
                break
            if s == 10 and leave_by == "error":
                raise KeyError("the loop body failed")
    except KeyError:
        assert leave_by == "error"
    assert during and all(not any(f) for f in during)
    assert _flags(model) == before


def test_one_progress_bar_counts_the_batches(monkeypatch, capsys):
    import datatrace.core.loop as loop_module

    bars = []
    real = loop_module.tqdm

    class Recording(real):  # type: ignore[misc,valid-type]
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.record = [kwargs["desc"], kwargs["total"], 0, kwargs["disable"]]
            bars.append(self.record)

        def update(self, n=1):
            self.record[2] += n
            return super().update(n)

    monkeypatch.setattr(loop_module, "tqdm", Recording)
    source, _, _ = _source()
    list(over_batches(source, 5, progress=True, desc="testing the bar"))
    list(over_batches(source, 5, progress=False, desc="silent"))
    assert bars == [["testing the bar", 5, 5, False], ["silent", 5, 5, True]]
    assert "testing the bar" in capsys.readouterr().err


def test_check_finite_names_every_bad_example_of_a_batch():
    values = torch.tensor([0.1, math.nan, 0.3, 0.4])
    grads = torch.ones(4, 2, 3)
    grads[3, 1, 2] = math.inf
    with pytest.raises(dt.NonFiniteError, match=r"non-finite .* loss at examples \[11, 13\]") as e:
        check_finite(values, [grads], offset=10, what="loss")
    assert e.value.indices == [11, 13]
    # a finite value with a non-finite gradient says so
    with pytest.raises(dt.NonFiniteError, match=r"gradient of the measurement at examples \[3\]"):
        check_finite(values.nan_to_num(), [grads], offset=0, what="measurement")
    # rows whose sum overflows but whose entries are finite are not reported
    big = torch.full((4, 2), 1e308, dtype=torch.float64)
    check_finite(torch.zeros(4, dtype=torch.float64), [big], offset=0, what="loss")
    # a group of examples in another order (length-sorted) names them by their indices
    with pytest.raises(dt.NonFiniteError, match=r"at examples \[2, 5\]") as e:
        check_finite(values, [grads], offset=torch.tensor([7, 2, 9, 5]), what="loss")
    assert e.value.indices == [2, 5]


def test_length_groups_sort_by_real_tokens_and_cover_the_range_once():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    source = ExampleSource({"input_ids": mask * 7, "attention_mask": mask})
    groups = length_groups(source, lambda b: b["attention_mask"], 2)
    assert [g.tolist() for g in groups] == [[2, 0], [3, 1], [4]]  # ties in index order
    part = length_groups(source, lambda b: b["attention_mask"], 2, start=1, stop=5)
    assert [g.tolist() for g in part] == [[2, 3], [1, 4]]
    assert length_groups(source, lambda b: None, 2) is None  # no mask: no grouping
    # sorted groups would carry as many positions as batches in index order: no grouping
    even = ExampleSource({"attention_mask": torch.tensor([[1, 0], [1, 0], [1, 1], [1, 1]])})
    assert length_groups(even, lambda b: b["attention_mask"], 2) is None
    got = [(idx.tolist(), b["attention_mask"]) for idx, b in over_groups(source, groups)]
    for idx, rows in got:
        assert torch.equal(rows, mask[idx])


def test_a_nonfinite_error_is_widened_to_every_example_of_the_rest():
    source, x, _ = _source()
    bad = x.clone()
    bad[[2, 9, 21], 0] = math.nan
    source = ExampleSource((bad, source.batch(0, 23)[1]))

    def value_of(batch):
        return batch[0].sum(1)

    widened = pytest.raises(dt.NonFiniteError, match=r"loss or gradient at examples \[2, 9, 21\]")
    rest = naming_every_nonfinite(value_of, source, batch_ranges(4, 8, 23), None, "loss")
    with widened as e, rest:
        raise dt.NonFiniteError("first batch", indices=[2])
    assert e.value.indices == [2, 9, 21]
    # nothing else wrong: the original error goes through unchanged
    same = pytest.raises(dt.NonFiniteError, match=r"^only this$")
    with same, naming_every_nonfinite(value_of, source, batch_ranges(4, 22, 23), None, "loss"):
        raise dt.NonFiniteError("only this", indices=[2])


def _direct_grads(model, x, y):
    """float64 per-example gradients, one autograd pass per example (no loop machinery)."""
    rows = []
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        rows.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    return torch.stack(rows)


def test_featurize_through_the_loop_equals_direct_gradients(mlp_data):
    model, x, y = mlp_data
    task = dt.ClassificationTask(model)
    feats = GradientFeatures(FeatureSpec(factored=False), task)
    state = (dict(model.named_parameters()), dict(model.named_buffers()))
    out = featurize(feats, state, ExampleSource((x, y)), False, 4, 3, 21, progress=False)
    torch.testing.assert_close(
        out["dense"], _direct_grads(model, x, y)[3:21], rtol=1e-10, atol=1e-12
    )
    model.train()
    featurize(feats, state, ExampleSource((x, y)), False, 4, progress=False)
    assert model.training  # eval mode only during the pass


def test_store_chunks_through_the_loop_equal_direct_gradients(mlp_data):
    model, x, y = mlp_data
    task = dt.ClassificationTask(model)
    feats = GradientFeatures(FeatureSpec(factored=False), task)
    state = (dict(model.named_parameters()), dict(model.named_buffers()))
    store = MemoryFeatureStore(feats.layout(), len(x), 2, torch.float64, chunk_size=6)
    store.write(1, 2, {"dense": torch.zeros(6, feats.num_params, dtype=torch.float64)})
    assert featurize_into_store(feats, [state, state], ExampleSource((x, y)), store) == 7
    ref = _direct_grads(model, x, y)
    torch.testing.assert_close(store.read(0, 0, 23)["dense"], ref, rtol=1e-10, atol=1e-12)
    # chunk 2 of checkpoint 1 was marked done: it is skipped, not recomputed
    assert torch.equal(store.read(1, 12, 18)["dense"], torch.zeros(6, feats.num_params).double())
    torch.testing.assert_close(store.read(1, 18, 23)["dense"], ref[18:], rtol=1e-10, atol=1e-12)


def test_featurize_into_store_names_every_nonfinite_example(mlp_data):
    model, x, y = mlp_data
    xb = x.clone()
    xb[[1, 14, 22]] = math.nan
    task = dt.ClassificationTask(model)
    feats = GradientFeatures(FeatureSpec(), task)
    state = (dict(model.named_parameters()), dict(model.named_buffers()))
    store = MemoryFeatureStore(feats.layout(), len(x), 1, torch.float64, chunk_size=5)
    with pytest.raises(dt.NonFiniteError) as e:
        featurize_into_store(feats, [state], ExampleSource((xb, y)), store)
    assert e.value.indices == [1, 14, 22]


def test_curvature_passes_through_the_loop_equal_the_float64_hessian(mlp_data):
    model, x, y = mlp_data
    task = dt.ClassificationTask(model)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    names = select_parameters(model, None)
    flat = torch.cat([params[n].detach().flatten() for n in names])
    sizes = [params[n].numel() for n in names]

    def mean_loss(theta):
        parts = dict(zip(names, torch.split(theta, sizes), strict=True))
        state = {n: t.reshape(params[n].shape) for n, t in parts.items()}
        out = torch.func.functional_call(model, {**buffers, **state}, (x,))
        return F.cross_entropy(out, y)

    H = torch.func.hessian(mean_loss)(flat)
    # batch size 5 does not divide 23: the last, short batch must be included exactly once
    problem = CurvatureProblem(task, names, params, buffers, ExampleSource((x, y)), 5)
    torch.testing.assert_close(problem.hessian_by_products(), H, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(problem.hessian(), H, rtol=1e-9, atol=1e-11)
    v = torch.randn(3, problem.p, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(problem.mean_product(v, False), v @ H, rtol=1e-9, atol=1e-11)
    assert problem.offsets["fc2.weight"] == (sizes[0] + sizes[1], sum(sizes[:3]))


def test_true_label_probability_through_the_loop_equals_softmax(mlp_data):
    model, x, y = mlp_data
    task = dt.ClassificationTask(model)
    state = (dict(model.named_parameters()), dict(model.named_buffers()))
    p = true_label_probability(task, state, ExampleSource((x, y)), batch_size=4)
    with torch.no_grad():
        direct = torch.softmax(model(x), dim=1)[torch.arange(len(y)), y]
    assert p.shape == (23,)
    torch.testing.assert_close(p, direct, rtol=1e-12, atol=1e-14)


def test_measure_and_measure_stacked_through_the_loop(mlp_data):
    model, x, y = mlp_data
    task = dt.ClassificationTask(model)
    queries = ExampleSource((x, y), "queries")
    with torch.no_grad():
        direct = F.cross_entropy(model(x), y, reduction="none")
    torch.testing.assert_close(measure(task, model, queries, batch_size=4), direct)
    params = {n: torch.stack([p.detach(), 2 * p.detach()]) for n, p in model.named_parameters()}
    both = measure_stacked(task, {}, params, queries, torch.device("cpu"))
    doubled = {n: 2 * p.detach() for n, p in model.named_parameters()}
    with torch.no_grad():
        out2 = torch.func.functional_call(model, doubled, (x,))
    assert both.shape == (23, 2)
    torch.testing.assert_close(both[:, 0], direct)
    torch.testing.assert_close(both[:, 1], F.cross_entropy(out2, y, reduction="none"))


def test_per_example_loop_twin_matches_featurized_gradients(mlp_data):
    """The same numbers by the library's slow twin (per_example_grads_loop)."""
    model, x, y = mlp_data
    task = dt.ClassificationTask(model)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    names = select_parameters(model, None)
    g, _ = per_example_grads_loop(task, params, buffers, (x, y), names)
    feats = GradientFeatures(FeatureSpec(factored=False), task)
    out = featurize(feats, (params, buffers), ExampleSource((x, y)), False, 7, progress=False)
    torch.testing.assert_close(out["dense"], flatten_grads(g, names), rtol=1e-10, atol=1e-12)


def test_cut_positions_cuts_only_tensors_with_the_batch_and_token_axes():
    ids, mask = torch.arange(12).view(2, 6), torch.ones(2, 6)
    batch = {"x": (ids, [mask]), "labels": torch.tensor([1, 0]), "image": torch.zeros(2, 3, 6)}
    places: list[str] = []
    cut = cut_positions(batch, (2, 6), 4, places)
    assert places == ["batch['x'][0]", "batch['x'][1][0]"]
    assert torch.equal(cut["x"][0], ids[:, :4]) and cut["x"][0].is_contiguous()
    assert cut["x"][1][0].shape == (2, 4) and isinstance(cut["x"][1], list)
    assert torch.equal(cut["labels"], batch["labels"])
    assert cut["image"].shape == (2, 3, 6)  # (batch, channels, ...): not the token axis
