"""The package is in layers and imports only point down (the design's one rule of shape)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import datatrace as dt

SRC = Path(dt.__file__).parent
# lowest first; a module may import its own layer and the layers before it
# (metrics are pure functions over score tensors: low, so that sweeps and evaluations use them)
LAYERS = [
    "core",
    "metrics",
    "grads",
    "features",
    "curvature",
    "retrain",
    "truth",  # gold standards need only retraining; methods check themselves against them
    "methods",
    "integrations",
    "app",
]


def _layer(module: str) -> int:
    parts = module.split(".")
    assert parts[0] == "datatrace", module
    if len(parts) == 1:  # the package itself: the public API, for the application layer
        return LAYERS.index("app")
    return LAYERS.index(parts[1])


def _imports(path: Path) -> list[str]:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    package = parts if parts[-1] == "__init__" else parts[:-1]
    package = [p for p in package if p != "__init__"]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                if not node.module:  # from . import x: x may be a module
                    out += [f"{mod}.{a.name}" for a in node.names]
                    continue
                out.append(mod)
            elif node.module and node.module.startswith("datatrace"):
                out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("datatrace")]
    return out


def test_every_import_points_down_or_sideways() -> None:
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC.parent).with_suffix("")
        me = ".".join(p for p in rel.parts if p != "__init__")
        if me in ("datatrace", "datatrace.__main__"):
            continue
        for target in _imports(path):
            if _layer(target) > _layer(me):
                bad.append(f"{me} imports {target}")
    assert bad == []


def test_all_holds_library_names_only() -> None:
    for name in dt.__all__:
        obj = getattr(dt, name)
        module = getattr(obj, "__module__", None) or getattr(obj, "__name__", "")
        assert not module.startswith("datatrace.app"), name


def test_importing_datatrace_does_not_import_the_app_layer() -> None:
    code = "import sys, datatrace; print(any(m.startswith('datatrace.app') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_moved_application_modules_still_import_with_a_deprecation_warning() -> None:
    import pytest

    from datatrace.app import evaluate, problems

    with pytest.warns(DeprecationWarning, match=r"datatrace\.app\.evaluate"):
        assert dt.evaluate is evaluate
    with pytest.warns(DeprecationWarning, match=r"datatrace\.app\.problems"):
        assert dt.problems is problems
    with pytest.raises(AttributeError):
        _ = dt.no_such_name
