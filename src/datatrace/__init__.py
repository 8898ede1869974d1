"""datatrace: training data attribution for PyTorch.

Which training examples made a model predict what it predicts, how sure that is, and
which training data is mislabelled or harmful.

    import datatrace as dt
    task = dt.ClassificationTask(model)
    ckpts = [dt.Checkpoint.from_module(model, weight=lr)]
    fitted = dt.TracIn().fit(task, ckpts, (X_train, y_train))
    S = fitted.attribute((X_test, y_test))      # (n_test, n_train), > 0 = proponent

The package is in layers, each importing only those below it: ``core`` (task, checkpoint,
data, errors, the data loop, persistence), ``grads``, ``features``, ``curvature``,
``retrain``, ``methods``, ``truth``, ``metrics``; ``app`` (config, registry, CLI, evaluate,
report, demo) sits on top and is not imported here.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Names are imported on first use (PEP 562), so `import datatrace` and the command line's
# --help do not pay for importing torch; `from datatrace import X` and `dt.X` work as usual.
_MODULES = {
    "metrics": "datatrace.metrics",
    "truth": "datatrace.truth",
    "distributed": "datatrace.core.distributed",
}
_HOMES = {
    "datatrace.core.checkpoint": ["Checkpoint"],
    "datatrace.core.errors": [
        "CheckpointError", "ConfigError", "DataError", "DatatraceError", "ModelError",
        "NonFiniteError", "StoreCorruptError", "StoreError", "StoreMismatchError",
    ],
    "datatrace.core.task": ["AbstractTask", "ClassificationTask", "RegressionTask", "Task"],
    "datatrace.core.language": ["LanguageModelingTask"],
    "datatrace.curvature": [
        "EKFAC", "KFAC", "AbstractPreconditioner", "Arnoldi", "ConjugateGradient",
        "ExactHessian", "GaussNewton", "InfluenceWarning", "LiSSA",
    ],
    "datatrace.features": [
        "AbstractFeaturizer", "AbstractProjector", "FeatureSpec", "ProjectionSpec",
    ],
    "datatrace.methods": [
        "TRAK", "AbstractExampleWeights", "AbstractOutput", "CheckpointWeights", "DataInf",
        "DistilledDatamodel", "FittedDistilledDatamodel", "FittedGradientAttributor", "GradCos",
        "GradDot", "GradientAttributor", "Influence", "SweepPoint", "TracIn", "damping_sweep",
        "mean_squared_gradient",
    ],
    "datatrace.methods.saved": ["load", "load_scores"],
}  # fmt: skip
_HOME = {name: module for module, names in _HOMES.items() for name in names}

# Application modules once reachable as attributes of the package: still importable, with a
# DeprecationWarning naming the new home (they are not library names).
_MOVED = {"evaluate": "datatrace.app.evaluate", "problems": "datatrace.app.problems"}

if TYPE_CHECKING:  # what the lazy names are, for type checkers and IDEs
    from . import metrics, truth
    from .core import distributed
    from .core.checkpoint import Checkpoint
    from .core.errors import (
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
    from .core.language import LanguageModelingTask
    from .core.task import AbstractTask, ClassificationTask, RegressionTask, Task
    from .curvature import (
        EKFAC,
        KFAC,
        AbstractPreconditioner,
        Arnoldi,
        ConjugateGradient,
        ExactHessian,
        GaussNewton,
        InfluenceWarning,
        LiSSA,
    )
    from .features import AbstractFeaturizer, AbstractProjector, FeatureSpec, ProjectionSpec
    from .methods import (
        TRAK,
        AbstractExampleWeights,
        AbstractOutput,
        CheckpointWeights,
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
    from .methods.saved import load, load_scores


def __getattr__(name: str) -> Any:
    if name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
    elif name in _MODULES:
        value = importlib.import_module(_MODULES[name])
    elif name in _MOVED:
        warnings.warn(
            f"datatrace.{name} moved to {_MOVED[name]}; import it from there",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(_MOVED[name])
    else:
        raise AttributeError(f"module 'datatrace' has no attribute {name!r}")
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "EKFAC",
    "KFAC",
    "TRAK",
    "AbstractExampleWeights",
    "AbstractFeaturizer",
    "AbstractOutput",
    "AbstractPreconditioner",
    "AbstractProjector",
    "AbstractTask",
    "Arnoldi",
    "Checkpoint",
    "CheckpointError",
    "CheckpointWeights",
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
    "LanguageModelingTask",
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
    "load",
    "load_scores",
    "mean_squared_gradient",
    "metrics",
    "truth",
]
