"""core.persist and the caches on it: atomic writes, manifests, checksums, read-only reuse,
symlinks, short writes, and the store lock."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import datatrace as dt
from datatrace.core import locks, persist
from datatrace.features import store as store_module
from datatrace.features.store import FeatureStore

Q = slice(0, 4)


def _fit(model, x, y, path, spec=None, **kw):
    return (spec or dt.TracIn()).fit(
        dt.ClassificationTask(model),
        [dt.Checkpoint.from_module(model, weight=0.1)],
        (x, y),
        store=path,
        progress=False,
        batch_size=4,
        **kw,
    )


def _scores(fitted, x, y):
    return fitted.attribute((x[Q], y[Q]))


def _reopen(fitted, **kw):
    """The fitted object's store, opened again with its own settings."""
    m = fitted.store.manifest
    return FeatureStore(
        fitted.store.path,
        m["fingerprint"],
        m["layout"],
        m["n"],
        m["n_checkpoints"],
        getattr(torch, m["dtype"]),
        m["chunk_size"],
        **kw,
    )


def _array_file(path: Path) -> Path:
    return next(path.glob("c0.*.npy"))


def _flip_byte(f: Path, offset_from_end: int) -> None:
    data = bytearray(f.read_bytes())
    data[len(data) - offset_from_end] ^= 0xFF
    f.write_bytes(bytes(data))


def test_atomic_write_keeps_the_old_file_on_a_crash_and_ignores_temp_files(
    mlp_data, tmp_path, monkeypatch
):
    target = tmp_path / "f.json"
    persist.write_json(target, {"a": 1})

    def crash(*args):
        raise KeyboardInterrupt("killed between write and rename")

    with monkeypatch.context() as m:
        m.setattr(os, "replace", crash)
        with pytest.raises(KeyboardInterrupt):
            persist.write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]  # its temp file removed
    # a temp file left by a killed process: the folder still counts as empty, then as a store
    model, x, y = mlp_data
    folder = tmp_path / "s"
    folder.mkdir()
    (folder / f"{persist.TEMP_PREFIX}killed").write_bytes(b"\x00half a manifest")
    first = _fit(model, x, y, folder)
    (folder / f"{persist.TEMP_PREFIX}killed2").write_bytes(b"\x00half a done record")
    again = _fit(model, x, y, folder)
    assert again.store.done(0) == set(range(6))  # 23 examples in chunks of 4
    torch.testing.assert_close(_scores(again, x, y), _scores(first, x, y), rtol=0, atol=0)


def test_manifest_mismatch_names_keys_and_overwrite_fixes_each(mlp_data, tmp_path):
    model, x, y = mlp_data
    path = tmp_path / "s"
    want = _scores(_fit(model, x, y, tmp_path / "ref", dt.TracIn(projection_dim=16)), x, y)
    # another fingerprint
    _fit(model, x, y, path, dt.TracIn(projection_dim=8))
    with pytest.raises(dt.StoreMismatchError, match=r"layout\.proj=8 in the store, 16 requested"):
        _fit(model, x, y, path, dt.TracIn(projection_dim=16))
    fixed = _fit(model, x, y, path, dt.TracIn(projection_dim=16), overwrite=True)
    torch.testing.assert_close(_scores(fixed, x, y), want, rtol=0, atol=0)
    # another format version (a store from an older datatrace)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "version": 1}))
    with pytest.raises(dt.StoreMismatchError, match=r"version=1 in the store, 2 requested.*overwr"):
        _fit(model, x, y, path, dt.TracIn(projection_dim=16))
    fixed = _fit(model, x, y, path, dt.TracIn(projection_dim=16), overwrite=True)
    torch.testing.assert_close(_scores(fixed, x, y), want, rtol=0, atol=0)
    # a manifest that is not JSON
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(dt.StoreCorruptError, match=r"cannot read .*manifest\.json.*overwrite=True"):
        _fit(model, x, y, path, dt.TracIn(projection_dim=16))
    fixed = _fit(model, x, y, path, dt.TracIn(projection_dim=16), overwrite=True)
    torch.testing.assert_close(_scores(fixed, x, y), want, rtol=0, atol=0)
    # a folder that is no store is never deleted, overwrite or not
    (path / "manifest.json").write_text("{not json")
    (path / "thesis.tex").write_text("years of work")
    with pytest.raises(dt.StoreCorruptError, match="not a datatrace store"):
        _fit(model, x, y, path, overwrite=True)
    assert (path / "thesis.tex").read_text() == "years of work"


def test_a_store_killed_before_its_manifest_is_made_again(mlp_data, tmp_path, monkeypatch):
    """Creating a store writes its data files, then the manifest: a process killed in
    between (0.9 s for a 20-checkpoint store) left a folder no fit could open, overwrite or
    not. Only the format's files and datatrace's lock there: the store is made again, and
    scores as a fresh fit; the same files without the lock (someone else's) are refused."""
    model, x, y = mlp_data
    path = tmp_path / "s"
    write = persist.write_json

    def killed(file, obj):
        if file.name == "manifest.json":
            raise KeyboardInterrupt
        return write(file, obj)

    monkeypatch.setattr(persist, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        _fit(model, x, y, path, dt.TracIn(projection_dim=8))
    monkeypatch.setattr(persist, "write_json", write)
    assert not (path / "manifest.json").exists() and any(path.glob("c0.*"))
    want = _scores(_fit(model, x, y, tmp_path / "fresh", dt.TracIn(projection_dim=8)), x, y)
    resumed = _fit(model, x, y, path, dt.TracIn(projection_dim=8))
    torch.testing.assert_close(_scores(resumed, x, y), want, rtol=0, atol=0)
    # the same files in a folder datatrace never locked: not its store, never deleted
    other = tmp_path / "other"
    other.mkdir()
    for f in path.glob("c0.*"):
        (other / f.name).write_bytes(f.read_bytes())
    with pytest.raises(dt.StoreCorruptError, match="not a datatrace store"):
        _fit(model, x, y, other, dt.TracIn(projection_dim=8), overwrite=True)


def test_flipped_bytes_in_a_committed_chunk_raise_naming_the_file(mlp_data, tmp_path, monkeypatch):
    model, x, y = mlp_data
    fitted = _fit(model, x, y, tmp_path / "s")
    arr = _array_file(tmp_path / "s")
    _flip_byte(arr, 3)  # in the last chunk (examples 20..22)
    with pytest.raises(dt.StoreCorruptError, match=rf"chunk 5 \(examples 20..22\) of .*{arr.name}"):
        _reopen(fitted, verify="full")
    with pytest.raises(dt.StoreCorruptError, match=arr.name):  # a small store: all sampled
        _fit(model, x, y, tmp_path / "s")
    # a large store samples: with room for one chunk, the sample is the first
    row_bytes = fitted.store.read(0, 0, 1)[next(iter(fitted.store.manifest["layout"]))].nbytes
    monkeypatch.setattr(store_module, "SAMPLE_BYTES", 4 * row_bytes)
    assert _reopen(fitted).done(0) == set(range(6))  # the damage is not in the sample
    with pytest.raises(dt.StoreCorruptError, match=arr.name):
        _reopen(fitted, verify="full")
    with pytest.raises(dt.ConfigError, match="verify"):
        _reopen(fitted, verify="quick")


def test_edited_npy_header_or_object_array_raise_store_corrupt(mlp_data, tmp_path):
    model, x, y = mlp_data
    _fit(model, x, y, tmp_path / "s")
    arr = _array_file(tmp_path / "s")
    data = arr.read_bytes()
    assert b"'fortran_order': False" in data[:128]
    arr.write_bytes(data.replace(b"'fortran_order': False", b"'fortran_order': True ", 1))
    with pytest.raises(dt.StoreCorruptError, match=rf"{arr.name} has .*fortran_order True"):
        _fit(model, x, y, tmp_path / "s")
    np.save(arr, np.array([{"a": 1}] * 23, dtype=object), allow_pickle=True)
    with pytest.raises(dt.StoreCorruptError, match=arr.name) as err:
        _fit(model, x, y, tmp_path / "s")
    assert "allow_pickle" not in str(err.value)


@pytest.mark.parametrize(
    ("name", "record"),
    [
        ("c0.done.json", '{"0": 1}'),
        ("c0.done.json", "[0, 6]"),  # chunk 6 of 6
        ("c0.done.json", '[0, "1"]'),
        ("c0.done.json", "[0, true]"),
        ("c0.done.json", "{broken"),
        ("c0.sums.json", '{"0": 5}'),
        ("c0.sums.json", "[0, 1]"),
        ("c0.sums.json", "{}"),  # done chunks without a checksum
    ],
)
def test_malformed_done_record_raises_store_corrupt_naming_it(mlp_data, tmp_path, name, record):
    model, x, y = mlp_data
    _fit(model, x, y, tmp_path / "s")
    (tmp_path / "s" / name).write_text(record)
    with pytest.raises(dt.StoreCorruptError, match=rf"{name}.*overwrite=True"):
        _fit(model, x, y, tmp_path / "s")


def test_store_on_read_only_files_scores_as_the_writable_one(mlp_data, tmp_path):
    model, x, y = mlp_data
    path = tmp_path / "s"
    want = _scores(_fit(model, x, y, path), x, y)
    files = sorted(path.iterdir())
    for f in files:
        f.chmod(stat.S_IRUSR | stat.S_IRGRP)
    path.chmod(stat.S_IRUSR | stat.S_IXUSR)
    before = {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in files}
    try:
        got = _scores(_fit(model, x, y, path), x, y)
        after = {f.name: (f.stat().st_mtime_ns, f.read_bytes()) for f in sorted(path.iterdir())}
    finally:
        path.chmod(stat.S_IRWXU)
        for f in files:
            f.chmod(stat.S_IRUSR | stat.S_IWUSR)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert after == before  # nothing written, nothing created (also when run as root)


def test_symlinks_planted_in_a_store_are_never_written_through(mlp_data, tmp_path):
    model, x, y = mlp_data
    path = tmp_path / "s"
    want = _scores(_fit(model, x, y, path), x, y)
    victim = tmp_path / "victim.json"
    victim.write_text("[]")  # a valid, empty done list: the store refills every chunk
    (path / "c0.done.json").unlink()
    (path / "c0.done.json").symlink_to(victim)
    got = _scores(_fit(model, x, y, path), x, y)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert victim.read_text() == "[]"
    assert not (path / "c0.done.json").is_symlink()  # the link was replaced, not followed
    # an array replaced by a link: refilling it is refused, the target is untouched
    arr = _array_file(path)
    victim_arr = tmp_path / "victim.npy"
    victim_arr.write_bytes(arr.read_bytes())
    arr.unlink()
    arr.symlink_to(victim_arr)
    (path / "c0.done.json").write_text("[]")
    original = victim_arr.read_bytes()
    with pytest.raises(dt.StoreCorruptError, match=rf"cannot write .*{arr.name}"):
        _fit(model, x, y, path)
    assert victim_arr.read_bytes() == original
    fixed = _fit(model, x, y, path, overwrite=True)  # removes the link, not its target
    torch.testing.assert_close(_scores(fixed, x, y), want, rtol=0, atol=0)
    assert victim_arr.read_bytes() == original and not arr.is_symlink()


SHORT_WRITE_SCRIPT = textwrap.dedent(
    """
    import resource, signal, sys, torch
    import datatrace as dt
    from datatrace.features.store import FeatureStore
    sys.path.insert(0, {tests!r})
    from conftest import MLP

    torch.manual_seed(0)
    model = MLP().double()
    x = torch.randn(23, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (23,))
    real = FeatureStore.write

    def limited(self, c, chunk, feats):
        # from the first chunk on, files may not grow past the middle of chunk 2
        mm = next(iter(self._arrays.values()))
        limit = int(mm.offset + 2.5 * self.chunk_size * mm.strides[0])
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a short write, then EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        return real(self, c, chunk, feats)

    FeatureStore.write = limited
    dt.TracIn().fit(dt.ClassificationTask(model), [dt.Checkpoint.from_module(model, weight=0.1)],
                    (x, y), store=sys.argv[1], batch_size=4, progress=False)
    """
)


def test_a_short_write_is_not_recorded_and_the_resumed_fit_is_bit_identical(tmp_path):
    from conftest import MLP

    script = tmp_path / "short.py"
    script.write_text(SHORT_WRITE_SCRIPT.format(tests=str(Path(__file__).parent)))
    path = tmp_path / "s"
    run = subprocess.run(
        [sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode != 0 and "File too large" in run.stderr, run.stderr[-2000:]
    done = json.loads((path / "c0.done.json").read_text())
    assert 2 not in done and set(done) <= {0, 1}  # the half-written chunk is not done
    torch.manual_seed(0)
    model = MLP().double()
    x = torch.randn(23, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (23,))
    resumed = _fit(model, x, y, path)
    reference = _fit(model, x, y, tmp_path / "ref")
    assert resumed.store.done(0) == set(range(6))
    torch.testing.assert_close(_scores(resumed, x, y), _scores(reference, x, y), rtol=0, atol=0)


RACE_SCRIPT = textwrap.dedent(
    """
    import sys, time, torch
    import datatrace as dt
    sys.path.insert(0, {tests!r})
    from conftest import MLP

    class Slow(torch.utils.data.Dataset):
        def __init__(self, x, y):
            self.x, self.y = x, y
        def __len__(self):
            return len(self.x)
        def __getitem__(self, i):
            time.sleep(0.01)
            return self.x[i], self.y[i]

    torch.manual_seed(0)
    model = MLP().double()
    x = torch.randn(40, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    fitted = dt.TracIn().fit(dt.ClassificationTask(model),
        [dt.Checkpoint.from_module(model, weight=0.1)], Slow(x, y), store=sys.argv[1],
        batch_size=4, progress=False)
    torch.save(fitted.attribute((x[:5], y[:5])), sys.argv[2])
    """
)


def test_two_processes_creating_one_store_both_get_correct_scores(tmp_path):
    script = tmp_path / "race.py"
    script.write_text(RACE_SCRIPT.format(tests=str(Path(__file__).parent)))
    store = tmp_path / "shared"
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(store), str(tmp_path / f"{k}.pt")],
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(2)
    ]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    subprocess.run([sys.executable, str(script), str(tmp_path / "ref"), str(tmp_path / "ref.pt")])
    ref = torch.load(tmp_path / "ref.pt", weights_only=True)
    for k in range(2):
        assert torch.equal(torch.load(tmp_path / f"{k}.pt", weights_only=True), ref)
    assert json.loads((store / "c0.done.json").read_text()) == list(range(10))


HOLD_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from datatrace.core import persist
    with persist.locked(Path(sys.argv[1])):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
    """
)


def test_the_lock_makes_another_process_wait_then_fail_clearly(tmp_path, monkeypatch):
    script = tmp_path / "hold.py"
    script.write_text(HOLD_SCRIPT)
    holder = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), "30"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(locks, "LOCK_TIMEOUT_S", 0.3)
        with (
            pytest.raises(dt.StoreError, match=r"in use by another process .*\.lock"),
            persist.locked(tmp_path),
        ):
            pass
    finally:
        holder.kill()
        holder.communicate()
    # free once the holder is gone; and a process never waits for itself
    with persist.locked(tmp_path), persist.locked(tmp_path, exclusive=False):
        pass


def test_checksummed_tensor_files_refuse_damage_and_other_versions(tmp_path):
    fmt = persist.StoreFormat("datatrace-test", 2, ("*.safetensors",), "delete it")
    f = tmp_path / "t.safetensors"
    t = torch.arange(12, dtype=torch.float64).reshape(3, 4)
    persist.save_tensors(f, {"t": t}, {"format": fmt.tag, "version": 2, "note": "x"})
    got, meta = persist.load_tensors(f, fmt, "delete it")
    assert torch.equal(got["t"], t) and meta["note"] == "x"
    _flip_byte(f, 5)
    with pytest.raises(dt.StoreCorruptError, match=r"t\.safetensors is damaged.*delete it"):
        persist.load_tensors(f, fmt, "delete it")
    persist.save_tensors(f, {"t": t}, {"format": fmt.tag, "version": 1})
    with pytest.raises(dt.StoreMismatchError, match="version 1"):
        persist.load_tensors(f, fmt, "delete it")
    f.write_bytes(b"\x00garbage")
    with pytest.raises(dt.StoreCorruptError, match="cannot read"):
        persist.load_tensors(f, fmt, "delete it")


def test_damaged_truth_job_and_kfac_factor_files_raise_naming_them(mlp_data, tmp_path):
    model, x, y = mlp_data
    spec = dt.Influence(dt.KFAC(damping=0.1))
    want = _scores(_fit(model, x, y, tmp_path / "s", spec), x, y)
    factors = next((tmp_path / "s").glob("curvature-*.safetensors"))
    again = _fit(model, x, y, tmp_path / "s", spec)  # reuses the cached factors
    torch.testing.assert_close(_scores(again, x, y), want, rtol=0, atol=0)
    _flip_byte(factors, 9)
    with pytest.raises(dt.StoreCorruptError, match=factors.name):
        _fit(model, x, y, tmp_path / "s", spec)
    fixed = _fit(model, x, y, tmp_path / "s", spec, overwrite=True)
    torch.testing.assert_close(_scores(fixed, x, y), want, rtol=0, atol=0)

    from test_truth import ridge_problem

    task, train, queries, train_fn = ridge_problem()
    cache = tmp_path / "jobs"
    first = dt.truth.leave_one_out(train_fn, task, train, queries, indices=[0, 1], cache=cache)
    _flip_byte(cache / "job-000001.safetensors", 3)
    with pytest.raises(dt.StoreCorruptError, match=r"job-000001\.safetensors is damaged"):
        dt.truth.leave_one_out(train_fn, task, train, queries, indices=[0, 1], cache=cache)
    (cache / "job-000001.safetensors").unlink()  # the fix the message names
    again_jobs = dt.truth.leave_one_out(train_fn, task, train, queries, indices=[0, 1], cache=cache)
    torch.testing.assert_close(again_jobs, first, rtol=0, atol=0)


def test_saved_distilled_datamodel_refuses_damage_and_the_old_format(tmp_path):
    from test_datamodel import trained

    task, ckpts, train, q = trained()
    ddm = dt.DistilledDatamodel(groups=torch.arange(24) % 4, synset_per_group=2, steps_per_point=2)
    fitted = ddm.fit(task, ckpts, train)
    fitted.save(tmp_path / "saved")
    f = tmp_path / "saved" / "fitted.safetensors"
    loaded = dt.FittedDistilledDatamodel.load(tmp_path / "saved", task, ckpts[-1])
    torch.testing.assert_close(loaded.attribute(q), fitted.attribute(q), rtol=0, atol=0)
    _flip_byte(f, 2)
    with pytest.raises(dt.StoreCorruptError, match=r"fitted\.safetensors is damaged"):
        dt.FittedDistilledDatamodel.load(tmp_path / "saved", task, ckpts[-1])
    (tmp_path / "saved" / "fitted.json").write_text("{}")  # as version 1 saved it
    with pytest.raises(dt.StoreMismatchError, match=r"format version 1.*save"):
        dt.FittedDistilledDatamodel.load(tmp_path / "saved", task, ckpts[-1])
    fitted.save(tmp_path / "saved")  # the fix the message names
    again = dt.FittedDistilledDatamodel.load(tmp_path / "saved", task, ckpts[-1])
    torch.testing.assert_close(again.attribute(q), fitted.attribute(q), rtol=0, atol=0)
