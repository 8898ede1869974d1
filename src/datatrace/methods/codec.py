"""How a saved fit's settings and fitted objects become JSON plus named tensors, and back
(:mod:`datatrace.methods.saved`'s format): plain values as is, tensors by key, slots and
fitted dataclasses as their class and fields, the model's modules by name. Only datatrace's
own classes, and slot classes of modules already imported, are ever rebuilt."""

from __future__ import annotations

import dataclasses
import enum
import sys
from typing import Any

import torch
from torch import nn

from ..core.errors import ConfigError, StoreCorruptError, StoreMismatchError
from ..core.runtime import model_device
from ..curvature.base import AbstractFittedPreconditioner, AbstractPreconditioner
from ..curvature.context import FitContext
from ..curvature.problem import CurvatureProblem
from ..features.spec import FeatureSpec
from .engine import GradientAttributor
from .slots import AbstractExampleWeights, AbstractOutput, CheckpointWeights

#: what to do about an unreadable saved fit
FIX = "fit and save it again"

# the classes a saved file may name (their module must be datatrace's or already imported)
_SLOTS: tuple[type, ...] = (
    GradientAttributor,
    FeatureSpec,
    AbstractPreconditioner,
    AbstractFittedPreconditioner,
    AbstractExampleWeights,
    AbstractOutput,
)


def encode(obj: Any, key: str, tensors: dict[str, torch.Tensor], model: nn.Module) -> Any:
    """JSON for ``obj``: plain values as is; tensors by their key in ``tensors``; slots and
    fitted objects (dataclasses) as their class and fields; the model's modules by name;
    the curvature problem and fit context by reference (rebuilt when loading)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj
        return {"tensor": key}
    if isinstance(obj, (list, tuple)):
        kind = "list" if isinstance(obj, list) else "tuple"
        return {kind: [encode(v, f"{key}/{i}", tensors, model) for i, v in enumerate(obj)]}
    if isinstance(obj, torch.dtype):
        return {"dtype": str(obj).removeprefix("torch.")}
    if isinstance(obj, CheckpointWeights):
        return {"checkpoint_weights": obj.value}
    if isinstance(obj, enum.Enum):  # a setting such as K-FAC's layer kind or its Fisher
        return {"enum": class_name(type(obj)), "value": obj.value}
    if isinstance(obj, CurvatureProblem):
        return {"problem": True}
    if isinstance(obj, FitContext):
        return {"context": True}
    if isinstance(obj, nn.Module):
        names = [n for n, m in model.named_modules() if m is obj]
        if not names:
            raise ConfigError(f"cannot save {key}: it holds a module that is not the model's")
        return {"module": names[0]}
    cls = type(obj)
    if dataclasses.is_dataclass(obj):
        fields = {
            f.name: encode(getattr(obj, f.name), f"{key}/{f.name}", tensors, model)
            for f in dataclasses.fields(obj)
            if f.init and f.metadata.get("saved", True)  # (runtime state is not)
        }
        return {"class": class_name(cls), "fields": fields}
    if isinstance(obj, _SLOTS) and not vars(obj):  # a setting-free slot (TRAK's Margin)
        return {"class": class_name(cls), "fields": {}}
    raise ConfigError(
        f"cannot save {key}: a {cls.__name__} is neither a dataclass of tensors and numbers "
        "nor a datatrace slot"
    )


def class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


class Decoder:
    """Rebuilds what :func:`_encode` wrote, for one model and checkpoint context."""

    def __init__(
        self, tensors: dict[str, torch.Tensor], model: nn.Module, ctx: FitContext | None
    ) -> None:
        self.tensors, self.model, self.ctx = tensors, model, ctx
        self.device = model_device(model)

    def __call__(self, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        if "tensor" in value:
            return self.tensors[value["tensor"]].to(self.device)
        if "list" in value:
            return [self(v) for v in value["list"]]
        if "tuple" in value:
            return tuple(self(v) for v in value["tuple"])
        if "dtype" in value:
            dtype = getattr(torch, value["dtype"], None)
            if not isinstance(dtype, torch.dtype):
                raise StoreCorruptError(f"unknown dtype {value['dtype']!r}; {FIX}")
            return dtype
        if "checkpoint_weights" in value:
            return CheckpointWeights(value["checkpoint_weights"])
        if "enum" in value:
            return find_enum(value["enum"])(value["value"])
        if "problem" in value or "context" in value:
            assert self.ctx is not None, "a fitted preconditioner outside a checkpoint"
            return self.ctx.problem if "problem" in value else self.ctx
        if "module" in value:
            return self.model.get_submodule(value["module"])
        if "class" in value:
            cls = find_class(value["class"])
            return cls(**{k: self(v) for k, v in value["fields"].items()})
        raise StoreCorruptError(f"unreadable entry {sorted(value)}; {FIX}")


#: datatrace classes that moved since fits naming them were saved: old name → new name
#: (issue 13 split ``curvature/iterative.py`` into one module per solver)
MOVED = {
    f"datatrace.curvature.iterative:{old}": f"datatrace.curvature.{module}:{new}"
    for old, module, new in (
        ("ConjugateGradient", "cg", "ConjugateGradient"),
        ("CGPreconditioner", "cg", "CGPreconditioner"),
        ("LiSSA", "lissa", "LiSSA"),
        ("LiSSAPreconditioner", "lissa", "LiSSAPreconditioner"),
        ("Arnoldi", "arnoldi", "Arnoldi"),
        ("EigenPreconditioner", "arnoldi", "EigenPreconditioner"),
        ("_MatrixFree", "matrix_free", "MatrixFree"),
    )
}


def find_class(name: str) -> type:
    """A class a saved fit names: datatrace's own (imported on demand; by its new name where
    it moved, :data:`MOVED`) or a slot class of a module already imported (a contributor's
    preconditioner). Nothing else is imported."""
    module_name, _, qualname = MOVED.get(name, name).partition(":")
    if module_name == "datatrace" or module_name.startswith("datatrace."):
        import importlib

        module: Any = importlib.import_module(module_name)
    else:
        module = sys.modules.get(module_name)
        if module is None:
            raise StoreMismatchError(
                f"the saved fit uses {qualname} from {module_name!r}: import that module "
                "before loading"
            )
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    ours = module_name.startswith(("datatrace.curvature", "datatrace.methods"))
    if not isinstance(obj, type) or not (
        issubclass(obj, _SLOTS) or (ours and dataclasses.is_dataclass(obj))
    ):
        raise StoreCorruptError(f"the saved fit names {name!r}, not a datatrace slot class")
    return obj


def find_enum(name: str) -> type[enum.Enum]:
    """An enum a saved fit names: datatrace's own only."""
    module_name, _, qualname = name.partition(":")
    if not module_name.startswith("datatrace."):
        raise StoreCorruptError(f"the saved fit names {name!r}, not a datatrace enum")
    import importlib

    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    if not (isinstance(obj, type) and issubclass(obj, enum.Enum)):
        raise StoreCorruptError(f"the saved fit names {name!r}, not a datatrace enum")
    return obj
