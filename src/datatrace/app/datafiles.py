"""Data files named on the command line (``--train`` / ``--queries``; the formats are in
:mod:`datatrace.app.inputs`' docstring): a ``.npz`` / ``.pt`` / ``.safetensors`` file of
tensors, or a folder of images with ``labels.csv``."""

from __future__ import annotations

import csv
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.errors import ConfigError, DataError, DatatraceError

INPUT_KEYS = ("x", "inputs", "input", "features")
LABEL_KEYS = ("y", "labels", "label", "targets", "target")
LABELS_FILE = "labels.csv"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def tensor_file(path: Path, what: str) -> Any:
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                raw: Any = {k: torch.from_numpy(np.array(npz[k])) for k in npz.files}
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path))
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except DatatraceError:
        raise
    except Exception as exc:  # unreadable, pickled objects, a damaged archive
        raise DataError(f"{what}: cannot read {str(path)!r} ({one_line(exc)})") from None
    if isinstance(raw, (tuple, list)) and all(isinstance(t, torch.Tensor) for t in raw):
        return tuple(raw)
    if not isinstance(raw, Mapping) or not raw:
        raise DataError(
            f"{what}: {str(path)!r} must hold tensors by name (e.g. x and y), got "
            f"{type(raw).__name__}"
        )
    bad = [k for k, v in raw.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise DataError(f"{what}: {str(path)!r} entries {bad[:5]} are not tensors")
    return _named_tensors(dict(raw), path, what)


def _named_tensors(tensors: dict[str, torch.Tensor], path: Path, what: str) -> Any:
    """``(inputs, labels)`` from x/y-style names; otherwise the dict itself (a dict batch)."""
    inputs = [k for k in tensors if k in INPUT_KEYS]
    labels = [k for k in tensors if k in LABEL_KEYS]
    if not inputs:
        if not labels:
            raise DataError(
                f"{what}: {str(path)!r} has keys {sorted(tensors)} but no labels; name the "
                f"inputs one of {list(INPUT_KEYS)} and the labels one of {list(LABEL_KEYS)}, "
                "or give a dict batch with 'labels'"
            )
        return tensors  # a dict batch: model(**inputs), labels under their key
    if len(inputs) > 1 or len(labels) != 1 or len(tensors) != 2:
        raise DataError(
            f"{what}: {str(path)!r} has keys {sorted(tensors)}; give exactly one input key "
            f"({'/'.join(INPUT_KEYS)}) and one label key ({'/'.join(LABEL_KEYS)})"
        )
    return tensors[inputs[0]], tensors[labels[0]]


def image_folder(
    folder: Path, what: str, classes: list[str] | None
) -> tuple[tuple[torch.Tensor, torch.Tensor], list[str] | None]:
    labels_file = folder / LABELS_FILE
    if not labels_file.is_file():
        raise DataError(
            f"{what}: the folder {str(folder)!r} has no {LABELS_FILE} (rows: filename,label)"
        )
    with open(labels_file, newline="") as fh:
        rows = [r for r in csv.reader(fh) if r and any(c.strip() for c in r)]
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["filename", "label"]:
        rows = rows[1:]
    if not rows:
        raise DataError(f"{what}: {str(labels_file)!r} lists no images")
    names, raw_labels = [], []
    for i, row in enumerate(rows):
        if len(row) != 2:
            raise DataError(
                f"{what}: {str(labels_file)!r} line {i + 1} must be 'filename,label', got {row}"
            )
        names.append(row[0].strip())
        raw_labels.append(row[1].strip())
    images = [_read_image(folder / name, what) for name in names]
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) > 1:
        first = tuple(images[0].shape)
        odd = next(n for n, im in zip(names, images, strict=True) if tuple(im.shape) != first)
        raise DataError(f"{what}: images must share one shape; {names[0]} is {first}, {odd} is not")
    labels, found = _label_ids(raw_labels, classes, what)
    return (torch.stack(images), labels), found


def _label_ids(
    raw: list[str], classes: list[str] | None, what: str
) -> tuple[torch.Tensor, list[str] | None]:
    if classes is None and all(re.fullmatch(r"[+-]?\d+", v) for v in raw):
        return torch.tensor([int(v) for v in raw], dtype=torch.long), None
    names = classes if classes is not None else sorted(set(raw))
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted({v for v in raw if v not in index})
    if unknown:
        raise DataError(
            f"{what}: labels {unknown[:5]} are not classes of the training data ({names[:10]})"
        )
    return torch.tensor([index[v] for v in raw], dtype=torch.long), names


def _read_image(path: Path, what: str) -> torch.Tensor:
    if not path.is_file():
        raise DataError(f"{what}: {LABELS_FILE} names {path.name!r}, which is not in the folder")
    if path.suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise DataError(f"{what}: cannot read {str(path)!r} ({one_line(exc)})") from None
        t = torch.as_tensor(arr, dtype=torch.float32)
        if t.dim() not in (2, 3):
            raise DataError(f"{what}: {str(path)!r} must be (H, W) or (C, H, W)")
        return t[None] if t.dim() == 2 else t
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise DataError(f"{what}: {str(path)!r} is neither a .npy array nor an image file")
    try:
        from PIL import Image
    except ImportError:
        raise ConfigError(
            f"{what}: reading {path.suffix} images needs Pillow (pip install pillow), or "
            "save them as .npy arrays"
        ) from None
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("L") if im.mode in ("L", "1", "P") else im.convert("RGB"))
    except Exception as exc:
        raise DataError(f"{what}: cannot read {str(path)!r} ({one_line(exc)})") from None
    t = torch.from_numpy(arr.copy()).float() / 255.0
    return t[None] if t.dim() == 2 else t.permute(2, 0, 1).contiguous()
