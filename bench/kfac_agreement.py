"""EK-FAC agreement with kronfluence on a tiny Hugging Face BERT classifier (not a unit test).

Same model (BertConfig hidden 32, 2 layers, vocab 100, built from the config, float64), same
padded data, same modules (every nn.Linear: kronfluence's default and datatrace's
``params=None``), same damping added to the EK-FAC eigenvalues. Two settings:

* empirical Fisher (``use_empirical_fisher=True`` / ``fisher="empirical"``): the same
  quantity, deterministic: agreement should be 1 up to round-off;
* sampled labels (kronfluence's default / datatrace's ``fisher="sampled"``): the same
  quantity in expectation, different random labels: agreement < 1, set by the sampling.

kronfluence's scores are ``q_jᵀ (G + λ)⁻¹ g_i``; datatrace's carry the ``1/n`` of leave-one-out
units, so datatrace's are multiplied by n before comparing. Prints the mean per-query
Pearson correlation and the largest relative difference.

Measured (2026-12-01, kronfluence 1.0.1, transformers 5.24.0, torch 2.13.0 CPU; 64 train ×
8 queries, 14 Linear layers): empirical Fisher, mean per-query Pearson 1.000000 and max
relative difference 2.0e-14 (the same numbers: token factors, padding and per-example
gradients agree); sampled labels, Pearson 0.86 (one label sample per example on 64
examples in each library; the difference is Monte Carlo noise).

Run (kronfluence and transformers are in /work/venvs/hf, datatrace from the source tree)::

    PYTHONPATH=src:. /work/venvs/hf/bin/python bench/kfac_agreement.py
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import warnings
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn

import datatrace as dt

N_TRAIN, N_QUERY, T, VOCAB, DAMPING = 64, 8, 12, 100, 1e-3


def model_and_data() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, num_labels=3,
        attn_implementation="eager", initializer_range=0.3,
    )  # fmt: skip
    model = transformers.BertForSequenceClassification(config).double().eval()
    n = N_TRAIN + N_QUERY
    ids = torch.randint(1, VOCAB, (n, T))
    lengths = torch.randint(4, T + 1, (n,))
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    data = {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.randint(0, 3, (n,))}
    return model, data


class _Rows(torch.utils.data.Dataset):
    def __init__(self, data: dict[str, torch.Tensor]) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data["labels"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.data.items()}


def kronfluence_scores(model: nn.Module, train: dict, query: dict, empirical: bool) -> torch.Tensor:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class BertTask(Task):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Any:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            logits = logits.logits
            y = batch["labels"]
            if sample:
                with torch.no_grad():
                    y = torch.multinomial(F.softmax(logits.detach(), dim=-1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch: Any, model: nn.Module) -> Any:
            return self.compute_train_loss(batch, model)

        def get_attention_mask(self, batch: Any) -> Any:
            return batch["attention_mask"]

    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    task, out_dir = BertTask(), tempfile.mkdtemp(prefix="kfac-agreement-")
    f64 = torch.float64
    try:
        analyzer = Analyzer(
            analysis_name="bert", model=prepare_model(copy.deepcopy(model), task), task=task,
            cpu=True, disable_tqdm=True, output_dir=out_dir,
        )  # fmt: skip
        factor_args = FactorArguments(
            strategy="ekfac", use_empirical_fisher=empirical, amp_dtype=None,
            activation_covariance_dtype=f64, gradient_covariance_dtype=f64,
            per_sample_gradient_dtype=f64, lambda_dtype=f64,
        )  # fmt: skip
        torch.manual_seed(0)
        analyzer.fit_all_factors(
            factors_name="ekfac", dataset=_Rows(train), factor_args=factor_args,
            per_device_batch_size=16, overwrite_output_dir=True,
        )  # fmt: skip
        score_args = ScoreArguments(
            damping_factor=DAMPING, amp_dtype=None, per_sample_gradient_dtype=f64,
            precondition_dtype=f64, score_dtype=f64,
        )  # fmt: skip
        analyzer.compute_pairwise_scores(
            scores_name="pairwise", factors_name="ekfac", query_dataset=_Rows(query),
            train_dataset=_Rows(train), per_device_query_batch_size=N_QUERY,
            per_device_train_batch_size=16, overwrite_output_dir=True, score_args=score_args,
        )  # fmt: skip
        return analyzer.load_pairwise_scores("pairwise")["all_modules"].double()
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def datatrace_scores(model: nn.Module, train: dict, query: dict, fisher: str) -> torch.Tensor:
    method = dt.Influence(dt.EKFAC(damping=DAMPING, fisher=fisher))
    with warnings.catch_warnings():  # transformers' masks cannot be vmapped: per-example loop
        warnings.filterwarnings("ignore", message="vmap could not trace")
        fitted = method.fit(
            dt.ClassificationTask(model), [dt.Checkpoint.from_module(model)], train,
            progress=False, batch_size=16,
        )  # fmt: skip
        return fitted.attribute(query) * N_TRAIN


def agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(mean per-query Pearson, max |a − b| / max |b|)."""
    ac, bc = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    pearson = (ac * bc).sum(1) / (ac.norm(dim=1) * bc.norm(dim=1))
    return float(pearson.mean()), float((a - b).abs().max() / b.abs().max())


def main() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # kronfluence's GradScaler
    model, data = model_and_data()
    train = {k: v[:N_TRAIN] for k, v in data.items()}
    query = {k: v[N_TRAIN:] for k, v in data.items()}
    for name, empirical, fisher in [("empirical Fisher", True, "empirical"),
                                    ("sampled labels", False, "sampled")]:  # fmt: skip
        kron = kronfluence_scores(model, train, query, empirical)
        ours = datatrace_scores(model, train, query, fisher)
        pearson, rel = agreement(ours, kron)
        print(f"{name:17s} mean per-query Pearson {pearson:.6f}, max rel. difference {rel:.2e}")


if __name__ == "__main__":
    main()
