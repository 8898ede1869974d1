"""Small float64 models and data shared by the tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from datatrace.core.runtime import load_forward_ad_decompositions

# The tests' own torch.func.hessian/jacfwd twins would otherwise be the first forward-mode
# AD of the process, and torch warns then (see load_forward_ad_decompositions);
# test_solvers_defaults checks in a fresh process that datatrace's own calls never do.
load_forward_ad_decompositions()


class MLP(nn.Module):
    def __init__(self, d_in: int = 5, hidden: int = 7, classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.act = nn.Tanh()
        self.fc2 = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class CNN(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(4 * 3 * 3, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(torch.tanh(self.conv(x)))
        return self.fc(h.flatten(1))


class DictModel(nn.Module):
    """Takes Hugging Face style keyword inputs: token ids and a mask."""

    def __init__(self, vocab: int = 11, dim: int = 4, classes: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        e = self.emb(input_ids) * attention_mask[..., None]
        pooled = e.sum(1) / attention_mask.sum(1, keepdim=True).clamp_min(1)
        return self.head(torch.tanh(pooled))


# a small `datatrace evaluate` experiment (iris, logistic regression, 2 checkpoints) for CLI tests
IRIS_CONFIG = """
[data]
dataset = "iris"
n_train = 60
n_query = 5
[model]
kind = "logreg"
[train]
epochs = 5
checkpoints = 2
"""


@pytest.fixture
def mlp_data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = MLP().double()
    x = torch.randn(23, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (23,))
    return model, x, y


@pytest.fixture
def cnn_data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    model = CNN().double()
    x = torch.randn(9, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (9,))
    return model, x, y


@pytest.fixture
def dict_data() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(2)
    model = DictModel().double()
    batch = {
        "input_ids": torch.randint(0, 11, (8, 6)),
        "attention_mask": (torch.rand(8, 6) > 0.3).double(),
        "labels": torch.randint(0, 2, (8,)),
    }
    return model, batch


def perturbed(model: nn.Module, scale: float, seed: int) -> dict[str, torch.Tensor]:
    """A state dict near the model's: another 'checkpoint' of the same architecture."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype)
        for k, v in model.state_dict().items()
    }


def single_process_env() -> dict[str, str]:
    """The environment for a subprocess run outside any torchrun job, one thread (so that
    one process and each rank compute with the same kernels)."""
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def assert_two_ranks_equal_one_process(tmp_path, make_script) -> None:
    """Run ``make_script(out_pattern, sharded)`` once as a plain process and once under
    ``torchrun --nproc_per_node=2``; every tensor each rank saved must equal the single
    process's bit for bit. The script saves a dict of tensors to ``out_pattern.format(rank)``."""
    import subprocess
    import sys

    import torch

    env = single_process_env()
    single = make_script(str(tmp_path / "one{}.pt"), False)
    proc = subprocess.run([sys.executable, "-c", single], env=env, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    script = tmp_path / "shard.py"
    script.write_text(make_script(str(tmp_path / "rank{}.pt"), True))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    proc = subprocess.run([*cmd, str(script)], env=env, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    want = torch.load(tmp_path / "one0.pt", weights_only=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=key)
