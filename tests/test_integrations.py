"""datatrace.integrations.transformers: the Trainer callback's checkpoints carry the learning
rates of their steps, TracIn over them equals TracIn over state dicts saved by hand, and the
Distilled Datamodel's recorder fed by it equals a fit from the same checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import datatrace as dt

transformers = pytest.importorskip("transformers")
from datatrace.integrations.transformers import DatatraceCallback  # noqa: E402

LR = 0.05


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict[str, torch.Tensor]]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.rows[i]


class ByHand(transformers.TrainerCallback):
    """The reference: state dicts and the optimizer's learning rate, copied by hand."""

    def __init__(self, steps: set[int]) -> None:
        self.steps, self.saved, self.lr = steps, {}, None

    def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
        self.lr = optimizer.param_groups[0]["lr"]

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step in self.steps:
            sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.saved[state.global_step] = (sd, self.lr)


def train(model, rows, callbacks, tmp_path, epochs=2, batch=4):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=batch,
        num_train_epochs=epochs, learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0,
        weight_decay=0.0, report_to="none", save_strategy="no", logging_strategy="no",
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    transformers.Trainer(
        model=model, args=args, train_dataset=ListDataset(rows), callbacks=callbacks
    ).train()


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=50, n_positions=8, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    config._attn_implementation = "eager"
    return transformers.GPT2LMHeadModel(config)


def test_callback_saves_checkpoints_with_their_learning_rates_for_tracin(tmp_path):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 50, (12, 8), generator=g)
    rows = [{"input_ids": r, "attention_mask": torch.ones(8, dtype=torch.long), "labels": r}
            for r in ids]  # fmt: skip
    model = tiny_gpt2()
    cb = DatatraceCallback(tmp_path / "ckpts", save_steps=[2, 5], every_epoch=True)
    by_hand = ByHand({2, 3, 5, 6})
    train(model, rows, [cb, by_hand], tmp_path)  # 12 rows / 4 = 3 steps per epoch, 2 epochs

    manifest = json.loads((tmp_path / "ckpts" / "trajectory.json").read_text())["checkpoints"]
    assert [m["global_step"] for m in manifest] == [2, 3, 5, 6]
    assert [m["epoch"] for m in manifest] == pytest.approx([2 / 3, 1.0, 5 / 3, 2.0])
    ckpts = dt.Checkpoint.glob(tmp_path / "ckpts" / "step-*.safetensors")
    # linear decay over 6 steps: step k was taken with LR·(6 − (k − 1))/6
    expected = [LR * (6 - (k - 1)) / 6 for k in (2, 3, 5, 6)]
    assert [c.weight for c in ckpts] == pytest.approx(expected, rel=1e-12)
    assert [by_hand.saved[k][1] for k in (2, 3, 5, 6)] == pytest.approx(expected, rel=1e-12)

    manual = [dt.Checkpoint.from_state_dict(sd, weight=lr) for sd, lr in by_hand.saved.values()]
    assert not torch.equal(ckpts[0].state["transformer.h.0.mlp.c_fc.weight"],
                           ckpts[-1].state["transformer.h.0.mlp.c_fc.weight"])  # fmt: skip
    task = dt.LanguageModelingTask(model)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    S = dt.TracIn().fit(task, ckpts, data, progress=False).attribute(data)
    ref = dt.TracIn().fit(task, manual, data, progress=False).attribute(data)
    torch.testing.assert_close(S, ref, rtol=0, atol=0)
    assert S.abs().max() > 0


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))

    def forward(self, x, labels=None):
        logits = self.net(x)
        if labels is None:
            return logits
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def test_callback_feeds_the_distilled_datamodel_recorder_like_saved_checkpoints(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(16, 4)
    y = (x[:, 0] > 0).long()
    model = Classifier()
    task = dt.ClassificationTask(model)
    ddm = dt.DistilledDatamodel(
        groups=torch.arange(16) % 4, synset_per_group=2, steps_per_point=3, unlearn_steps=3
    )
    recorder = ddm.recorder(task, (x, y))
    cb = DatatraceCallback(tmp_path / "ckpts", save_steps=1, recorder=recorder)
    rows = [{"x": x[i], "labels": y[i]} for i in range(16)]
    train(model, rows, [cb], tmp_path, epochs=1, batch=4)

    ckpts = dt.Checkpoint.glob(tmp_path / "ckpts" / "step-*.safetensors")
    assert len(recorder.points) == len(ckpts) == 4
    assert [p.weight for p in recorder.points] == pytest.approx([c.weight for c in ckpts])
    for p, c in zip(recorder.points, ckpts, strict=True):
        assert p.fingerprint() == c.fingerprint()
    fitted = recorder.finish(model)
    ref = ddm.fit(task, ckpts, (x, y))
    torch.testing.assert_close(fitted.attribute((x[:3], y[:3])), ref.attribute((x[:3], y[:3])))


def test_callback_settings_are_checked(tmp_path):
    with pytest.raises(dt.ConfigError, match="would do nothing"):
        DatatraceCallback(tmp_path)
    with pytest.raises(dt.ConfigError, match="save_steps must be >= 1"):
        DatatraceCallback(tmp_path, save_steps=0)
    with pytest.raises(dt.ConfigError, match="recorder must come from"):
        DatatraceCallback(tmp_path, recorder=object())


def test_datatrace_imports_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None; import datatrace as dt; "
        "dt.LanguageModelingTask; dt.TRAK; print('transformers' in sys.modules and "
        "sys.modules['transformers'] is not None)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_checkpoint_from_file_reads_the_learning_rate_from_safetensors_metadata(tmp_path):
    from safetensors.torch import save_file

    state = {"w": torch.ones(2, 3)}
    save_file(state, str(tmp_path / "a.safetensors"), metadata={"learning_rate": "0.0025"})
    save_file(state, str(tmp_path / "b.safetensors"))
    save_file(state, str(tmp_path / "c.safetensors"), metadata={"learning_rate": "fast"})
    assert dt.Checkpoint.from_file(tmp_path / "a.safetensors").weight == 0.0025
    assert dt.Checkpoint.from_file(tmp_path / "a.safetensors", weight=2.0).weight == 2.0
    assert dt.Checkpoint.from_file(tmp_path / "b.safetensors").weight == 1.0
    with pytest.raises(dt.CheckpointError, match="learning_rate='fast' is not a number"):
        dt.Checkpoint.from_file(tmp_path / "c.safetensors")
