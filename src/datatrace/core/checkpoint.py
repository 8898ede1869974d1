"""Where gradients are taken: a set of parameter values plus a weight.

A :class:`Checkpoint` holds a copy of a model's state (parameters and buffers) and a weight
(TracIn's learning rate at that point, or an ensemble weight). Files are read with
safetensors or ``torch.load(weights_only=True)``, never with unrestricted pickle.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import hash_tensor
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
    #: [the state's tensor versions, the digest of its bytes] once computed
    _fingerprint: list[Any] = field(default_factory=list, init=False, repr=False, compare=False)
    #: the state is this checkpoint's own copy (the ``from_*`` constructors): its digest is
    #: remembered; a state passed in may be the model's own tensors, changed through
    #: ``.data`` without a version count, so it is hashed at every call
    _own: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "weight", _weight(self.weight))
        for k, v in self.state.items():
            if not isinstance(v, torch.Tensor):
                raise CheckpointError(f"checkpoint entry {k!r} is not a tensor")

    @classmethod
    def from_module(cls, module: nn.Module, weight: float = 1.0, name: str = "") -> Checkpoint:
        """Snapshot a module's current state (a detached copy)."""
        state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        return cls(state=state, weight=weight, name=name)._owning()

    def _owning(self) -> Checkpoint:
        object.__setattr__(self, "_own", True)
        return self

    @classmethod
    def from_state_dict(
        cls, state_dict: Mapping[str, torch.Tensor], weight: float = 1.0, name: str = ""
    ) -> Checkpoint:
        """Wrap a state dict (copied, so later changes to it do not leak in)."""
        return cls(
            state={k: v.detach().clone() for k, v in state_dict.items()},
            weight=weight,
            name=name,
        )._owning()

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        weight: float | None = None,
        name: str = "",
        *,
        key: str | None = None,
        strip_prefix: str | None = None,
    ) -> Checkpoint:
        """Load a checkpoint as people save them (never with unrestricted pickle).

        Reads a state dict from a ``.safetensors`` file, a ``torch.save``d state dict, a
        training checkpoint dict (``{"model_state_dict" | "state_dict" | "model": ...,
        "optimizer_state_dict": ..., "epoch": ...}``; PyTorch Lightning's ``state_dict`` and
        ``optimizer_states`` too), or a Hugging Face model folder (``model.safetensors``,
        sharded or not, or ``pytorch_model.bin``).

        Args:
            path: the file or folder.
            weight: the checkpoint's weight; ``None``: the learning rate stored in the
                file's optimizer state or, for safetensors, under ``learning_rate`` in its
                metadata (as datatrace's Trainer callback writes it), else 1.0.
            name: a label (default: the file name).
            key: the entry holding the state dict, when it is none of the usual ones.
            strip_prefix: removed from every parameter name that starts with it (Lightning
                modules save ``model.`` + the wrapped model's names).

        Raises:
            CheckpointError: missing, unreadable or ambiguous files, naming the keys found
                and the argument that selects one.
        """
        path = Path(path)
        raw = _read_checkpoint(path)
        state, beside = _find_state(raw, path, key)
        if strip_prefix:
            state = {k.removeprefix(strip_prefix): v for k, v in state.items()}
        if weight is None:
            lr = _learning_rate(beside, path)
            if lr is None and path.suffix == ".safetensors":
                lr = _metadata_learning_rate(path)
            weight = lr if lr is not None else 1.0
        return cls(state=dict(state), weight=weight, name=name or path.stem)._owning()

    @classmethod
    def glob(
        cls, pattern: str | Path, weight: float | None = None, **kwargs: Any
    ) -> list[Checkpoint]:
        """Every file matching ``pattern`` (e.g. ``"ckpts/epoch*.pt"``), in natural order
        (``epoch2`` before ``epoch10``): a training trajectory for TracIn. ``weight`` and
        ``kwargs`` as for :meth:`from_file` (by default each file's own learning rate)."""
        pattern = Path(pattern)
        paths = sorted(pattern.parent.glob(pattern.name), key=_natural_key)
        if not paths:
            raise CheckpointError(f"no checkpoint files match {str(pattern)!r}")
        return [cls.from_file(p, weight=weight, **kwargs) for p in paths]

    def fingerprint(self, module: nn.Module | None = None) -> str:
        """SHA-256 (truncated) of names, shapes, dtypes and bytes of the state; with
        ``module``, also of the module's buffers the state lacks (which
        :meth:`parameters_for` reads from the module).

        Remembered for the constructors' own copies while no tensor of them changed in
        place; a state passed in (``Checkpoint(state=model.state_dict())``, which shares the
        model's tensors) is hashed at every call."""
        key = _versions(self.state) if self._own else None
        if not self._fingerprint or key is None or self._fingerprint[0] != key:
            h = hashlib.sha256()
            _hash_tensors(h, sorted(self.state.items()))
            self._fingerprint[:] = [key, h.hexdigest()[:16]]
        digest: str = self._fingerprint[1]
        buffers = module.named_buffers() if module is not None else ()
        live = [(k, b) for k, b in buffers if k not in self.state]
        if not live:
            return digest
        h = hashlib.sha256(digest.encode())
        _hash_tensors(h, live)
        return h.hexdigest()[:16]

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


def _hash_tensors(h: Any, items: list[tuple[str, torch.Tensor]]) -> None:
    for k, t in items:
        hash_tensor(h, k, t)


def _versions(state: Mapping[str, torch.Tensor]) -> tuple[Any, ...] | None:
    """Where each tensor's memory is and how often it was changed in place (``None``: not
    known for inference tensors, which count no versions)."""
    if any(t.is_inference() for t in state.values()):
        return None
    return tuple((k, t.data_ptr(), t._version) for k, t in state.items())


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


#: where a training checkpoint dict keeps the model's state dict, most specific first
STATE_KEYS = ("model_state_dict", "state_dict", "model", "module", "net")
#: and the optimizer's state (a dict, or Lightning's list of dicts)
OPTIMIZER_KEYS = ("optimizer_state_dict", "optimizer", "optimizer_states")


def _read_checkpoint(path: Path) -> Any:
    if path.is_dir():
        return _read_model_folder(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt, truncated, or pickled objects weights_only refuses
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc


def _read_model_folder(path: Path) -> dict[str, torch.Tensor]:
    """A Hugging Face model folder: (sharded) safetensors, else ``pytorch_model.bin``."""
    index = path / "model.safetensors.index.json"
    files = (
        sorted({path / f for f in json.loads(index.read_text())["weight_map"].values()})
        if index.is_file()
        else [f for f in (path / "model.safetensors", path / "pytorch_model.bin") if f.is_file()][
            :1
        ]
    )
    if not files:
        found = sorted(p.name for p in path.iterdir())[:12]
        raise CheckpointError(
            f"{path} is a folder without model.safetensors or pytorch_model.bin (found "
            f"{found}); pass the checkpoint file itself"
        )
    state: dict[str, torch.Tensor] = {}
    for f in files:
        part = _read_checkpoint(f)
        if not isinstance(part, Mapping):
            raise CheckpointError(f"{f} does not hold a state dict")
        state.update(part)
    return state


def _find_state(
    raw: Any, path: Path, key: str | None
) -> tuple[Mapping[str, torch.Tensor], Mapping[str, Any]]:
    """The state dict inside what was loaded, and the dict it was found in (which may hold
    the optimizer's state)."""
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict (got {type(raw).__name__})")
    if key is not None:
        if key not in raw or not isinstance(raw[key], Mapping):
            raise CheckpointError(
                f"{path} has no state dict under key={key!r}; its keys: {sorted(map(str, raw))}"
            )
        return raw[key], raw
    if raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        return raw, {}  # a plain state dict
    for k in STATE_KEYS:
        if (
            isinstance(raw.get(k), Mapping)
            and raw[k]
            and all(isinstance(v, torch.Tensor) for v in raw[k].values())
        ):
            return raw[k], raw
    nested = sorted(str(k) for k, v in raw.items() if isinstance(v, Mapping))
    raise CheckpointError(
        f"{path} holds a dict with keys {sorted(map(str, raw))[:20]} and no state dict under "
        f"{list(STATE_KEYS)}; pass key=... (one of {nested}) to select it"
    )


def _learning_rate(raw: Mapping[str, Any], path: Path) -> float | None:
    """The learning rate of the optimizer state saved beside the model (one value, or an
    error naming them when its parameter groups differ)."""
    for k in OPTIMIZER_KEYS:
        opt = raw.get(k)
        if isinstance(opt, list) and opt:  # Lightning: one state per optimizer
            opt = opt[0]
        if not isinstance(opt, Mapping) or not isinstance(opt.get("param_groups"), list):
            continue
        rates = {
            float(g["lr"]) for g in opt["param_groups"] if isinstance(g, Mapping) and "lr" in g
        }
        if len(rates) > 1:
            raise CheckpointError(
                f"{path}: the optimizer's parameter groups have learning rates {sorted(rates)}; "
                "pass weight=... to choose the checkpoint's weight"
            )
        if rates:
            return rates.pop()
    return None


def _metadata_learning_rate(path: Path) -> float | None:
    """``learning_rate`` from a safetensors file's metadata (its header), if any."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        value = (f.metadata() or {}).get("learning_rate")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        raise CheckpointError(
            f"{path}: metadata learning_rate={value!r} is not a number; pass weight=..."
        ) from None


def _natural_key(path: Path) -> list[Any]:
    """``epoch2`` before ``epoch10``: digits compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]
