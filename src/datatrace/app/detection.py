"""The report's data-quality measurement: how many suspected examples a self-influence
ranking finds against how much of the training data is inspected (the table and SVG curve
of the report's "detection" section, and the demo's PNG plot)."""

from __future__ import annotations

import html
from pathlib import Path

import torch

from ..core.errors import ConfigError
from ..metrics import detection_auc, detection_curve, found_at
from .rendering import data_uri, svg_line_plot

#: the fractions of the training data at which the detection table reads the curve
FRACTIONS = (0.05, 0.10, 0.20)


def detection_summary(self_inf: torch.Tensor, suspected: torch.Tensor) -> dict[str, list[float]]:
    """Found @ :data:`FRACTIONS` and AUC of the self-influence ranking, a random ranking
    (expected) and the best possible one."""
    share = float(suspected.double().mean())
    return {
        "self-influence": [*found_at(self_inf, suspected, FRACTIONS),
                           detection_auc(self_inf, suspected)],
        "random (expected)": [*FRACTIONS, 0.5],
        "best possible": [*(min(1.0, f / share) for f in FRACTIONS), 1 - share / 2],
    }  # fmt: skip


def detection_section(self_inf: torch.Tensor | None, sus: torch.Tensor | None) -> str:
    if sus is None or self_inf is None:
        return (
            "<p>No examples were marked suspected. Pass suspected= (a bool mask or the "
            "indices of training examples whose labels you doubt, e.g. ones you corrupted "
            "on purpose) to see how many a self-influence ranking finds.</p>"
        )
    rows = detection_summary(self_inf, sus)
    head = "".join(
        f"<th>{h}</th>" for h in ["ranking", *(f"found @ {f:.0%}" for f in FRACTIONS), "AUC"]
    )
    body = "".join(
        f"<tr><td>{html.escape(name)}</td>"
        + "".join(f"<td>{v:.0%}</td>" for v in vals[:-1])
        + f"<td>{vals[-1]:.3f}</td></tr>"
        for name, vals in rows.items()
    )
    x, y = detection_curve(self_inf, sus)
    share = float(sus.double().mean())
    svg = svg_line_plot(
        {
            "self-influence": (x.tolist(), y.tolist()),
            "random": ([0.0, 1.0], [0.0, 1.0]),
            "best possible": ([0.0, share, 1.0], [0.0, 1.0, 1.0]),
        },
        title="Suspected examples found by self-influence",
        xlabel="fraction of training data inspected",
        ylabel="fraction of suspected examples found",
        dashed=("random", "best possible"),
    )
    uri = data_uri("image/svg+xml", svg.encode())
    return (
        f"<p>{int(sus.sum())} of {sus.numel()} training examples are marked suspected. "
        "Inspecting the training data in order of self-influence finds them at these "
        f"rates:</p><table><tr>{head}</tr>{body}</table>"
        f'<img src="{uri}" alt="found against inspected" width="480" height="360">'
    )


def plot_detection_curves(
    curves: dict[str, tuple[torch.Tensor, torch.Tensor]], path: Path, title: str
) -> None:
    """Found-vs-inspected curves as a PNG file (matplotlib), one line per ranking."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ConfigError("plots need matplotlib: pip install 'datatrace[demo]'") from exc
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
