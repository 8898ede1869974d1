"""Your own CNN, from the checkpoints your training loop saved: TracIn and a report.

A small CNN is trained on scikit-learn's 8×8 digits (10% of the training labels flipped,
so there is something to find), saving at every epoch what most PyTorch training loops
save::

    torch.save({"epoch": e, "model_state_dict": ..., "optimizer_state_dict": ...}, path)

Then, as you would with your own run:

* ``dt.Checkpoint.glob("ckpts/epoch*.pt")`` loads the trajectory in natural order
  (``epoch2`` before ``epoch10``), each checkpoint weighted by the learning rate stored
  in its optimizer state (what TracIn needs; a step schedule halves it here);
* ``dt.TracIn()`` scores the test images against the training images;
* ``write_report`` writes one self-contained HTML file: each test image's top proponents
  and opponents (beside Grad-Cos), the training images ranked by self-influence, and how
  many flipped labels that ranking finds.

Run: ``python examples/own_cnn_checkpoints.py --out cnn-example`` (about 10 s on 2 cores).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import datatrace as dt
from datatrace.app.report import write_report


class SmallCNN(nn.Module):
    """conv 3×3 (8 channels) → ReLU → 2×2 max-pool → linear: 1,370 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.fc(h.flatten(1))


def load_digits_images(seed: int = 0, n_train: int = 800, flip: float = 0.10) -> dict:
    """Digits as (N, 1, 8, 8) images in [0, 1]; a seeded ``flip`` share of the training
    labels changed to another class."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    tr, te = perm[:n_train], perm[n_train:]
    flipped = torch.zeros(n_train, dtype=torch.bool)
    flipped[torch.randperm(n_train, generator=g)[: round(flip * n_train)]] = True
    shift = torch.randint(1, 10, (int(flipped.sum()),), generator=g)
    y_train = y[tr].clone()
    y_train[flipped] = (y_train[flipped] + shift) % 10
    return {"x_train": x[tr], "y_train": y_train, "flipped": flipped,
            "x_test": x[te], "y_test": y[te]}  # fmt: skip


def train_and_save(data: dict, ckpt_dir: Path, epochs: int = 10, seed: int = 0) -> SmallCNN:
    """An ordinary training loop (SGD, momentum, a step learning-rate schedule) that saves
    model and optimizer state at the end of every epoch."""
    torch.manual_seed(seed)
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    g = torch.Generator().manual_seed(seed)
    x, y = data["x_train"], data["y_train"]
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for epoch in range(1, epochs + 1):
        model.train()
        for idx in torch.randperm(len(x), generator=g).split(32):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        torch.save(
            {
                "epoch": epoch,
                "model_state_dict": model.state_dict(),
                "optimizer_state_dict": opt.state_dict(),  # holds this epoch's lr
            },
            ckpt_dir / f"epoch{epoch}.pt",
        )
        sched.step()
    return model.eval()


def main(out: Path = Path("cnn-example"), seed: int = 0) -> dict:
    out = Path(out)
    data = load_digits_images(seed)
    train_and_save(data, out / "ckpts", seed=seed)

    # --- from here on, only what is on disk: your model class and your checkpoint files
    checkpoints = dt.Checkpoint.glob(out / "ckpts" / "epoch*.pt")
    model = SmallCNN()
    model.load_state_dict(checkpoints[-1].state)
    model.eval()
    task = dt.ClassificationTask(model)
    train = (data["x_train"], data["y_train"])
    queries = (data["x_test"][:6], data["y_test"][:6])

    tracin = dt.TracIn().fit(task, checkpoints, train, store=out / "features", overwrite=True)
    scores = tracin.attribute(queries)  # (6, 800): > 0 = proponent
    self_influence = tracin.self_influence()  # (800,): large = inspect first
    gradcos = dt.GradCos().fit(task, checkpoints[-1:], train).attribute(queries)
    report = write_report(
        out / "report.html",
        scores=scores,
        train=train,
        queries=queries,
        self_influence=self_influence,
        normalised_scores=gradcos,
        suspected=data["flipped"],  # known here; in your data: the labels you doubt
        method="TracIn",
        rerun=f"python examples/own_cnn_checkpoints.py --out {out} --seed {seed}",
        title="Your own CNN from checkpoints on disk",
    )

    with torch.no_grad():
        accuracy = float((model(data["x_test"]).argmax(1) == data["y_test"]).float().mean())
    found = dt.metrics.found_at(self_influence, data["flipped"], [0.10, 0.20])
    print(f"{len(checkpoints)} checkpoints: {[c.name for c in checkpoints]}")
    print(f"learning rates read from the optimizer states: {[c.weight for c in checkpoints]}")
    print(f"test accuracy {accuracy:.3f}; flipped labels found in the top 10% / 20% by "
          f"self-influence: {found[0]:.0%} / {found[1]:.0%}")  # fmt: skip
    print(f"report: {report}")
    return {
        "names": [c.name for c in checkpoints],
        "weights": [c.weight for c in checkpoints],
        "accuracy": accuracy,
        "found": found,
        "scores": scores,
        "report": report,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("cnn-example"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.out, args.seed)
