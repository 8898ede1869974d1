"""THE registry: method names (as in configs and on the command line) → recipes.

The only place where a string selects behaviour. Each :class:`MethodEntry` says how to build
the method from :class:`MethodOptions` (the ``[methods]`` section of a config, the damping
being swept, the command line's projection options) and what the application layer needs
to know about it: whether it takes a damping, whether it uses every saved checkpoint (the
trajectory) or the final model, whether it takes first-order feature options.

Adding a method is one recipe (:mod:`datatrace.methods.recipes`) and one entry here; a
contributor's method can also be added at run time with :func:`register` (see
CONTRIBUTING.md). ``datatrace evaluate``, ``featurize`` and ``score`` pick it up unchanged.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import datatrace as dt  # lazy top-level names: recipes import torch only when built

from ..core.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from ..methods import GradientAttributor


@dataclass(frozen=True)
class MethodOptions:
    """Everything a registry entry may read to build its method."""

    damping: float | None = None
    #: ``None`` (or 0 in a config): the solver's own rule, as in the library
    cg_iters: int | None = None
    lissa_depth: int | None = None
    arnoldi_rank: int | None = None
    trak_dim: int = 512
    projection_dim: int | None = None
    feature_dtype: torch.dtype | None = None
    tf32: bool = False

    @classmethod
    def from_config(cls, methods: dict[str, Any], damping: float | None = None) -> MethodOptions:
        """Options from a resolved config's ``[methods]`` section."""
        keys = ("cg_iters", "lissa_depth", "arnoldi_rank", "trak_dim")
        given = {k: methods[k] for k in keys if k in methods}
        for k in ("cg_iters", "lissa_depth", "arnoldi_rank"):  # 0: the solver's default rule
            if given.get(k) == 0:
                given[k] = None
        return cls(damping=damping, **given)

    def first_order(self) -> dict[str, Any]:
        return {
            "projection_dim": self.projection_dim,
            "feature_dtype": self.feature_dtype,
            "tf32": self.tf32,
        }


@dataclass(frozen=True)
class MethodEntry:
    """How the application layer builds and runs one named method.

    Args:
        build: ``options -> method`` (an object with ``fit(task, checkpoints, train, ...)``).
        damped: it takes ``options.damping`` (swept over a config's ``[methods] damping``).
        trajectory: it uses every saved checkpoint (TracIn); otherwise the final model only.
        first_order: it takes the projection / feature-dtype / TF32 options.
        summary: one line for ``--help`` and the docs.
    """

    build: Callable[[MethodOptions], GradientAttributor]
    summary: str
    damped: bool = False
    trajectory: bool = False
    first_order: bool = False


def _influence(make: Callable[[MethodOptions], Any]) -> Callable[[MethodOptions], Any]:
    return lambda o: dt.Influence(make(o))


REGISTRY: dict[str, MethodEntry] = {
    "graddot": MethodEntry(
        lambda o: dt.GradDot(**o.first_order()), "gradient dot product", first_order=True
    ),
    "gradcos": MethodEntry(
        lambda o: dt.GradCos(**o.first_order()), "gradient cosine", first_order=True
    ),
    "tracin": MethodEntry(
        lambda o: dt.TracIn(**o.first_order()),
        "TracIn over the saved checkpoints",
        trajectory=True,
        first_order=True,
    ),
    "datainf": MethodEntry(lambda o: dt.DataInf(damping=o.damping), "DataInf", damped=True),
    "exact": MethodEntry(
        _influence(lambda o: dt.ExactHessian(damping=o.damping)), "exact Hessian IF", damped=True
    ),
    "gauss_newton": MethodEntry(
        _influence(lambda o: dt.GaussNewton(damping=o.damping)), "Gauss-Newton IF", damped=True
    ),
    "cg": MethodEntry(
        _influence(lambda o: dt.ConjugateGradient(damping=o.damping, max_iter=o.cg_iters)),
        "conjugate-gradient IF",
        damped=True,
    ),
    "lissa": MethodEntry(
        _influence(lambda o: dt.LiSSA(damping=o.damping, depth=o.lissa_depth)),
        "LiSSA IF",
        damped=True,
    ),
    "arnoldi": MethodEntry(
        _influence(lambda o: dt.Arnoldi(rank=o.arnoldi_rank, damping=o.damping)),
        "Arnoldi IF",
        damped=True,
    ),
    "kfac": MethodEntry(_influence(lambda o: dt.KFAC(damping=o.damping)), "K-FAC IF", damped=True),
    "ekfac": MethodEntry(
        _influence(lambda o: dt.EKFAC(damping=o.damping)), "EK-FAC IF", damped=True
    ),
    "trak": MethodEntry(
        lambda o: dt.TRAK(projection_dim=o.trak_dim, damping=o.damping), "TRAK", damped=True
    ),
}


def register(name: str, entry: MethodEntry) -> None:
    """Add a method under ``name`` (configs, ``evaluate``, ``featurize`` and ``score``)."""
    if not isinstance(entry, MethodEntry):
        raise ConfigError(
            f"register({name!r}, ...) needs a MethodEntry, got {type(entry).__name__}"
        )
    if name in REGISTRY:
        raise ConfigError(f"a method named {name!r} is already registered")
    REGISTRY[name] = entry


def entry(name: str) -> MethodEntry:
    """The registry entry of ``name``; an unknown name is a :class:`ConfigError` with a
    suggestion."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown method {name!r}" + suggest(name, list(REGISTRY)))
    return REGISTRY[name]


def suggest(word: str, options: list[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest option, else the list of options."""
    close = difflib.get_close_matches(word, options, n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(options)}"


def method_variants(m: dict[str, Any]) -> list[tuple[str, str, float | None]]:
    """``(label, name, damping)`` for every method of a config's ``[methods]`` section and,
    for damped methods, every damping listed (``-1``: datatrace's default)."""
    out = []
    for name in m["use"]:
        lams = m["damping"] if entry(name).damped else [-1.0]
        for lam in lams:
            value = None if lam < 0 else lam
            label = (
                name
                if len(lams) == 1
                else f"{name} λ={'default' if value is None else f'{value:g}'}"
            )
            out.append((label, name, value))
    return out


def make_method(name: str, m: dict[str, Any], lam: float | None = None) -> GradientAttributor:
    """The method ``name`` with a config's ``[methods]`` options and damping ``lam``."""
    return entry(name).build(MethodOptions.from_config(m, lam))
