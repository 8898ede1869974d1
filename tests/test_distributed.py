"""torchrun: featurization sharded across ranks into one store equals one process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import IRIS_CONFIG, assert_two_ranks_equal_one_process, single_process_env

SCRIPT = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from conftest import MLP
import datatrace as dt
torch.manual_seed(0)
model = MLP().double()
x = torch.randn(37, 5, dtype=torch.float64)
y = torch.randint(0, 3, (37,))
task = dt.ClassificationTask(model)
ckpts = [dt.Checkpoint.from_module(model, weight=0.5)]
with torch.no_grad():
    for p in model.parameters():
        p.add_(0.1)
ckpts.append(dt.Checkpoint.from_module(model, weight=0.25))
q = (x[:4] + 0.1, y[:4])
out = {{}}
for name, store in (("memory", None), ("disk", {store!r})):
    fitted = dt.TracIn().fit(task, ckpts, (x, y), store=store, batch_size=5, progress=False)
    out[name] = fitted.attribute(q)
    out[name + "_self"] = fitted.self_influence()
    fitted.block_size = 6  # several training blocks, so ranks split them
    out[name + "_self_blocks"] = fitted.self_influence()
    out[name + "_top_v"], out[name + "_top_i"] = fitted.top_k(q, k=5)
    out[name + "_opp_v"], out[name + "_opp_i"] = fitted.top_k(q, k=40, opponents=True)
    proj = dt.TracIn(projection_dim=16).fit(task, ckpts, (x, y), batch_size=5, progress=False)
    out[name + "_proj"] = proj.attribute(q)
for name, store in (("bf16_memory", None), ("bf16_disk", {store!r} + "_bf16")):
    bf = dt.TracIn(feature_dtype=torch.bfloat16)
    fitted = bf.fit(task, ckpts, (x, y), store=store, batch_size=5, progress=False)
    out[name] = fitted.attribute(q)
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
torch.save(out, {out!r}.format(rank))
"""


def test_sharded_featurization_equals_one_process(tmp_path: Path) -> None:
    tests = str(Path(__file__).parent)

    def make(out: str, sharded: bool) -> str:
        store = str(tmp_path / ("s2" if sharded else "s1"))
        return SCRIPT.format(tests=tests, store=store, out=out)

    assert_two_ranks_equal_one_process(tmp_path, make)
    # the two ranks each recorded their own chunks; together they are all of them
    files = sorted(p.name for p in (tmp_path / "s2").glob("c0.done*.json"))
    assert files == ["c0.done.json", "c0.done.r1.json"]
    import json

    parts = [set(json.loads((tmp_path / "s2" / f).read_text())) for f in files]
    assert parts[0] and parts[1] and not parts[0] & parts[1]
    assert parts[0] | parts[1] == set(range(8))  # 37 examples in chunks of 5


def test_cli_featurize_and_score_under_torchrun_equal_one_process(tmp_path: Path) -> None:
    import csv

    import numpy as np

    cfg = tmp_path / "exp.toml"
    cfg.write_text(IRIS_CONFIG)
    env = single_process_env()
    entry = [sys.executable, "-m", "datatrace"]
    common = ["--method", "tracin", "--batch-size", "7"]
    one = subprocess.run(
        [*entry, "score", str(cfg), "--store", str(tmp_path / "s1"), *common,
         "--matrix", str(tmp_path / "one.npy"), "--out", str(tmp_path / "one.csv")],
        env=env, capture_output=True, timeout=300,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr.decode()[-3000:]
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
    feat = subprocess.run(
        [*run, "-m", "datatrace", "featurize", str(cfg), "--store", str(tmp_path / "s2"),
         *common],
        env=env, capture_output=True, timeout=300,
    )  # fmt: skip
    assert feat.returncode == 0, feat.stderr.decode()[-3000:]
    two = subprocess.run(
        [*run, "-m", "datatrace", "score", str(cfg), "--store", str(tmp_path / "s2"),
         *common, "--matrix", str(tmp_path / "two.npy"), "--out", str(tmp_path / "two.csv")],
        env=env, capture_output=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr.decode()[-3000:]
    a, b = np.load(tmp_path / "one.npy"), np.load(tmp_path / "two.npy")
    assert a.shape == (5, 60) and np.array_equal(a, b)
    with open(tmp_path / "one.csv") as f1, open(tmp_path / "two.csv") as f2:
        rows1, rows2 = list(csv.DictReader(f1)), list(csv.DictReader(f2))
    assert rows1 == rows2 and len(rows1) == 5 * 10
    best = [int(r["train_index"]) for r in rows1 if r["rank"] == "1"]
    assert best == [int(i) for i in np.argmax(a, axis=1)]


DDM_SCRIPT = """
import sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {tests!r})
from conftest import MLP
import datatrace as dt
import datatrace.core.locks as locks
locks.LOCK_TIMEOUT_S = 0.5  # shorter than the distillation: a rank must not give up on it
from datatrace.retrain import sgd_train
torch.manual_seed(0)
x = torch.randn(40, 5, dtype=torch.float64)
y = torch.randint(0, 3, (40,))
model, ckpts = sgd_train(lambda: MLP().double(), x, y, 0, epochs=4, lr=0.3, batch_size=8,
                         momentum=0.0, checkpoints=4)
ddm = dt.DistilledDatamodel(groups=torch.arange(40) % 4, synset_per_group=3, steps_per_point=60)
fitted = ddm.fit(dt.ClassificationTask(model), ckpts, (x, y), store={store!r})
out = {{"syn": fitted.syn_x, "scores": fitted.attribute((x[:5] + 0.05, y[:5]))}}
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
torch.save(out, {out!r}.format(rank))
"""


def test_a_distilled_datamodel_store_under_torchrun_equals_one_process(tmp_path: Path) -> None:
    """The distillation is one sequence of steps: every rank took the store's lock in turn
    and gave up after the lock timeout when the distillation took longer (10 minutes by
    default). Rank 0 now distils while the others wait for it as long as it lives, then
    read the finished run: every rank's synthetic set and scores equal one process's."""
    tests = str(Path(__file__).parent)

    def make(out: str, sharded: bool) -> str:
        store = str(tmp_path / ("d2" if sharded else "d1"))
        return DDM_SCRIPT.format(tests=tests, store=store, out=out)

    assert_two_ranks_equal_one_process(tmp_path, make)
