"""A Hugging Face ``Trainer`` callback: the checkpoints TracIn needs, saved during normal
training with their learning rates, and the Distilled Datamodel's recorder fed at every step.

    from datatrace.integrations.transformers import DatatraceCallback

    cb = DatatraceCallback("ckpts", every_epoch=True)            # and/or save_steps=...
    Trainer(model, args, train_dataset=..., callbacks=[cb]).train()
    ckpts = dt.Checkpoint.glob("ckpts/step-*.safetensors")       # weight = learning rate
    dt.TracIn().fit(dt.ClassificationTask(model), ckpts, train)

**On disk** (``output_dir``): one ``step-<global step>.safetensors`` per saved checkpoint,
holding the model's ``state_dict()`` (tied tensors once, under their first name, as
``save_pretrained`` does) with the metadata ``learning_rate``, ``global_step`` and ``epoch``
in its header (so :meth:`datatrace.Checkpoint.from_file` reads the weight without anything
beside it), and ``trajectory.json``, the list of saved checkpoints with the same fields,
rewritten atomically after every save.

**Which learning rate**: that of the last optimizer step before the checkpoint (the step
that produced it, read from the optimizer after ``optimizer.step()``), so a linear decay to
zero still gives the final checkpoint a positive weight. TracIn weights checkpoint c by
the step size in effect around it; with a constant rate within an epoch both readings agree.

``transformers`` is imported with this module, never by ``import datatrace``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..core.errors import ConfigError
from ..methods.datamodel import Recorder

if TYPE_CHECKING:
    from transformers import TrainerCallback
else:
    try:  # the callback subclasses transformers' base class when it is installed
        from transformers import TrainerCallback
    except ImportError:  # pragma: no cover - exercised only without transformers
        TrainerCallback = object

MANIFEST = "trajectory.json"


class DatatraceCallback(TrainerCallback):
    """Save checkpoints with their learning rates (for TracIn) and feed a recorder.

    Args:
        output_dir: where checkpoints and ``trajectory.json`` go (created).
        save_steps: ``None`` (no step-based saves), an int k (every k optimizer steps) or
            the global steps to save at (e.g. ``[10, 50, 100]``).
        every_epoch: also save at the end of every epoch.
        recorder: a Distilled Datamodel recorder (``dt.DistilledDatamodel(...).recorder(
            task, train)``), given every optimizer step with its learning rate; call
            ``recorder.finish(model)`` after training.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str],
        save_steps: int | Iterable[int] | None = None,
        every_epoch: bool = False,
        recorder: Recorder | None = None,
    ) -> None:
        if TrainerCallback is object:
            raise ConfigError(
                "datatrace.integrations.transformers needs transformers: pip install transformers"
            )
        self.output_dir = Path(output_dir)
        self.every: int | None = None
        self.steps: frozenset[int] = frozenset()
        if isinstance(save_steps, bool):
            raise ConfigError(f"save_steps must be an int or a list of steps, got {save_steps!r}")
        if isinstance(save_steps, int):
            if save_steps < 1:
                raise ConfigError(f"save_steps must be >= 1, got {save_steps}")
            self.every = save_steps
        elif save_steps is not None:
            self.steps = frozenset(int(s) for s in save_steps)
        if not isinstance(every_epoch, bool):
            raise ConfigError(f"every_epoch must be True or False, got {every_epoch!r}")
        if save_steps is None and not every_epoch and recorder is None:
            raise ConfigError(
                "the callback would do nothing: give save_steps=..., every_epoch=True or "
                "recorder=..."
            )
        if recorder is not None and not isinstance(recorder, Recorder):
            raise ConfigError(
                "recorder must come from dt.DistilledDatamodel(...).recorder(task, train), got "
                f"{type(recorder).__name__}"
            )
        self.every_epoch = every_epoch
        self.recorder = recorder
        self.saved: list[dict[str, Any]] = []
        self._lr: float | None = None

    # -- Trainer events ------------------------------------------------------------------------

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._lr = _learning_rate(kwargs["optimizer"])

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        lr = self._applied_lr(kwargs)
        if self.recorder is not None:
            self.recorder.observe(kwargs["model"], lr=lr)
        step = int(state.global_step)
        if (self.every is not None and step % self.every == 0) or step in self.steps:
            self.save(kwargs["model"], step, float(state.epoch or 0.0), lr)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.every_epoch:
            step = int(state.global_step)
            self.save(kwargs["model"], step, float(state.epoch or 0.0), self._applied_lr(kwargs))

    def _applied_lr(self, kwargs: dict[str, Any]) -> float:
        # before any optimizer step (on_epoch_end of an empty epoch): the optimizer's rate
        return self._lr if self._lr is not None else _learning_rate(kwargs["optimizer"])

    # -- saving --------------------------------------------------------------------------------

    def save(self, model: nn.Module, step: int, epoch: float, lr: float) -> Path:
        """Write ``step-<step>.safetensors`` (once per step) and update the manifest."""
        from safetensors.torch import save_file

        path = self.output_dir / f"step-{step}.safetensors"
        if any(entry["global_step"] == step for entry in self.saved):
            return path
        self.output_dir.mkdir(parents=True, exist_ok=True)
        entry = {"file": path.name, "global_step": step, "epoch": epoch, "learning_rate": lr}
        tmp = path.with_suffix(".tmp")
        save_file(_unshared_state(model), str(tmp), metadata={k: str(v) for k, v in entry.items()})
        os.replace(tmp, path)
        self.saved.append(entry)
        manifest = self.output_dir / MANIFEST
        tmp = manifest.with_suffix(".tmp")
        tmp.write_text(json.dumps({"checkpoints": self.saved}, indent=1))
        os.replace(tmp, manifest)
        return path


def _learning_rate(optimizer: Any) -> float:
    rates = {float(g["lr"]) for g in optimizer.param_groups}
    if len(rates) != 1:
        raise ConfigError(
            f"the optimizer's parameter groups have learning rates {sorted(rates)}; a "
            "checkpoint has one weight, so datatrace's callback needs one learning rate"
        )
    return rates.pop()


def _unshared_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors kept once (safetensors refuses shared storage),
    detached, contiguous and on the CPU."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    out = {}
    for name, value in model.state_dict().items():
        key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = value.detach().to("cpu", copy=True).contiguous()
    return out
