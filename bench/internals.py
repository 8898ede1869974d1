"""Every datatrace name the benchmarks take from below the public top level, in one place:
when the library's modules move, this file is the one to remap."""

from datatrace.app.problems import load_sklearn, logistic_regression_problem, mlp_problem
from datatrace.core.distributed import resolve_device
from datatrace.methods.datamodel import kmeans_groups
from datatrace.retrain import sgd_train

__all__ = ["kmeans_groups", "load_sklearn", "logistic_regression_problem", "mlp_problem",
           "resolve_device", "sgd_train"]  # fmt: skip
