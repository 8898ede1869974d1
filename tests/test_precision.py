"""Reduced-precision features (bfloat16) stay within their stated error bound; devices."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from conftest import CNN, IRIS_CONFIG, MLP, perturbed

import datatrace as dt
from datatrace.app.cli import main as cli_main
from datatrace.core import distributed

BF16_U = 2.0**-8  # unit roundoff of bfloat16 (8 significand bits, round to nearest)


def _digits(n: int = 120):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data[:n] / 16.0, dtype=torch.float64)
    return x, torch.tensor(d.target[:n])


def _case(kind: str):
    """(model, train, queries, checkpoints) in float64: two checkpoints with weights."""
    torch.manual_seed(0)
    if kind == "digits":
        model = MLP(64, 16, 10).double()
        x, y = _digits()
    elif kind == "cnn":
        model = CNN().double()
        x, y = torch.randn(30, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (30,))
    else:
        model = MLP().double()
        x, y = torch.randn(40, 5, dtype=torch.float64), torch.randint(0, 3, (40,))
    ckpts = [dt.Checkpoint.from_module(model, weight=0.5)]
    model.load_state_dict(perturbed(model, 0.2, seed=1))
    ckpts.append(dt.Checkpoint.from_module(model, weight=-0.25))  # |w| in the bound
    return model, (x, y), (x[:7] + 0.05, y[:7]), ckpts


@pytest.mark.parametrize(
    "kind, spec, f",
    [
        ("mlp", dict(factored=False), 1),  # dense flattened gradients
        ("mlp", dict(), 2),  # factored Linear layers: a and e rounded separately
        ("digits", dict(), 2),  # real data
        ("digits", dict(projection_dim=48), 1),
        ("cnn", dict(), 2),  # Conv2d dense (hooks) + factored Linear
    ],
)
def test_bf16_scores_stay_within_the_stated_bound(kind, spec, f):
    model, train, queries, ckpts = _case(kind)
    task = dt.ClassificationTask(model)

    def fit(dtype):
        method = dt.GradientAttributor(
            dt.FeatureSpec(feature_dtype=dtype, **spec),
            checkpoints=dt.CheckpointWeights.LEARNING_RATE,
        )
        return method.fit(task, ckpts, train, batch_size=16, progress=False)

    exact, rounded = fit(None), fit(torch.bfloat16)
    S, S_bf = exact.attribute(queries), rounded.attribute(queries)
    assert S_bf.dtype == torch.float64  # scored in the model's dtype
    # Σ_c |w_c| ‖φ_c(q)‖ ‖φ_c(z)‖ from the exact features
    norms = torch.zeros_like(S)
    for c, q in enumerate(exact.query_features(queries)):
        g = exact._train_block(c, 0, exact.n_train)
        qn, gn = exact.features.sqnorm(q).sqrt(), exact.features.sqnorm(g).sqrt()
        norms += abs(exact.weights[c]) * qn[:, None] * gn[None, :]
    bound = ((1 + BF16_U) ** (2 * f) - 1) * norms
    err = (S_bf - S).abs()
    assert bool((err <= bound).all()), float((err / bound).max())
    assert float(err.max()) > 0  # the features really were rounded
    # and the bound is not loose by orders of magnitude on the worst entry
    assert float((err / bound).max()) > 0.01
    # the store held bfloat16
    assert rounded.store is not None
    assert next(iter(rounded.store.read(0, 0, 2).values())).dtype == torch.bfloat16


def test_bf16_disk_store_equals_memory_and_is_a_quarter_of_float64(tmp_path):
    model, train, queries, ckpts = _case("mlp")
    task = dt.ClassificationTask(model)
    bf = dt.TracIn(feature_dtype=torch.bfloat16)
    memory = bf.fit(task, ckpts, train, batch_size=8, progress=False)
    disk = bf.fit(task, ckpts, train, store=tmp_path / "s", batch_size=8, progress=False)
    torch.testing.assert_close(disk.attribute(queries), memory.attribute(queries), rtol=0, atol=0)
    torch.testing.assert_close(disk.self_influence(), memory.self_influence(), rtol=0, atol=0)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["dtype"] == "bfloat16"
    assert manifest["fingerprint"]["features"]["feature_dtype"] == "bfloat16"
    full = dt.TracIn().fit(task, ckpts, train, store=tmp_path / "f", batch_size=8, progress=False)
    assert disk.store is not None and full.store is not None
    assert disk.store.nbytes() * 4 == full.store.nbytes()
    size = sum(os.path.getsize(p) for p in (tmp_path / "s").glob("c0.*.npy"))
    assert size < sum(os.path.getsize(p) for p in (tmp_path / "f").glob("c0.*.npy")) / 3
    # reopened: reused bit for bit; a store of the other precision is refused
    again = bf.fit(task, ckpts, train, store=tmp_path / "s", batch_size=8, progress=False)
    torch.testing.assert_close(again.attribute(queries), memory.attribute(queries), rtol=0, atol=0)
    with pytest.raises(dt.StoreMismatchError, match="dtype"):
        dt.TracIn().fit(task, ckpts, train, store=tmp_path / "s", batch_size=8, progress=False)


def test_bf16_trak_and_influence_stay_close_to_full_precision():
    model, train, queries, ckpts = _case("digits")
    task = dt.ClassificationTask(model)
    for make in (
        lambda d: dt.TRAK(projection_dim=64, feature_dtype=d),
        lambda d: dt.GradientAttributor(
            dt.FeatureSpec(factored=False, feature_dtype=d),
            preconditioner=dt.GaussNewton(damping=0.1),
        ),
    ):
        a = make(None).fit(task, ckpts, train, progress=False).attribute(queries)
        b = make(torch.bfloat16).fit(task, ckpts, train, progress=False).attribute(queries)
        rel = float((a - b).norm() / a.norm())
        assert 0 < rel < 0.02, rel


def test_feature_dtype_and_tf32_settings():
    for bad in (torch.float16, torch.int8, "bfloat16"):
        with pytest.raises(dt.ConfigError, match="feature_dtype"):
            dt.FeatureSpec(feature_dtype=bad)  # type: ignore[arg-type]
    model, train, queries, ckpts = _case("mlp")
    task = dt.ClassificationTask(model)
    before = torch.backends.cuda.matmul.fp32_precision
    plain = dt.TracIn().fit(task, ckpts, train, progress=False).attribute(queries)
    tf32 = dt.TracIn(tf32=True).fit(task, ckpts, train, progress=False)
    seen = []
    real = tf32.features.pairwise

    def spy(q, g):
        seen.append(torch.backends.cuda.matmul.fp32_precision)
        return real(q, g)

    tf32.features.pairwise = spy  # type: ignore[method-assign]
    # TF32 only changes CUDA matmuls: float64 scores on the CPU are unchanged
    torch.testing.assert_close(tf32.attribute(queries), plain, rtol=0, atol=0)
    assert seen and set(seen) == {"tf32"}  # scoring ran with TF32 allowed ...
    assert torch.backends.cuda.matmul.fp32_precision == before  # ... and it was restored


def test_resolve_device():
    assert distributed.resolve_device("cpu") == torch.device("cpu")
    auto = distributed.resolve_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(dt.ConfigError, match="unknown device"):
        distributed.resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(dt.ConfigError, match="CUDA is not available"):
            distributed.resolve_device("cuda")


def test_cli_device_and_feature_dtype(tmp_path, capsys):
    cfg = tmp_path / "exp.toml"
    cfg.write_text(IRIS_CONFIG)
    common = ["score", str(cfg), "--method", "tracin", "--device", "cpu"]
    a_args = ["--store", str(tmp_path / "a"), "--matrix", str(tmp_path / "a.npy")]
    assert cli_main([*common, *a_args]) == 0
    b_args = ["--store", str(tmp_path / "b"), "--matrix", str(tmp_path / "b.npy")]
    assert cli_main([*common, *b_args, "--feature-dtype", "bfloat16"]) == 0
    a, b = np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")
    rel = np.linalg.norm(a - b) / np.linalg.norm(a)
    assert 0 < rel < 0.01
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["dtype"] == "bfloat16"
    if not torch.cuda.is_available():
        code = cli_main(["score", str(cfg), "--store", str(tmp_path / "c"), "--device", "cuda"])
        assert code == 2 and "CUDA is not available" in capsys.readouterr().err
