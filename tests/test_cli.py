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


def test_a_store_of_other_settings_is_an_error_that_overwrite_fixes(tmp_path: Path, capsys) -> None:
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


def test_an_output_path_under_a_file_is_a_one_line_error(tmp_path: Path, capsys) -> None:
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


def test_threads_must_be_a_positive_integer(tmp_path: Path, capsys) -> None:
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
