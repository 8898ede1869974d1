"""The models and data the benchmarks attribute over: seeded, offline, deterministic.

Digits workloads trained by plain SGD (no momentum, no weight decay: what TracIn models), a
checkpoint per learning-rate stage; the scale run's synthetic data and MLP; ResNet-9 for the
GPU anchor. A :class:`Workload` travels to fresh worker processes with :func:`save_workload`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, hidden: int = 128) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class CNN(nn.Module):
    """Conv(1,16)-ReLU-Conv(16,32)-ReLU-MaxPool2-Linear(512,24)-ReLU-Linear(24,10) on 8x8
    images. Layers are attributes: captum's per-sample-gradient hooks need modules."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(32 * 4 * 4, 24)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu2(self.conv2(self.relu1(self.conv1(x)))))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))


class PoolCNN(nn.Module):
    """Conv2d(1, c1, 3, padding=1)-ReLU-MaxPool2-Conv2d(c1, c2, 3, padding=1)-ReLU-MaxPool2-
    Linear(4 c2, 10) (1,898 parameters for 8, 16). Integer padding: datatrace's K-FAC and
    EK-FAC reject ``padding="same"``."""

    def __init__(self, c1: int = 8, c2: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc = nn.Linear(c2 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, c1, 4, 4)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, c2, 2, 2)
        return self.fc(x.flatten(1))


MODELS: dict[str, type[nn.Module]] = {"MLP": MLP, "CNN": CNN, "PoolCNN": PoolCNN}


def build_model(arch: dict[str, Any]) -> nn.Module:
    """``{"model": "MLP", "hidden": 16}`` -> MLP(hidden=16): a recipe a worker can rebuild."""
    kwargs = {k: v for k, v in arch.items() if k != "model"}
    return MODELS[arch["model"]](**kwargs)


Checkpoints = list[tuple[dict[str, torch.Tensor], float]]  # (state_dict, learning rate)


@dataclass
class Workload:
    name: str
    model: nn.Module  # at the final checkpoint, eval mode
    ckpts: Checkpoints
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    arch: dict[str, Any]
    stats: dict[str, float] = field(default_factory=dict)  # train loss/accuracy, test accuracy

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def n_train(self) -> int:
        return len(self.train[1])

    @property
    def n_test(self) -> int:
        return len(self.test[1])

    def describe(self) -> str:
        stats = ", ".join(f"{k} {v:.4g}" for k, v in self.stats.items())
        return (
            f"{self.name}: {type(self.model).__name__} {self.arch} {self.n_params:,} params, "
            f"{self.n_train:,} train x {self.n_test:,} test, {len(self.ckpts)} ckpts "
            f"lr={[lr for _, lr in self.ckpts]}, float32; {stats}"
        )

    def subset(self, n_train: int, n_test: int) -> Workload:
        """The first examples (same checkpoints): warm-up runs and smaller workloads."""
        train = (self.train[0][:n_train], self.train[1][:n_train])
        test = (self.test[0][:n_test], self.test[1][:n_test])
        return Workload(self.name, self.model, self.ckpts, train, test, self.arch, self.stats)


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data / 16.0, dtype=torch.float32)  # (1797, 64) in [0, 1]
    return X, torch.tensor(d.target, dtype=torch.int64)


def train_sgd(
    model: nn.Module, train: tuple, lrs: list[float], epochs_per_ckpt: int, batch: int, seed: int
) -> Checkpoints:
    """Plain SGD; a checkpoint after each stage of ``epochs_per_ckpt`` epochs at ``lrs[c]``."""
    X, y = train
    g = torch.Generator().manual_seed(seed)
    ckpts = []
    for lr in lrs:
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        for _ in range(epochs_per_ckpt):
            perm = torch.randperm(len(y), generator=g)
            for s in range(0, len(y), batch):
                idx = perm[s : s + batch]
                opt.zero_grad()
                F.cross_entropy(model(X[idx]), y[idx]).backward()
                opt.step()
        ckpts.append(({k: v.detach().clone() for k, v in model.state_dict().items()}, lr))
    return ckpts


def _trained(name: str, arch: dict, train: tuple, test: tuple, lrs: list[float],
             epochs_per_ckpt: int, batch: int, seed: int) -> Workload:  # fmt: skip
    torch.manual_seed(seed)
    model = build_model(arch)
    ckpts = train_sgd(model, train, lrs, epochs_per_ckpt, batch, seed)
    model.eval()
    with torch.no_grad():
        out = model(train[0])
        stats = {
            "train loss": float(F.cross_entropy(out, train[1])),
            "train acc": float((out.argmax(1) == train[1]).float().mean()),
            "test acc": float((model(test[0]).argmax(1) == test[1]).float().mean()),
        }
    return Workload(name, model, ckpts, train, test, arch, stats)


def digits_workload(name: str, arch: dict, n_train: int, n_test: int, lrs: list[float],
                    epochs_per_ckpt: int, seed: int = 0) -> Workload:  # fmt: skip
    """Real digits, a seeded split (train first, test after), SGD in batches of 32;
    images (1, 8, 8) for the convolutional models."""
    X, y = digits()
    if arch["model"] != "MLP":
        X = X.reshape(-1, 1, 8, 8)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:n_train], perm[n_train : n_train + n_test]
    train, test = (X[tr].contiguous(), y[tr].contiguous()), (X[te].contiguous(), y[te].contiguous())
    return _trained(name, arch, train, test, lrs, epochs_per_ckpt, 32, seed)


def small_mlp_workload() -> Workload:
    """``small``: the MLP 64-128-10 on 1,000 x 200 digits, 4 checkpoints (lr 0.2/0.1/0.05/0.02,
    2 epochs each): the TracIn and TRAK benchmarks' small workload."""
    arch = {"model": "MLP", "hidden": 128}
    return digits_workload("small", arch, 1000, 200, [0.2, 0.1, 0.05, 0.02], 2)


def _augment(images: torch.Tensor, n: int, noise: float, g: torch.Generator) -> tuple:
    """``n`` examples: random base images (m, 1, 8, 8) shifted by a random (dx, dy) in
    {-1,0,1}^2 (zero fill) plus Gaussian noise. Returns (examples, base index)."""
    src = torch.randint(0, images.shape[0], (n,), generator=g)
    shifts = torch.randint(-1, 2, (n, 2), generator=g)
    padded = F.pad(images[src], (1, 1, 1, 1))  # (n, 1, 10, 10)
    out = torch.empty(n, 1, 8, 8)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            m = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            out[m] = padded[m][:, :, 1 - dy : 9 - dy, 1 - dx : 9 - dx]
    return out + noise * torch.randn(out.shape, generator=g), src


def augmented_digits_workload(n_train: int = 20_000, n_test: int = 1_000, seed: int = 0):
    """The CNN on ``n_train`` augmented copies of the 797 digits not held out; 4 checkpoints
    at lr 0.1/0.05/0.02/0.01, 20,000 examples' worth of SGD steps per checkpoint."""
    X, y = digits()
    X = X.reshape(-1, 1, 8, 8)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + 1))
    te, base = perm[:n_test], perm[n_test:]
    Xtr, src = _augment(X[base], n_train, noise=0.05, g=torch.Generator().manual_seed(seed + 2))
    train, test = (Xtr.contiguous(), y[base][src].contiguous()), (X[te].contiguous(), y[te])
    epochs = max(1, 20_000 // n_train)
    return _trained(
        "large", {"model": "CNN"}, train, test, [0.1, 0.05, 0.02, 0.01], epochs, 64, seed
    )


def save_workload(wl: Workload, path: str) -> None:
    torch.save({"name": wl.name, "arch": wl.arch, "ckpts": wl.ckpts, "train": wl.train,
                "test": wl.test, "stats": wl.stats}, path)  # fmt: skip


def load_workload(path: str) -> Workload:
    d = torch.load(path, weights_only=True)
    model = build_model(d["arch"])
    model.load_state_dict(d["ckpts"][-1][0])
    model.eval()
    return Workload(d["name"], model, d["ckpts"], tuple(d["train"]), tuple(d["test"]),
                    d["arch"], d["stats"])  # fmt: skip


# ----------------------------------------------------------------------------- scale run

SCALE_WEIGHTS = (0.1, 0.05)  # the two checkpoints' weights (learning rates)


def synthetic_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """64 Gaussian features; the label is the argmax of a noisy random linear map."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 64, generator=g)
    w = torch.randn(64, 10, generator=g)
    return x, (x @ w + 0.5 * torch.randn(n, 10, generator=g)).argmax(1)


def scale_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )


def scale_checkpoints() -> Checkpoints:
    """The initial weights and the same scaled by 1.01 (the cost, not the scores, is measured)."""
    m = scale_model()
    out = [({k: v.detach().clone() for k, v in m.state_dict().items()}, SCALE_WEIGHTS[0])]
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.01)
    out.append(({k: v.detach().clone() for k, v in m.state_dict().items()}, SCALE_WEIGHTS[1]))
    return out


# ----------------------------------------------------------------------------- GPU anchor


def conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    ]
    return nn.Sequential(*layers, nn.MaxPool2d(2)) if pool else nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b = conv_bn(c, c), conv_bn(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(self.a(x))


class ResNet9(nn.Module):
    """ResNet-9 (Page's DAWNBench layout) with base width w: 1.65M parameters at w = 32."""

    def __init__(self, w: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            conv_bn(3, w),
            conv_bn(w, 2 * w, pool=True),
            Residual(2 * w),
            conv_bn(2 * w, 4 * w, pool=True),
            conv_bn(4 * w, 8 * w, pool=True),
            Residual(8 * w),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
            nn.Linear(8 * w, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
