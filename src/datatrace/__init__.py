"""datatrace: training data attribution for PyTorch.

Which training examples made a model predict what it predicts, how sure that is, and
which training data is mislabelled or harmful.

    import datatrace as dt
    task = dt.ClassificationTask(model)
    ckpts = [dt.Checkpoint.from_module(model, weight=lr)]
    fitted = dt.TracIn().fit(task, ckpts, (X_train, y_train))
    S = fitted.attribute((X_test, y_test))      # (n_test, n_train), > 0 = proponent
"""

from . import distributed, evaluate, metrics, problems, truth
from .checkpoint import Checkpoint
from .curvature import (
    EKFAC,
    KFAC,
    Arnoldi,
    ConjugateGradient,
    ExactHessian,
    GaussNewton,
    InfluenceWarning,
    LiSSA,
)
from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DatatraceError,
    ModelError,
    NonFiniteError,
    StoreCorruptError,
    StoreError,
    StoreMismatchError,
)
from .features import FeatureSpec
from .methods import (
    TRAK,
    DataInf,
    DistilledDatamodel,
    FittedDistilledDatamodel,
    FittedGradientAttributor,
    GradCos,
    GradDot,
    GradientAttributor,
    Influence,
    SweepPoint,
    TracIn,
    damping_sweep,
    mean_squared_gradient,
)
from .project import ProjectionSpec
from .task import AbstractTask, ClassificationTask, RegressionTask, Task

__version__ = "0.1.0"

__all__ = [
    "EKFAC",
    "KFAC",
    "TRAK",
    "AbstractTask",
    "Arnoldi",
    "Checkpoint",
    "CheckpointError",
    "ClassificationTask",
    "ConfigError",
    "ConjugateGradient",
    "DataError",
    "DataInf",
    "DatatraceError",
    "DistilledDatamodel",
    "ExactHessian",
    "FeatureSpec",
    "FittedDistilledDatamodel",
    "FittedGradientAttributor",
    "GaussNewton",
    "GradCos",
    "GradDot",
    "GradientAttributor",
    "Influence",
    "InfluenceWarning",
    "LiSSA",
    "ModelError",
    "NonFiniteError",
    "ProjectionSpec",
    "RegressionTask",
    "StoreCorruptError",
    "StoreError",
    "StoreMismatchError",
    "SweepPoint",
    "Task",
    "TracIn",
    "__version__",
    "damping_sweep",
    "distributed",
    "evaluate",
    "mean_squared_gradient",
    "metrics",
    "problems",
    "truth",
]
