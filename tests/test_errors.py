"""Bad input gets a clear datatrace error."""

from __future__ import annotations

import pytest
import torch
from conftest import MLP

import datatrace as dt


def _fit(model, train, spec=None, ckpts=None, **kw):
    spec = spec or dt.TracIn()
    ckpts = ckpts if ckpts is not None else [dt.Checkpoint.from_module(model)]
    return spec.fit(dt.ClassificationTask(model), ckpts, train, progress=False, **kw)


def test_hierarchy():
    for err in (dt.ConfigError, dt.DataError, dt.ModelError, dt.CheckpointError, dt.StoreError):
        assert issubclass(err, dt.DatatraceError)
    assert issubclass(dt.NonFiniteError, dt.DataError)
    assert issubclass(dt.StoreMismatchError, dt.StoreError)
    assert issubclass(dt.StoreCorruptError, dt.StoreError)


def test_model_without_trainable_parameters():
    model = MLP()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(dt.ModelError, match="no trainable parameters"):
        dt.ClassificationTask(model)
    with pytest.raises(dt.ModelError, match="no trainable parameters"):
        dt.ClassificationTask(torch.nn.ReLU())


def test_mismatched_lengths_and_empty_data(mlp_data):
    model, x, y = mlp_data
    with pytest.raises(dt.DataError, match=r"same number of examples.*23.*22"):
        _fit(model, (x, y[:-1]))
    with pytest.raises(dt.DataError, match="empty"):
        _fit(model, (x[:0], y[:0]))
    with pytest.raises(dt.DataError, match="empty"):
        _fit(model, torch.utils.data.TensorDataset(x[:0], y[:0]))
    fitted = _fit(model, (x, y))
    with pytest.raises(dt.DataError, match="queries is empty"):
        fitted.attribute((x[:0], y[:0]))
    with pytest.raises(dt.DataError, match="single tensor"):
        _fit(model, x)


def test_labels_out_of_range_and_wrong_dtype(mlp_data):
    model, x, y = mlp_data
    bad = y.clone()
    bad[[4, 9]] = torch.tensor([3, -1])
    with pytest.raises(dt.DataError, match=r"out of range \[0, 3\) at examples \[4, 9\]"):
        _fit(model, (x, bad))
    fitted = _fit(model, (x, y))
    with pytest.raises(dt.DataError, match=r"out of range .* at examples \[1\]"):
        fitted.attribute((x[:2], torch.tensor([0, 7])))
    with pytest.raises(dt.DataError, match="integer"):
        _fit(model, (x, y.double()))
    # more classes than the model has logits: labels past them would index nothing
    with pytest.raises(dt.ConfigError, match="num_classes=5, but the model gives 3 logits"):
        dt.GradDot().fit(
            dt.ClassificationTask(model, num_classes=5), [dt.Checkpoint.from_module(model)], (x, y)
        )


def test_nan_and_inf_losses_name_the_examples(mlp_data):
    model, x, y = mlp_data
    xb = x.clone()
    xb[[2, 17]] = float("nan")
    with pytest.raises(dt.NonFiniteError, match=r"non-finite .*loss.* at examples \[2, 17\]") as e:
        _fit(model, (xb, y), batch_size=5)
    assert e.value.indices == [2, 17]
    xb = x.clone()
    xb[11, 0] = float("inf")
    with pytest.raises(dt.NonFiniteError, match=r"\[11\]"):
        _fit(model, (xb, y), spec=dt.GradDot())
    # an inf input in a later batch whose loss stays finite (tanh saturates) and whose
    # gradient is NaN is named too: the scan of the rest reads the inputs as well
    xb = x.clone()
    xb[7] = float("nan")
    xb[10, 0] = float("inf")
    with pytest.raises(dt.NonFiniteError, match=r"at examples \[7, 10\]") as e:
        _fit(model, (xb, y), spec=dt.GradDot(), batch_size=4)
    assert e.value.indices == [7, 10]
    # K-FAC/EK-FAC passes (length groups, no indices at hand) name them as well
    for spec in (dt.EKFAC(), dt.KFAC(fisher="empirical")):
        with pytest.raises(dt.NonFiniteError, match=r"K-FAC pass at examples \[7, 10\]"):
            _fit(model, (xb, y), spec=dt.Influence(spec), batch_size=4)
    # rows of a sampler's subset are named with their dataset indices too
    xb = x.clone()
    xb[7] = float("nan")
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(xb, y), sampler=[1, 7, 10, 11], batch_size=2
    )
    with pytest.raises(dt.NonFiniteError, match=r"examples \[1\] \(dataset indices \[7\]\)"):
        _fit(model, loader, spec=dt.GradDot())


def test_nan_gradient_with_finite_loss_is_caught():
    class Sqrt(torch.nn.Module):  # sqrt at 0 has an infinite derivative, finite value
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))

        def forward(self, x):
            return torch.sqrt(x * self.w)

    model = Sqrt()
    x = torch.rand(6, 3, dtype=torch.float64) + 0.5
    x[4, 1] = 0.0
    y = torch.zeros(6, 3, dtype=torch.float64)
    with pytest.raises(dt.NonFiniteError, match=r"gradient of the loss at examples \[4\]"):
        dt.GradDot().fit(
            dt.RegressionTask(model), [dt.Checkpoint.from_module(model)], (x, y), progress=False
        )


def test_unknown_parameter_names_and_bad_projection(mlp_data):
    model, x, y = mlp_data
    with pytest.raises(dt.ConfigError, match=r"'fc3'.*did you mean"):
        _fit(model, (x, y), spec=dt.TracIn(params=["fc3"]))
    for bad in (0, -4, 2.5, True):
        with pytest.raises(dt.ConfigError, match="projection_dim must be a positive integer"):
            dt.TracIn(projection_dim=bad)
    with pytest.raises(dt.ConfigError, match="empty list"):
        dt.GradDot(params=[])
    fitted = _fit(model, (x, y))
    with pytest.raises(dt.ConfigError, match="k must be"):
        fitted.top_k((x, y), k=0)
    with pytest.raises(dt.ConfigError, match="batch_size"):
        _fit(model, (x, y), batch_size=0)


def test_checkpoint_shape_mismatch_and_missing_files(mlp_data, tmp_path):
    model, x, y = mlp_data
    wrong = MLP(hidden=9).double()
    with pytest.raises(dt.CheckpointError, match=r"'fc1.weight' has shape \(9, 5\)"):
        _fit(model, (x, y), ckpts=[dt.Checkpoint.from_module(wrong)])
    with pytest.raises(dt.CheckpointError, match=r"missing parameter 'fc2\.bias'"):
        sd = {k: v for k, v in model.state_dict().items() if k != "fc2.bias"}
        _fit(model, (x, y), ckpts=[dt.Checkpoint.from_state_dict(sd)])
    with pytest.raises(dt.CheckpointError, match="no checkpoints"):
        _fit(model, (x, y), ckpts=[])
    with pytest.raises(dt.CheckpointError, match="not found"):
        dt.Checkpoint.from_file(tmp_path / "nope.pt")
    corrupt = tmp_path / "c.pt"
    corrupt.write_bytes(b"\x80\x04garbage")
    with pytest.raises(dt.CheckpointError, match="cannot read"):
        dt.Checkpoint.from_file(corrupt)
    with pytest.raises(dt.CheckpointError, match="finite"):
        dt.Checkpoint.from_module(model, weight=float("nan"))


def test_checkpoint_files_round_trip(mlp_data, tmp_path):
    from safetensors.torch import save_file

    model, _x, _y = mlp_data
    torch.save(model.state_dict(), tmp_path / "m.pt")
    save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    a = dt.Checkpoint.from_file(tmp_path / "m.pt", weight=0.3)
    b = dt.Checkpoint.from_file(tmp_path / "m.safetensors", weight=0.3)
    assert a.fingerprint() == b.fingerprint() == dt.Checkpoint.from_module(model).fingerprint()
    assert a.weight == 0.3


def test_pickled_objects_are_not_loaded(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(dt.CheckpointError, match="cannot read"):
        dt.Checkpoint.from_file(tmp_path / "evil.pt")


def test_wrong_output_shape_for_classification():
    model = torch.nn.Linear(4, 1).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.zeros(5, 1, dtype=torch.long)
    with pytest.raises(dt.DataError, match="1-D integer"):
        _fit(model, (x, y))


def test_regression_shape_mismatch():
    model = torch.nn.Linear(4, 2).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(dt.DataError, match="does not match targets"):
        dt.GradDot().fit(
            dt.RegressionTask(model), [dt.Checkpoint.from_module(model)], (x, y), progress=False
        )
