"""Saved fits: ``fitted.save(folder)`` then ``dt.load(folder, task, train)`` scores exactly as
the original fit, for every method and wherever its features were (memory, a feature store,
recomputed); a model, task or training data other than the fit's is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import MLP

import datatrace as dt
from datatrace.methods.kronecker import FittedKroneckerInfluence


def trained(n: int = 40, seed: int = 0):
    """A tanh MLP trained by SGD, 3 checkpoints weighted by their learning rates."""
    torch.manual_seed(seed)
    model = MLP().double()
    x = torch.randn(n, 5, dtype=torch.float64)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    ckpts = []
    for step in range(1, 31):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if step % 10 == 0:
            ckpts.append(dt.Checkpoint.from_module(model, weight=0.3 / step**0.5))
    q = (torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,)))
    return model, ckpts, (x, y), q


METHODS = {
    "graddot": lambda: dt.GradDot(),
    "gradcos": lambda: dt.GradCos(),
    "tracin": lambda: dt.TracIn(),
    "tracin_projected": lambda: dt.TracIn(projection_dim=16),
    "exact": lambda: dt.Influence(dt.ExactHessian(damping=1.0)),
    "gauss_newton": lambda: dt.Influence(dt.GaussNewton()),
    "cg": lambda: dt.Influence(dt.ConjugateGradient(damping=1.0, max_iter=30, gauss_newton=True)),
    "lissa": lambda: dt.Influence(dt.LiSSA(damping=1.0, depth=20, batch_size=8, gauss_newton=True)),
    "arnoldi": lambda: dt.Influence(dt.Arnoldi(rank=10, damping=1.0, gauss_newton=True)),
    "kfac": lambda: dt.Influence(dt.KFAC()),
    "ekfac": lambda: dt.Influence(dt.EKFAC()),
    "datainf": lambda: dt.DataInf(),
    "trak": lambda: dt.TRAK(projection_dim=16),
    "default_influence": lambda: dt.Influence(),  # chooses (exact here) and keeps its choice
}


# every method with features in memory; the feature store (by reference) and recomputed
# features with the methods whose saved state differs most
CASES = [(name, "memory") for name in METHODS] + [
    (name, where)
    for name in ("tracin", "ekfac", "datainf", "trak", "lissa")
    for where in ("store", "recompute")
]


@pytest.mark.parametrize("name, where", CASES)
def test_save_then_load_scores_exactly_as_the_fit(tmp_path: Path, name: str, where: str) -> None:
    model, ckpts, train, q = trained()
    task = dt.ClassificationTask(model)
    options: dict[str, object] = {"block_size": 16}
    if where == "store":
        options["store"] = tmp_path / "store"
    if where == "recompute":
        options["max_store_bytes"] = 0
        options["store"] = tmp_path / "unused"
    fitted = METHODS[name]().fit(task, ckpts, train, **options)
    fused = name in ("kfac", "ekfac") and where == "memory"  # K-FAC scored without features
    assert (fitted.store is None) == (where == "recompute" or fused)
    fitted.save(tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / "attributor.json").read_text())
    kind = {"memory": "inline", "store": "store", "recompute": "recompute"}[where]
    if fused:
        kind = "recompute"
        assert meta["fused"] and isinstance(fitted, FittedKroneckerInfluence)
    assert meta["features"]["kind"] == kind
    # a fresh model object of the same class: only its architecture and code matter
    loaded = dt.load(tmp_path / "saved", dt.ClassificationTask(MLP().double()), train)
    assert isinstance(loaded, dt.FittedGradientAttributor)
    assert type(loaded) is type(fitted)
    assert loaded.damping == fitted.damping and loaded.weights == fitted.weights
    assert torch.equal(loaded.attribute(q), fitted.attribute(q))
    assert torch.equal(loaded.self_influence(), fitted.self_influence())
    if where == "store":  # by reference: the features were not copied
        assert not any(k.startswith("features/") for k in _tensor_names(tmp_path / "saved"))


@pytest.mark.parametrize("name", ["cg", "lissa", "arnoldi"])
def test_a_fit_saved_when_the_solvers_were_in_one_module_loads(tmp_path: Path, name: str) -> None:
    """Fits saved while CG, LiSSA and Arnoldi lived in ``datatrace.curvature.iterative``
    (before issue 13 gave each solver its module) name their classes there: they load by
    the new names (``codec.MOVED``) and score exactly as the fit."""
    from datatrace.core import persist
    from datatrace.methods.saved import FORMAT

    model, ckpts, train, q = trained()
    fitted = METHODS[name]().fit(dt.ClassificationTask(model), ckpts, train, block_size=16)
    fitted.save(tmp_path / "saved")
    path = tmp_path / "saved" / "attributor.safetensors"
    tensors, meta = persist.load_tensors(path, FORMAT, "")
    text = json.dumps(meta)
    for module in ("cg", "lissa", "arnoldi", "matrix_free"):
        text = text.replace(f'"datatrace.curvature.{module}:', '"datatrace.curvature.iterative:')
    text = text.replace("iterative:MatrixFree", "iterative:_MatrixFree")
    assert text.count('"datatrace.curvature.iterative:') >= 2  # the settings and the fit
    old = {k: v for k, v in json.loads(text).items() if k != "checksum"}
    persist.save_tensors(path, tensors, old)
    loaded = dt.load(tmp_path / "saved", dt.ClassificationTask(MLP().double()), train)
    assert type(loaded.preconditioners[0]) is type(fitted.preconditioners[0])
    assert torch.equal(loaded.attribute(q), fitted.attribute(q))


def _tensor_names(folder: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "attributor.safetensors"), "pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("store", [False, True])
def test_ekfac_factors_are_saved_and_not_refitted(tmp_path: Path, monkeypatch, store: bool) -> None:
    from datatrace.curvature import kfac

    model, ckpts, train, q = trained()
    where = {"store": tmp_path / "store"} if store else {}
    fitted = dt.Influence(dt.EKFAC()).fit(dt.ClassificationTask(model), ckpts, train, **where)
    fitted.save(tmp_path / "saved")
    names = set(_tensor_names(tmp_path / "saved"))
    inline = {"preconditioner/0/layers/0/ua", "preconditioner/0/layers/1/lam"}
    if store:  # by reference to the store's factor cache
        assert (
            not inline & names and (tmp_path / "store" / "curvature-c0-ekfac.safetensors").exists()
        )
    else:
        assert inline <= names

    def refit(*args, **kwargs):
        raise AssertionError("the factors were fitted again")

    monkeypatch.setattr(kfac, "_fit_factors", refit)
    monkeypatch.setattr(kfac, "_refit_eigenvalues", refit)
    loaded = dt.load(tmp_path / "saved", model=model, train=train)
    assert torch.equal(loaded.attribute(q), fitted.attribute(q))


def test_a_saved_fit_refuses_another_model_task_or_data(tmp_path: Path) -> None:
    model, ckpts, train, _ = trained()
    dt.TracIn().fit(dt.ClassificationTask(model), ckpts, train).save(tmp_path / "saved")
    with pytest.raises(dt.StoreMismatchError, match="another model"):
        dt.load(tmp_path / "saved", MLP(hidden=8).double(), train)

    class Other(MLP):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(x)))

    with pytest.raises(dt.StoreMismatchError, match="another model"):
        dt.load(tmp_path / "saved", Other().double(), train)
    with pytest.raises(dt.StoreMismatchError, match="another task"):
        dt.load(tmp_path / "saved", dt.ClassificationTask(MLP().double(), num_classes=3), train)
    with pytest.raises(dt.StoreMismatchError, match="another training data"):
        dt.load(tmp_path / "saved", MLP().double(), (train[0] + 1e-9, train[1]))
    with pytest.raises(dt.ConfigError, match="train="):
        dt.load(tmp_path / "saved", MLP().double())
    with pytest.raises(dt.StoreCorruptError, match="no saved fit"):
        dt.load(tmp_path, MLP().double(), train)


def test_a_fit_whose_feature_store_changed_or_moved(tmp_path: Path) -> None:
    import shutil

    model, ckpts, train, q = trained()
    fitted = dt.GradDot().fit(dt.ClassificationTask(model), ckpts, train, store=tmp_path / "s")
    fitted.save(tmp_path / "saved")
    want = fitted.attribute(q)
    del fitted
    shutil.move(tmp_path / "s", tmp_path / "moved")
    with pytest.raises(dt.StoreCorruptError, match="is gone; pass store="):
        dt.load(tmp_path / "saved", model, train)
    loaded = dt.load(tmp_path / "saved", model, train, store=tmp_path / "moved")
    assert torch.equal(loaded.attribute(q), want)
    del loaded
    # replaced by another fit's store: refused
    dt.TracIn().fit(
        dt.ClassificationTask(model), ckpts, train, store=tmp_path / "moved", overwrite=True
    )
    with pytest.raises(dt.StoreMismatchError):
        dt.load(tmp_path / "saved", model, train, store=tmp_path / "moved")


def test_the_distilled_datamodel_loads_through_dt_load(tmp_path: Path) -> None:
    model, ckpts, train, q = trained(n=24)
    ddm = dt.DistilledDatamodel(groups=torch.arange(24) % 4, synset_per_group=2, steps_per_point=5)
    fitted = ddm.fit(dt.ClassificationTask(model), ckpts, train)
    fitted.save(tmp_path / "ddm")
    with pytest.raises(dt.ConfigError, match="checkpoints=\\[final\\]"):
        dt.load(tmp_path / "ddm", model)
    loaded = dt.load(tmp_path / "ddm", model, checkpoints=ckpts)
    assert isinstance(loaded, dt.FittedDistilledDatamodel)
    assert torch.equal(loaded.attribute(q), fitted.attribute(q))


def smoothed_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, label_smoothing=0.5, reduction="none")


def test_a_saved_distilled_datamodel_is_refused_for_another_model_task_or_data(
    tmp_path: Path, caplog
) -> None:
    """Only the final checkpoint's bytes were checked: another activation (same state dict)
    or another loss loaded silently. Now the model, the task, the trained parameters and,
    when given, the training data are checked, by both load paths; a save without those
    fingerprints (an older datatrace's) loads with a warning that it could not be checked."""
    model, ckpts, train, q = trained(n=24)
    task = dt.ClassificationTask(model)
    ddm = dt.DistilledDatamodel(groups=torch.arange(24) % 4, synset_per_group=2, steps_per_point=3)
    fitted = ddm.fit(task, ckpts, train)
    fitted.save(tmp_path / "ddm")
    want = fitted.attribute(q)
    load = dt.FittedDistilledDatamodel.load
    assert torch.equal(load(tmp_path / "ddm", task, ckpts[-1], train=train).attribute(q), want)

    relu = MLP().double()
    relu.act = torch.nn.ReLU()  # same class, same state dict, another activation
    relu.load_state_dict(model.state_dict())
    with pytest.raises(dt.StoreMismatchError, match="another model"):
        load(tmp_path / "ddm", dt.ClassificationTask(relu), ckpts[-1])
    with pytest.raises(dt.StoreMismatchError, match="another model"):
        dt.load(tmp_path / "ddm", relu, checkpoints=ckpts)
    smoothed = dt.Task(model, smoothed_loss)
    with pytest.raises(dt.StoreMismatchError, match="another task"):
        load(tmp_path / "ddm", smoothed, ckpts[-1])
    with pytest.raises(dt.StoreMismatchError, match="another task"):
        dt.load(tmp_path / "ddm", smoothed, checkpoints=ckpts)
    other = (train[0] + 0.5, train[1])
    with pytest.raises(dt.StoreMismatchError, match="another training data"):
        load(tmp_path / "ddm", task, ckpts[-1], train=other)
    with pytest.raises(dt.StoreMismatchError, match="another training data"):
        dt.load(tmp_path / "ddm", task, other, checkpoints=ckpts)
    frozen = MLP().double()
    frozen.load_state_dict(model.state_dict())
    frozen.fc1.requires_grad_(False)
    with pytest.raises(dt.StoreMismatchError, match="parameters trained"):
        load(tmp_path / "ddm", dt.ClassificationTask(frozen), ckpts[-1])

    # as saved before the fingerprints were recorded: loads, with a warning
    from datatrace.core import persist
    from datatrace.methods.ddm_fitted import _FITTED_FORMAT as FORMAT

    file = tmp_path / "ddm" / "fitted.safetensors"
    tensors, meta = persist.load_tensors(file, FORMAT, "")
    del meta["fingerprint"]
    persist.save_tensors(file, tensors, meta)
    with caplog.at_level("WARNING", logger="datatrace"):
        old = load(tmp_path / "ddm", task, ckpts[-1])
    assert "could be checked" in caplog.text
    assert torch.equal(old.attribute(q), want)
    old.save(tmp_path / "resaved")  # still without fingerprints: not laundered by a save
    _, meta = persist.load_tensors(tmp_path / "resaved" / "fitted.safetensors", FORMAT, "")
    assert "fingerprint" not in meta


def test_scores_written_to_files_load_back_in_one_call(tmp_path: Path) -> None:
    from datatrace.app.cli import main

    model, ckpts, train, q = trained()
    fitted = dt.TracIn().fit(dt.ClassificationTask(model), ckpts, train)
    path = fitted.attribute_to_file(q, tmp_path / "S.npy")
    assert torch.equal(dt.load_scores(path), fitted.attribute(q))
    # the CLI's top-k CSV: (values, indices), best first
    np.savez(tmp_path / "train.npz", x=train[0].numpy(), y=train[1].numpy())
    np.savez(tmp_path / "q.npz", x=q[0].numpy(), y=q[1].numpy())
    (tmp_path / "m.py").write_text(
        "import torch\nfrom conftest import MLP\ndef build():\n    return MLP().double()\n"
    )
    for i, c in enumerate(ckpts):
        torch.save(dict(c.state), tmp_path / f"ck{i}.pt")
    argv = ["score", "--model", f"{tmp_path / 'm.py'}:build", "--checkpoints",
            str(tmp_path / "ck*.pt"), "--lr", "0.1", "--train", str(tmp_path / "train.npz"),
            "--queries", str(tmp_path / "q.npz"), "--method", "graddot", "--top-k", "3",
            "--out", str(tmp_path / "top.csv"), "--matrix", str(tmp_path / "M.npy")]  # fmt: skip
    assert main(argv) == 0
    values, indices = dt.load_scores(tmp_path / "top.csv")
    want_v, want_i = dt.GradDot().fit(dt.ClassificationTask(model), ckpts, train).top_k(q, k=3)
    assert torch.equal(indices, want_i) and torch.equal(values, want_v)
    assert dt.load_scores(tmp_path / "M.npy").shape == (6, 40)
    with pytest.raises(dt.DataError, match=r"\.npy"):
        dt.load_scores(tmp_path / "train.npz")


@pytest.mark.parametrize("where", ["memory", "store"])
def test_a_fit_saved_with_another_feature_layout_is_refused(
    tmp_path: Path, monkeypatch, where: str
) -> None:
    """A fit saved by a datatrace that formed this Embedding's gradient (before embeddings
    kept ids and output gradients) holds a ``dense`` array of another width: loading it
    must refuse, not read its columns as other parameters' features (it crashed in a
    matmul, or would score wrongly where the widths happened to agree)."""
    from conftest import DictModel

    from datatrace.features.planning import FeaturePlanning

    torch.manual_seed(0)
    model = DictModel().double()
    ids = torch.randint(0, 11, (12, 6))
    train = {"input_ids": ids, "attention_mask": torch.ones(12, 6), "labels": ids[:, 0] % 2}
    ckpts = [dt.Checkpoint(state={k: v.clone() for k, v in model.state_dict().items()})]
    task = dt.ClassificationTask(model)
    store = tmp_path / "s" if where == "store" else None
    with monkeypatch.context() as m:  # the older layout: the embedding's gradient formed
        m.setattr(FeaturePlanning, "_find_index_candidates", lambda self: {})
        old = dt.GradDot().fit(task, ckpts, train, store=store)
        assert "emb.i" not in old.features.layout()
        old.save(tmp_path / "saved")
    fresh = dt.GradDot().fit(dt.ClassificationTask(model), ckpts, train)
    assert "emb.i" in fresh.features.layout()  # today's layout differs
    with pytest.raises(dt.StoreMismatchError, match=r"another layout.*'dense'.*fit again"):
        dt.load(tmp_path / "saved", model, train)
