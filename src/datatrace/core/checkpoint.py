"""Where gradients are taken: a set of parameter values plus a weight.

A :class:`Checkpoint` holds a copy of a model's state (parameters and buffers) and a weight
(TracIn's learning rate at that point, or an ensemble weight). Files are read with
safetensors or ``torch.load(weights_only=True)``, never with unrestricted pickle.
"""

from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointError


@dataclass(frozen=True)
class Checkpoint:
    """A model state and the weight its scores get.

    Args:
        state: parameter (and optionally buffer) tensors by name, as in ``state_dict()``.
        weight: multiplier of this checkpoint's scores (TracIn: the learning rate).
        name: a label for logs and reports.
    """

    state: Mapping[str, torch.Tensor]
    weight: float = 1.0
    name: str = ""
    _fingerprint: list[str] = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight", _weight(self.weight))
        for k, v in self.state.items():
            if not isinstance(v, torch.Tensor):
                raise CheckpointError(f"checkpoint entry {k!r} is not a tensor")

    @classmethod
    def from_module(cls, module: nn.Module, weight: float = 1.0, name: str = "") -> Checkpoint:
        """Snapshot a module's current state (a detached copy)."""
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        return cls(state=state, weight=weight, name=name)

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, torch.Tensor], weight: float = 1.0, name: str = ""
    ) -> Checkpoint:
        """Wrap a state dict (copied, so later changes to it do not leak in)."""
        return cls(
            state={k: v.detach().clone() for k, v in state_dict.items()},
            weight=weight,
            name=name,
        )

    @classmethod
    def from_file(cls, path: str | Path, weight: float = 1.0, name: str = "") -> Checkpoint:
        """Load a ``.safetensors`` file or a ``torch.save``d state dict (weights only)."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"checkpoint file not found: {path}")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file

                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupt, truncated or not a state dict
            raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{path} does not hold a state dict (got {type(state).__name__})")
        return cls(state=dict(state), weight=weight, name=name or path.stem)

    def fingerprint(self) -> str:
        """SHA-256 (truncated) of names, shapes, dtypes and bytes of the state."""
        if not self._fingerprint:
            h = hashlib.sha256()
            for k in sorted(self.state):
                t = self.state[k].detach().cpu().contiguous()
                h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            self._fingerprint.append(h.hexdigest()[:16])
        return self._fingerprint[0]

    def parameters_for(
        self, module: nn.Module, device: torch.device | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(parameters, buffers) of ``module`` with this checkpoint's values.

        Raises:
            CheckpointError: a parameter is missing or has another shape than the model's.
        """
        params: dict[str, torch.Tensor] = {}
        buffers: dict[str, torch.Tensor] = {}
        problems = []
        for kind, named, out in (
            ("parameter", module.named_parameters(), params),
            ("buffer", module.named_buffers(), buffers),
        ):
            for k, ref in named:
                v = self.state.get(k)
                if v is None:
                    if kind == "parameter":
                        problems.append(f"missing parameter {k!r}")
                    else:
                        out[k] = ref.detach()
                    continue
                if v.shape != ref.shape:
                    problems.append(
                        f"{k!r} has shape {tuple(v.shape)} in the checkpoint but "
                        f"{tuple(ref.shape)} in the model"
                    )
                    continue
                out[k] = v.detach().to(device=device or ref.device, dtype=ref.dtype)
        if problems:
            label = f" {self.name!r}" if self.name else ""
            raise CheckpointError(
                f"checkpoint{label} does not fit the model: "
                + "; ".join(problems[:5])
                + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
            )
        return params, buffers


def _weight(weight: object) -> float:
    """A checkpoint weight as a finite float; anything else is a :class:`CheckpointError`."""
    if isinstance(weight, torch.Tensor) and weight.numel() == 1:
        weight = weight.item()
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        raise CheckpointError(
            f"checkpoint weight must be a finite number (e.g. the learning rate), got "
            f"{type(weight).__name__} {weight!r}"
        )
    if not math.isfinite(weight):
        raise CheckpointError(f"checkpoint weight must be a finite number, got {weight!r}")
    return float(weight)
