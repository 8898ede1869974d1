"""Gold standards: what attribution scores are checked against (see :mod:`.gold`), and the
resumable, sharded job runner they use (:mod:`.jobs`)."""

from ..retrain import measure, subset_masks
from .gold import batch_order, further_training, group_leave_out, leave_one_out, subset_retraining

__all__ = [
    "batch_order",
    "further_training",
    "group_leave_out",
    "leave_one_out",
    "measure",
    "subset_masks",
    "subset_retraining",
]
