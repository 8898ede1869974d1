"""``fitted.check()``: a method scored against further training on a random sample."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import MLP

import datatrace as dt
from datatrace.methods.check import CheckResult, check_sample


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = MLP().double()
    x = torch.randn(80, 5, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return dt.ClassificationTask(model), [dt.Checkpoint.from_module(model)], (x, y)


def test_check_equals_further_training_and_agreement_on_the_same_sample(trained):
    task, ckpts, train = trained
    fitted = dt.Influence(dt.ExactHessian(damping=0.01)).fit(task, ckpts, train, progress=False)
    res = fitted.check(n_examples=12, n_queries=10, epochs=1, seed=3, n_seeds=2, lr=0.05)
    assert isinstance(res, CheckResult)
    left, qidx = check_sample(80, 12, 10, 3, True)
    assert qidx is not None and not set(left.tolist()) & set(qidx.tolist())
    queries = (train[0][qidx], train[1][qidx])
    gold = dt.truth.further_training(
        task, ckpts[0], train, queries, left, epochs=1, seeds=range(2), lr=0.05, batch_size=32,
        progress=False,
    )[-1]  # fmt: skip
    want = dt.metrics.agreement(fitted.attribute(queries)[:, left], gold)
    assert res.cosine == want["cosine"]
    assert res.spearman == want["spearman"]
    assert (res.n_examples, res.n_queries) == (12, 10)
    assert "further training" in res.gold_standard and "1 epoch" in res.gold_standard
    assert res.seconds > 0
    # exact influence agrees with a short further training (0.67 ± 0.08 measured here)
    assert res.cosine[0] > 0.5 and res.cosine[1] < 0.15, res
    with pytest.raises(AttributeError):
        res.cosine = (0.0, 0.0)  # type: ignore[misc]  # frozen


def test_check_is_reproducible_and_the_seed_draws_the_sample(trained):
    task, ckpts, train = trained
    fitted = dt.GradDot().fit(task, ckpts, train, progress=False)
    a = fitted.check(n_examples=8, n_queries=6, n_seeds=1)
    b = fitted.check(n_examples=8, n_queries=6, n_seeds=1)
    c = fitted.check(n_examples=8, n_queries=6, n_seeds=1, seed=1)
    assert (a.cosine, a.spearman) == (b.cosine, b.spearman)
    assert a.cosine != c.cosine
    assert not torch.equal(check_sample(80, 8, 6, 0, True)[0], check_sample(80, 8, 6, 1, True)[0])


def test_check_with_given_queries(trained):
    task, ckpts, train = trained
    fitted = dt.GradDot().fit(task, ckpts, train, progress=False)
    queries = (train[0][:5] + 0.1, train[1][:5])
    res = fitted.check(queries, n_examples=10, n_seeds=1)
    assert res.n_queries == 5
    left, qidx = check_sample(80, 10, 32, 0, False)
    assert qidx is None
    gold = dt.truth.further_training(
        task, ckpts[0], train, queries, left, epochs=1, seeds=range(1), progress=False
    )[-1]
    want = dt.metrics.agreement(fitted.attribute(queries)[:, left], gold)
    assert res.spearman == want["spearman"]


def test_check_refuses_a_sample_larger_than_the_data(trained):
    task, ckpts, train = trained
    fitted = dt.GradDot().fit(task, ckpts, train, progress=False)
    with pytest.raises(dt.ConfigError, match=r"needs 112 training examples.*there are 80"):
        fitted.check(n_examples=80, n_queries=32)
    with pytest.raises(dt.ConfigError, match="n_examples must be an integer >= 2"):
        fitted.check(n_examples=1)


def test_check_of_trak_further_trains_the_classification_task(trained):
    """TRAK scores a margin; the gold standard is still further training of the task as
    trained (cross-entropy), as `datatrace evaluate` compares."""
    task, ckpts, train = trained
    fitted = dt.TRAK(projection_dim=None).fit(task, ckpts, train, progress=False)
    res = fitted.check(n_examples=8, n_queries=6, n_seeds=1)
    left, qidx = check_sample(80, 8, 6, 0, True)
    queries = (train[0][qidx], train[1][qidx])
    gold = dt.truth.further_training(
        task, ckpts[0], train, queries, left, epochs=1, seeds=range(1), progress=False
    )[-1]
    want = dt.metrics.agreement(fitted.attribute(queries)[:, left], gold)
    assert res.cosine == want["cosine"]
