"""The models and data the benchmarks attribute over (seeded, offline, deterministic; see
bench/README.md); a :class:`Workload` travels to fresh worker processes as a file."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def mlp(hidden: int = 128) -> nn.Module:
    """64-hidden-10, ReLU; layers ``fc1``, ``fc2`` (TRAK's reference check takes ``fc2``)."""
    return nn.Sequential(
        OrderedDict(fc1=nn.Linear(64, hidden), relu=nn.ReLU(), fc2=nn.Linear(hidden, 10))
    )


def cnn() -> nn.Module:
    """Conv(1,16)-ReLU-Conv(16,32)-ReLU-MaxPool2-Linear(512,24)-ReLU-Linear(24,10) on 8x8
    images, every layer a module (captum's per-sample-gradient hooks need modules)."""
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(1, 16, 3, padding=1), relu1=nn.ReLU(), conv2=nn.Conv2d(16, 32, 3, padding=1),
        relu2=nn.ReLU(), pool=nn.MaxPool2d(2), flatten=nn.Flatten(), fc1=nn.Linear(32 * 4 * 4, 24),
        relu3=nn.ReLU(), fc2=nn.Linear(24, 10)))  # fmt: skip


def pool_cnn(c1: int = 8, c2: int = 16) -> nn.Module:
    """Conv2d(1, c1, 3, padding=1)-ReLU-MaxPool2-Conv2d(c1, c2, 3, padding=1)-ReLU-MaxPool2-
    Linear(4 c2, 10) (1,898 parameters for 8, 16). Integer padding: datatrace's K-FAC and
    EK-FAC reject ``padding="same"``."""
    return nn.Sequential(nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(c2 * 4, 10))  # fmt: skip


def conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(), *([nn.MaxPool2d(2)] if pool else []))  # fmt: skip


class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b = conv_bn(c, c), conv_bn(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(self.a(x))


def resnet9(w: int = 32) -> nn.Sequential:
    """ResNet-9 (Page's DAWNBench layout) with base width w: 1.65M parameters at w = 32."""
    return nn.Sequential(conv_bn(3, w), conv_bn(w, 2 * w, pool=True), Residual(2 * w),
                         conv_bn(2 * w, 4 * w, pool=True), conv_bn(4 * w, 8 * w, pool=True),
                         Residual(8 * w), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(8 * w, 10))  # fmt: skip


def build_model(arch: dict[str, Any]) -> nn.Module:
    """``{"model": "MLP", "hidden": 16}`` -> mlp(hidden=16): a recipe a worker can rebuild."""
    return MODELS[arch["model"]](**{k: v for k, v in arch.items() if k != "model"})


Checkpoints = list[tuple[dict[str, torch.Tensor], float]]  # (state_dict, learning rate)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def batches(data: tuple, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for s in range(0, len(data[1]), size):
        yield data[0][s : s + size], data[1][s : s + size]


def loader(data: tuple, batch_size: int) -> DataLoader:
    """The data in order, as the peers take it."""
    return DataLoader(TensorDataset(*data), batch_size=batch_size, shuffle=False)


@dataclass
class Workload:
    name: str
    model: nn.Module  # at the final checkpoint, eval mode
    ckpts: Checkpoints
    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    arch: dict[str, Any]
    stats: dict[str, float] = field(default_factory=dict)  # train loss/accuracy, test accuracy

    def __post_init__(self) -> None:
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.n_train, self.n_test = len(self.train[1]), len(self.test[1])

    def describe(self) -> str:
        stats = ", ".join(f"{k} {v:.4g}" for k, v in self.stats.items())
        return (f"{self.name}: {self.arch} {self.n_params:,} params, {self.n_train:,} train x "
                f"{self.n_test:,} test, {len(self.ckpts)} ckpts lr={[lr for _, lr in self.ckpts]}, "
                f"float32; {stats}")  # fmt: skip

    def subset(self, n_train: int, n_test: int) -> Workload:
        """The first examples (same checkpoints): warm-up runs and smaller workloads."""
        train = (self.train[0][:n_train], self.train[1][:n_train])
        return replace(self, train=train, test=(self.test[0][:n_test], self.test[1][:n_test]))


def trained(name: str, arch: dict, train: tuple, test: tuple, lrs: list[float], epochs_per_ckpt: int,
            batch: int, seed: int, momentum: float = 0.0) -> Workload:  # fmt: skip
    """SGD from a seeded model; a checkpoint after each stage of ``epochs_per_ckpt`` epochs
    at ``lrs[c]`` (no momentum, no weight decay by default: what TracIn models)."""
    torch.manual_seed(seed)
    model = build_model(arch).to(train[0].device)
    (X, y), g, ckpts = train, torch.Generator().manual_seed(seed), []
    for lr in lrs:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        for _ in range(epochs_per_ckpt):
            for idx in torch.randperm(len(y), generator=g).to(y.device).split(batch):
                opt.zero_grad()
                F.cross_entropy(model(X[idx]), y[idx]).backward()
                opt.step()
        ckpts.append((snapshot(model), lr))
    model.eval()
    with torch.no_grad():
        out = model(train[0])
        stats = {"train loss": float(F.cross_entropy(out, train[1])),
                 "train acc": float((out.argmax(1) == train[1]).float().mean()),
                 "test acc": float((model(test[0]).argmax(1) == test[1]).float().mean())}  # fmt: skip
    return Workload(name, model, ckpts, train, test, arch, stats)


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data / 16.0, dtype=torch.float32)  # (1797, 64) in [0, 1]
    return X, torch.tensor(d.target, dtype=torch.int64)


def digits_workload(name: str, arch: dict, n_train: int, n_test: int, lrs: list[float],
                    epochs_per_ckpt: int, seed: int = 0) -> Workload:  # fmt: skip
    """Real digits, a seeded split (train first, test after), SGD in batches of 32;
    images (1, 8, 8) for the convolutional models."""
    X, y = digits()
    X = X if arch["model"] == "MLP" else X.reshape(-1, 1, 8, 8)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:n_train], perm[n_train : n_train + n_test]
    train, test = (X[tr].contiguous(), y[tr].contiguous()), (X[te].contiguous(), y[te].contiguous())
    return trained(name, arch, train, test, lrs, epochs_per_ckpt, 32, seed)


def small_mlp_workload() -> Workload:
    """``small``: the MLP 64-128-10 on 1,000 x 200 digits, 4 checkpoints (lr 0.2/0.1/0.05/0.02,
    2 epochs each): the TracIn and TRAK benchmarks' small workload."""
    return digits_workload("small", {"model": "MLP", "hidden": 128}, 1000, 200,
                           [0.2, 0.1, 0.05, 0.02], 2)  # fmt: skip


def augmented_digits_workload(n_train: int = 20_000, n_test: int = 1_000, seed: int = 0):
    """The CNN on ``n_train`` copies of the 797 digits not held out, each shifted by a random
    (dx, dy) in {-1,0,1}^2 (zero fill) plus N(0, 0.05) noise; 4 checkpoints at lr
    0.1/0.05/0.02/0.01, 20,000 examples' worth of SGD steps per checkpoint."""
    X, y = digits()
    X = X.reshape(-1, 1, 8, 8)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + 1))
    te, base = perm[:n_test], perm[n_test:]
    g = torch.Generator().manual_seed(seed + 2)
    src = torch.randint(0, len(base), (n_train,), generator=g)
    shifts = torch.randint(-1, 2, (n_train, 2), generator=g)
    padded = F.pad(X[base][src], (1, 1, 1, 1))  # (n, 1, 10, 10)
    Xtr = torch.empty(n_train, 1, 8, 8)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            m = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            Xtr[m] = padded[m][:, :, 1 - dy : 9 - dy, 1 - dx : 9 - dx]
    Xtr = Xtr + 0.05 * torch.randn(Xtr.shape, generator=g)
    train, test = (Xtr.contiguous(), y[base][src].contiguous()), (X[te].contiguous(), y[te])
    return trained("large", {"model": "CNN"}, train, test, [0.1, 0.05, 0.02, 0.01],
                   max(1, 20_000 // n_train), 64, seed)  # fmt: skip


def resnet9_workload(n_train: int, n_test: int, width: int, device: Any) -> Workload:
    """ResNet-9 after one epoch of SGD (momentum 0.9, lr 0.05, batch 500) on synthetic
    3x32x32 inputs with random labels: one checkpoint, the GPU anchor's model."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_train + n_test, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (n_train + n_test,), generator=g).to(device)
    return trained("resnet9", {"model": "ResNet9", "w": width}, (x[:n_train], y[:n_train]),
                   (x[n_train:], y[n_train:]), [0.05], 1, 500, 0, momentum=0.9)  # fmt: skip


def save_workload(wl: Workload, path: str) -> None:
    torch.save({"name": wl.name, "arch": wl.arch, "ckpts": wl.ckpts, "train": wl.train,
                "test": wl.test, "stats": wl.stats}, path)  # fmt: skip


def load_workload(path: str, device: Any = "cpu") -> Workload:
    d = torch.load(path, map_location=device, weights_only=True)
    model = build_model(d["arch"]).to(device)
    model.load_state_dict(d["ckpts"][-1][0])
    return Workload(d["name"], model.eval(), d["ckpts"], tuple(d["train"]), tuple(d["test"]),
                    d["arch"], d["stats"])  # fmt: skip


def synthetic_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """64 Gaussian features; the label is the argmax of a noisy random linear map."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 64, generator=g)
    w = torch.randn(64, 10, generator=g)
    return x, (x @ w + 0.5 * torch.randn(n, 10, generator=g)).argmax(1)


def scale_model() -> nn.Module:
    """MLP 64-512-512-10 (301k parameters), seeded."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 10))  # fmt: skip


def scale_workload(n_train: int) -> Workload:
    """The scale run: :func:`synthetic_data` (``n_train`` x 1,000 queries), the untrained
    :func:`scale_model` and the same weights x 1.01 as two checkpoints, weights 0.1 and 0.05
    (the cost, not the scores, is measured)."""
    sd = snapshot(scale_model())
    ckpts = [(sd, 0.1), ({k: 1.01 * v for k, v in sd.items()}, 0.05)]
    model = scale_model()
    model.load_state_dict(ckpts[-1][0])
    name = f"scale-{n_train // 1000}k" if n_train % 1000 == 0 else f"scale-{n_train}"
    return Workload(name, model.eval(), ckpts, synthetic_data(n_train, 0), synthetic_data(1_000, 1),
                    {"model": "ScaleMLP"})  # fmt: skip


MODELS = {"MLP": mlp, "CNN": cnn, "PoolCNN": pool_cnn, "ResNet9": resnet9, "ScaleMLP": scale_model}
