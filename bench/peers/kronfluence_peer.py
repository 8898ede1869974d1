"""kronfluence 1.0.1: EK-FAC influence, one parametrised ``Task`` for every benchmark
(summed loss, factors as means, ``damping_factor = lam``, S = scores / n; see bench/README.md).
It wraps the modules of the model it is given: pass a copy."""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from harness import Clock
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from peers import InfluenceSettings

#: (model, batch) -> (logits (N, C), targets (N,), weights of the N terms or None: all 1)
Terms = Callable[[nn.Module, Any], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]


class Rows(Dataset):
    """A dict of equally long tensors as a dataset of dict rows (kronfluence's dict batches)."""

    def __init__(self, data: dict[str, torch.Tensor]) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(next(iter(self.data.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.data.items()}


def task(terms: Terms, measure: Callable[[nn.Module, Any], torch.Tensor],
         modules: list[str] | None = None, mask_key: str | None = None) -> Any:  # fmt: skip
    """A kronfluence ``Task``: the summed cross-entropy of ``terms``, ``measure`` as the
    measurement, tracking ``modules`` (None: every supported one), padding masked by
    ``batch[mask_key]``."""
    from kronfluence.task import Task

    class _Task(Task):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Any:
            logits, y, keep = terms(model, batch)
            if sample:  # true Fisher: labels drawn from the model's predictive distribution
                with torch.no_grad():
                    y = torch.multinomial(F.softmax(logits.detach(), dim=-1), 1).view(y.shape)
            if keep is None:
                return F.cross_entropy(logits, y, reduction="sum")
            return (F.cross_entropy(logits, y, reduction="none") * keep).sum()

        def compute_measurement(self, batch: Any, model: nn.Module) -> Any:
            return measure(model, batch)

        def get_influence_tracked_modules(self) -> list[str] | None:
            return modules

        def get_attention_mask(self, batch: Any) -> torch.Tensor | None:
            return None if mask_key is None else batch[mask_key]

    return _Task()


def pairwise(model: nn.Module, task: Any, train: Dataset, queries: Dataset, batch_size: int,
             damping: float | None, empirical: bool = False) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """(S = scores / n_train, {fit, attribute, total}): prepare_model + Analyzer + EK-FAC
    factors over ``train``, then the pairwise scores of all ``queries`` in one batch."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    torch.manual_seed(0)  # label sampling
    with tempfile.TemporaryDirectory(prefix="bench-kronfluence-") as out:
        clock = Clock()
        analyzer = Analyzer(analysis_name="bench", model=prepare_model(model, task), task=task,
                            cpu=True, disable_tqdm=True, output_dir=out)  # fmt: skip
        factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=empirical, amp_dtype=None,
                                      covariance_max_examples=None, lambda_max_examples=None)  # fmt: skip
        analyzer.fit_all_factors(factors_name="ekfac", dataset=train, factor_args=factor_args,
                                 per_device_batch_size=batch_size, overwrite_output_dir=True)  # fmt: skip
        clock.lap("fit")
        analyzer.compute_pairwise_scores(
            scores_name="pairwise", factors_name="ekfac", query_dataset=queries, train_dataset=train,
            per_device_query_batch_size=len(queries), per_device_train_batch_size=batch_size,
            overwrite_output_dir=True, score_args=ScoreArguments(damping_factor=damping, amp_dtype=None))  # fmt: skip
        S = analyzer.load_pairwise_scores("pairwise")["all_modules"].detach().float()
        clock.lap("attribute")
    return S / len(train), clock.times


def ekfac(wl: Any, st: InfluenceSettings) -> tuple:
    """(S, {fit, attribute, total}, notes) on a (x, y) classification workload."""
    kron = task(lambda m, b: (m(b[0]), b[1], None),
                lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="sum"))  # fmt: skip
    S, t = pairwise(copy.deepcopy(wl.model), kron, TensorDataset(*wl.train),
                    TensorDataset(*wl.test), st.batch_size, st.damping)  # fmt: skip
    return S, t, ["true Fisher, MC labels"]
