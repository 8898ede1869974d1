"""Inputs are checked where they enter: every kind of data a user has either works as they
would expect or is refused with one clear error naming the fix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import (
    DataLoader,
    Sampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)

import datatrace as dt


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    return dt.ClassificationTask(model), [dt.Checkpoint.from_module(model)], x, y


METHODS = {
    "tracin": lambda: dt.TracIn(),
    "gradcos": lambda: dt.GradCos(),
    "ekfac": lambda: dt.Influence(dt.EKFAC()),
    "cg": lambda: dt.Influence(dt.ConjugateGradient(max_iter=20)),
    "trak": lambda: dt.TRAK(projection_dim=16),
}


def test_a_subset_sampler_is_honoured_rows_in_dataset_order() -> None:
    task, ck, x, y = _setup()
    chosen = [17, 3, 25, 8, 11, 0, 29, 14, 5, 21]
    loader = DataLoader(TensorDataset(x, y), batch_size=4, sampler=SubsetRandomSampler(chosen))
    fitted = dt.GradDot().fit(task, ck, loader, progress=False)
    rows = torch.tensor(sorted(chosen))
    assert fitted.n_train == 10
    assert fitted.train.indices.tolist() == rows.tolist()
    want = dt.GradDot().fit(task, ck, (x[rows], y[rows]), progress=False).attribute((x[:4], y[:4]))
    torch.testing.assert_close(fitted.attribute((x[:4], y[:4])), want, rtol=1e-12, atol=0)


def test_a_shuffling_loader_is_read_in_dataset_order() -> None:
    task, ck, x, y = _setup()
    loader = DataLoader(TensorDataset(x, y), batch_size=7, shuffle=True)
    got = dt.GradDot().fit(task, ck, loader, progress=False).attribute((x[:3], y[:3]))
    want = dt.GradDot().fit(task, ck, (x, y), progress=False).attribute((x[:3], y[:3]))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert got.shape == (3, 30)


@pytest.mark.parametrize(
    "loader",
    [
        lambda ds: DataLoader(ds, sampler=WeightedRandomSampler(torch.ones(30), 30)),
        lambda ds: DataLoader(ds, batch_size=7, shuffle=True, drop_last=True),
        lambda ds: DataLoader(ds, sampler=[0, 1, 1, 2]),
    ],
)
def test_samplers_without_a_fixed_set_of_examples_are_refused(loader) -> None:
    task, ck, x, y = _setup()
    with pytest.raises(dt.DataError, match="sampler"):
        dt.GradDot().fit(task, ck, loader(TensorDataset(x, y)), progress=False)


class _Permutation(Sampler):
    """A user's own shuffling sampler: another order on every pass."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __iter__(self):
        return iter(torch.randperm(self.n).tolist())

    def __len__(self) -> int:
        return self.n


@pytest.mark.parametrize(
    "loader",
    [
        lambda ds: DataLoader(
            ds, batch_size=3, drop_last=True, sampler=SubsetRandomSampler(list(range(7)))
        ),
        lambda ds: DataLoader(ds, batch_size=4, drop_last=True, sampler=_Permutation(30)),
    ],
)
def test_a_random_sampler_with_drop_last_is_refused_naming_the_fix(loader) -> None:
    task, ck, x, y = _setup()
    with pytest.raises(dt.DataError, match="drop_last=False"):
        dt.GradDot().fit(task, ck, loader(TensorDataset(x, y)), progress=False)


def test_a_fixed_order_sampler_with_drop_last_attributes_what_it_keeps() -> None:
    task, ck, x, y = _setup()
    backwards = list(range(29, -1, -1))  # drops examples 1 and 0, every time
    loader = DataLoader(TensorDataset(x, y), batch_size=7, drop_last=True, sampler=backwards)
    assert dt.GradDot().fit(task, ck, loader, progress=False).train.indices.tolist() == list(
        range(2, 30)
    )
    chosen = SubsetRandomSampler(list(range(9)))  # nothing dropped: 9 = 3 batches of 3
    loader = DataLoader(TensorDataset(x, y), batch_size=3, drop_last=True, sampler=chosen)
    assert dt.GradDot().fit(task, ck, loader, progress=False).n_train == 9


def test_a_sampler_that_runs_once_is_taken_as_it_came() -> None:
    """A sampler that yields its examples on one pass only (an iterator): the second pass
    that looks for another set finds nothing to compare, and the first pass is kept."""
    task, ck, x, y = _setup()

    class Once(torch.utils.data.Sampler):
        def __init__(self) -> None:
            self.it = iter([1, 3, 5, 7, 9])

        def __iter__(self):
            return self.it

        def __len__(self) -> int:
            return 5

    loader = DataLoader(TensorDataset(x, y), batch_size=4, sampler=Once())
    fitted = dt.GradDot().fit(task, ck, loader, progress=False)
    assert fitted.train.indices.tolist() == [1, 3, 5, 7, 9]


def test_the_longest_example_is_found_whatever_the_order_of_its_parts() -> None:
    """Examples (label, token ids) as Python lists: a label first must not make every
    example count as two entries (the first example was then taken as the longest)."""
    from datatrace.core.data import ExampleSource

    class Items(torch.utils.data.Dataset):
        def __init__(self, items: list) -> None:
            self.items = items

        def __getitem__(self, i: int):
            return self.items[i]

        def __len__(self) -> int:
            return len(self.items)

    rows = [(0, [5, 6, 7]), (1, [5, 6, 7, 8, 9]), (2, [5])]
    assert ExampleSource(Items(rows)).longest() == 1
    assert ExampleSource(Items([(ids, label) for label, ids in rows])).longest() == 1
    assert ExampleSource(Items([{"input_ids": r[1], "label": r[0]} for r in rows])).longest() == 1


def test_a_sequential_loader_with_drop_last_attributes_what_it_yields() -> None:
    task, ck, x, y = _setup()
    loader = DataLoader(TensorDataset(x, y), batch_size=8, drop_last=True)
    fitted = dt.GradDot().fit(task, ck, loader, progress=False)
    assert fitted.n_train == 24


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.uint8])
def test_integer_labels_of_any_dtype_give_the_int64_scores(name: str, dtype: torch.dtype) -> None:
    task, ck, x, y = _setup()
    want = METHODS[name]().fit(task, ck, (x, y), progress=False).attribute((x[:4], y[:4]))
    fitted = METHODS[name]().fit(task, ck, (x, y.to(dtype)), progress=False)
    got = fitted.attribute((x[:4], y[:4].to(dtype)))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_float_and_one_hot_labels_are_refused_quoting_the_users_shape() -> None:
    task, ck, x, y = _setup()
    with pytest.raises(dt.DataError, match=r"shape \(30,\).*y.long\(\)"):
        dt.TracIn().fit(task, ck, (x, y.double()), progress=False)
    with pytest.raises(dt.DataError, match=r"shape \(30, 3\).*argmax"):
        dt.TracIn().fit(task, ck, (x, nn.functional.one_hot(y, 3)), progress=False)


def test_numpy_arrays_are_accepted_like_tensors() -> None:
    task, ck, x, y = _setup()
    fitted = dt.TracIn().fit(task, ck, (x.numpy(), y.numpy()), progress=False)
    got = fitted.attribute((x[:3].numpy(), y[:3].numpy()))
    want = dt.TracIn().fit(task, ck, (x, y), progress=False).attribute((x[:3], y[:3]))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(dt.DataError, match="object-dtype"):
        dt.TracIn().fit(task, ck, (np.array([object()] * 30), y), progress=False)


def test_queries_of_another_shape_are_refused_before_scoring() -> None:
    task, ck, x, y = _setup()
    fitted = dt.GradDot().fit(task, ck, (x, y), progress=False)
    with pytest.raises(dt.DataError, match=r"shape \(5,\).*\(4,\)"):
        fitted.attribute((torch.randn(3, 5, dtype=torch.float64), y[:3]))
    with pytest.raises(dt.DataError, match="parts"):
        fitted.top_k((x[:3], x[:3], y[:3]), k=2)


def test_meta_tensors_and_non_numeric_checkpoint_weights_are_clear_errors() -> None:
    task, ck, x, y = _setup()
    with pytest.raises(dt.DataError, match="meta"):
        dt.GradDot().fit(task, ck, (x.to("meta"), y), progress=False)
    for bad in ("abc", True, float("nan"), None):
        with pytest.raises(dt.CheckpointError, match="finite number"):
            dt.Checkpoint.from_module(task.model, weight=bad)
    assert dt.Checkpoint.from_module(task.model, weight=np.float32(0.5)).weight == 0.5


@pytest.mark.parametrize("name", sorted(METHODS))
def test_float64_inputs_into_a_float32_model_are_cast_as_users_expect(name: str) -> None:
    task, _, x, y = _setup()
    model32 = task.model.float()
    task32, ck32 = dt.ClassificationTask(model32), [dt.Checkpoint.from_module(model32)]
    want = (
        METHODS[name]()
        .fit(task32, ck32, (x.float(), y), progress=False)
        .attribute((x[:3].float(), y[:3]))
    )
    got = METHODS[name]().fit(task32, ck32, (x, y), progress=False).attribute((x[:3], y[:3]))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_integer_features_into_a_float_model_are_a_data_error() -> None:
    task, ck, x, y = _setup()
    with pytest.raises(dt.DataError, match=r"torch.float64.*int64.*x.float\(\)"):
        dt.TracIn().fit(task, ck, ((x * 10).long(), y), progress=False)
