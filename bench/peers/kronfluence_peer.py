"""kronfluence 1.0.1: EK-FAC influence.

``compute_train_loss`` SUMS the per-example cross-entropy (per-example gradients are those
of single examples) and samples labels from the model when ``sample=True`` (true Fisher,
Monte Carlo; the default ``use_empirical_fisher=False``). Factors are means over examples
and ``damping_factor`` is added to the eigenvalues: ``damping_factor = lam``. Pairwise
scores are ``q_j^T (G + lam)^{-1} g_i`` (n_test, n_train): S = kronfluence / n. AMP is off;
every dtype float32 except its default float64 eigendecomposition. It wraps the modules of
the model it is given, so it gets a copy.
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
from typing import Any

import torch
import torch.nn.functional as F
from harness import Clock
from torch import nn
from torch.utils.data import TensorDataset

from peers import InfluenceSettings


def ekfac(wl: Any, st: InfluenceSettings) -> tuple:
    """(S, {fit, attribute, total}, notes): prepare_model + Analyzer + factors, then scores."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class DigitsTask(Task):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Any:
            logits, y = model(batch[0]), batch[1]
            if sample:  # true Fisher: labels drawn from the model's predictive distribution
                with torch.no_grad():
                    y = torch.multinomial(F.softmax(logits.detach(), dim=-1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> Any:
            return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")

    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    train, test, task = TensorDataset(*wl.train), TensorDataset(*wl.test), DigitsTask()
    out_dir = tempfile.mkdtemp(prefix="bench-kronfluence-")
    torch.manual_seed(0)  # label sampling
    try:
        clock = Clock()
        analyzer = Analyzer(analysis_name="digits", model=prepare_model(copy.deepcopy(wl.model), task),
                            task=task, cpu=True, disable_tqdm=True, output_dir=out_dir)  # fmt: skip
        factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=False, amp_dtype=None,
                                      covariance_max_examples=None, lambda_max_examples=None)  # fmt: skip
        analyzer.fit_all_factors(factors_name="ekfac", dataset=train, factor_args=factor_args,
                                 per_device_batch_size=st.batch_size, overwrite_output_dir=True)  # fmt: skip
        clock.lap("fit")
        analyzer.compute_pairwise_scores(
            scores_name="pairwise", factors_name="ekfac", query_dataset=test, train_dataset=train,
            per_device_query_batch_size=wl.n_test, per_device_train_batch_size=st.batch_size,
            overwrite_output_dir=True, score_args=ScoreArguments(damping_factor=st.damping, amp_dtype=None))  # fmt: skip
        scores = analyzer.load_pairwise_scores("pairwise")["all_modules"]
        clock.lap("attribute")
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return scores.detach().float() / wl.n_train, clock.times, ["true Fisher, MC labels"]
