"""HTML reports and plots (matplotlib, imported only when a report is written)."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.errors import ConfigError


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError("reports need matplotlib: pip install 'datatrace[demo]'") from exc
    return plt


def image_data_uri(image: torch.Tensor, scale: int = 6) -> str:
    """A grayscale image (H, W) as an inline PNG ``data:`` URI, enlarged ``scale`` times."""
    plt = _pyplot()
    t = image.detach().float().cpu()
    img = t.repeat_interleave(scale, 0).repeat_interleave(scale, 1).numpy()
    buf = io.BytesIO()
    plt.imsave(buf, img, cmap="gray_r", format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def plot_detection_curves(
    curves: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path, title: str
) -> None:
    """Found-vs-inspected curves, one line per ranking, with the random diagonal."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4), dpi=120)
    for label, (x, y) in curves.items():
        ax.plot(x.numpy(), y.numpy(), label=label)
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="random")
    ax.set_xlabel("fraction of training data inspected")
    ax.set_ylabel("fraction of flipped labels found")
    ax.set_title(title)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def figure(uri: str, caption: str, flagged: bool = False) -> str:
    """One captioned image; ``flagged`` draws a red border (e.g. a flipped label)."""
    border = "3px solid #c0392b" if flagged else "3px solid transparent"
    return (
        f'<figure><img src="{uri}" style="border:{border}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
figure{display:inline-block;margin:4px;text-align:center;font-size:11px}
figcaption{max-width:70px}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px}
.row{display:flex;align-items:center;gap:12px;border-bottom:1px solid #eee;padding:6px 0}
.label{width:110px;font-size:12px;color:#555}
"""


def write_html(path: Path, title: str, body: Sequence[str]) -> None:
    """Write a self-contained HTML page (images inline)."""
    doc = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
        f"</title><style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        + "\n".join(body)
        + "</body></html>"
    )
    path.write_text(doc, encoding="utf-8")
