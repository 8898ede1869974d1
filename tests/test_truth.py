"""Gold standards: units, closed forms, caching/resume, sharding across ranks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import MLP, assert_two_ranks_equal_one_process
from torch import nn

import datatrace as dt
from datatrace.app.problems import logistic_regression_problem
from datatrace.core.errors import ConfigError, StoreCorruptError, StoreMismatchError


def ridge_problem(n: int = 12, d: int = 3, alpha: float = 0.1):
    """Ridge regression solved in closed form (deterministic), float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = x @ torch.randn(d, generator=g, dtype=torch.float64) + 0.3 * torch.randn(
        n, generator=g, dtype=torch.float64
    )
    xq = torch.randn(5, d, generator=g, dtype=torch.float64)
    yq = torch.randn(5, generator=g, dtype=torch.float64)

    def train_fn(idx: torch.Tensor, seed: int) -> nn.Module:
        xs, ys = x[idx], y[idx]
        w = torch.linalg.solve(
            xs.T @ xs + alpha * len(idx) * torch.eye(d, dtype=x.dtype), xs.T @ ys
        )
        model = nn.Linear(d, 1, bias=False).double()
        with torch.no_grad():
            model.weight.copy_(w[None] + 1e-3 * seed)
        return model

    task = dt.RegressionTask(train_fn(torch.arange(n), 0))
    return task, (x, y), (xq, yq), train_fn


def test_leave_one_out_matches_direct_retraining() -> None:
    task, train, queries, train_fn = ridge_problem()
    _x, _y = train
    xq, yq = queries
    idx = [0, 3, 7]
    got = dt.truth.leave_one_out(train_fn, task, train, queries, indices=idx, seeds=(0, 2))
    want = torch.zeros(5, 3, dtype=torch.float64)
    for seed in (0, 2):
        base = task.loss(train_fn(torch.arange(12), seed), (xq, yq))
        for k, i in enumerate(idx):
            keep = torch.tensor([j for j in range(12) if j != i])
            want[:, k] += (task.loss(train_fn(keep, seed), (xq, yq)) - base) / 2
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)
    groups = dt.truth.group_leave_out(train_fn, task, train, queries, [[0], [3], [7]], seeds=(0, 2))
    torch.testing.assert_close(groups, got, rtol=0, atol=0)


def test_group_leave_out_by_ids_and_bad_groups() -> None:
    task, train, queries, train_fn = ridge_problem()
    ids = torch.arange(12) % 3
    got = dt.truth.group_leave_out(train_fn, task, train, queries, ids)
    lists = [list(range(g, 12, 3)) for g in range(3)]
    want = dt.truth.group_leave_out(train_fn, task, train, queries, lists)
    assert got.shape == (5, 3)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    as_list = dt.truth.group_leave_out(train_fn, task, train, queries, ids.tolist())
    torch.testing.assert_close(as_list, want, rtol=0, atol=0)
    with pytest.raises(ConfigError, match="no members"):
        dt.truth.group_leave_out(train_fn, task, train, queries, torch.arange(12) % 3 * 2)
    with pytest.raises(ConfigError, match=r"group 1: .*within"):
        dt.truth.group_leave_out(train_fn, task, train, queries, [[0], [0, 12]])
    with pytest.raises(ConfigError, match="seeds"):
        dt.truth.leave_one_out(train_fn, task, train, queries, seeds=())


def test_loo_on_l2_logistic_regression_matches_influence() -> None:
    """The truth and influence agree on a strictly convex problem (same units and sign).
    Influence is a first-order prediction: leave-one-out on 60 examples moves a little
    further than it predicts (slope ~1.17 here, -> 1 as n grows), never in another
    direction."""
    pytest.importorskip("sklearn")
    prob = logistic_regression_problem("wine", n_train=60, n_query=8, alpha=1e-1)
    task = dt.ClassificationTask(prob.model, num_classes=3)
    idx = list(range(0, 60, 4))
    truth = dt.truth.leave_one_out(prob.train_fn, task, prob.train, prob.queries, indices=idx)
    fitted = dt.Influence(dt.ExactHessian(damping=2 * prob.alpha)).fit(
        task, [dt.Checkpoint.from_module(prob.model)], prob.train
    )
    scores = fitted.attribute(prob.queries)[:, idx]
    agree = dt.metrics.agreement(scores, truth)
    assert agree["pearson"][0] > 0.99
    rel = (scores - truth).norm() / truth.norm()
    assert rel < 0.2, rel
    slope = float((scores * truth).sum() / (scores * scores).sum())
    assert 1.0 < slope < 1.3, slope


def test_subset_retraining_masks_and_outputs() -> None:
    task, train, queries, train_fn = ridge_problem()
    masks, outputs = dt.truth.subset_retraining(
        train_fn, task, train, queries, n_subsets=6, fraction=0.5, seed=3
    )
    assert masks.shape == (6, 12) and masks.dtype == torch.bool
    assert (masks.sum(1) == 6).all()
    torch.testing.assert_close(masks, dt.truth.subset_masks(12, 6, 0.5, 3), rtol=0, atol=0)
    for m in range(6):
        model = train_fn(torch.nonzero(masks[m]).flatten(), 3 + m)
        torch.testing.assert_close(outputs[m], task.loss(model, queries), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="fraction"):
        dt.truth.subset_masks(12, 6, 1.0, 0)


class CountingTrain:
    def __init__(self, train_fn, crash_after: int | None = None) -> None:
        self.train_fn, self.crash_after, self.calls = train_fn, crash_after, 0

    def __call__(self, idx: torch.Tensor, seed: int) -> nn.Module:
        if self.crash_after is not None and self.calls >= self.crash_after:
            raise KeyboardInterrupt("simulated crash")
        self.calls += 1
        return self.train_fn(idx, seed)


def test_cache_resumes_after_interruption_and_checks_settings(tmp_path: Path) -> None:
    task, train, queries, train_fn = ridge_problem()
    want = dt.truth.leave_one_out(train_fn, task, train, queries, seeds=(0, 1))
    crashing = CountingTrain(train_fn, crash_after=9)
    with pytest.raises(KeyboardInterrupt):
        dt.truth.leave_one_out(crashing, task, train, queries, seeds=(0, 1), cache=tmp_path)
    assert len(list(tmp_path.glob("job-*.safetensors"))) == 9
    resumed = CountingTrain(train_fn)
    got = dt.truth.leave_one_out(resumed, task, train, queries, seeds=(0, 1), cache=tmp_path)
    assert resumed.calls == 2 * 13 - 9  # nothing finished is recomputed
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    again = CountingTrain(train_fn)
    dt.truth.leave_one_out(again, task, train, queries, seeds=(0, 1), cache=tmp_path)
    assert again.calls == 0
    keyed = tmp_path / "keyed"  # a tuple key survives the JSON round trip
    dt.truth.leave_one_out(train_fn, task, train, queries, [0], cache=keyed, cache_key=("v", 1))
    counting = CountingTrain(train_fn)
    dt.truth.leave_one_out(counting, task, train, queries, [0], cache=keyed, cache_key=("v", 1))
    assert counting.calls == 0
    with pytest.raises(StoreMismatchError, match="cache_key"):
        dt.truth.leave_one_out(train_fn, task, train, queries, [0], cache=keyed, cache_key="v2")
    with pytest.raises(StoreMismatchError, match="seeds"):
        dt.truth.leave_one_out(train_fn, task, train, queries, seeds=(0, 2), cache=tmp_path)
    with pytest.raises(StoreMismatchError, match="train"):
        x, y = train
        dt.truth.leave_one_out(train_fn, task, (x, y + 1), queries, seeds=(0, 1), cache=tmp_path)
    (tmp_path / "job-000003.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(StoreCorruptError, match="job-000003"):
        dt.truth.leave_one_out(train_fn, task, train, queries, seeds=(0, 1), cache=tmp_path)


KILL_SCRIPT = """
import os, signal, sys, torch
sys.path.insert(0, {tests!r})
from test_truth import ridge_problem
import datatrace as dt
task, train, queries, train_fn = ridge_problem()
calls = [0]
def dying(idx, seed):
    calls[0] += 1
    if calls[0] == 6:
        os.kill(os.getpid(), signal.SIGKILL)
    return train_fn(idx, seed)
dt.truth.leave_one_out(dying, task, train, queries, cache={cache!r})
"""


def test_resume_after_sigkill_equals_uninterrupted(tmp_path: Path) -> None:
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), cache=str(tmp_path / "c"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    assert len(list((tmp_path / "c").glob("job-*.safetensors"))) == 5
    task, train, queries, train_fn = ridge_problem()
    counting = CountingTrain(train_fn)
    got = dt.truth.leave_one_out(counting, task, train, queries, cache=tmp_path / "c")
    assert counting.calls == 13 - 5
    want = dt.truth.leave_one_out(train_fn, task, train, queries)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


SHARD_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from test_truth import ridge_problem, mlp_further
import datatrace as dt
task, train, queries, train_fn = ridge_problem()
out = {{}}
out["loo"] = dt.truth.leave_one_out(train_fn, task, train, queries, seeds=(0, 1), cache={cache!r})
out["group"] = dt.truth.group_leave_out(train_fn, task, train, queries, torch.arange(12) % 4)
out["masks"], out["subsets"] = dt.truth.subset_retraining(
    train_fn, task, train, queries, n_subsets=5)
t2, ck, tr2, q2 = mlp_further()
out["further"] = dt.truth.further_training(
    t2, ck, tr2, q2, indices=range(7), epochs=2, seeds=(0, 1, 2), batch_size=4, lr=0.1,
    vectorize=3)
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
torch.save({{k: v.clone() for k, v in out.items()}}, {out!r}.format(rank))
"""


def mlp_further():
    torch.manual_seed(0)
    model = MLP().double()
    x = torch.randn(14, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (14,))
    task = dt.ClassificationTask(model, num_classes=3)
    q = (torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,)))
    return task, dt.Checkpoint.from_module(model), (x, y), q


def test_sharded_runs_equal_single_process(tmp_path: Path) -> None:
    tests = str(Path(__file__).parent)

    def make(out: str, sharded: bool) -> str:
        cache = str(tmp_path / "c") if sharded else None
        return SHARD_SCRIPT.format(tests=tests, cache=cache, out=out)

    assert_two_ranks_equal_one_process(tmp_path, make)
    # the ranks together filled one cache: a single process now recomputes nothing
    task, train, queries, train_fn = ridge_problem()
    counting = CountingTrain(train_fn)
    dt.truth.leave_one_out(counting, task, train, queries, seeds=(0, 1), cache=tmp_path / "c")
    assert counting.calls == 0


@pytest.mark.parametrize("mode", ["remove", "downweight"])
def test_further_training_vmap_equals_loop(mode: str, tmp_path: Path) -> None:
    task, ck, train, q = mlp_further()
    kw = dict(
        indices=[0, 3, 5, 13],
        epochs=2,
        seeds=(0, 4),
        batch_size=4,
        lr=0.2,
        mode=mode,
        momentum=0.5,
        weight_decay=0.01,
        eval_steps=[0, 1, 4, 8],
    )
    fast = dt.truth.further_training(task, ck, train, q, vectorize=3, **kw)
    slow = dt.truth.further_training(task, ck, train, q, vectorize=1, **kw)
    assert fast.shape == (4, 4, 4)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-13)
    assert fast[0].abs().max() == 0  # step 0: nothing trained yet
    assert fast[-1].abs().min() > 0
    centred = dt.truth.further_training(task, ck, train, q, vectorize=3, center=True, **kw)
    torch.testing.assert_close(centred, fast - fast.mean(-1, keepdim=True))
    cached = dt.truth.further_training(task, ck, train, q, vectorize=3, cache=tmp_path, **kw)
    torch.testing.assert_close(cached, fast, rtol=0, atol=0)
    assert len(list(tmp_path.glob("job-*"))) == 2 * 2  # seeds x chunks of 3
    again = dt.truth.further_training(task, ck, train, q, vectorize=3, cache=tmp_path, **kw)
    torch.testing.assert_close(again, fast, rtol=0, atol=0)
    other = dt.Checkpoint.from_state_dict({k: v + 1 for k, v in ck.state.items()})
    with pytest.raises(StoreMismatchError, match="checkpoint"):
        dt.truth.further_training(task, other, train, q, vectorize=3, cache=tmp_path, **kw)


def test_further_training_one_step_is_first_order() -> None:
    """One full-batch SGD step: removing i moves θ by +lr/n · g_i, so the effect on a query
    is (lr/n) q·g_i to first order: Grad-Dot's units times lr/n."""
    task, ck, train, q = mlp_further()
    lr, n = 1e-5, 14
    gold = dt.truth.further_training(task, ck, train, q, steps=1, seeds=(0,), batch_size=n, lr=lr)
    g = dt.GradDot().fit(task, [ck], train).attribute(q)
    want = g * lr / n
    torch.testing.assert_close(gold[0], want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))
    down = dt.truth.further_training(
        task, ck, train, q, steps=1, seeds=(0,), batch_size=n, lr=lr, mode="downweight"
    )
    torch.testing.assert_close(down[0], gold[0], rtol=1e-6, atol=1e-12)  # same step, math-wise


def test_further_training_cache_is_keyed_by_trained_parameters_and_buffers(
    tmp_path: Path,
) -> None:
    """A cache filled with every parameter trained is refused once the first layer is frozen,
    and one filled from a parameter-only checkpoint is refused once the batch-norm running
    statistics it takes from the model change (both changed the scores silently before);
    the loop twin runs a parameter-only checkpoint too (it used to fail to load it)."""
    torch.manual_seed(0)
    x = torch.randn(12, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (12,))
    q = (x[:3] + 0.1, y[:3])
    kw = dict(indices=[0, 1, 2], steps=3, seeds=(0,), lr=0.5, batch_size=4)
    model = MLP().double()
    task, ck = dt.ClassificationTask(model), dt.Checkpoint.from_module(model)
    dt.truth.further_training(task, ck, (x, y), q, cache=tmp_path / "a", **kw)
    model.fc1.requires_grad_(False)
    frozen = dt.truth.further_training(task, ck, (x, y), q, **kw)
    with pytest.raises(StoreMismatchError, match=r"trained\.fc1\.weight"):
        dt.truth.further_training(task, ck, (x, y), q, cache=tmp_path / "a", **kw)
    assert frozen[-1].abs().max() > 0

    net = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    net.train()
    net(x * 2 + 1)
    net.eval()
    task = dt.ClassificationTask(net)
    params_only = dt.Checkpoint(state={k: v.detach().clone() for k, v in net.named_parameters()})
    fast = dt.truth.further_training(
        task, params_only, (x, y), q, cache=tmp_path / "b", vectorize=4, **kw
    )
    slow = dt.truth.further_training(task, params_only, (x, y), q, vectorize=1, **kw)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-13)
    net.train()
    net(x)  # the running statistics move; the checkpoint does not hold them
    net.eval()
    with pytest.raises(StoreMismatchError, match="buffers") as refused:
        dt.truth.further_training(
            task, params_only, (x, y), q, cache=tmp_path / "b", vectorize=4, **kw
        )
    assert "trained" not in str(refused.value) and "vectorize" not in str(refused.value)


def test_further_training_bad_input() -> None:
    task, ck, train, q = mlp_further()
    with pytest.raises(ConfigError, match="exactly one"):
        dt.truth.further_training(task, ck, train, q, seeds=(0,))
    with pytest.raises(ConfigError, match="mode"):
        dt.truth.further_training(task, ck, train, q, epochs=1, mode="drop")
    with pytest.raises(ConfigError, match="eval_steps"):
        dt.truth.further_training(task, ck, train, q, epochs=1, eval_steps=[99])
    with pytest.raises(ConfigError, match="indices"):
        dt.truth.further_training(task, ck, train, q, indices=[14], epochs=1)


def test_no_pickle_in_cache(tmp_path: Path) -> None:
    task, train, queries, train_fn = ridge_problem()
    dt.truth.leave_one_out(train_fn, task, train, queries, indices=[0], cache=tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [".lock", "job-000000.safetensors", "job-000001.safetensors", "manifest.json"]


def test_further_training_loop_twin_keeps_a_non_persistent_buffer() -> None:
    """The per-example loop (vectorize=1) loads the checkpoint into a copy of the model:
    a non-persistent buffer (not in its state dict) stays the model's, and the loop equals
    the stacked runs (it raised 'Unexpected key(s) in state_dict')."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(5, 3)
            self.register_buffer("scale", torch.full((5,), 0.5), persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x * self.scale)

    torch.manual_seed(0)
    model = Scaled().double()
    task = dt.ClassificationTask(model)
    x, y = torch.randn(12, 5, dtype=torch.float64), torch.randint(0, 3, (12,))
    kw = dict(indices=[0, 1], steps=3, seeds=(0,), lr=0.5, batch_size=4)
    ck = dt.Checkpoint.from_module(model)
    slow = dt.truth.further_training(task, ck, (x, y), (x[:3], y[:3]), vectorize=1, **kw)
    fast = dt.truth.further_training(task, ck, (x, y), (x[:3], y[:3]), vectorize=2, **kw)
    torch.testing.assert_close(slow, fast, rtol=1e-9, atol=1e-12)
