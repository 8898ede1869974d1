"""``datatrace demo``: find flipped labels in scikit-learn's digits with TracIn.

Trains a small MLP on the real 8×8 digits with 10% of the training labels flipped
(seeded), saving a checkpoint and its learning rate every few epochs; runs TracIn over
those checkpoints; prints the top proponents/opponents of a few test images; ranks the
training data by self-influence and reports how many flipped labels are found after
inspecting 5/10/20% of it (beside a random ranking and the final-model loss); writes the
self-contained HTML report of :func:`datatrace.app.report.write_report` (TracIn beside
Grad-Cos), the found-vs-inspected curve (PNG and SVG) and ``summary.json`` (the numbers
printed, from which ``scripts/readme_figures.py`` writes the README's table).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from ..core.checkpoint import Checkpoint
from ..core.errors import ConfigError
from ..core.task import ClassificationTask
from ..methods.recipes import GradCos, TracIn
from ..metrics import detection_auc, detection_curve, found_at
from ..retrain import LRSchedule, sgd_train
from . import detection, report
from .rendering import svg_line_plot

FRACTIONS = (0.05, 0.10, 0.20)


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo; ``quick`` shrinks everything for tests."""

    seed: int = 0
    out: Path = Path("datatrace-demo")
    quick: bool = False
    flip_fraction: float = 0.10
    progress: bool | None = None

    @property
    def n_train(self) -> int:
        return 600 if self.quick else 1_400

    @property
    def epochs(self) -> int:
        return 12 if self.quick else 40


def load_digits_split(cfg: DemoConfig) -> dict[str, torch.Tensor]:
    """Digits scaled to [0, 1], split train/test, with a seeded fraction of labels flipped."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise ConfigError("the demo needs scikit-learn: pip install 'datatrace[demo]'") from exc
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    g = torch.Generator().manual_seed(cfg.seed)
    perm = torch.randperm(len(x), generator=g)
    tr, te = perm[: cfg.n_train], perm[cfg.n_train :]
    y_train = y[tr].clone()
    n_flip = round(cfg.flip_fraction * cfg.n_train)
    flipped = torch.zeros(cfg.n_train, dtype=torch.bool)
    flipped[torch.randperm(cfg.n_train, generator=g)[:n_flip]] = True
    shift = torch.randint(1, 10, (n_flip,), generator=g)
    y_train[flipped] = (y_train[flipped] + shift) % 10  # always a different class
    return {
        "x_train": x[tr],
        "y_train": y_train,
        "y_clean": y[tr],
        "flipped": flipped,
        "x_test": x[te],
        "y_test": y[te],
    }


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))


def train_with_checkpoints(
    data: dict[str, torch.Tensor], cfg: DemoConfig, ckpt_dir: Path
) -> tuple[nn.Module, list[Checkpoint]]:
    """SGD with momentum, weight decay and a step-decayed learning rate; a checkpoint every
    few epochs, saved as safetensors files (with their learning rates) and loaded back, as
    a user's own training run would."""
    every = max(1, cfg.epochs // 8)
    model, snapshots = sgd_train(
        make_model, data["x_train"], data["y_train"], cfg.seed, cfg.epochs, 0.1, 32, 0.9,
        weight_decay=1e-4, schedule=LRSchedule.STEP_HALVING, order_seed=cfg.seed + 1,
        checkpoint_epochs=range(every, cfg.epochs + 1, every),
    )  # fmt: skip
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    lrs: dict[str, float] = {}
    for snap in snapshots:
        name = f"epoch_{int(snap.name.removeprefix('epoch')):03d}.safetensors"
        save_file({k: v.contiguous() for k, v in snap.state.items()}, str(ckpt_dir / name))
        lrs[name] = snap.weight
    (ckpt_dir / "learning_rates.json").write_text(json.dumps(lrs, indent=1))
    ckpts = [Checkpoint.from_file(ckpt_dir / n, weight=w) for n, w in sorted(lrs.items())]
    return model, ckpts


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def run(cfg: DemoConfig) -> dict[str, object]:
    """Run the demo end to end; returns the numbers it printed (for tests)."""
    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_digits_split(cfg)
    model, ckpts = train_with_checkpoints(data, cfg, out / "checkpoints")
    acc = accuracy(model, data["x_test"], data["y_test"])
    print(
        f"digits: {cfg.n_train} training images ({int(data['flipped'].sum())} labels "
        f"flipped), {len(data['x_test'])} test; MLP test accuracy {acc:.3f}; "
        f"{len(ckpts)} checkpoints in {out / 'checkpoints'}"
    )
    task = ClassificationTask(model)
    train = (data["x_train"], data["y_train"])
    fitted = TracIn().fit(
        task, ckpts, train, store=out / "features", overwrite=True, progress=cfg.progress
    )
    queries = (data["x_test"][:4], data["y_test"][:4])
    pro_v, pro_i = fitted.top_k(queries, k=5)
    opp_v, opp_i = fitted.top_k(queries, k=5, opponents=True)
    print_top(data, pro_v, pro_i, opp_v, opp_i)
    self_influence = fitted.self_influence()
    rankings = suspicion_rankings(self_influence, model, train)
    summary = print_detection(rankings, data["flipped"])
    curves = {k: detection_curve(v, data["flipped"]) for k, v in rankings.items()}
    detection.plot_detection_curves(
        curves, out / "mislabel_detection.png", "Finding flipped labels in digits"
    )
    (out / "mislabel_detection.svg").write_text(detection_svg(curves), encoding="utf-8")
    (out / "summary.json").write_text(
        json.dumps({"test_accuracy": acc, "detection": summary}, indent=1) + "\n"
    )
    # the normalised view beside TracIn: Grad-Cos at the final checkpoint
    gradcos = GradCos().fit(task, ckpts[-1:], train, progress=False).attribute(queries)
    html_path = write_demo_report(
        out, cfg, data, acc, fitted.attribute(queries), gradcos, self_influence
    )
    print(
        f"report: {html_path}  plot: {out / 'mislabel_detection.png'}  "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    return {"test_accuracy": acc, "detection": summary, "out": str(out)}


def detection_svg(curves: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> str:
    """The found-vs-inspected curves as SVG text (the README's figure)."""
    lines = {k: (x.tolist(), y.tolist()) for k, (x, y) in curves.items()}
    return svg_line_plot(
        {**lines, "random": ([0.0, 1.0], [0.0, 1.0])},
        title="Finding flipped labels in digits",
        xlabel="fraction of training data inspected",
        ylabel="fraction of flipped labels found",
        dashed=("random",),
    )


def suspicion_rankings(
    self_influence: torch.Tensor, model: nn.Module, train: tuple[torch.Tensor, torch.Tensor]
) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        loss = F.cross_entropy(model(train[0]), train[1], reduction="none")
    return {"TracIn self-influence": self_influence, "final-model loss": loss}


def print_top(
    data: dict[str, torch.Tensor],
    pro_v: torch.Tensor,
    pro_i: torch.Tensor,
    opp_v: torch.Tensor,
    opp_i: torch.Tensor,
) -> None:
    def fmt(v: torch.Tensor, i: torch.Tensor) -> str:
        return ", ".join(
            f"#{int(j)} (label {int(data['y_train'][j])}"
            f"{' FLIPPED' if data['flipped'][j] else ''}, {float(s):+.3f})"
            for s, j in zip(v, i, strict=True)
        )

    for q in range(len(pro_i)):
        print(f"test image {q} (label {int(data['y_test'][q])})")
        print(f"  proponents: {fmt(pro_v[q], pro_i[q])}")
        print(f"  opponents:  {fmt(opp_v[q], opp_i[q])}")


def print_detection(
    rankings: dict[str, torch.Tensor], flipped: torch.Tensor
) -> dict[str, dict[str, float]]:
    print("flipped labels found after inspecting the top-ranked fraction of training data:")
    head = "  ".join(f"{f:>5.0%}" for f in FRACTIONS)
    print(f"  {'ranking':<24}{head}    AUC")
    summary: dict[str, dict[str, float]] = {}
    share = float(flipped.double().mean())
    rows = {
        **{k: found_at(v, flipped, FRACTIONS) for k, v in rankings.items()},
        "random (expected)": list(FRACTIONS),
        "best possible": [min(1.0, f / share) for f in FRACTIONS],
    }
    aucs = {"random (expected)": 0.5, "best possible": 1 - share / 2}
    for name, found in rows.items():
        auc = detection_auc(rankings[name], flipped) if name in rankings else aucs[name]
        summary[name] = {
            **{f"{f:.2f}": v for f, v in zip(FRACTIONS, found, strict=True)},
            "auc": auc,
        }
        print(f"  {name:<24}" + "  ".join(f"{v:>5.0%}" for v in found) + f"   {auc:.3f}")
    return summary


def write_demo_report(
    out: Path,
    cfg: DemoConfig,
    data: dict[str, torch.Tensor],
    acc: float,
    scores: torch.Tensor,
    gradcos: torch.Tensor,
    self_influence: torch.Tensor,
) -> Path:
    """The demo's report: :func:`report.write_report` on the digits shown as 8×8 images,
    with the flipped labels as the suspected examples."""
    n_query = scores.shape[0]
    rerun = f"datatrace demo --seed {cfg.seed} --out {out}" + (" --quick" if cfg.quick else "")
    return report.write_report(
        out / "report.html",
        scores=scores,
        train=(data["x_train"].reshape(-1, 8, 8), data["y_train"]),
        queries=(data["x_test"][:n_query].reshape(-1, 8, 8), data["y_test"][:n_query]),
        self_influence=self_influence,
        normalised_scores=gradcos,
        suspected=data["flipped"],
        method="TracIn",
        rerun=rerun,
        title=f"datatrace demo: TracIn on digits (test accuracy {acc:.3f})",
    )
