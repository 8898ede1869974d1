"""Gold standards: what attribution scores are checked against.

* :mod:`.gold`: leave-one-out, group leave-out and subset retraining (for the LDS);
* :mod:`.further`: further training (Wei et al. 2024), for a final model only;
* :mod:`.autodamp`: ``damping="auto"``, calibrated against further training;
* :mod:`.jobs`: the resumable, sharded job runner they all use.
"""

from ..retrain import measure, subset_masks
from .autodamp import AutoDamping, AutoDampingResult, calibrate_damping
from .further import Removal, batch_order, further_training
from .gold import group_leave_out, leave_one_out, subset_retraining

__all__ = [
    "AutoDamping",
    "AutoDampingResult",
    "Removal",
    "batch_order",
    "calibrate_damping",
    "further_training",
    "group_leave_out",
    "leave_one_out",
    "measure",
    "subset_masks",
    "subset_retraining",
]
