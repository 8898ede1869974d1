"""`datatrace evaluate CONFIG.toml`: config validation, a small end-to-end run, custom entry."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

import datatrace as dt
from datatrace.app.cli import main
from datatrace.app.config import load_config, resolve_config
from datatrace.app.evaluate import run as run_evaluate
from datatrace.app.experiment import Experiment

pytest.importorskip("sklearn")

SMALL = """
name = "small"
out = "{out}"
[data]
dataset = "iris"
n_train = 40
n_query = 6
[model]
kind = "logreg"
alpha = 1e-2
[train]
epochs = 30
lr = 0.1
batch_size = 8
checkpoints = 3
[methods]
use = ["graddot", "tracin", "exact", "cg"]
cg_iters = 50
[truth]
use = ["further_training", "loo", "lds"]
indices = 8
[truth.further_training]
epochs = 2
seeds = 2
lr = 0.05
batch_size = 8
[truth.lds]
n_subsets = 6
"""


def test_unknown_keys_and_bad_values_are_errors_with_suggestions() -> None:
    with pytest.raises(dt.ConfigError, match="did you mean 'n_train'"):
        resolve_config({"data": {"n_trian": 10}})
    with pytest.raises(dt.ConfigError, match=r"did you mean 'truth\.further_training'"):
        resolve_config({"truth": {"further_trianing": {"epochs": 1}}})
    with pytest.raises(dt.ConfigError, match="did you mean 'gradcos'"):
        resolve_config({"methods": {"use": ["gradcoss"]}})
    with pytest.raises(dt.ConfigError, match="must be int"):
        resolve_config({"train": {"epochs": "ten"}})
    with pytest.raises(dt.ConfigError, match="did you mean 'digits'"):
        resolve_config({"data": {"dataset": "digit"}})
    with pytest.raises(dt.ConfigError, match="out of range"):
        resolve_config({"truth": {"indices": -5}})
    with pytest.raises(dt.ConfigError, match="out of range"):
        resolve_config({"truth": {"lds": {"fraction": 1.5}}})
    cfg = resolve_config({"methods": {"damping": 1}})
    assert cfg["methods"]["damping"] == [1.0] and cfg["truth.further_training"]["seeds"] == 10


def test_config_leaves_solver_settings_to_the_library_unless_given() -> None:
    """No [methods] cg_iters / lissa_depth: the CLI builds CG and LiSSA with the library's
    own rules (max_iter / depth None), not the old fixed 100 / 500; a given value is
    passed on; 0 means the default; negative is an error."""
    from datatrace.app.registry import make_method

    m = resolve_config({"methods": {"use": ["cg", "lissa", "arnoldi"]}})["methods"]
    assert (m["cg_iters"], m["lissa_depth"], m["arnoldi_rank"]) == (0, 0, 0)
    cg, lissa = make_method("cg", m).preconditioner, make_method("lissa", m).preconditioner
    assert cg == dt.ConjugateGradient() and cg.max_iter is None
    assert lissa == dt.LiSSA() and lissa.depth is None
    arnoldi = make_method("arnoldi", m).preconditioner
    assert arnoldi == dt.Arnoldi() and arnoldi.rank is None
    given = resolve_config({"methods": {"use": ["cg", "lissa"], "cg_iters": 7, "lissa_depth": 9}})
    assert make_method("cg", given["methods"]).preconditioner.max_iter == 7
    assert make_method("lissa", given["methods"]).preconditioner.depth == 9
    ranked = resolve_config({"methods": {"use": ["arnoldi"], "arnoldi_rank": 20}})["methods"]
    assert make_method("arnoldi", ranked).preconditioner.rank == 20
    with pytest.raises(dt.ConfigError, match="cg_iters = -1 is out of range"):
        resolve_config({"methods": {"cg_iters": -1}})


def test_small_run_writes_results_and_resumes_from_cache(tmp_path: Path, capsys) -> None:
    cfg_path = tmp_path / "small.toml"
    cfg_path.write_text(SMALL.format(out=str(tmp_path / "out")))
    assert main(["evaluate", str(cfg_path)]) == 0
    printed = capsys.readouterr().out
    assert "graddot" in printed and "FT@2 cosi" in printed and "lds lds" in printed
    report = json.loads((tmp_path / "out" / "results.json").read_text())
    with open(tmp_path / "out" / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    # 4 methods x (2 epochs x 3 metrics + loo 3 metrics + lds 1)
    assert len(rows) == len(report["results"]) == 4 * (2 * 3 + 3 + 1)
    for r in report["results"]:
        assert -1 - 1e-9 <= r["mean"] <= 1 + 1e-9 and math.isfinite(r["se"])
    loo = {r["method"]: r["mean"] for r in report["results"]
           if r["truth"] == "loo" and r["metric"] == "pearson"}  # fmt: skip
    assert loo["exact"] > 0.5, loo  # SGD-trained logreg: influence tracks retraining
    # every gradient method checked itself against one epoch of further training
    assert "check cos" in printed
    assert sorted(report["check"]) == ["cg", "exact", "graddot", "tracin"]
    for own in report["check"].values():
        assert (own["n_examples"], own["n_queries"]) == (32, 6)
        assert -1 <= own["cosine"][0] <= 1 and own["cosine"][1] >= 0
        assert "further training" in own["gold_standard"]
    assert (tmp_path / "out" / "agreement.png").stat().st_size > 1000
    # rerun: every gold-standard job comes from the cache, same numbers
    jobs = sorted((tmp_path / "out" / "cache").rglob("job-*.safetensors"))
    assert len(jobs) == 2 + 9 + 6  # FT: 2 seeds x 1 chunk; LOO: 8 + the full run; LDS: 6
    before = [p.stat().st_mtime_ns for p in jobs]
    again = run_evaluate(load_config(cfg_path))
    assert again["results"] == report["results"]
    assert [p.stat().st_mtime_ns for p in jobs] == before  # nothing recomputed


def entry_point(cfg: dict) -> Experiment:
    torch.manual_seed(0)
    x = torch.randn(30, 4, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    model = torch.nn.Linear(4, 2).double()
    task = dt.ClassificationTask(model, num_classes=2)
    return Experiment(task, (x, y), (x[:5], y[:5]), [dt.Checkpoint.from_module(model)])


def test_custom_entry_point(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    cfg = resolve_config(
        {
            "out": str(tmp_path),
            "data": {"entry": "test_evaluate:entry_point"},
            "methods": {"use": ["graddot", "gradcos"]},
            "truth": {"indices": 10, "further_training": {"epochs": 1, "seeds": 2}},
        }
    )
    report = run_evaluate(cfg)
    assert {r["method"] for r in report["results"]} == {"graddot", "gradcos"}
    bad = resolve_config({"data": {"entry": "nowhere_module:fn"}})
    with pytest.raises(dt.ConfigError, match="cannot import"):
        run_evaluate(bad, out=tmp_path)
    no_loo = resolve_config(
        {"data": {"entry": "test_evaluate:entry_point"}, "truth": {"use": ["loo"]}}
    )
    with pytest.raises(dt.ConfigError, match="train_fn"):
        run_evaluate(no_loo, out=tmp_path)


@pytest.mark.parametrize(
    "entry",
    ["os:system", "builtins:exec", "subprocess:run", "datatrace.app.demo:run", "a:b:c",
     "test_evaluate:Experiment", "test_evaluate:SMALL", "os.path:join; rm", ":f", "m:"],
)  # fmt: skip
def test_entries_that_are_not_a_function_of_your_own_module_are_refused(
    entry: str, monkeypatch
) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    cfg = resolve_config({"data": {"entry": entry}})
    with pytest.raises(dt.ConfigError, match=r"data\.entry"):
        run_evaluate(cfg)
