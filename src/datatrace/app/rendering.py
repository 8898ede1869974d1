"""Training and query examples as HTML: images, text or table rows, all self-contained.

* :class:`ExampleView` reads example ``i`` of whatever was given to ``fit``/``attribute``
  (a tuple or dict of tensors, NumPy arrays or lists of strings, a Dataset, a DataLoader or
  a bare tensor) as its renderable part and its label.
* :func:`infer_render` picks how an example is shown: ``"image"`` for (H, W), (C, H, W) or
  (H, W, C) arrays, ``"text"`` for strings and token ids (decoded with ``decode``),
  ``"table"`` for feature vectors and dicts of scalar columns.
* :func:`image_uri` encodes one image as a PNG ``data:`` URI (a small PNG writer of our
  own: no matplotlib or Pillow needed, byte-for-byte deterministic).
* :func:`svg_line_plot` draws line plots as SVG text (embedded as a ``data:`` URI).

Every string that reaches HTML goes through :func:`html.escape`.
"""

from __future__ import annotations

import base64
import html
import math
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..core.data import ExampleSource
from ..core.errors import ConfigError, DataError

RENDER_KINDS = ("image", "text", "table")
#: keys read as an example's label in dict batches (Hugging Face: ``labels``)
LABEL_KEYS = ("labels", "label", "y", "target", "targets")
#: keys read as an example's content in dict batches, in order of preference
CONTENT_KEYS = ("text", "sentence", "input_ids", "pixel_values", "image", "x", "inputs")
#: images are shown at least this many pixels wide (nearest-neighbour enlarged) and at
#: most this many (area-averaged down), so that 8×8 digits are visible and 224×224
#: photos do not make a report of hundreds of megabytes
IMAGE_MIN_PX, IMAGE_MAX_PX = 64, 96
TEXT_MAX_CHARS = 300
TABLE_MAX_COLUMNS = 40  # feature columns shown per table row (the rest are counted)


class ExampleView:
    """Example ``i``'s content (a tensor or a string) and label, from data as given to fit.

    Args:
        data: tuple/list ``(inputs, labels, ...)`` or dict of tensors, arrays or lists of
            strings; a pandas DataFrame (its columns); a Dataset or DataLoader (read one
            example at a time); or a single tensor of inputs.
        name: what the data is called in error messages.
    """

    def __init__(self, data: Any, name: str) -> None:
        self.name = name
        self._columns: dict[str, Any] | None = None  # whole columns, indexable by example
        self._content_key: str | int = 0
        self._label_key: str | int | None = None
        self._getter: Callable[[int], Any] | None = None
        self._n = 0
        if isinstance(data, DataLoader):
            source = ExampleSource(data, name)
            rows = source.indices
            self._n = len(source)
            dataset = data.dataset
            self._getter = lambda i: dataset[i if rows is None else int(rows[i])]
        elif hasattr(data, "columns") and hasattr(data, "iloc"):  # a pandas DataFrame
            self._set_columns({str(c): _as_column(data[c].to_numpy()) for c in data.columns}, name)
        elif isinstance(data, (torch.Tensor, np.ndarray)):
            self._set_columns({"0": _as_column(data)}, name)
        elif isinstance(data, Mapping):
            self._set_columns({str(k): _as_column(v) for k, v in data.items()}, name)
        elif isinstance(data, (tuple, list)) and data and not isinstance(data[0], str):
            self._set_columns({str(i): _as_column(v) for i, v in enumerate(data)}, name)
        elif hasattr(data, "__len__") and hasattr(data, "__getitem__"):
            self._n = len(data)
            self._getter = data.__getitem__
        else:
            raise DataError(
                f"{name}: cannot read examples from a {type(data).__name__}; pass tensors, "
                "a dict of columns, a Dataset or a DataLoader"
            )

    def _set_columns(self, columns: dict[str, Any], name: str) -> None:
        lengths = {k: len(v) for k, v in columns.items()}
        if len(set(lengths.values())) != 1:
            raise DataError(f"{name}: columns have different lengths {lengths}")
        self._columns = columns
        self._n = next(iter(lengths.values()))
        keys = list(columns)
        if keys == [str(i) for i in range(len(keys))]:  # a tuple: (inputs, labels, ...)
            self._content_key = "0"
            self._label_key = "1" if len(keys) > 1 and _is_label_column(columns["1"]) else None
            return
        self._label_key = next(
            (k for k in LABEL_KEYS if k in columns and _is_label_column(columns[k])), None
        )
        self._content_key = next(
            (k for k in CONTENT_KEYS if k in columns),
            next((k for k in keys if k != self._label_key and k != "attention_mask"), keys[0]),
        )

    def __len__(self) -> int:
        return self._n

    def _example(self, i: int) -> Any:
        assert self._getter is not None
        return self._getter(i)

    def content(self, i: int) -> Any:
        """Example ``i``'s input: a tensor without batch dimension, or a string."""
        if self._columns is not None:
            value = self._columns[str(self._content_key)][i]
            mask = self._columns.get("attention_mask")
            if mask is not None and self._content_key == "input_ids":
                value = value[torch.as_tensor(mask[i]).bool()]
            return value
        ex = self._example(i)
        if isinstance(ex, Mapping):
            key = next((k for k in CONTENT_KEYS if k in ex), next(iter(ex)))
            value = ex[key]
            if key == "input_ids" and "attention_mask" in ex:
                value = torch.as_tensor(value)[torch.as_tensor(ex["attention_mask"]).bool()]
            return value
        if isinstance(ex, (tuple, list)):
            return ex[0]
        return ex

    def label(self, i: int) -> str | None:
        """Example ``i``'s label as text, or ``None`` when the data carry no scalar label."""
        if self._columns is not None:
            if self._label_key is None:
                return None
            return _scalar_text(self._columns[str(self._label_key)][i])
        ex = self._example(i)
        if isinstance(ex, Mapping):
            key = next((k for k in LABEL_KEYS if k in ex), None)
            return None if key is None else _scalar_text(ex[key])
        if isinstance(ex, (tuple, list)) and len(ex) > 1:
            return _scalar_text(ex[1])
        return None

    @property
    def frame_columns(self) -> list[str]:
        """The named scalar columns of a dict of columns (a data frame), else ``[]``."""
        if self._columns is None or self._content_key == "0":
            return []
        names = [
            k for k, v in self._columns.items() if k != self._label_key and _is_scalar_column(v)
        ]
        return names if len(names) > 1 else []

    def table_columns(self, i: int) -> list[tuple[str, str]]:
        """Example ``i`` as (column name, formatted value) pairs, for table rows."""
        names = self.frame_columns
        if names:
            assert self._columns is not None
            return [(k, _scalar_text(self._columns[k][i]) or "") for k in names]
        value = self.content(i)
        if isinstance(value, str):
            return [("text", value)]
        flat = torch.as_tensor(value).flatten()
        cells = [(f"x{j}", _scalar_text(v) or "") for j, v in enumerate(flat[:TABLE_MAX_COLUMNS])]
        if flat.numel() > TABLE_MAX_COLUMNS:
            cells.append(("…", f"(+{flat.numel() - TABLE_MAX_COLUMNS} more)"))
        return cells

    @property
    def holds_token_ids(self) -> bool:
        """Whether the content is a dict batch's ``input_ids`` (shown as text)."""
        if self._columns is not None:
            return self._content_key == "input_ids"
        ex = self._example(0) if len(self) else None
        return isinstance(ex, Mapping) and "input_ids" in ex and "text" not in ex


def _as_column(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "biuf":  # numbers and booleans: a tensor
            return torch.from_numpy(np.ascontiguousarray(value))
        return value.tolist()  # strings or objects: one Python value per example
    if isinstance(value, (torch.Tensor, list, tuple, np.ndarray)):
        return value
    raise DataError(f"a {type(value).__name__} is not a column of examples")


def _is_label_column(col: Any) -> bool:
    """One scalar per example (class ids, regression targets or label strings)."""
    if isinstance(col, torch.Tensor):
        return col.dim() == 1
    return bool(len(col)) and all(isinstance(v, (str, int, float)) for v in col[:10])


def _is_scalar_column(col: Any) -> bool:
    return (isinstance(col, torch.Tensor) and col.dim() == 1) or (
        not isinstance(col, torch.Tensor) and _is_label_column(col)
    )


def _scalar_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    t = torch.as_tensor(value)
    if t.numel() != 1:
        return None
    v = t.item()
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def infer_render(
    content: Any, decode: Callable[..., str] | None, table_like: bool, token_ids: bool = False
) -> str:
    """How to show an example with this content (see the module docstring); ``token_ids``:
    the content is known to be token ids (a batch's ``input_ids``), shown as text even
    without ``decode`` (as the ids)."""
    if isinstance(content, str):
        return "text"
    t = torch.as_tensor(content)
    if not t.is_floating_point() and t.dtype != torch.uint8 and (decode is not None or token_ids):
        return "text"
    if table_like or t.dim() <= 1:
        return "table"
    if t.dim() == 2 or (t.dim() == 3 and _channel_axis(t) is not None):
        return "image"
    raise ConfigError(
        f"cannot tell how to show examples of shape {tuple(t.shape)} and dtype {t.dtype}; "
        f"pass render= one of {list(RENDER_KINDS)} (images: (H, W), (C, H, W) or (H, W, C) "
        "with 1, 3 or 4 channels)"
    )


def _channel_axis(t: torch.Tensor) -> int | None:
    if t.shape[0] in (1, 3, 4):
        return 0
    if t.shape[-1] in (1, 3, 4):
        return 2
    return None


def to_pixels(image: Any) -> torch.Tensor:
    """One image as uint8 pixels (H, W) or (H, W, C), scaled to the display size.

    Float images in [0, 1] are taken as they are; others are min-max scaled (e.g. images
    normalised by a mean and standard deviation). uint8 images are taken as they are.
    """
    t = torch.as_tensor(image).detach().cpu()
    if t.dim() == 3:
        axis = _channel_axis(t)
        if axis is None:
            raise ConfigError(f"an image of shape {tuple(t.shape)} has no 1, 3 or 4 channel axis")
        t = t if axis == 0 else t.permute(2, 0, 1)
    elif t.dim() == 2:
        t = t.unsqueeze(0)
    else:
        raise ConfigError(f"an image must have 2 or 3 dimensions, got shape {tuple(t.shape)}")
    x = t.double() / 255.0 if t.dtype == torch.uint8 else t.double()
    if not bool(torch.isfinite(x).all()):
        raise DataError("an image to render contains NaN or inf")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        x = (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)
    side = max(x.shape[1], x.shape[2])
    if side < IMAGE_MIN_PX:
        k = math.ceil(IMAGE_MIN_PX / side)
        x = x.repeat_interleave(k, 1).repeat_interleave(k, 2)
    elif side > IMAGE_MAX_PX:
        size = (
            max(1, round(x.shape[1] * IMAGE_MAX_PX / side)),
            max(1, round(x.shape[2] * IMAGE_MAX_PX / side)),
        )
        x = F.interpolate(x.unsqueeze(0), size=size, mode="area").squeeze(0)
    pixels = (x * 255.0).round().clamp(0, 255).to(torch.uint8)
    return pixels[0] if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).contiguous()


def png_bytes(pixels: torch.Tensor) -> bytes:
    """A PNG file of uint8 pixels (H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA."""
    if pixels.dtype != torch.uint8 or pixels.dim() not in (2, 3):
        raise ValueError("png_bytes takes uint8 pixels (H, W) or (H, W, C)")
    p = pixels if pixels.dim() == 3 else pixels.unsqueeze(-1)
    h, w, c = p.shape
    color_type = {1: 0, 3: 2, 4: 6}[c]
    rows = np.concatenate(  # each scanline starts with filter type 0 (none)
        [np.zeros((h, 1), np.uint8), p.numpy().reshape(h, w * c)], axis=1
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", w, h, 8, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
        + chunk(b"IEND", b"")
    )


def data_uri(mime: str, payload: bytes) -> str:
    return f"data:{mime};base64," + base64.b64encode(payload).decode("ascii")


def image_uri(image: Any) -> str:
    """One image (see :func:`to_pixels`) as a PNG ``data:`` URI."""
    return data_uri("image/png", png_bytes(to_pixels(image)))


def text_of(content: Any, decode: Callable[..., str] | None) -> str:
    """An example's text: the string itself, or its token ids decoded (or listed)."""
    if isinstance(content, str):
        text = content
    else:
        ids = torch.as_tensor(content).flatten().tolist()
        text = str(decode(ids)) if decode is not None else " ".join(map(str, ids))
    return text if len(text) <= TEXT_MAX_CHARS else text[: TEXT_MAX_CHARS - 1] + "…"


PALETTE = ("#1f77b4", "#d62728", "#9467bd", "#ff7f0e", "#8c564b")
DASHED = ("#555555", "#2ca02c", "#17becf")


def svg_line_plot(
    curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    dashed: Sequence[str] = (),
    width: int = 480,
    height: int = 360,
) -> str:
    """Lines on [0, 1] × [0, 1] axes as an SVG document (text, deterministic)."""
    left, right, top, bottom = 56, 16, 32, 48
    pw, ph = width - left - right, height - top - bottom

    def px(x: float, y: float) -> str:
        return f"{left + x * pw:.1f},{top + (1 - y) * ph:.1f}"

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2:.0f}" y="18" text-anchor="middle" font-size="13">'
        f"{html.escape(title)}</text>",
    ]
    for k in range(6):
        v = k / 5
        parts.append(
            f'<line x1="{left}" y1="{top + (1 - v) * ph:.1f}" x2="{left + pw}" '
            f'y2="{top + (1 - v) * ph:.1f}" stroke="#ddd"/>'
            f'<line x1="{left + v * pw:.1f}" y1="{top}" x2="{left + v * pw:.1f}" '
            f'y2="{top + ph}" stroke="#ddd"/>'
            f'<text x="{left - 6}" y="{top + (1 - v) * ph + 4:.1f}" text-anchor="end">'
            f"{v:.0%}</text>"
            f'<text x="{left + v * pw:.1f}" y="{top + ph + 16}" text-anchor="middle">'
            f"{v:.0%}</text>"
        )
    parts.append(
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>'
        f'<text x="{left + pw / 2:.0f}" y="{height - 10}" text-anchor="middle">'
        f"{html.escape(xlabel)}</text>"
        f'<text transform="translate(14,{top + ph / 2:.0f}) rotate(-90)" '
        f'text-anchor="middle">{html.escape(ylabel)}</text>'
    )
    solid = [k for k in curves if k not in dashed]
    for n, (label, (xs, ys)) in enumerate(curves.items()):
        color = (
            DASHED[list(dashed).index(label) % len(DASHED)]
            if label in dashed
            else PALETTE[solid.index(label) % len(PALETTE)]
        )
        dash = ' stroke-dasharray="5,4"' if label in dashed else ""
        points = " ".join(px(float(x), float(y)) for x, y in zip(xs, ys, strict=True))
        parts.append(
            f'<polyline points="{points}" fill="none" stroke="{color}" stroke-width="2"{dash}/>'
        )
        ly = top + ph - 12 - 16 * (len(curves) - 1 - n)
        parts.append(
            f'<line x1="{left + pw - 150}" y1="{ly - 4}" x2="{left + pw - 126}" y2="{ly - 4}" '
            f'stroke="{color}" stroke-width="2"{dash}/>'
            f'<text x="{left + pw - 120}" y="{ly}">{html.escape(label)}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
