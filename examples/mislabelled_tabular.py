"""Finding and fixing mislabelled tabular data: rank by self-influence, fix, retrain.

scikit-learn's breast cancer data (30 features, benign/malignant), standardised; 20% of
the 400 training labels are flipped, as a careless annotation pass might. A small MLP
trained on them loses accuracy on the (clean) test set. Then:

1. TracIn self-influence over the training run's checkpoints ranks the training rows
   (a row the model struggled to fit comes first);
2. a reviewer checks the labels of the top-ranked 20% of rows and corrects the wrong
   ones (simulated here with the true labels; no other row is touched);
3. the model is retrained on the corrected data and gains accuracy: the script prints
   and returns the numbers, beside dropping those rows instead and training on
   perfectly clean labels.

It also writes the HTML report (rows as table rows, the found-vs-inspected curve).
Run: ``python examples/mislabelled_tabular.py --out tabular-example`` (about 5 s).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import datatrace as dt
from datatrace.app.report import write_report

LR, EPOCHS, CHECKPOINT_EVERY = 0.05, 20, 2
REVIEWED = 0.20  # share of the training rows a reviewer looks at


def load(seed: int = 0, n_train: int = 400, flip: float = 0.20) -> dict:
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    x = torch.tensor(d.data, dtype=torch.float32)
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    tr, te = perm[:n_train], perm[n_train:]
    mean, std = x[tr].mean(0), x[tr].std(0)
    x = (x - mean) / std  # statistics of the training rows only
    flipped = torch.zeros(n_train, dtype=torch.bool)
    flipped[torch.randperm(n_train, generator=g)[: round(flip * n_train)]] = True
    return {
        "x_train": x[tr], "y_true": y[tr], "y_noisy": torch.where(flipped, 1 - y[tr], y[tr]),
        "flipped": flipped, "x_test": x[te], "y_test": y[te],
        "columns": list(d.feature_names),
    }  # fmt: skip


def train(
    x: torch.Tensor, y: torch.Tensor, seed: int = 0, checkpoints: list | None = None
) -> nn.Module:
    """Minibatch SGD with momentum; appends a checkpoint (weight = its learning rate)
    every ``CHECKPOINT_EVERY`` epochs when ``checkpoints`` is a list."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(x.shape[1], 64), nn.ReLU(), nn.Linear(64, 2))
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(1, EPOCHS + 1):
        for idx in torch.randperm(len(x), generator=g).split(32):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        if checkpoints is not None and epoch % CHECKPOINT_EVERY == 0:
            checkpoints.append(dt.Checkpoint.from_module(model, weight=LR, name=f"ep{epoch}"))
    return model.eval()


def accuracy(model: nn.Module, data: dict) -> float:
    with torch.no_grad():
        return float((model(data["x_test"]).argmax(1) == data["y_test"]).float().mean())


def main(out: Path = Path("tabular-example"), seed: int = 0) -> dict:
    out = Path(out)
    data = load(seed)
    x, y = data["x_train"], data["y_noisy"]
    checkpoints: list = []
    model = train(x, y, seed, checkpoints)
    noisy_acc = accuracy(model, data)

    # 1. rank the training rows by TracIn self-influence
    task = dt.ClassificationTask(model)
    tracin = dt.TracIn().fit(task, checkpoints, (x, y), progress=False)
    self_influence = tracin.self_influence()
    ranked = torch.sort(self_influence, descending=True, stable=True).indices
    reviewed = ranked[: round(REVIEWED * len(x))]

    # 2. the reviewer corrects the wrong labels among the reviewed rows
    y_fixed = y.clone()
    y_fixed[reviewed] = data["y_true"][reviewed]
    wrong_found = int(data["flipped"][reviewed].sum())

    # 3. retrain: on the corrected labels, without the reviewed rows, on clean labels
    fixed_acc = accuracy(train(x, y_fixed, seed), data)
    keep = torch.ones(len(x), dtype=torch.bool)
    keep[reviewed] = False
    dropped_acc = accuracy(train(x[keep], y[keep], seed), data)
    clean_acc = accuracy(train(x, data["y_true"], seed), data)

    frame = {name: x[:, j] for j, name in enumerate(data["columns"][:8])}  # 8 of 30 columns
    test_frame = {name: data["x_test"][:, j] for j, name in enumerate(data["columns"][:8])}
    queries = {**{k: v[:5] for k, v in test_frame.items()}, "label": data["y_test"][:5]}
    report = write_report(
        out / "report.html",
        scores=tracin.attribute((data["x_test"][:5], data["y_test"][:5])),
        train={**frame, "label": y},
        queries=queries,
        self_influence=self_influence,
        suspected=data["flipped"],
        method="TracIn",
        rerun=f"python examples/mislabelled_tabular.py --out {out} --seed {seed}",
        title="Finding mislabelled rows in breast cancer data",
    )
    n_flipped = int(data["flipped"].sum())
    print(f"{n_flipped} of {len(x)} training labels flipped; test accuracy {noisy_acc:.3f}")
    print(f"reviewing the top {len(reviewed)} rows by self-influence finds {wrong_found} "
          f"wrong labels ({wrong_found / n_flipped:.0%}; a random {REVIEWED:.0%} would find "
          f"{REVIEWED:.0%})")  # fmt: skip
    print(f"retrained on the corrected labels: test accuracy {fixed_acc:.3f} "
          f"({fixed_acc - noisy_acc:+.3f}); those rows dropped instead: {dropped_acc:.3f}; "
          f"all labels clean: {clean_acc:.3f}")  # fmt: skip
    print(f"report: {report}")
    return {
        "noisy_accuracy": noisy_acc,
        "fixed_accuracy": fixed_acc,
        "dropped_accuracy": dropped_acc,
        "clean_accuracy": clean_acc,
        "wrong_found": wrong_found,
        "n_flipped": n_flipped,
        "reviewed": len(reviewed),
        "report": report,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("tabular-example"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.out, args.seed)
