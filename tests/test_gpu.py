"""The same scores on CUDA as on the CPU: ``python -m pytest -m gpu`` on a machine with a GPU.

Selected without a CUDA device these tests fail (they are never skipped silently); the
default test run deselects them. ``DATATRACE_GPU_TEST_DEVICE=cpu`` runs the same tests with
the CPU in CUDA's place (checks the tests themselves on a machine without a GPU).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
from conftest import CNN, MLP, perturbed

import datatrace as dt

pytestmark = pytest.mark.gpu
DEVICE = os.environ.get("DATATRACE_GPU_TEST_DEVICE", "cuda")


@pytest.fixture(autouse=True)
def _needs_cuda() -> None:
    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device (run them with -m gpu on a GPU machine)")


def _pair(kind: str, dtype: torch.dtype = torch.float64):
    """The same model and data on the CPU and on CUDA, two checkpoints."""
    torch.manual_seed(0)
    if kind == "cnn":
        model, x = CNN(), torch.randn(30, 1, 6, 6)
    else:
        model, x = MLP(), torch.randn(40, 5)
    model, x = model.to(dtype), x.to(dtype)
    y = torch.randint(0, 3, (len(x),))
    states = [model.state_dict(), perturbed(model, 0.1, seed=3)]
    out = []
    for device in ("cpu", DEVICE):
        m = (CNN() if kind == "cnn" else MLP()).to(dtype).to(device)
        m.load_state_dict(states[0])
        ckpts = [dt.Checkpoint(states[0], weight=0.5), dt.Checkpoint(states[1], weight=0.25)]
        out.append((dt.ClassificationTask(m), ckpts, (x.to(device), y.to(device))))
    return out


METHODS = {
    "tracin": lambda: dt.TracIn(),
    "tracin-dense": lambda: dt.GradientAttributor(
        dt.FeatureSpec(factored=False), checkpoints=dt.CheckpointWeights.LEARNING_RATE
    ),
    "tracin-proj": lambda: dt.TracIn(projection_dim=64),
    "gradcos": lambda: dt.GradCos(),
    "exact": lambda: dt.Influence(dt.ExactHessian(damping=1.0)),
    "cg": lambda: dt.Influence(dt.ConjugateGradient(damping=0.1, gauss_newton=True, max_iter=200)),
    "ekfac": lambda: dt.Influence(dt.EKFAC(damping=0.1)),
    "datainf": lambda: dt.DataInf(damping=0.1),
    "trak": lambda: dt.TRAK(projection_dim=64),
}


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_cuda_matches_cpu_in_float64(kind, name):
    (cpu_task, ckpts, train), (gpu_task, gckpts, gtrain) = _pair(kind)
    q, gq = (train[0][:6], train[1][:6]), (gtrain[0][:6], gtrain[1][:6])
    method = METHODS[name]()
    cpu = method.fit(cpu_task, ckpts, train, progress=False)
    gpu = method.fit(gpu_task, gckpts, gtrain, progress=False)
    S_gpu = gpu.attribute(gq)
    assert S_gpu.device.type == torch.device(DEVICE).type
    torch.testing.assert_close(S_gpu.cpu(), cpu.attribute(q), rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(
        gpu.self_influence().cpu(), cpu.self_influence(), rtol=1e-7, atol=1e-9
    )
    values, index = gpu.top_k(gq, k=5)
    cpu_values, cpu_index = cpu.top_k(q, k=5)
    assert torch.equal(index.cpu(), cpu_index)
    torch.testing.assert_close(values.cpu(), cpu_values, rtol=1e-7, atol=1e-9)


class _Tokens(torch.nn.Module):
    """Embedding → Linear on (batch, T, d) → masked mean → classes: a sequence model whose
    padding is masked out (so batches are cut after their longest sequence)."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = torch.nn.Embedding(50, 48)
        self.mix = torch.nn.Linear(48, 48)
        self.head = torch.nn.Linear(48, 3)

    def forward(self, input_ids, attention_mask):
        h = torch.tanh(self.mix(self.tok(input_ids)))
        m = attention_mask[..., None].to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def test_cuda_sequence_products_formed_in_cache_match_cpu(monkeypatch):
    """Factored (batch, T, d) layers whose products take the formed route, with padding
    cut after each batch's longest sequence: the same scores on CUDA as on the CPU."""
    from datatrace.features import products

    formed = []
    real = products.formed_products
    monkeypatch.setattr(
        products, "formed_products", lambda *a, **k: formed.append(1) or real(*a, **k)
    )
    torch.manual_seed(0)
    ids = torch.randint(1, 50, (24, 16))
    lengths = torch.randint(3, 13, (24,))  # every batch ends in padding: it is cut
    mask = (torch.arange(16)[None, :] < lengths[:, None]).long()
    data = {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.randint(0, 3, (24,))}
    model = _Tokens().double()
    out = []
    for device in ("cpu", DEVICE):
        m = _Tokens().double().to(device)
        m.load_state_dict(model.state_dict())
        batch = {k: v.to(device) for k, v in data.items()}
        fitted = dt.GradDot(params=["mix"]).fit(
            dt.ClassificationTask(m), [dt.Checkpoint.from_module(m)], batch, progress=False
        )
        assert fitted.features.tokens == {"mix": 16}
        out.append(fitted.attribute({k: v[:20] for k, v in batch.items()}).cpu())
        padding = fitted.features._padding
        assert padding.verdict("loss") is True and padding.verdict("measurement") is True
    assert len(formed) == 2  # one scoring call per device, by the formed route
    torch.testing.assert_close(out[1], out[0], rtol=1e-7, atol=1e-9)


def test_cuda_float32_store_and_kronecker_projection(tmp_path):
    (cpu_task, ckpts, train), (gpu_task, gckpts, gtrain) = _pair("cnn", torch.float32)
    method = dt.GradientAttributor(
        dt.FeatureSpec(projection_dim=128, kronecker=True),
        checkpoints=dt.CheckpointWeights.LEARNING_RATE,
    )
    q, gq = (train[0][:6], train[1][:6]), (gtrain[0][:6], gtrain[1][:6])
    cpu = method.fit(cpu_task, ckpts, train, store=tmp_path / "c", progress=False).attribute(q)
    gpu = method.fit(gpu_task, gckpts, gtrain, store=tmp_path / "g", progress=False)
    # the projection is seeded on the CPU: the same matrix on every device
    torch.testing.assert_close(gpu.attribute(gq).cpu(), cpu, rtol=1e-3, atol=1e-4 * cpu.abs().max())


@pytest.mark.parametrize("opts", [dict(feature_dtype=torch.bfloat16), dict(tf32=True)])
def test_cuda_reduced_precision_within_its_bound(opts):
    (_, _, _), (gpu_task, gckpts, gtrain) = _pair("mlp", torch.float32)
    gq = (gtrain[0][:6], gtrain[1][:6])
    spec = dict(factored=False)
    full = dt.GradientAttributor(
        dt.FeatureSpec(**spec), checkpoints=dt.CheckpointWeights.LEARNING_RATE
    )
    fast = dt.GradientAttributor(
        dt.FeatureSpec(**spec, **opts), checkpoints=dt.CheckpointWeights.LEARNING_RATE
    )
    a = full.fit(gpu_task, gckpts, gtrain, progress=False)
    b = fast.fit(gpu_task, gckpts, gtrain, progress=False)
    S, S2 = a.attribute(gq), b.attribute(gq)
    u = 2.0**-8 if "feature_dtype" in opts else 2.0**-11
    norms = torch.zeros_like(S)
    for c, qf in enumerate(a.query_features(gq)):
        g = a._train_block(c, 0, a.n_train)
        norms += (
            abs(a.weights[c])
            * a.features.sqnorm(qf).sqrt()[:, None]
            * (a.features.sqnorm(g).sqrt()[None, :])
        )
    bound = ((1 + u) ** 2 - 1 + 64 * 2.0**-24) * norms  # + float32 summation
    assert bool(((S2 - S).abs() <= bound).all())


def test_cuda_further_training_matches_cpu():
    (cpu_task, ckpts, train), (gpu_task, gckpts, gtrain) = _pair("mlp")
    kw = dict(steps=5, lr=0.1, batch_size=8, seeds=range(2))
    q, gq = (train[0][:4], train[1][:4]), (gtrain[0][:4], gtrain[1][:4])
    cpu = dt.truth.further_training(cpu_task, ckpts[-1], train, q, range(10), **kw)
    gpu = dt.truth.further_training(gpu_task, gckpts[-1], gtrain, gq, range(10), **kw)
    assert cpu.shape == (1, 4, 10) and float(cpu.abs().max()) > 0
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-6, atol=1e-9)


def test_cli_runs_on_cuda(tmp_path):
    import subprocess

    cfg = tmp_path / "exp.toml"
    cfg.write_text(
        '[data]\ndataset = "iris"\nn_train = 60\nn_query = 5\n[model]\nkind = "logreg"\n'
        "[train]\nepochs = 5\ncheckpoints = 2\n"
    )
    runs = {}
    for device in ("cpu", DEVICE):
        out = tmp_path / f"{device}.npy"
        proc = subprocess.run(
            [sys.executable, "-m", "datatrace", "score", str(cfg), "--store",
             str(tmp_path / device), "--device", device, "--matrix", str(out)],
            capture_output=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr.decode()[-3000:]
        runs[device] = np.load(out)
    np.testing.assert_allclose(runs[DEVICE], runs["cpu"], rtol=1e-4, atol=1e-6)
