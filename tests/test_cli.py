"""The command line's rough edges: one-line errors with exit status 2, --overwrite, --version."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import IRIS_CONFIG

from datatrace.app.cli import main

SEVEN_QUERIES = IRIS_CONFIG.replace("n_query = 5", "n_query = 7")


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("datatrace 0.")


def test_a_store_of_other_settings_is_an_error_that_overwrite_fixes(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)  # the built-in model's cache: ./evaluate-out
    cfg = tmp_path / "iris.toml"
    cfg.write_text(SEVEN_QUERIES)
    store = str(tmp_path / "store")
    assert main(["featurize", str(cfg), "--store", store, "--method", "tracin"]) == 0
    capsys.readouterr()
    assert main(["score", str(cfg), "--store", store, "--method", "graddot"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("datatrace: error:") and "overwrite" in err and "Traceback" not in err
    code = main(["score", str(cfg), "--store", store, "--method", "graddot", "--overwrite"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.count("query ") == 5
    assert "showing 5 of 7 queries (all of them with --out FILE.csv)" in out


def test_an_output_path_under_a_file_is_a_one_line_error(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "iris.toml"
    cfg.write_text(IRIS_CONFIG)
    (tmp_path / "afile").write_text("x")
    code = main(
        [
            "score",
            str(cfg),
            "--store",
            str(tmp_path / "s"),
            "--out",
            str(tmp_path / "afile" / "top.csv"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("datatrace: error:")


def test_threads_must_be_a_positive_integer(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "iris.toml"
    cfg.write_text(IRIS_CONFIG)
    assert main(["--threads", "0", "featurize", str(cfg), "--store", str(tmp_path / "s")]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["--threads", "x", "featurize", str(cfg), "--store", str(tmp_path / "s")])
    assert exit_.value.code == 2


def test_help_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from datatrace.app.cli import build_parser; build_parser().format_help();"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- your own model, checkpoints and data (nothing trained) -----------------------------------

MODEL_FILE = """
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def not_a_model():
    return 3


def broken():
    raise RuntimeError("no GPU here")


def model_not_task(model):
    return model


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(9, 4, generator=g), torch.randint(0, 3, (9,), generator=g)
"""


def _project(root: Path) -> dict[str, object]:
    """A model file, three training checkpoints (lr 0.05, 0.05, 0.02 in the optimizer
    state), training data and queries in .npz files."""
    import numpy as np
    import torch

    (root / "mymodel.py").write_text(MODEL_FILE)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    xq, yq = x[:7] + 0.1, y[:7]
    np.savez(root / "train.npz", x=x.numpy(), y=y.numpy())
    np.savez(root / "queries.npz", inputs=xq.numpy(), labels=yq.numpy())
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
    ).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    (root / "ckpts").mkdir()
    for epoch, lr in enumerate((0.05, 0.05, 0.02)):
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        torch.save(
            {
                "epoch": epoch,
                "model_state_dict": model.state_dict(),
                "optimizer_state_dict": opt.state_dict(),
            },
            root / "ckpts" / f"epoch{epoch}.pt",
        )
    return {"x": x, "y": y, "xq": xq, "yq": yq, "model": model}


def _own(root: Path) -> list[str]:
    return [
        "--model",
        f"{root / 'mymodel.py'}:build",
        "--checkpoints",
        str(root / "ckpts" / "epoch*.pt"),
        "--train",
        str(root / "train.npz"),
        "--queries",
        str(root / "queries.npz"),
    ]


def _read_top(path: Path) -> tuple[list[list[int]], list[list[float]]]:
    import csv

    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    n_query = 1 + max(int(r["query"]) for r in rows)
    idx: list[list[int]] = [[] for _ in range(n_query)]
    val: list[list[float]] = [[] for _ in range(n_query)]
    for r in rows:
        idx[int(r["query"])].append(int(r["train_index"]))
        val[int(r["query"])].append(float(r["score"]))
    return idx, val


def _expected_tracin(p: dict[str, object], root: Path, k: int):
    from mymodel_ref import build  # type: ignore[import-not-found]

    import datatrace as dt

    model = build()
    ckpts = dt.Checkpoint.glob(root / "ckpts" / "epoch*.pt")
    assert [c.weight for c in ckpts] == [0.05, 0.05, 0.02]  # read from the optimizer state
    fitted = dt.TracIn().fit(dt.ClassificationTask(model), ckpts, (p["x"], p["y"]))
    return fitted.top_k((p["xq"], p["yq"]), k=k)


def test_score_your_own_model_from_checkpoints_without_training(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    import sys

    import torch

    import datatrace.app.experiment as experiment

    p = _project(tmp_path)
    (tmp_path / "mymodel_ref.py").write_text(MODEL_FILE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(experiment, "sgd_train", None)  # training would fail loudly
    out = tmp_path / "top.csv"
    assert main(["score", *_own(tmp_path), "--top-k", "4", "--out", str(out)]) == 0
    idx, val = _read_top(out)
    values, indices = _expected_tracin(p, tmp_path, 4)
    assert idx == indices.tolist()
    torch.testing.assert_close(torch.tensor(val, dtype=torch.float64), values, rtol=1e-12, atol=0)
    sys.modules.pop("mymodel_ref", None)


def test_the_same_keys_in_a_config_relative_to_its_folder(tmp_path: Path, monkeypatch) -> None:
    import torch

    _project(tmp_path)
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "own.toml").write_text(
        "[model]\nfactory = '../mymodel.py:build'\ncheckpoints = '../ckpts/epoch*.pt'\n"
        "[data]\ntrain = '../train.npz'\nqueries = '../queries.npz'\n"
    )
    monkeypatch.chdir(tmp_path / "conf")
    flags = tmp_path / "flags.csv"
    config = tmp_path / "config.csv"
    assert main(["score", *_own(tmp_path), "--method", "graddot", "--out", str(flags)]) == 0
    assert main(["score", "own.toml", "--method", "graddot", "--out", str(config)]) == 0
    assert flags.read_text() == config.read_text()
    assert torch.tensor(_read_top(flags)[1]).abs().sum() > 0
    # a flag overrides the config's key
    other = tmp_path / "other.csv"
    assert main(["score", "own.toml", "--method", "graddot", "--queries",
                 str(tmp_path / "train.npz"), "--out", str(other)]) == 0  # fmt: skip
    assert len(_read_top(other)[0]) == 30


def test_data_files_and_image_folders_give_the_same_tensors(tmp_path: Path) -> None:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from datatrace.app.inputs import load_data

    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 3, 3, generator=g)
    y = torch.tensor([0, 2, 1, 1, 0, 2])
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=y.numpy())
    torch.save({"inputs": x, "labels": y}, tmp_path / "d.pt")
    torch.save((x, y), tmp_path / "t.pt")
    save_file({"x": x, "y": y}, str(tmp_path / "d.safetensors"))
    images = tmp_path / "images"
    images.mkdir()
    names = ["cat", "dog", "emu"]
    rows = ["filename,label"]
    for i in range(6):
        np.save(images / f"im{i}.npy", x[i, 0].numpy())
        rows.append(f"im{i}.npy,{names[int(y[i])]}")
    (images / "labels.csv").write_text("\n".join(rows) + "\n")
    for spec in ("d.npz", "d.pt", "t.pt", "d.safetensors", "images"):
        (xs, ys), classes = load_data(str(tmp_path / spec), "--train")
        assert torch.equal(xs, x) and torch.equal(ys, y), spec
        assert classes == (names if spec == "images" else None)
    # queries' named labels are numbered like the training set's, even with fewer classes
    (images / "labels.csv").write_text("im0.npy,emu\nim1.npy,emu\n")
    (_, yq), _ = load_data(str(images), "--queries", classes=names)
    assert yq.tolist() == [2, 2]
    # any other set of keys is a dict batch (Hugging Face style)
    ids = torch.arange(12).reshape(6, 2)
    save_file({"input_ids": ids, "labels": y}, str(tmp_path / "hf.safetensors"))
    batch, _ = load_data(str(tmp_path / "hf.safetensors"), "--train")
    assert set(batch) == {"input_ids", "labels"} and torch.equal(batch["input_ids"], ids)


def test_png_images_are_read_with_pillow(tmp_path: Path) -> None:
    import numpy as np
    import torch

    from datatrace.app.inputs import load_data

    image_module = pytest.importorskip("PIL.Image")  # Pillow is optional (.npy always works)
    pixels = np.array([[0, 255], [51, 102]], dtype=np.uint8)
    image_module.fromarray(pixels).save(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_text("a.png,1\n")
    (x, y), _ = load_data(str(tmp_path), "--train")
    assert torch.equal(x, torch.tensor([[[[0.0, 1.0], [0.2, 0.4]]]])) and y.tolist() == [1]


def _one_line_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("datatrace: error:"), err
    return err[0]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--model": "{root}/mymodel.py:nope"}, "must name a function"),
        ({"--model": "no_such_module_xyz:build"}, "cannot import 'no_such_module_xyz'"),
        ({"--model": "os:getcwd"}, "not of your own code"),
        ({"--model": "{root}/missing.py:build"}, "no such file"),
        ({"--model": "{root}/mymodel.py:not_a_model"}, "must return a torch.nn.Module"),
        ({"--model": "{root}/mymodel.py:broken"}, "RuntimeError: no GPU here"),
        ({"--model": "build"}, "must look like 'package.module:function'"),
        ({"--checkpoints": "{root}/nowhere/*.pt"}, "no checkpoint files match"),
        ({"--train": "{root}/missing.npz"}, "no such file"),
        ({"--train": "{root}/mymodel.py"}, "must be .npz, .pt or .safetensors"),
        ({"--train": "{root}/bad_shape.npz"}, "the model cannot take the examples of --train"),
        ({"--train": "{root}/bad_keys.npz"}, "give exactly one input key"),
        ({"--queries": "{root}/mymodel.py:data"}, "--queries"),  # float32 vs 4 features: ok
        ({"--method": "tracn"}, "did you mean 'tracin'"),
        ({"--task": "{root}/mymodel.py:model_not_task"}, "must return a datatrace task"),
        ({"--lr": "-1"}, "--lr must be > 0"),
    ],
)
def test_every_mistake_is_one_line_and_exit_status_2(
    tmp_path: Path, capsys, monkeypatch, change: dict[str, str], message: str
) -> None:
    import numpy as np

    _project(tmp_path)
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "bad_shape.npz", x=np.zeros((5, 3)), y=np.zeros(5, dtype=np.int64))
    np.savez(tmp_path / "bad_keys.npz", x=np.zeros((5, 4)), y=np.zeros(5), z=np.zeros(5))
    argv = _own(tmp_path)
    for flag, value in change.items():
        value = value.format(root=tmp_path)
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    if change.get("--queries") == "{root}/mymodel.py:data":
        # a function returning tensors is accepted: this one is fine (exit 0)
        assert main(["score", *argv]) == 0
        return
    assert message in _one_line_error(capsys, ["score", *argv])


def test_flags_that_need_a_model_say_so(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert "--train goes with --model" in _one_line_error(capsys, ["score", "--train", "x.npz"])
    assert "name your model and data" in _one_line_error(capsys, ["score"])
    _project(tmp_path)
    argv = _own(tmp_path)
    del argv[argv.index("--queries") : argv.index("--queries") + 2]
    assert "needs --queries" in _one_line_error(capsys, ["score", *argv])


def test_help_lists_the_registry_and_the_input_forms(capsys) -> None:
    from datatrace.app.registry import REGISTRY

    with pytest.raises(SystemExit):
        main(["score", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert f"one of: {', '.join(REGISTRY)}" in out
    assert "labels.csv" in out and "--checkpoints GLOB" in out


def test_the_built_in_experiment_is_trained_once_and_reused(
    tmp_path: Path, caplog, monkeypatch
) -> None:
    import logging

    import datatrace.app.experiment as experiment

    caplog.set_level(logging.INFO, logger="datatrace")
    monkeypatch.chdir(tmp_path)
    calls = []
    real = experiment.sgd_train

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(experiment, "sgd_train", counted)
    cfg = tmp_path / "iris.toml"
    cfg.write_text(IRIS_CONFIG)
    first, second = tmp_path / "1.csv", tmp_path / "2.csv"
    assert main(["score", str(cfg), "--out", str(first)]) == 0
    assert len(calls) == 1 and "trained the built-in model; cached in" in caplog.text
    caplog.clear()
    assert main(["score", str(cfg), "--method", "graddot", "--out", str(tmp_path / "g.csv")]) == 0
    assert main(["score", str(cfg), "--out", str(second)]) == 0
    assert len(calls) == 1  # not trained again
    assert "reusing the model trained by an earlier call (evaluate-out/trained-" in caplog.text
    assert first.read_text() == second.read_text()
    # other training settings: another cache entry, trained again
    cfg.write_text(IRIS_CONFIG.replace("epochs = 5", "epochs = 4"))
    assert main(["score", str(cfg), "--out", str(second)]) == 0
    assert len(calls) == 2 and len(list((tmp_path / "evaluate-out").iterdir())) == 2


# -- datatrace report on your own model ---------------------------------------------------------


@pytest.fixture
def captured_report(monkeypatch):
    """The report helper's ``write_report`` replaced by a recorder (the CLI's part is what
    it passes; the HTML itself is tested with the report)."""
    import datatrace.app.report as report

    calls: list[dict[str, object]] = []

    def write_report(path, **kwargs):
        calls.append({"path": path, **kwargs})
        Path(path).write_text("<html></html>")
        return Path(path)

    monkeypatch.setattr(report, "write_report", write_report, raising=False)
    return calls


def test_report_passes_scores_self_influence_and_a_cosine_view(
    tmp_path: Path, capsys, monkeypatch, captured_report
) -> None:
    import torch

    import datatrace as dt

    p = _project(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "noisy.txt").write_text("# flipped on purpose\n3, 7\n12\n")
    out = tmp_path / "r" / "report.html"
    argv = ["report", *_own(tmp_path), "--suspected", "noisy.txt", "--out", str(out),
            "--top", "3"]  # fmt: skip
    assert main(argv) == 0
    assert f"wrote {out}" in capsys.readouterr().err
    (call,) = captured_report
    model = p["model"]
    task = dt.ClassificationTask(model)
    ckpts = dt.Checkpoint.glob(tmp_path / "ckpts" / "epoch*.pt")
    train, queries = (p["x"], p["y"]), (p["xq"], p["yq"])
    tracin = dt.TracIn().fit(task, ckpts, train)
    assert torch.equal(call["scores"], tracin.attribute(queries))
    assert torch.equal(call["self_influence"], tracin.self_influence())
    cosine = dt.GradCos().fit(task, ckpts[-1:], train).attribute(queries)
    assert torch.equal(call["normalised_scores"], cosine)
    assert call["suspected"].tolist() == [3, 7, 12]
    assert torch.equal(call["train"][0], p["x"]) and torch.equal(call["queries"][1], p["yq"])
    assert call["path"] == out and call["method"] == "tracin" and call["top"] == 3
    assert call["rerun"].startswith("datatrace report --model ") and "--suspected" in call["rerun"]
    assert call["render"] is None and call["decode"] is None
    # a normalised method is its own cosine view
    assert main(["report", *_own(tmp_path), "--method", "gradcos", "--out", str(out)]) == 0
    assert captured_report[1]["normalised_scores"] is None


def test_report_mistakes_are_one_line_errors(
    tmp_path: Path, capsys, monkeypatch, captured_report
) -> None:
    _project(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "noisy.txt").write_text("3 30\n")
    (tmp_path / "words.txt").write_text("3 seven\n")
    for extra, message in (
        (["--suspected", "noisy.txt"], "index 30 is outside the training data (n_train = 30)"),
        (["--suspected", "words.txt"], "['seven'] are not training indices"),
        (["--suspected", "missing.txt"], "--suspected: cannot read"),
        (["--decode", "no_tokenizer"], "no such tokenizer folder"),
        (["--top", "0"], "--top must be >= 1"),
    ):
        assert message in _one_line_error(capsys, ["report", *_own(tmp_path), *extra])
    assert captured_report == []


def test_report_decodes_token_ids_with_a_local_tokenizer(tmp_path: Path) -> None:
    from transformers import BertTokenizer

    from datatrace.app.commands import load_decode

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "hello", "world"]) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(str(tmp_path / "tok"))
    decode = load_decode(str(tmp_path / "tok"))
    assert decode([2, 4, 5, 3, 0]) == "hello world"


def test_a_task_factory_for_regression(tmp_path: Path, monkeypatch) -> None:
    import sys

    import numpy as np
    import torch

    import datatrace as dt

    p = _project(tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tasks.py").write_text(
        "import datatrace as dt\ndef regression(model):\n    return dt.RegressionTask(model)\n"
    )
    g = torch.Generator().manual_seed(3)
    targets = torch.randn(30, 3, generator=g)  # float32 in the file: cast to the model's dtype
    np.savez(tmp_path / "reg.npz", x=p["x"].numpy(), y=targets.numpy())
    argv = ["score", "--model", f"{tmp_path / 'mymodel.py'}:build", "--task",
            f"{tmp_path / 'tasks.py'}:regression", "--train", "reg.npz", "--queries", "reg.npz",
            "--method", "graddot", "--top-k", "2", "--out", "top.csv"]  # fmt: skip
    assert main(argv) == 0
    idx, val = _read_top(tmp_path / "top.csv")
    monkeypatch.syspath_prepend(str(tmp_path))
    from mymodel import build  # type: ignore[import-not-found]

    monkeypatch.delitem(sys.modules, "mymodel")
    net = build()  # the factory's weights (no --checkpoints)
    data = (p["x"], targets.double())
    v, i = (
        dt.GradDot()
        .fit(dt.RegressionTask(net), [dt.Checkpoint.from_module(net)], data)
        .top_k(data, k=2)
    )
    assert idx == i.tolist()
    torch.testing.assert_close(torch.tensor(val, dtype=torch.float64), v, rtol=1e-12, atol=0)


def test_featurize_then_score_from_the_store_of_your_own_model(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    _project(tmp_path)
    monkeypatch.chdir(tmp_path)
    store = str(tmp_path / "store")
    argv = _own(tmp_path)
    train_only = argv[: argv.index("--queries")]
    assert main(["featurize", *train_only, "--store", store]) == 0
    assert "features of 30 training examples in" in capsys.readouterr().err
    with_store, without = tmp_path / "a.csv", tmp_path / "b.csv"
    assert main(["score", *argv, "--store", store, "--out", str(with_store)]) == 0
    assert main(["score", *argv, "--out", str(without)]) == 0
    assert with_store.read_text() == without.read_text()
    # other features (a projection) are another store: refused without --overwrite
    other = ["score", *argv, "--store", store, "--projection-dim", "8"]
    capsys.readouterr()
    assert "overwrite" in _one_line_error(capsys, other)


def test_a_lightning_prefix_is_named_with_the_flag_that_strips_it(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    import torch

    p = _project(tmp_path)
    monkeypatch.chdir(tmp_path)
    state = {f"model.{k}": v for k, v in p["model"].state_dict().items()}
    (tmp_path / "lightning").mkdir()
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "lightning" / "last.ckpt")
    argv = _own(tmp_path)
    argv[argv.index("--checkpoints") + 1] = str(tmp_path / "lightning" / "*.ckpt")
    assert "pass --strip-prefix model." in _one_line_error(capsys, ["score", *argv])
    assert main(["score", *argv, "--strip-prefix", "model."]) == 0


def test_a_model_factory_as_an_importable_module_of_the_current_folder(
    tmp_path: Path, monkeypatch
) -> None:
    import sys

    _project(tmp_path)
    (tmp_path / "cli_factory_pkg.py").write_text(MODEL_FILE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI adds the current folder
    monkeypatch.delitem(sys.modules, "cli_factory_pkg", raising=False)
    argv = _own(tmp_path)
    by_file, by_module = tmp_path / "f.csv", tmp_path / "m.csv"
    assert main(["score", *argv, "--method", "graddot", "--out", str(by_file)]) == 0
    argv[argv.index("--model") + 1] = "cli_factory_pkg:build"
    assert main(["score", *argv, "--method", "graddot", "--out", str(by_module)]) == 0
    assert by_file.read_text() == by_module.read_text()
    monkeypatch.delitem(sys.modules, "cli_factory_pkg")
