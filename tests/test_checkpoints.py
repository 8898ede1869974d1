"""Checkpoints as people save them: training dicts, Lightning, Hugging Face folders, globs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import datatrace as dt


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def _same_state(ck: dt.Checkpoint, model: nn.Module) -> bool:
    params, _ = ck.parameters_for(model)
    return all(torch.equal(params[k], v) for k, v in model.named_parameters())


def test_a_training_checkpoint_dict_with_its_optimizer_learning_rate(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.037, momentum=0.9)
    torch.save(
        {
            "epoch": 5,
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": opt.state_dict(),
        },
        tmp_path / "ck.pt",
    )
    ck = dt.Checkpoint.from_file(tmp_path / "ck.pt")
    assert ck.weight == pytest.approx(0.037) and _same_state(ck, model)
    assert dt.Checkpoint.from_file(tmp_path / "ck.pt", weight=2.0).weight == 2.0


def test_several_learning_rates_need_an_explicit_weight(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.SGD(
        [
            {"params": model[0].parameters(), "lr": 0.1},
            {"params": model[2].parameters(), "lr": 0.01},
        ]
    )
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ck.pt")
    with pytest.raises(dt.CheckpointError, match=r"\[0.01, 0.1\].*weight="):
        dt.Checkpoint.from_file(tmp_path / "ck.pt")
    assert dt.Checkpoint.from_file(tmp_path / "ck.pt", weight=0.1).weight == 0.1


def test_a_lightning_checkpoint_with_a_prefix(tmp_path: Path) -> None:
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-4)
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save(
        {"state_dict": state, "optimizer_states": [opt.state_dict()], "global_step": 10},
        tmp_path / "lightning.ckpt",
    )
    ck = dt.Checkpoint.from_file(tmp_path / "lightning.ckpt", strip_prefix="model.")
    assert ck.weight == pytest.approx(3e-4) and _same_state(ck, model)


def test_hugging_face_model_folders(tmp_path: Path) -> None:
    model = _model()
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    single = tmp_path / "single"
    single.mkdir()
    save_file(sd, str(single / "model.safetensors"))
    assert _same_state(dt.Checkpoint.from_file(single), model)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    keys = sorted(sd)
    parts = {
        "model-00001-of-00002.safetensors": keys[:2],
        "model-00002-of-00002.safetensors": keys[2:],
    }
    for fname, ks in parts.items():
        save_file({k: sd[k] for k in ks}, str(sharded / fname))
    index = {"weight_map": {k: f for f, ks in parts.items() for k in ks}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert _same_state(dt.Checkpoint.from_file(sharded), model)
    binary = tmp_path / "bin"
    binary.mkdir()
    torch.save(model.state_dict(), binary / "pytorch_model.bin")
    assert _same_state(dt.Checkpoint.from_file(binary), model)
    with pytest.raises(dt.CheckpointError, match=r"without model\.safetensors"):
        dt.Checkpoint.from_file(tmp_path)


def test_an_unknown_layout_names_the_keys_and_the_argument(tmp_path: Path) -> None:
    model = _model()
    torch.save({"epoch": 3, "weights_ema": model.state_dict()}, tmp_path / "ck.pt")
    with pytest.raises(dt.CheckpointError, match=r"'epoch', 'weights_ema'.*key=.*weights_ema"):
        dt.Checkpoint.from_file(tmp_path / "ck.pt")
    assert _same_state(dt.Checkpoint.from_file(tmp_path / "ck.pt", key="weights_ema"), model)


def test_glob_loads_a_trajectory_in_natural_order(tmp_path: Path) -> None:
    model = _model()
    for epoch in (10, 2, 1):
        opt = torch.optim.SGD(model.parameters(), lr=0.1 / epoch)
        saved = {"model_state_dict": model.state_dict(), "optimizer_state_dict": opt.state_dict()}
        torch.save(saved, tmp_path / f"epoch{epoch}.pt")
    ckpts = dt.Checkpoint.glob(tmp_path / "epoch*.pt")
    assert [c.name for c in ckpts] == ["epoch1", "epoch2", "epoch10"]
    assert [c.weight for c in ckpts] == pytest.approx([0.1, 0.05, 0.01])
    with pytest.raises(dt.CheckpointError, match="no checkpoint files"):
        dt.Checkpoint.glob(tmp_path / "nothing*.pt")
