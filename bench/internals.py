"""Every datatrace name the benchmarks take from below the public top level, in one place:
when the library's modules move, this file is the one to remap."""

from datatrace.distributed import resolve_device
from datatrace.evaluate import sgd_train
from datatrace.methods.datamodel import kmeans_groups
from datatrace.problems import load_sklearn, logistic_regression_problem, mlp_problem

__all__ = ["kmeans_groups", "load_sklearn", "logistic_regression_problem", "mlp_problem",
           "resolve_device", "sgd_train"]  # fmt: skip
