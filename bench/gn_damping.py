#!/usr/bin/env python
"""The Gauss–Newton family's default damping (issue 12): K-FAC, EK-FAC, DataInf, exact GN.

    python bench/gn_damping.py [--cache bench/out/defaults] [--out bench/out/gn_damping]

For each of bench/defaults.py's five tasks at both sizes (``FULL``: 400 examples, ``QUICK``:
200) and an ad-hoc sixth (``mlp_bc``, not in the suite: a 30-16-2 tanh MLP on breast
cancer, SGD momentum 0.9, weight decay 1e-3, 30 epochs, lr 0.05), each preconditioner's LDS
over a 37-point damping grid ``λ₀ × 10^(k/4)``, k = -20..16, with the fitted curvature
reused at every point (``with_damping``), beside the spectrum quantities a rule could use
(the exact GN's mean eigenvalue and quantiles, the K-FAC eigenvalues', the Hessian rule's
value). K-FAC and EK-FAC also get two per-layer families on their own factors: ``c ×`` each
layer's mean eigenvalue, and π-damping (factored Tikhonov, Martens and Grosse 2015:
``(S + π√λ)(A + √λ/π)``, ``π = sqrt((tr A/dim A)/(tr S/dim S))``, λ = c × λ₀). Then, for each
family ``c × Q``, the window of c that meets the target (≥ 95% of the grid's best LDS, or
within 0.02) on every (task, size). Results: bench/RESULTS.md ("Gauss–Newton family
damping"). Quality numbers only: the load does not change them.
"""

from __future__ import annotations

import argparse
import json
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import defaults
import numpy as np
import torch
from torch import nn

import datatrace as dt
from datatrace.curvature import dense

defaults.CLASSIFIERS.setdefault(
    "mlp_bc",
    ("breast_cancer", lambda: nn.Sequential(nn.Linear(30, 16), nn.Tanh(), nn.Linear(16, 2)),
     {"epochs": 30, "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}),
)  # fmt: skip
TASKS = ["logreg_bc", "mlp_sgd", "mlp_mom_wd", "cnn_digits", "mlp_diabetes", "mlp_bc"]
SIZES = {400: defaults.FULL, 200: defaults.QUICK}
MULT = [10 ** (k / 4) for k in range(-20, 17)]
QUANTILES = (0.5, 0.9, 0.99)


def measure(name: str, n: int, cache: Path) -> dict[str, Any]:
    """Every grid and quantity of one (task, size), in units of λ₀."""
    s = SIZES[n]
    t = defaults.build(name, s)
    gt = defaults.ground_truth(t, s, cache)

    def lds(S: torch.Tensor) -> float:
        if not bool(torch.isfinite(S).all()):
            return float("nan")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return float(dt.metrics.lds(S.double(), gt["masks"], gt["outputs"]).mean)

    def fit(method: Any) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return method.fit(t.task, t.ckpts[-1:], t.train, progress=False)

    def at(fitted: Any, make: Any) -> float:
        """LDS with the preconditioner ``make()`` (NaN where it cannot be formed)."""
        try:
            fitted.preconditioners[:] = [make()]
        except dt.ConfigError:  # e.g. a singular GN at a tiny damping
            return float("nan")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return lds(fitted.attribute(t.queries))

    lam0 = float(dt.mean_squared_gradient(t.task, t.ckpts[-1], t.train))
    out: dict[str, Any] = {"task": name, "n": n, "lambda0": lam0}
    out["hessian_rule"] = float(fit(dt.Influence(dt.ExactHessian())).damping[0]) / lam0
    keep = dense._fit_dense  # the exact GN keeps its undamped matrix, as damping="auto" does
    dense._fit_dense = lambda m, d, h, g: keep(m, d, h, dt.curvature.base.AUTO)  # type: ignore[assignment]
    try:
        methods = {"kfac": dt.Influence(dt.KFAC()), "ekfac": dt.Influence(dt.EKFAC()),
                   "datainf": dt.DataInf(), "gn": dt.Influence(dt.GaussNewton())}  # fmt: skip
        for label, method in methods.items():
            fitted = fit(method)
            pc = fitted.preconditioners[0]
            res: dict[str, Any] = {"default": float(fitted.damping[0]) / lam0,
                                   "lds_default": lds(fitted.attribute(t.queries))}  # fmt: skip
            res["grid"] = [at(fitted, lambda m=m: pc.with_damping(m * lam0)) for m in MULT]
            if label == "gn":
                ev = torch.linalg.eigvalsh(pc.undamped[0].double())
                out["gn_mean"] = float(ev.mean()) / lam0
                out["gn_quantiles"] = {q: float(torch.quantile(ev, q)) / lam0 for q in QUANTILES}
            if label in ("kfac", "ekfac"):
                res.update(kronecker_families(pc, lam0, lambda make: at(fitted, make)))
            out[label] = res
    finally:
        dense._fit_dense = keep
    return out


def kronecker_families(pc: Any, lam0: float, at: Any) -> dict[str, Any]:
    """Spectrum quantities of K-FAC/EK-FAC and the per-layer families' grids."""
    layers = pc.layers
    lam = torch.cat([lay.lam.flatten().double() for lay in layers])
    res: dict[str, Any] = {"mean": float(lam.mean()) / lam0, "spectrum": (lam / lam0).tolist()}
    res["quantiles"] = {q: float(torch.quantile(lam, q)) / lam0 for q in QUANTILES}
    means = [float(lay.lam.double().mean()) for lay in layers]
    factors = []
    for lay in layers:  # the factors' eigenvalues in the basis of lam, and π
        sv = torch.diagonal(lay.us.T @ lay.S @ lay.us).clamp_min(0)
        av = torch.diagonal(lay.ua.T @ lay.A @ lay.ua).clamp_min(0)
        pi = float(((lay.A.trace() / lay.A.shape[0]) / (lay.S.trace() / lay.S.shape[0])).sqrt())
        factors.append((sv, av, pi))

    def with_denominators(denoms: list[torch.Tensor]) -> Any:
        """(G + damping) with each layer's eigenvalue denominators given (damping 0)."""
        return replace(
            pc, layers=[replace(y, lam=d) for y, d in zip(layers, denoms, strict=True)], damping=0.0
        )

    def pi_damped(lam_: float) -> list[torch.Tensor]:
        r = lam_**0.5  # (s + π√λ)(a + √λ/π) = s a + λ + √λ (π a + s/π)
        return [y.lam + lam_ + r * (pi * av[None, :] + sv[:, None] / pi)
                for y, (sv, av, pi) in zip(layers, factors, strict=True)]  # fmt: skip

    check = at(lambda: with_denominators([y.lam + 3 * lam0 for y in layers]))
    if abs(check - at(lambda: pc.with_damping(3 * lam0))) > 1e-9:
        raise SystemExit("per-layer denominators do not reproduce with_damping")
    res["perlayer_mean"] = [
        at(
            lambda m=m: with_denominators(
                [y.lam + m * mu for y, mu in zip(layers, means, strict=True)]
            )
        )
        for m in MULT
    ]
    res["pi_lambda0"] = [at(lambda m=m: with_denominators(pi_damped(m * lam0))) for m in MULT]
    return res


def add_spectra(r: dict[str, Any]) -> bool:
    """Give a run saved before the spectra were kept its K-FAC/EK-FAC eigenvalues (× λ₀),
    refitted on the same build (no ground truth needed); True if it had none."""
    if all("spectrum" in r[m] for m in ("kfac", "ekfac")):
        return False
    t = defaults.build(r["task"], SIZES[r["n"]])
    for m, method in (("kfac", dt.Influence(dt.KFAC())), ("ekfac", dt.Influence(dt.EKFAC()))):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pc = method.fit(t.task, t.ckpts[-1:], t.train, progress=False).preconditioners[0]
        lam = torch.cat([lay.lam.flatten().double() for lay in pc.layers]) / r["lambda0"]
        if abs(float(lam.mean()) / r[m]["mean"] - 1) > 1e-3:
            raise SystemExit(f"{r['task']}-{r['n']}: the refit is not the saved {m} fit")
        r[m]["spectrum"] = lam.tolist()
    return True


def tail_mass(spectrum: list[float], c: float) -> float:
    """The damping below which the smallest eigenvalues hold a fraction ``c`` of the trace."""
    ev = np.sort(np.asarray(spectrum))
    return float(np.interp(c, np.cumsum(ev) / ev.sum(), ev))


def effective_dim(spectrum: list[float], c: float) -> float:
    """The damping λ at which ``Σ σ/(σ+λ)`` is ``c ×`` the number of non-zero eigenvalues."""
    ev = np.asarray(spectrum)
    target, lo, hi = c * (ev > 1e-9 * ev.max()).sum(), 1e-12 * ev.max(), 1e6 * ev.max()
    for _ in range(100):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if (ev / (ev + mid)).sum() > target else (lo, mid)
    return mid


def interp(ys: list[float], x: float) -> float:
    """LDS at damping ``x`` (× λ₀), linear in log damping between grid points."""
    return float(np.interp(np.log10(x), np.log10(MULT), np.array(ys, float)))


def best(r: dict[str, Any], m: str) -> float:
    return float(np.nanmax([*r[m]["grid"], r[m]["lds_default"]]))


def meets(v: float, b: float) -> bool:
    return v >= 0.95 * b or v >= b - 0.02


def scale(r: dict[str, Any], fam: str, m: str) -> float:
    """A family's quantity Q, × λ₀, for method ``m``."""
    if fam == "λ₀":
        return 1.0
    if fam == "own mean":  # K-FAC's/EK-FAC's own fitted eigenvalues: the default since
        return float(r[m]["mean"])  # the fifth session (curvature/damping.py)
    if fam == "Hessian rule":
        return float(r["hessian_rule"])
    if fam == "GN mean":
        return float(r["gn_mean"])
    if fam == "K-FAC mean":
        return float(r["kfac"]["mean"])
    if fam.startswith("GN q"):
        return float(r["gn_quantiles"][fam[4:]])
    return float(r["kfac"]["quantiles"][fam[7:]])  # "K-FAC q0.9"


def window(rs: list[dict[str, Any]], ok_at: Any, cs: list[float]) -> str:
    """The range of c meeting the target on every run, or the c failing fewest."""
    oks = [[ok_at(r, c) for c in cs] for r in rs]
    good = [c for i, c in enumerate(cs) if all(o[i] for o in oks)]
    if good:
        return f"[{min(good):.3g}, {max(good):.3g}]"
    fails = [sum(not o[i] for o in oks) for i in range(len(cs))]
    i = int(np.argmin(fails))
    names = [f"{r['task']}-{r['n']}" for r, o in zip(rs, oks, strict=True) if not o[i]]
    return f"none (c = {cs[i]:.3g} fails {fails[i]}: {', '.join(names)})"


def windows(rs: list[dict[str, Any]]) -> list[str]:
    cs = [10 ** (k / 16) for k in range(-96, 65)]
    fams = ["λ₀", "own mean", "GN mean", "K-FAC mean", "Hessian rule"]
    fams += [f"GN q{q}" for q in QUANTILES] + [f"K-FAC q{q}" for q in QUANTILES]
    lines = []
    for m in ("kfac", "ekfac", "gn", "datainf"):
        for fam in fams:
            if fam == "own mean" and m not in ("kfac", "ekfac"):
                continue
            w = window(
                rs, lambda r, c: meets(interp(r[m]["grid"], c * scale(r, fam, m)), best(r, m)), cs
            )
            lines.append(f"{m} c × {fam}: {w}")
        for label, rule in (
            ("tail mass c", tail_mass),
            ("effective dimension c × rank", effective_dim),
        ):
            if m not in ("kfac", "ekfac"):
                break
            w = window(rs, lambda r, c: meets(interp(r[m]["grid"], rule(r[m]["spectrum"], c)), best(r, m)),
                       [10 ** (k / 16) for k in range(-64, 1)])  # fmt: skip
            lines.append(f"{m} {label}: {w}")
        for key in ("perlayer_mean", "pi_lambda0") if m in ("kfac", "ekfac") else ():
            w = window(rs, lambda r, c: meets(r[m][key][MULT.index(c)], best(r, m)), MULT)
            lines.append(f"{m} {key} (c on the grid λ₀ × 10^(k/4)): {w}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default="bench/out/defaults")
    ap.add_argument("--out", default="bench/out/gn_damping")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rs = []
    for n in SIZES:
        for name in TASKS:
            path = out / f"{name}-{n}.json"
            if not path.exists():
                path.write_text(json.dumps(measure(name, n, Path(args.cache))))
            rs.append(r := json.loads(path.read_text()))
            if add_spectra(r):
                path.write_text(json.dumps(r))
            print(f"{name}-{n}: λ₀ {r['lambda0']:.3g}; " + "; ".join(
                f"{m} default {r[m]['lds_default']:.3f} / best {best(r, m):.3f}"
                for m in ("kfac", "ekfac", "datainf", "gn")), flush=True)  # fmt: skip
    suite = [r for r in rs if r["task"] != "mlp_bc"]
    print("\nthe five suite tasks, both sizes:", *windows(suite), sep="\n")
    print("\nwith the sixth task (mlp_bc):", *windows(rs), sep="\n")


if __name__ == "__main__":
    main()
