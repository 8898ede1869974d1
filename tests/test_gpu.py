"""The same scores on CUDA as on the CPU (run with -m gpu on a machine with a GPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import MLP

import datatrace as dt

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "method",
    [
        dt.TracIn(),
        dt.TracIn(projection_dim=64),
        dt.Influence(dt.ExactHessian(damping=0.1)),
        dt.Influence(dt.EKFAC(damping=0.1)),
        dt.TRAK(projection_dim=64),
    ],
)
def test_cuda_matches_cpu(method):
    torch.manual_seed(0)
    model = MLP().double()
    x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,))
    cpu = method.fit(
        dt.ClassificationTask(model), [dt.Checkpoint.from_module(model)], (x, y), progress=False
    ).attribute((x[:6], y[:6]))
    gpu_model = MLP().double().cuda()
    gpu_model.load_state_dict(model.state_dict())
    gpu = method.fit(
        dt.ClassificationTask(gpu_model),
        [dt.Checkpoint.from_module(gpu_model)],
        (x.cuda(), y.cuda()),
        progress=False,
    ).attribute((x[:6].cuda(), y[:6].cuda()))
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-8, atol=1e-10)
