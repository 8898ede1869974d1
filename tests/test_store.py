"""Feature store: reuse, mismatch and corruption errors, crash-resume with bit-identical scores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import datatrace as dt
from datatrace.features.featurizer import GradientFeatures


def _fit(model, x, y, path, **kw):
    spec = kw.pop("spec", dt.TracIn())
    return spec.fit(
        dt.ClassificationTask(model),
        [dt.Checkpoint.from_module(model, weight=0.1)],
        (x, y),
        store=path,
        progress=False,
        **kw,
    )


def test_store_round_trip_reuses_features(mlp_data, tmp_path, monkeypatch):
    model, x, y = mlp_data
    first = _fit(model, x, y, tmp_path / "s", batch_size=4)
    S1 = first.attribute((x[:3], y[:3]))
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["n"] == 23 and manifest["chunk_size"] == 4
    calls = []
    real = GradientFeatures.compute

    def counting(self, *a, **k):
        calls.append(a[3])  # measurement flag
        return real(self, *a, **k)

    monkeypatch.setattr(GradientFeatures, "compute", counting)
    again = _fit(model, x, y, tmp_path / "s", batch_size=4)
    assert calls.count(False) == 1  # only the one-example layout probe; no training chunk
    torch.testing.assert_close(again.attribute((x[:3], y[:3])), S1, rtol=0, atol=0)


def test_other_settings_raise_a_mismatch_naming_the_fix(mlp_data, tmp_path):
    model, x, y = mlp_data
    _fit(model, x, y, tmp_path / "s", spec=dt.TracIn(projection_dim=8))
    with pytest.raises(dt.StoreMismatchError, match=r"projection_dim=8 .*16 requested.*overwrite"):
        _fit(model, x, y, tmp_path / "s", spec=dt.TracIn(projection_dim=16))
    with pytest.raises(dt.StoreMismatchError, match="checkpoints"):
        other = type(model)().double()
        _fit(other, x, y, tmp_path / "s", spec=dt.TracIn(projection_dim=8))
    with pytest.raises(dt.StoreMismatchError, match="n=23"):
        _fit(model, x[:20], y[:20], tmp_path / "s", spec=dt.TracIn(projection_dim=8))
    fresh = _fit(model, x, y, tmp_path / "s", spec=dt.TracIn(projection_dim=16), overwrite=True)
    assert fresh.store.manifest["layout"] == {"proj": 16}


def test_foreign_and_corrupt_stores_are_refused(mlp_data, tmp_path):
    model, x, y = mlp_data
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("hello")
    with pytest.raises(dt.StoreCorruptError, match="not a datatrace store"):
        _fit(model, x, y, foreign)
    bad = tmp_path / "bad"
    _fit(model, x, y, bad)
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(dt.StoreCorruptError, match="cannot read"):
        _fit(model, x, y, bad)
    trunc = tmp_path / "trunc"
    _fit(model, x, y, trunc)
    arr = next(trunc.glob("c0.*.npy"))
    np.save(arr, np.zeros((3, 2)))
    with pytest.raises(dt.StoreCorruptError, match="shape"):
        _fit(model, x, y, trunc)
    (tmp_path / "file").write_text("x")
    with pytest.raises(dt.StoreCorruptError, match="is a file"):
        _fit(model, x, y, tmp_path / "file")


RESUME_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    import datatrace as dt
    sys.path.insert(0, {tests!r})
    from conftest import MLP

    class Slow(torch.utils.data.Dataset):
        def __init__(self, x, y, delay):
            self.x, self.y, self.delay = x, y, delay
        def __len__(self):
            return len(self.x)
        def __getitem__(self, i):
            time.sleep(self.delay)
            return self.x[i], self.y[i]

    torch.manual_seed(0)
    model = MLP(d_in=5, hidden=16, classes=3)
    x = torch.randn(200, 5); y = torch.randint(0, 3, (200,))
    ckpts = [dt.Checkpoint.from_module(model, weight=0.5)]
    torch.manual_seed(1)
    ckpts.append(dt.Checkpoint.from_state_dict(
        {{k: v + 0.1 * torch.randn_like(v) for k, v in model.state_dict().items()}}, weight=0.2))
    delay = float(sys.argv[2])
    fitted = dt.TracIn(params={params}, projection_dim={proj}).fit(
        dt.ClassificationTask(model), ckpts, Slow(x, y, delay), store=sys.argv[1],
        batch_size=10, progress=False)
    S = fitted.attribute((x[:7], y[:7]))
    torch.save(S, sys.argv[1] + ".scores.pt")
    """
)


@pytest.mark.parametrize(
    ("params", "proj", "done_name", "at"),
    [
        (None, None, "c0.done.json", 3),  # mid checkpoint 0
        (None, None, "c0.done.json", 1),  # right after the first commit
        (None, None, "c1.done.json", 1),  # in the second checkpoint
        (None, 32, "c0.done.json", 3),
    ],
)
def test_killed_featurization_resumes_bit_identically(tmp_path, params, proj, done_name, at):
    tests = str(Path(__file__).parent)
    script = tmp_path / "job.py"
    script.write_text(RESUME_SCRIPT.format(tests=tests, params=params, proj=proj))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # uninterrupted reference
    ref = tmp_path / "ref"
    subprocess.run([sys.executable, str(script), str(ref), "0"], check=True, env=env)
    # run slowly, kill -9 once some (not all) chunks are done, then resume
    store = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, str(script), str(store), "0.02"], env=env)
    done_file = store / done_name
    deadline = time.time() + 120
    while time.time() < deadline:
        if done_file.exists() and len(json.loads(done_file.read_text() or "[]")) >= at:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads(done_file.read_text())
    assert at <= len(done) < 20, "the kill should land part way through featurization"
    assert not Path(str(store) + ".scores.pt").exists()
    subprocess.run([sys.executable, str(script), str(store), "0"], check=True, env=env)
    s_ref = torch.load(str(ref) + ".scores.pt", weights_only=True)
    s_res = torch.load(str(store) + ".scores.pt", weights_only=True)
    assert torch.equal(s_ref, s_res)  # bit-identical


def test_features_over_the_disk_budget_are_streamed_with_equal_scores(mlp_data, tmp_path):
    model, x, y = mlp_data
    for spec in (dt.TracIn(), dt.GradCos(projection_dim=8)):
        stored = _fit(model, x, y, tmp_path / "s", spec=spec, overwrite=True)
        streamed = _fit(model, x, y, tmp_path / "t", spec=spec, max_store_bytes=0, block_size=5)
        assert streamed.store is None and not (tmp_path / "t").exists()
        torch.testing.assert_close(
            streamed.attribute((x[:4], y[:4])),
            stored.attribute((x[:4], y[:4])),
            rtol=1e-12,
            atol=1e-12,
        )
        torch.testing.assert_close(
            streamed.self_influence(), stored.self_influence(), rtol=1e-12, atol=1e-12
        )


def test_changing_any_example_invalidates_the_store(mlp_data, tmp_path):
    model, x, y = mlp_data
    _fit(model, x, y, tmp_path / "s")
    x2 = x.clone()
    x2[11, 2] += 1.0  # a middle example, not the first or last
    with pytest.raises(dt.StoreMismatchError, match="data"):
        _fit(model, x2, y, tmp_path / "s")
    y2 = y.clone()
    y2[12] = (y2[12] + 1) % 3
    with pytest.raises(dt.StoreMismatchError, match="data"):
        _fit(model, x, y2, tmp_path / "s")


def test_temporary_features_live_in_memory_or_a_temporary_directory(mlp_data, tmp_path):
    model, x, y = mlp_data
    # a preconditioned method spills to disk over the budget (a first-order one recomputes)
    spec = dt.Influence(dt.GaussNewton(damping=0.1))
    on_disk = _fit(model, x, y, tmp_path / "s", spec=spec)
    in_memory = _fit(model, x, y, None, spec=spec)
    assert in_memory.store.path is None
    spilled = _fit(model, x, y, None, max_memory_bytes=0, spec=spec)
    assert spilled.store.path is not None and spilled.store.path.exists()
    recomputed = _fit(model, x, y, None, max_memory_bytes=0)
    assert recomputed.store is None
    torch.testing.assert_close(
        recomputed.attribute((x[:4], y[:4])),
        _fit(model, x, y, tmp_path / "t").attribute((x[:4], y[:4])),
        rtol=0,
        atol=0,
    )
    ref = on_disk.attribute((x[:4], y[:4]))
    for fitted in (in_memory, spilled):
        torch.testing.assert_close(fitted.attribute((x[:4], y[:4])), ref, rtol=0, atol=0)
    path = spilled.store.path
    del spilled, fitted
    import gc

    gc.collect()
    assert not path.exists()  # the temporary directory goes with the fitted object


def test_a_failed_fit_leaves_no_temporary_store_behind(mlp_data, tmp_path, monkeypatch):
    import tempfile

    model, x, y = mlp_data
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    method = dt.Influence(dt.ExactHessian(max_params=1))  # refuses after featurizing
    with pytest.raises(dt.ConfigError, match="max_params"):
        method.fit(
            dt.ClassificationTask(model), [dt.Checkpoint.from_module(model)], (x, y),
            max_memory_bytes=0, progress=False,
        )  # fmt: skip
    assert list(scratch.iterdir()) == []
    fitted = dt.Influence(dt.GaussNewton(damping=0.1)).fit(
        dt.ClassificationTask(model), [dt.Checkpoint.from_module(model)], (x, y),
        max_memory_bytes=0, progress=False,
    )  # fmt: skip
    assert len(list(scratch.iterdir())) == 1  # a temporary store while the fitted object lives
    del fitted
    import gc

    gc.collect()
    assert list(scratch.iterdir()) == []
