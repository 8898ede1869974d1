"""A feature store or truth cache is never reused after something that changes the scores."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import datatrace as dt
from datatrace.core.fingerprint import code_fingerprint, model_fingerprint, task_fingerprint


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(20, 4, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (20,), generator=g
    )


def _mlp(act: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), act, nn.Linear(6, 3)).double()


def _fit(task: dt.AbstractTask, store: Path, **kw):
    ck = [dt.Checkpoint.from_module(task.model)]
    return dt.GradDot().fit(
        task, ck, _data(), store=store, progress=False, max_memory_bytes=0, **kw
    )


def test_a_changed_activation_with_the_same_weights_is_a_mismatch(tmp_path: Path) -> None:
    relu, tanh = _mlp(nn.ReLU()), _mlp(nn.Tanh())
    assert relu.state_dict().keys() == tanh.state_dict().keys()
    S = _fit(dt.ClassificationTask(relu), tmp_path).attribute(_data())
    with pytest.raises(dt.StoreMismatchError, match="model"):
        _fit(dt.ClassificationTask(tanh), tmp_path)
    again = _fit(dt.ClassificationTask(_mlp(nn.ReLU())), tmp_path).attribute(_data())
    torch.testing.assert_close(again, S, rtol=0, atol=0)  # same everything: reused


def _net_class(activation: str) -> type[nn.Module]:
    """Two classes with one name and one state_dict layout, differing only in forward."""
    namespace: dict = {"nn": nn, "torch": torch}
    exec(
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)\n"
        "    def forward(self, x):\n"
        f"        return self.b(torch.{activation}(self.a(x)))\n",
        namespace,
    )
    return namespace["Net"]


def test_a_changed_forward_in_user_code_is_a_mismatch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    first = _net_class("relu")().double()
    second = _net_class("tanh")().double()
    second.load_state_dict(first.state_dict())
    assert model_fingerprint(first)["modules"] == model_fingerprint(second)["modules"]
    assert model_fingerprint(first)["code"] != model_fingerprint(second)["code"]
    _fit(dt.ClassificationTask(first), tmp_path)
    with pytest.raises(dt.StoreMismatchError, match=r"model\.code"):
        _fit(dt.ClassificationTask(second), tmp_path)


def _ce(model, batch, smoothing=0.0):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none", label_smoothing=smoothing)


def test_a_changed_loss_function_is_a_mismatch(tmp_path: Path) -> None:
    model = _mlp(nn.ReLU())
    _fit(dt.Task(model, _ce), tmp_path)
    smoothed = dt.Task(model, functools.partial(_ce, smoothing=0.1))
    with pytest.raises(dt.StoreMismatchError, match="task"):
        _fit(smoothed, tmp_path)
    eps = 0.2
    closure = dt.Task(model, lambda m, b: _ce(m, b, eps))
    eps_other = 0.3
    other = dt.Task(model, lambda m, b: _ce(m, b, eps_other))
    assert task_fingerprint(closure) != task_fingerprint(other)  # closure values count
    assert code_fingerprint(functools.partial(_ce, smoothing=0.1)) != code_fingerprint(
        functools.partial(_ce, smoothing=0.2)
    )


def test_dtype_and_fingerprint_extra_are_recorded(tmp_path: Path) -> None:
    model = _mlp(nn.ReLU())
    _fit(dt.ClassificationTask(model), tmp_path, fingerprint_extra={"data_version": 1})
    with pytest.raises(dt.StoreMismatchError, match="extra"):
        _fit(dt.ClassificationTask(model), tmp_path, fingerprint_extra={"data_version": 2})
    with pytest.raises(dt.ConfigError, match="JSON"):
        _fit(dt.ClassificationTask(model), tmp_path / "x", fingerprint_extra=object())
    single = _mlp(nn.ReLU()).float()
    x, y = _data()
    ck = [dt.Checkpoint.from_module(single)]
    with pytest.raises(dt.StoreMismatchError, match="dtype"):
        dt.GradDot().fit(
            dt.ClassificationTask(single), ck, (x.float(), y), store=tmp_path,
            progress=False, max_memory_bytes=0, fingerprint_extra={"data_version": 1},
        )  # fmt: skip


def test_code_fingerprints_are_stable_across_processes() -> None:
    code = (
        "from datatrace.core.fingerprint import code_fingerprint\n"
        "from datatrace.core.task import ClassificationTask\n"
        "print(code_fingerprint(ClassificationTask.loss))"
    )
    runs = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(2)
    }
    from datatrace.core.task import ClassificationTask

    assert runs == {code_fingerprint(ClassificationTask.loss)}


def test_truth_caches_see_a_changed_model(tmp_path: Path) -> None:
    x, y = _data()

    def train_fn(indices: torch.Tensor, seed: int) -> nn.Module:
        return _mlp(nn.ReLU())

    kw = dict(seeds=(0,), cache=tmp_path, progress=False)
    task = dt.ClassificationTask(_mlp(nn.ReLU()))
    dt.truth.leave_one_out(train_fn, task, (x, y), (x[:2], y[:2]), [0, 1], **kw)
    with pytest.raises(dt.StoreMismatchError, match="model"):
        other = dt.ClassificationTask(_mlp(nn.Tanh()))
        dt.truth.leave_one_out(train_fn, other, (x, y), (x[:2], y[:2]), [0, 1], **kw)
