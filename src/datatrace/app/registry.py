"""THE registry: method names (as in configs and on the command line) → recipes.

The only place where a string selects behaviour. Adding a method is one line here (and a
recipe in :mod:`datatrace.methods.recipes`); see CONTRIBUTING.md."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..curvature import EKFAC, KFAC, Arnoldi, ConjugateGradient, ExactHessian, GaussNewton, LiSSA
from ..methods import TRAK, DataInf, GradCos, GradDot, Influence, TracIn

DAMPED = ("datainf", "exact", "gauss_newton", "cg", "lissa", "arnoldi", "kfac", "ekfac", "trak")


def method_variants(m: dict[str, Any]) -> list[tuple[str, str, float | None]]:
    """(label, method, damping) for every method and, for damped ones, every damping in
    ``m["damping"]`` (-1 = the default); labels carry the damping when several are given."""
    out = []
    for name in m["use"]:
        lams = m["damping"] if name in DAMPED else [-1.0]
        for lam in lams:
            value = None if lam < 0 else lam
            label = (
                name
                if len(lams) == 1
                else f"{name} λ={'default' if value is None else f'{value:g}'}"
            )
            out.append((label, name, value))
    return out


def make_method(name: str, m: dict[str, Any], lam: float | None = None) -> Any:
    table: dict[str, Callable[[], Any]] = {
        "graddot": GradDot,
        "gradcos": GradCos,
        "tracin": TracIn,
        "datainf": lambda: DataInf(damping=lam),
        "exact": lambda: Influence(ExactHessian(damping=lam)),
        "gauss_newton": lambda: Influence(GaussNewton(damping=lam)),
        "cg": lambda: Influence(ConjugateGradient(damping=lam, max_iter=m["cg_iters"])),
        "lissa": lambda: Influence(LiSSA(damping=lam, depth=m["lissa_depth"])),
        "arnoldi": lambda: Influence(Arnoldi(rank=m["arnoldi_rank"], damping=lam)),
        "kfac": lambda: Influence(KFAC(damping=lam)),
        "ekfac": lambda: Influence(EKFAC(damping=lam)),
        "trak": lambda: TRAK(projection_dim=m["trak_dim"], damping=lam),
    }
    return table[name]()
