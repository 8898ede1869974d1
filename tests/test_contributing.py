"""CONTRIBUTING.md's worked example works, and the app layer picks it up untouched."""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import IRIS_CONFIG

import datatrace as dt
from datatrace.app import registry
from datatrace.app.cli import main
from datatrace.app.config import resolve_config
from datatrace.app.evaluate import run as run_evaluate
from datatrace.grads import flatten_grads, per_example_grads_loop

ROOT = Path(__file__).resolve().parents[1]


def _load_example():  # the example is a file of examples/, not part of the package
    spec = importlib.util.spec_from_file_location(
        "contrib_methods", ROOT / "examples/contrib_methods.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["contrib_methods"] = module
    spec.loader.exec_module(module)
    return module


ex = _load_example()


@pytest.fixture
def registered() -> Iterator[None]:
    before = dict(registry.REGISTRY)
    ex.register_examples()
    try:
        yield
    finally:
        registry.REGISTRY.clear()
        registry.REGISTRY.update(before)


def test_contributing_md_shows_the_tested_example() -> None:
    doc = (ROOT / "CONTRIBUTING.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    source = (ROOT / "examples/contrib_methods.py").read_text()
    assert blocks and all(b.strip() in source for b in blocks)


def test_diagonal_fisher_equals_solving_with_the_explicit_matrix(mlp_data) -> None:
    model, x, y = mlp_data
    task = dt.ClassificationTask(model)
    ck = [dt.Checkpoint.from_module(model)]
    fitted = dt.Influence(ex.DiagonalFisher(damping=0.05)).fit(task, ck, (x, y), progress=False)
    params = {k: v.detach() for k, v in model.named_parameters()}
    names = list(params)
    g = flatten_grads(per_example_grads_loop(task, params, {}, (x, y), names)[0], names)
    q = flatten_grads(
        per_example_grads_loop(task, params, {}, (x[:4], y[:4]), names, True)[0], names
    )
    fisher = torch.diag((g**2).mean(0)) + 0.05 * torch.eye(g.shape[1], dtype=g.dtype)
    want = q @ torch.linalg.solve(fisher, g.T) / len(x)
    torch.testing.assert_close(fitted.attribute((x[:4], y[:4])), want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        fitted.self_influence(), (g * torch.linalg.solve(fisher, g.T).T).sum(1) / len(x)
    )


def test_logra_recipe_equals_its_formula_on_the_stored_features(mlp_data) -> None:
    model, x, y = mlp_data
    task = dt.ClassificationTask(model)
    ck = [dt.Checkpoint.from_module(model)]
    fitted = ex.LoGra(projection_dim=16, damping=0.01).fit(task, ck, (x, y), progress=False)
    phi = fitted.store.read(0, 0, len(x))["proj"].double()
    q = fitted.query_features((x[:5], y[:5]))[0]["proj"].double()
    n = len(x)
    gram = phi.T @ phi / n + 0.01 * torch.eye(16, dtype=phi.dtype)
    want = q @ torch.linalg.solve(gram, phi.T) / n
    torch.testing.assert_close(fitted.attribute((x[:5], y[:5])), want, rtol=1e-8, atol=1e-10)
    assert fitted.method.features.kronecker is True


def test_registry_evaluate_and_cli_pick_up_new_methods(registered, tmp_path: Path) -> None:
    assert {"diag_fisher", "logra"} <= set(registry.REGISTRY)
    cfg = resolve_config(
        {
            "out": str(tmp_path / "ev"),
            "data": {"dataset": "iris", "n_train": 40, "n_query": 4},
            "model": {"kind": "logreg"},
            "train": {"epochs": 5, "checkpoints": 2},
            "methods": {"use": ["diag_fisher", "logra", "graddot"], "trak_dim": 8},
            "truth": {"use": ["loo"], "indices": 5},
        }
    )
    report = run_evaluate(cfg)
    methods = {r["method"] for r in report["results"]}
    assert methods == {"diag_fisher", "logra", "graddot"}
    for r in report["results"]:
        assert r["mean"] == r["mean"]  # finite agreement numbers (NaN != NaN)
    cfg_path = tmp_path / "iris.toml"
    cfg_path.write_text(IRIS_CONFIG)
    out = tmp_path / "top.csv"
    code = main(["score", str(cfg_path), "--store", str(tmp_path / "s"), "--method", "diag_fisher",
                 "--top-k", "3", "--out", str(out)])  # fmt: skip
    assert code == 0
    assert len(out.read_text().strip().splitlines()) == 1 + 5 * 3  # header + queries x k


def test_an_unregistered_name_is_refused_before_any_training(tmp_path: Path, capsys) -> None:
    cfg_path = tmp_path / "iris.toml"
    cfg_path.write_text(IRIS_CONFIG)
    code = main(["score", str(cfg_path), "--store", str(tmp_path / "s"), "--method", "diag_fisher"])
    assert code != 0
    assert "unknown method 'diag_fisher'" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()  # refused before anything was trained or written
