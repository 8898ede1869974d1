"""What :meth:`FittedGradientAttributor.check` (``fitted.check()``) reports and how it draws
its sample: a fitted method scores itself against further training (Wei et al.
2024, the gold standard that needs only the final model) on a random sample of training
examples, so that every score comes with a measured answer to "how far can I trust it?".

The sample: ``n_examples`` training examples left out, and (when no queries are given)
``n_queries`` other training examples as queries, drawn with ``seed``. The gold standard:
:func:`datatrace.truth.further_training` from the final checkpoint, ``epochs`` of plain SGD,
averaged over ``n_seeds`` batch orders, run stacked. The agreement: per-query cosine and
Spearman of the method's scores with it, then mean ± standard error over the queries
(:func:`datatrace.metrics.agreement`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..core.errors import ConfigError


@dataclass(frozen=True)
class CheckResult:
    """How well a fitted method agreed with further training on a random sample.

    Attributes:
        cosine, spearman: (mean, standard error) over queries of the per-query agreement.
        gold_standard: the ground truth used, with its settings.
        n_examples: training examples left out (the columns compared).
        n_queries: queries (the rows compared).
        seconds: wall time of the check (scores and further training).
    """

    cosine: tuple[float, float]
    spearman: tuple[float, float]
    gold_standard: str
    n_examples: int
    n_queries: int
    seconds: float

    def __str__(self) -> str:
        return (
            f"agreement with {self.gold_standard} on {self.n_examples} examples × "
            f"{self.n_queries} queries: cosine {self.cosine[0]:.3f} ± {self.cosine[1]:.3f}, "
            f"Spearman {self.spearman[0]:.3f} ± {self.spearman[1]:.3f} ({self.seconds:.1f} s)"
        )


def check_sample(
    n_train: int, n_examples: int, n_queries: int, seed: int, own_queries: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(left-out training indices, sorted; query training indices or None): disjoint draws
    from one seeded permutation."""
    for name, value in (("n_examples", n_examples), ("n_queries", n_queries)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise ConfigError(f"{name} must be an integer >= 2, got {value!r}")
    need = n_examples + (n_queries if own_queries else 0)
    if need > n_train:
        raise ConfigError(
            f"check needs {need} training examples (n_examples={n_examples}"
            f"{f' + n_queries={n_queries}' if own_queries else ''}) but there are {n_train}; "
            "pass smaller n_examples/n_queries"
        )
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(int(seed)))
    left = torch.sort(perm[:n_examples]).values
    return left, (perm[n_examples:need] if own_queries else None)
