"""The worked examples of the docs are scripts that run, and their numbers hold."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _self_contained(report: Path) -> None:
    html = report.read_text()
    assert "src=" in html
    assert html.count("src=") == html.count('src="data:')


def test_own_cnn_from_checkpoints_on_disk(tmp_path):
    result = _load("own_cnn_checkpoints").main(tmp_path / "cnn")
    # natural order (epoch10 last) and each checkpoint's learning rate from its optimizer
    # state: StepLR(step_size=4, gamma=0.5) from 0.1
    assert result["names"] == [f"epoch{e}" for e in range(1, 11)]
    assert result["weights"] == pytest.approx([0.1] * 4 + [0.05] * 4 + [0.025] * 2)
    assert result["scores"].shape == (6, 800)
    assert result["accuracy"] > 0.85
    # 10% of labels flipped: self-influence finds most of them in the top 20%
    assert result["found"][0] >= 0.6 and result["found"][1] >= 0.85, result["found"]
    _self_contained(result["report"])


def test_finding_and_fixing_mislabelled_tabular_data(tmp_path):
    r = _load("mislabelled_tabular").main(tmp_path / "tabular")
    assert r["n_flipped"] == 80 and r["reviewed"] == 80
    # the top 20% by self-influence holds far more than the 20% a random pick would
    assert r["wrong_found"] >= 0.5 * r["n_flipped"], r
    # noisy labels cost accuracy; fixing the reviewed rows wins much of it back
    assert r["clean_accuracy"] - r["noisy_accuracy"] >= 0.08, r
    assert r["fixed_accuracy"] - r["noisy_accuracy"] >= 0.05, r
    assert r["dropped_accuracy"] > r["noisy_accuracy"], r
    _self_contained(r["report"])
