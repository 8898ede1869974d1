"""What is differentiated: the training loss (defines training and curvature) and the
measurement (what a score explains), kept apart as in kronfluence's Task.

Implementations:

* :class:`ClassificationTask`: per-example cross-entropy; measurement = the query's loss.
* :class:`RegressionTask`: per-example squared error (summed over output dimensions).
* :class:`Task`: any per-example loss and measurement given as functions, for models whose
  batches are dicts or whose outputs need unpacking.

A task's functions receive ``model``, a callable that runs the wrapped module with the
parameters being differentiated (the user's module itself is never modified), and a batch
(tuple or dict of tensors with a leading example dimension). They return one value per
example, shape (batch,).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError, DataError, ModelError

ModelFn = Callable[..., Any]
PerExampleFn = Callable[[ModelFn, Any], torch.Tensor]


class AbstractTask(ABC):
    """A model plus its per-example training loss and measurement.

    Every other attribute is a setting: caches fingerprint it (and the code of the task's
    methods and functions) unless its name is in :attr:`runtime_state`."""

    #: attributes that are runtime state, not settings (left out of cache fingerprints)
    runtime_state: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise ModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not any(p.requires_grad for p in model.parameters()):
            raise ModelError(
                "the model has no trainable parameters (none with requires_grad=True); "
                "attribution differentiates the loss with respect to them"
            )
        self.model = model

    @abstractmethod
    def loss(self, model: ModelFn, batch: Any) -> torch.Tensor:
        """Per-example training loss, shape (batch,)."""

    def measurement(self, model: ModelFn, batch: Any) -> torch.Tensor:
        """Per-example quantity to explain, shape (batch,); defaults to the loss."""
        return self.loss(model, batch)

    def check_batch(self, model: ModelFn, batch: Any, offset: int) -> None:  # noqa: B027
        """Validate a batch before differentiating (raise DataError); default: nothing."""

    def check_data(self, data: Any, name: str) -> None:  # noqa: B027
        """Validate a whole data set at once where it enters (``data``: every example as one
        batch, ``name``: what it is called), so errors quote the user's shapes and every
        offending example; default: nothing."""

    def token_mask(self, batch: Any) -> torch.Tensor | None:
        """Which tokens of a sequence batch are real, (batch, T) with 1 = real token and 0 =
        padding, or ``None`` (no padding, or not a sequence task). Token-level curvature
        (K-FAC/EK-FAC factors of layers applied to every token) leaves padding out.

        Default: ``batch["attention_mask"]`` when the batch is a mapping with that key."""
        if isinstance(batch, Mapping) and "attention_mask" in batch:
            mask = batch["attention_mask"]
            return mask if isinstance(mask, torch.Tensor) else None
        return None

    def outputs(self, model: ModelFn, batch: Any) -> torch.Tensor:
        """Model outputs (batch, d) that the loss is a function of (for Gauss–Newton/K-FAC)."""
        raise ConfigError(
            f"{type(self).__name__} does not split its loss into outputs and an output loss, "
            "which Gauss-Newton, K-FAC and EK-FAC need; use dt.ExactHessian or CG/LiSSA/"
            "Arnoldi, or give dt.Task output_fn= and output_loss_fn="
        )

    def output_loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        """Per-example loss (batch,) as a function of :meth:`outputs`."""
        raise ConfigError(f"{type(self).__name__} has no output loss; see outputs()")

    def cross_entropy_rows(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor | None:
        """Where :meth:`output_loss` is by construction the sum of softmax cross-entropies
        over the last axis of ``outputs``, each with weight 1: the flat indices of the
        counted rows of ``outputs.reshape(-1, outputs.shape[-1])``. The sampled Fisher then
        draws its labels without the loss's output gradient (which it otherwise computes,
        per batch, to find the rows and check that the loss is a cross-entropy).
        Default: ``None`` (not known)."""
        return None


def _split_supervised(batch: Any, target_key: str) -> tuple[tuple[Any, ...], dict, torch.Tensor]:
    """(positional inputs, keyword inputs, targets) of a tuple or dict batch."""
    if isinstance(batch, Mapping):
        if target_key not in batch:
            raise DataError(
                f"dict batch has no target key {target_key!r} (keys: {sorted(batch)}); "
                "pass target_key=... to the task"
            )
        kwargs = {k: v for k, v in batch.items() if k != target_key}
        return (), kwargs, batch[target_key]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return tuple(batch[:-1]), {}, batch[-1]
    raise DataError(
        "a supervised batch must be a tuple (inputs, ..., targets) or a dict with a target key"
    )


def _class_ids(y: torch.Tensor) -> torch.Tensor:
    """Integer labels of any dtype (int8/16/32, uint8) as the int64 cross-entropy needs."""
    if y.dtype != torch.long and not y.dtype.is_floating_point and y.dtype != torch.bool:
        return y.long()
    return y


def _as_tensor_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise DataError(f"cannot read a tensor from the model output of type {type(out).__name__}")


class ClassificationTask(AbstractTask):
    """Per-example cross-entropy of logits (batch, classes) against integer labels (batch,).

    Args:
        model: the classifier; called as ``model(*inputs)`` for tuple batches
            ``(inputs..., labels)`` or ``model(**batch_without_labels)`` for dict batches.
        num_classes: optional; inferred from the model output when omitted.
        target_key: the label key of dict batches.
    """

    runtime_state = ("_inferred_classes",)

    def __init__(
        self, model: nn.Module, num_classes: int | None = None, target_key: str = "labels"
    ) -> None:
        super().__init__(model)
        self.num_classes = num_classes
        self.target_key = target_key
        self._inferred_classes: int | None = None

    def logits(self, model: ModelFn, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        args, kwargs, y = _split_supervised(batch, self.target_key)
        y = _class_ids(y)
        logits = _as_tensor_output(model(*args, **kwargs))
        if logits.dim() != 2 or logits.shape[0] != y.shape[0]:
            raise DataError(
                f"classification needs logits of shape (batch, classes) and labels (batch,), "
                f"got logits {tuple(logits.shape)} and labels {tuple(y.shape)}"
            )
        return logits, y

    def loss(self, model: ModelFn, batch: Any) -> torch.Tensor:
        logits, y = self.logits(model, batch)
        return F.cross_entropy(logits, y, reduction="none")

    def outputs(self, model: ModelFn, batch: Any) -> torch.Tensor:
        return self.logits(model, batch)[0]

    def output_loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        return F.cross_entropy(outputs, self.labels(batch), reduction="none")

    def labels(self, batch: Any) -> torch.Tensor:
        """Class indices as int64 (labels of any integer dtype are accepted)."""
        return _class_ids(_split_supervised(batch, self.target_key)[2])

    def check_batch(self, model: ModelFn, batch: Any, offset: int) -> None:
        _, _, y = _split_supervised(batch, self.target_key)
        _check_label_dtype(y, "labels")
        if self._inferred_classes is None:  # read once from the model (not fingerprinted)
            with torch.no_grad():
                width = int(self.logits(model, _take_first(batch))[0].shape[1])
            if self.num_classes is not None and self.num_classes > width:
                raise ConfigError(
                    f"num_classes={self.num_classes}, but the model gives {width} logits per "
                    f"example: labels {width}..{self.num_classes - 1} would have no logit; "
                    "pass the model's number of classes"
                )
            self._inferred_classes = width
        _check_label_range(y, self.num_classes or self._inferred_classes, offset, "labels")

    def check_data(self, data: Any, name: str) -> None:
        _, _, y = _split_supervised(data, self.target_key)
        _check_label_dtype(y, f"{name}: labels")
        if self.num_classes is not None:
            _check_label_range(y, self.num_classes, 0, f"{name}: labels")


def _check_label_dtype(y: torch.Tensor, what: str) -> None:
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        hint = (
            "; one-hot or probability labels: pass y.argmax(1)"
            if y.dim() == 2
            else "; float class ids: pass y.long()"
            if y.dtype.is_floating_point
            else ""
        )
        raise DataError(
            f"{what} must be a 1-D integer tensor of class indices, got dtype {y.dtype} and "
            f"shape {tuple(y.shape)}{hint}"
        )


def _check_label_range(y: torch.Tensor, classes: int, offset: int, what: str) -> None:
    bad = ((y < 0) | (y >= classes)).nonzero().flatten()
    if bad.numel():
        idx = (bad[:10] + offset).tolist()
        raise DataError(
            f"{what} out of range [0, {classes}) at examples {idx}"
            f"{f' and {bad.numel() - 10} more' if bad.numel() > 10 else ''}: got "
            f"{y[bad[:10]].tolist()}"
        )


class RegressionTask(AbstractTask):
    """Per-example squared error ``Σ_d (model(x)_d − y_d)²`` over output dimensions."""

    def __init__(self, model: nn.Module, target_key: str = "labels") -> None:
        super().__init__(model)
        self.target_key = target_key

    def loss(self, model: ModelFn, batch: Any) -> torch.Tensor:
        return self.output_loss(self.outputs(model, batch), batch)

    def outputs(self, model: ModelFn, batch: Any) -> torch.Tensor:
        args, kwargs, y = _split_supervised(batch, self.target_key)
        out = _as_tensor_output(model(*args, **kwargs))
        if out.shape[0] != y.shape[0] or out[0].numel() != y[0].numel():
            raise DataError(
                f"regression output {tuple(out.shape)} does not match targets {tuple(y.shape)}"
            )
        return out.reshape(out.shape[0], -1)

    def output_loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        _, _, y = _split_supervised(batch, self.target_key)
        diff = outputs - y.reshape(y.shape[0], -1).to(outputs.dtype)
        return (diff**2).sum(dim=1)


class Task(AbstractTask):
    """A task from user functions ``loss_fn(model, batch) -> (batch,)``.

    Args:
        model: the module whose parameters are differentiated.
        loss_fn: per-example training loss.
        measurement_fn: per-example measurement to explain; defaults to ``loss_fn``.
        output_fn: optional ``output_fn(model, batch) -> (batch, d)`` and
        output_loss_fn: ``output_loss_fn(outputs, batch) -> (batch,)`` with
            ``loss_fn == output_loss_fn(output_fn(...))``; needed by Gauss-Newton and K-FAC.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: PerExampleFn,
        measurement_fn: PerExampleFn | None = None,
        output_fn: PerExampleFn | None = None,
        output_loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    ) -> None:
        super().__init__(model)
        self._loss_fn = loss_fn
        self._measurement_fn = measurement_fn or loss_fn
        if (output_fn is None) != (output_loss_fn is None):
            raise ConfigError("give both output_fn and output_loss_fn, or neither")
        self._output_fn = output_fn
        self._output_loss_fn = output_loss_fn

    def outputs(self, model: ModelFn, batch: Any) -> torch.Tensor:
        if self._output_fn is None:
            return super().outputs(model, batch)
        return self._output_fn(model, batch)

    def output_loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        if self._output_loss_fn is None:
            return super().output_loss(outputs, batch)
        return _per_example(self._output_loss_fn(outputs, batch), "output_loss_fn")

    def loss(self, model: ModelFn, batch: Any) -> torch.Tensor:
        return _per_example(self._loss_fn(model, batch), "loss_fn")

    def measurement(self, model: ModelFn, batch: Any) -> torch.Tensor:
        return _per_example(self._measurement_fn(model, batch), "measurement_fn")


def _per_example(value: Any, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dim() != 1:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise DataError(f"{what} must return one value per example, shape (batch,), got {shape}")
    return value


def _take_first(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[:1]
    if isinstance(batch, Mapping):
        return {k: _take_first(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_take_first(v) for v in batch)
    return batch
