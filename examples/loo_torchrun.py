"""Leave-one-out retraining split across processes, resumable.

    torchrun --nproc_per_node=2 examples/loo_torchrun.py      # 2 ranks (gloo on CPU)
    python examples/loo_torchrun.py                           # the same result, one process

Every rank retrains its share of the models, finished ones are cached in ``loo-cache/``
(kill it and run again: nothing finished is recomputed), and every rank gets the whole
(n_query, n_left_out) matrix, identical to a single-process run.
"""

import torch

import datatrace as dt
from datatrace.app.problems import logistic_regression_problem

prob = logistic_regression_problem("breast_cancer", n_train=300, n_query=20)
task = dt.ClassificationTask(prob.model, num_classes=2)
left_out = range(0, 300, 3)
truth = dt.truth.leave_one_out(
    prob.train_fn, task, prob.train, prob.queries, indices=left_out, cache="loo-cache"
)
fitted = dt.Influence(dt.ExactHessian(damping=2 * prob.alpha)).fit(
    task, [dt.Checkpoint.from_module(prob.model)], prob.train
)
scores = fitted.attribute(prob.queries)[:, list(left_out)]
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
if rank == 0:
    agree = dt.metrics.agreement(scores, truth)
    print(
        f"exact influence vs leave-one-out, {truth.shape[1]} examples x {truth.shape[0]} queries:"
    )
    for name, (mean, se) in agree.items():
        print(f"  {name:8s} {mean:.3f} ± {se:.3f}")
