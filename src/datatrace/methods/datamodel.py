"""Distilled Datamodel (Ye et al., CVPR 2024), as reconstructed in METHODS.md.

**Offline** (from saved checkpoints, or during training with :meth:`DistilledDatamodel.recorder`):
each group of training examples G_k gets a small synthetic set s_k (``synset_per_group``
inputs, initialised from real members, labels fixed, each standing for ``|G_k|/m`` real
examples). At every trajectory point θ_t, processed from the last to the first (the
"reverse" walk from the final model), the synthetic inputs are moved by Adam to minimise a
layer-wise gradient distance between the synset's contribution to the mean training loss
and the group's::

    D_k(θ_t) = Σ_layers ‖ĝ_k,l − g_k,l‖² / ‖g_k,l‖²
    g_k = (1/n) Σ_{i ∈ G_k} ∇ℓ(z_i; θ_t),   ĝ_k = (|G_k| / (n m)) Σ_{s ∈ s_k} ∇ℓ(s; θ_t)

(summed over groups, each trajectory point weighted by its checkpoint weight).

**Online**: the distilled objective ``L̂(θ) = Σ_k ĝ-weighted synset losses`` stands in for
the mean training loss. For group k, the final model is fast-learned for ``unlearn_steps``
gradient steps on ``L̂`` without s_k, and the reference model the same steps on all of
``L̂`` (the adjustment cancels drift of L̂ itself)::

    A[j, k] = f(z_j; θ₋ₖ) − f(z_j; θ₀)

the sign and units of every datatrace score (positive: removing group k raises the query's
loss). All K + 1 fast-learned models train together (stacked parameters, ``vmap``). A
datamodel mode drops random subsets of groups and fits a linear model from masks to
outputs; :meth:`FittedDistilledDatamodel.unlearn` returns the fast-unlearned module.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.func import grad, vmap

from ..core import persist
from ..core.checkpoint import Checkpoint
from ..core.data import ExampleSource
from ..core.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    StoreCorruptError,
    StoreMismatchError,
)
from ..core.runtime import eval_mode, model_device, show_progress
from ..core.task import AbstractTask
from ..grads.per_example import bound_model
from ..retrain import measure_stacked, stacked_sgd_step, subset_masks

# version 2: checksummed safetensors with their metadata inside (core.persist); version 1
# wrote fitted.json beside fitted.safetensors, and synsets without a checksum
_RUN_FORMAT = persist.StoreFormat(
    tag="datatrace-ddm-run",
    version=2,
    files=("synset.safetensors",),
    fix="use another store directory, or delete this one to distil again",
)
_FITTED_FORMAT = persist.StoreFormat(
    tag="datatrace-ddm",
    version=2,
    files=("fitted.safetensors",),
    fix="fit and save the Distilled Datamodel again",
)


def kmeans_groups(
    labels: torch.Tensor,
    features: torch.Tensor,
    clusters_per_class: int,
    seed: int = 0,
    iters: int = 50,
    min_size: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-wise k-means: group ids (n,) numbered class by class, and each group's class
    (the hierarchy class → cluster). Deterministic given ``seed`` (k-means++ start).
    Clusters smaller than ``min_size`` are dissolved into the others (so a synset of that
    many examples fits every group)."""
    labels = labels.flatten().long()
    x = features.reshape(len(features), -1).double()
    if len(x) != len(labels):
        raise DataError(f"{len(labels)} labels but {len(x)} feature rows")
    g = torch.Generator().manual_seed(seed)
    ids = torch.empty(len(x), dtype=torch.long)
    group_class: list[int] = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        k = max(1, min(clusters_per_class, len(members) // max(1, min_size)))
        xc = x[members]
        centres = xc[torch.randint(len(xc), (1,), generator=g)]
        while len(centres) < k:  # k-means++
            d2 = torch.cdist(xc, centres).min(1).values ** 2
            probs = d2 if float(d2.sum()) > 0 else torch.ones_like(d2)
            pick = torch.multinomial(probs / probs.sum(), 1, generator=g)
            centres = torch.cat([centres, xc[pick]])
        while True:
            for _ in range(iters):
                assign = torch.cdist(xc, centres).argmin(1)
                new = torch.stack(
                    [
                        xc[assign == j].mean(0) if (assign == j).any() else centres[j]
                        for j in range(len(centres))
                    ]
                )
                if torch.allclose(new, centres):
                    break
                centres = new
            assign = torch.cdist(xc, centres).argmin(1)
            counts = torch.bincount(assign, minlength=len(centres))
            if len(centres) == 1 or int(counts.min()) >= min_size:
                break
            centres = centres[torch.arange(len(centres)) != int(counts.argmin())]
        for j in torch.unique(assign).tolist():
            ids[members[assign == j]] = len(group_class)
            group_class.append(int(c))
    return ids, torch.tensor(group_class)


def _split(batch: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise DataError(
            f"the Distilled Datamodel needs {what} as (inputs, labels) tensors; got "
            f"{type(batch).__name__}"
        )
    x, y = batch
    if not torch.is_floating_point(x):
        raise DataError(f"{what} inputs must be floating point (they are optimised)")
    return x, y


@dataclass
class DistilledDatamodel:
    """Distilled Datamodel settings.

    Args:
        groups: group id of every training example (LongTensor (n,), ids 0..K-1, every
            group non-empty); ``None``: class-wise k-means on the inputs,
            ``clusters_per_class`` per class.
        synset_per_group: synthetic examples per group (m ≤ the smallest group).
        steps_per_point: Adam steps on the synsets at each trajectory point.
        lr: Adam learning rate, in units of the inputs' standard deviation.
        unlearn_steps, unlearn_lr, unlearn_momentum: online fast-learning: heavy-ball
            gradient steps, their step size (``None``: 1 / the largest eigenvalue of the
            distilled Hessian at θ_T, by power iteration during ``fit``) and momentum.
        weight_decay: the L2 coefficient of training (``α‖θ‖²`` → ``weight_decay=2α``), kept
            in the fast-learned objective.
        seed: synset initialisation and k-means seed.
    """

    groups: torch.Tensor | None = None
    synset_per_group: int = 4
    clusters_per_class: int = 2
    steps_per_point: int = 30
    lr: float = 0.05
    unlearn_steps: int = 20
    unlearn_lr: float | None = None
    unlearn_momentum: float = 0.8
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("synset_per_group", "clusters_per_class", "unlearn_steps"):
            if not int(getattr(self, name)) >= 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.steps_per_point < 0 or not self.lr > 0 or self.weight_decay < 0:
            raise ConfigError("steps_per_point >= 0, lr > 0 and weight_decay >= 0 are required")
        if self.unlearn_lr is not None and not self.unlearn_lr > 0:
            raise ConfigError(f"unlearn_lr must be > 0, got {self.unlearn_lr!r}")
        if not 0 <= self.unlearn_momentum < 1:
            raise ConfigError(f"unlearn_momentum must be in [0, 1), got {self.unlearn_momentum!r}")

    # -- offline -------------------------------------------------------------------------

    def fit(
        self,
        task: AbstractTask,
        checkpoints: Sequence[Checkpoint],
        train: Any,
        *,
        store: str | os.PathLike[str] | None = None,
        progress: bool | None = None,
    ) -> FittedDistilledDatamodel:
        """Distil from saved checkpoints (weights = their learning rates), last first. With
        ``store=DIR`` the synsets are saved after every trajectory point (one checksummed
        safetensors file) and an interrupted fit resumes there, with the same result; a
        second fit of the same store waits for the first (it holds the store's lock)."""
        if not checkpoints:
            raise CheckpointError("no checkpoints given")
        src = ExampleSource(train, "training data")
        with eval_mode(task.model):  # dropout off, batch-norm statistics frozen
            distiller = _Distiller(self, task, src, checkpoints[-1])
            points = list(reversed(list(checkpoints)))
            distiller.run(
                [(c.parameters_for(task.model, distiller.device)[0], c.weight) for c in points],
                [c.fingerprint() for c in points],
                store,
                progress,
            )
            return distiller.fitted()

    def recorder(self, task: AbstractTask, train: Any, every: int = 1) -> Recorder:
        """For use inside a training loop: ``rec.observe(model, batch_indices, lr)`` after
        every step (it snapshots θ every ``every`` steps, weighted by the learning rate
        summed since the last snapshot), then ``rec.finish(model)`` distils."""
        return Recorder(self, task, ExampleSource(train, "training data"), every)


@dataclass
class Recorder:
    ddm: DistilledDatamodel
    task: AbstractTask
    train: ExampleSource
    every: int
    points: list[Checkpoint] = field(default_factory=list)
    _steps: int = 0
    _lr_sum: float = 0.0

    def observe(self, model: nn.Module, batch_indices: Any = None, lr: float = 1.0) -> None:
        """Record one training step (``batch_indices`` is accepted for API symmetry; the
        group targets use whole groups, so it is not needed)."""
        self._steps += 1
        self._lr_sum += float(lr)
        if self._steps % self.every == 0:
            self.points.append(Checkpoint.from_module(model, weight=self._lr_sum))
            self._lr_sum = 0.0

    def finish(
        self, model: nn.Module, store: str | os.PathLike[str] | None = None
    ) -> FittedDistilledDatamodel:
        points = list(self.points)
        if not points or self._lr_sum > 0:
            points.append(Checkpoint.from_module(model, weight=max(self._lr_sum, 1e-12)))
        return self.ddm.fit(self.task, points, self.train, store=store)


class _Distiller:
    def __init__(
        self, ddm: DistilledDatamodel, task: AbstractTask, train: ExampleSource, final: Checkpoint
    ) -> None:
        self.ddm, self.task, self.train = ddm, task, train
        self.device = model_device(task.model)
        x, y = _split(train.batch(0, len(train)), "the training data")
        self.x, self.y = x.to(self.device), y.to(self.device)
        n = len(train)
        self.group_class: torch.Tensor | None = None
        if ddm.groups is None:
            ids, self.group_class = kmeans_groups(
                y.cpu(), x.cpu(), ddm.clusters_per_class, ddm.seed, min_size=ddm.synset_per_group
            )
        else:
            ids = torch.as_tensor(ddm.groups).long().cpu()
            if ids.dim() != 1:
                raise DataError(
                    "groups must be one group id per training example (1-D); for overlapping "
                    "or partial groups use dt.truth.group_leave_out's index lists instead"
                )
            if ids.numel() != n:
                raise DataError(f"groups has {ids.numel()} entries for {n} training examples")
            if int(ids.min()) < 0:
                raise DataError("group ids must be >= 0")
        sizes = torch.bincount(ids)
        empty = torch.nonzero(sizes == 0).flatten().tolist()
        if empty:
            raise DataError(f"groups {empty[:10]} are empty; number groups 0..K-1")
        m = ddm.synset_per_group
        small = torch.nonzero(sizes < m).flatten().tolist()
        if small:
            raise DataError(
                f"synset_per_group={m} is larger than groups {small[:10]} (sizes "
                f"{sizes[small[:10]].tolist()}); use a smaller m or larger groups"
            )
        self.ids, self.sizes, self.n, self.k = ids, sizes, n, len(sizes)
        g = torch.Generator().manual_seed(ddm.seed)
        init = torch.stack(
            [
                torch.nonzero(ids == k).flatten()[torch.randperm(int(sizes[k]), generator=g)[:m]]
                for k in range(self.k)
            ]
        )
        self.init_index = init  # (K, m) training indices
        self.syn_x = self.x[init.to(self.device)].clone()  # (K, m, ...)
        self.syn_y = self.y[init.to(self.device)].clone()
        self.weights = (sizes.double() / (n * m)).to(self.device, self.x.dtype)  # (K,)
        self.scale = float(self.x.std()) or 1.0
        self.names = [nm for nm, p in task.model.named_parameters() if p.requires_grad]
        self.final = final
        self.history: list[tuple[float, float]] = []  # (objective before, after) per point

    # per-example loss of one synthetic / real example under params
    def _loss1(
        self,
        params: dict[str, torch.Tensor],
        fixed: dict[str, torch.Tensor],
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> torch.Tensor:
        model = bound_model(self.task.model, {**fixed, **params})
        return self.task.loss(model, (x[None], y[None]))[0]

    def group_targets(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """g_k = (1/n) Σ_{i ∈ G_k} ∇ℓ_i at θ, per parameter: (K, *shape)."""
        params = {nm: state[nm].detach() for nm in self.names}
        fixed = {k: v for k, v in state.items() if k not in params}
        out = {
            nm: torch.zeros(self.k, *p.shape, dtype=p.dtype, device=p.device)
            for nm, p in params.items()
        }
        ids = self.ids.to(self.device)
        for s in range(0, self.n, 512):
            xb, yb, gb = self.x[s : s + 512], self.y[s : s + 512], ids[s : s + 512]
            per = vmap(grad(self._loss1), in_dims=(None, None, 0, 0))(params, fixed, xb, yb)
            for nm, t in per.items():
                out[nm].index_add_(0, gb, t)
        return {nm: t / self.n for nm, t in out.items()}

    def objective(
        self, syn_x: torch.Tensor, state: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        params = {nm: state[nm].detach() for nm in self.names}
        fixed = {k: v for k, v in state.items() if k not in params}
        k, m = syn_x.shape[:2]
        flat_x = syn_x.reshape(k * m, *syn_x.shape[2:])
        flat_y = self.syn_y.reshape(k * m, *self.syn_y.shape[2:])
        per = vmap(grad(self._loss1), in_dims=(None, None, 0, 0))(params, fixed, flat_x, flat_y)
        total = syn_x.new_zeros(())
        for nm, t in per.items():
            ghat = t.reshape(k, m, -1).sum(1) * self.weights[:, None]
            g = target[nm].reshape(k, -1)
            denom = (g * g).sum(1) + 1e-12 * float((g * g).sum(1).max()) + 1e-30
            total = total + (((ghat - g) ** 2).sum(1) / denom).sum()
        return total

    def run(
        self,
        points: list[tuple[dict[str, torch.Tensor], float]],
        fingerprints: list[str],
        store: str | os.PathLike[str] | None,
        progress: bool | None,
    ) -> None:
        if store is None:
            self._run(points, fingerprints, None, progress)
            return
        path = Path(store)
        persist.make_folder(path)
        with persist.locked(path):  # another fitter of this store waits, then resumes its end
            self._run(points, fingerprints, path, progress)

    def _run(
        self,
        points: list[tuple[dict[str, torch.Tensor], float]],
        fingerprints: list[str],
        path: Path | None,
        progress: bool | None,
    ) -> None:
        ddm = self.ddm
        syn = self.syn_x.clone().requires_grad_(True)
        opt = torch.optim.Adam([syn], lr=ddm.lr * self.scale)
        start = 0
        settings = self._settings(fingerprints)
        if path is not None and (path / "synset.safetensors").exists():
            start = self._resume(path, settings, syn, opt)
        total_w = sum(w for _, w in points) or 1.0
        it = range(start, len(points))
        if show_progress(progress):
            from tqdm.auto import tqdm

            it = tqdm(it, desc="distilling", unit="point", initial=start, total=len(points))
        for p in it:
            state, weight = points[p]
            target = self.group_targets(state)
            before = float(self.objective(syn.detach(), state, target))
            # Adam ignores the scale of the loss: weight each point through its step size
            for group in opt.param_groups:
                group["lr"] = ddm.lr * self.scale * weight / total_w * len(points)
            for _ in range(ddm.steps_per_point):
                opt.zero_grad()
                loss = self.objective(syn, state, target)
                loss.backward()
                opt.step()
            after = float(self.objective(syn.detach(), state, target))
            self.history.append((before, after))
            if path is not None:
                self._save(path, settings, syn, opt, p + 1)
        self.syn_x = syn.detach()

    def _settings(self, fingerprints: list[str]) -> dict[str, Any]:
        d = asdict(self.ddm)
        d["groups"] = None if self.ddm.groups is None else "given"
        return {
            "ddm": d,
            "group_ids": self.ids.tolist(),
            "train": self.train.fingerprint(),
            "points": fingerprints,
        }

    def _save(
        self,
        path: Path,
        settings: dict[str, Any],
        syn: torch.Tensor,
        opt: torch.optim.Optimizer,
        done: int,
    ) -> None:
        st = opt.state[syn]
        tensors = {
            "syn_x": syn.detach().cpu().contiguous(),
            "syn_y": self.syn_y.cpu().contiguous(),
            "weights": self.weights.cpu(),
            "group_ids": self.ids,
            "init_index": self.init_index,
        }
        if st:
            tensors.update(
                exp_avg=st["exp_avg"].cpu(),
                exp_avg_sq=st["exp_avg_sq"].cpu(),
                adam_step=torch.as_tensor(st["step"]).reshape(1).double(),
            )
        meta = {
            "format": _RUN_FORMAT.tag,
            "version": _RUN_FORMAT.version,
            "settings": settings,
            "done": done,
            "history": self.history,
        }
        # one file, one atomic rename: the synsets, the optimizer and the progress together
        persist.save_tensors(path / "synset.safetensors", tensors, meta)

    def _resume(
        self, path: Path, settings: dict[str, Any], syn: torch.Tensor, opt: torch.optim.Optimizer
    ) -> int:
        f = path / "synset.safetensors"
        tensors, meta = persist.load_tensors(f, _RUN_FORMAT, _RUN_FORMAT.fix)
        diffs = persist.diff(meta.get("settings"), persist.as_json(settings))
        if diffs:
            raise StoreMismatchError(
                f"the synset in {path} was distilled with other settings: "
                + "; ".join(diffs[:6])
                + f". {_RUN_FORMAT.fix}"
            )
        if not isinstance(meta.get("done"), int) or "syn_x" not in tensors:
            raise StoreCorruptError(f"{f} has no synset or progress; {_RUN_FORMAT.fix}")
        with torch.no_grad():
            syn.copy_(tensors["syn_x"].to(syn))
        if "exp_avg" in tensors:
            opt.state[syn] = {
                "step": torch.tensor(float(tensors["adam_step"][0])),
                "exp_avg": tensors["exp_avg"].to(syn),
                "exp_avg_sq": tensors["exp_avg_sq"].to(syn),
            }
        self.history = [(float(h[0]), float(h[1])) for h in meta.get("history", [])]
        return int(meta["done"])

    def fitted(self) -> FittedDistilledDatamodel:
        return FittedDistilledDatamodel(
            self.task,
            self.final,
            self.syn_x,
            self.syn_y,
            self.weights,
            self.ids,
            self.ddm,
            history=list(self.history),
        )


class FittedDistilledDatamodel:
    """Synsets distilled for one training run; attribute, unlearn, datamodel, save/load."""

    def __init__(
        self,
        task: AbstractTask,
        final: Checkpoint,
        syn_x: torch.Tensor,
        syn_y: torch.Tensor,
        weights: torch.Tensor,
        group_ids: torch.Tensor,
        ddm: DistilledDatamodel,
        history: list[tuple[float, float]] | None = None,
    ) -> None:
        self.task, self.final, self.ddm = task, final, ddm
        self.syn_x, self.syn_y, self.weights = syn_x.detach(), syn_y, weights
        self.group_ids = group_ids
        self.k = syn_x.shape[0]
        self.history = history or []
        self.device = model_device(task.model)
        params, buffers = final.parameters_for(task.model, self.device)
        self.names = [nm for nm, p in task.model.named_parameters() if p.requires_grad]
        self.start = {nm: params[nm].detach() for nm in self.names}
        self.fixed = {**buffers, **{k: v for k, v in params.items() if k not in self.start}}
        self._lr: float | None = ddm.unlearn_lr
        self.group_class: torch.Tensor | None = None  # k-means groups: each group's class

    @property
    def n_groups(self) -> int:
        return self.k

    # -- the distilled objective ----------------------------------------------------------

    def _sample_losses(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per synthetic example losses (K·m,) under one parameter set."""
        k, m = self.syn_x.shape[:2]
        model = bound_model(self.task.model, {**self.fixed, **params})
        x = self.syn_x.reshape(k * m, *self.syn_x.shape[2:])
        y = self.syn_y.reshape(k * m, *self.syn_y.shape[2:])
        return self.task.loss(model, (x, y))

    def _step_size(self) -> float:
        if self._lr is None:
            with eval_mode(self.task.model):
                self._lr = self._power_step()
        return self._lr

    def _power_step(self) -> float:
        """1 / the largest eigenvalue of the distilled objective's Hessian at θ_T."""
        m = self.syn_x.shape[1]
        w = self.weights.repeat_interleave(m)

        def total(params: dict[str, torch.Tensor]) -> torch.Tensor:
            return (self._sample_losses(params) * w).sum()

        gen = torch.Generator().manual_seed(0)
        v = {
            nm: torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)
            for nm, p in self.start.items()
        }
        top = 1.0
        for _ in range(30):
            norm = math.sqrt(sum(float((t * t).sum()) for t in v.values())) or 1.0
            v = {nm: t / norm for nm, t in v.items()}
            hv = torch.func.jvp(grad(total), (self.start,), (v,))[1]
            top = math.sqrt(sum(float((t * t).sum()) for t in hv.values()))
            v = hv
        return 1.0 / (top + self.ddm.weight_decay + 1e-12)

    def _fast_learn(self, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        """Train R models from θ_T at once, model r on the groups where ``keep[r]`` (R, K)
        is True; returns stacked parameters (R, ...)."""
        r_models, m = keep.shape[0], self.syn_x.shape[1]
        w = (self.weights[None, :] * keep.to(self.weights)).repeat_interleave(m, dim=1)  # (R, K·m)
        params = {
            nm: p.unsqueeze(0).repeat(r_models, *[1] * p.dim()) for nm, p in self.start.items()
        }
        velocity = {nm: torch.zeros_like(p) for nm, p in params.items()}
        lr, wd, mu = self._step_size(), self.ddm.weight_decay, self.ddm.unlearn_momentum
        per_model = vmap(self._sample_losses)
        with eval_mode(self.task.model), torch.enable_grad():  # also when called under no_grad
            for _ in range(self.ddm.unlearn_steps):
                live = {nm: p.detach().requires_grad_(True) for nm, p in params.items()}
                loss = (per_model(live) * w).sum()
                grads = torch.autograd.grad(loss, list(live.values()))
                stacked_sgd_step(params, grads, velocity, lr, mu, wd)
        return params

    def _measure(self, params: dict[str, torch.Tensor], queries: ExampleSource) -> torch.Tensor:
        """(n_query, R) measurements of the stacked models."""
        return measure_stacked(self.task, self.fixed, params, queries, self.device)

    # -- online --------------------------------------------------------------------------

    def attribute(
        self, queries: Any, groups: Sequence[int] | None = None, chunk: int = 64
    ) -> torch.Tensor:
        """``A[j, k] = f(z_j; θ₋ₖ) − f(z_j; θ₀)``, (n_query, n_groups) (or the given groups)."""
        q = ExampleSource(queries, "queries")
        if len(q) == 0:
            raise DataError("the queries are empty")
        chosen = list(range(self.k)) if groups is None else [int(g) for g in groups]
        if not chosen:
            raise ConfigError("groups is empty")
        if any(not 0 <= g < self.k for g in chosen):
            raise ConfigError(f"group indices must be within [0, {self.k})")
        cols = []
        for s in range(0, len(chosen), chunk):
            part = chosen[s : s + chunk]
            # row 0: the reference θ₀ (all groups), trained in the same stack as the others
            keep = torch.ones(len(part) + 1, self.k, dtype=torch.bool)
            keep[torch.arange(1, len(part) + 1), torch.tensor(part)] = False
            out = self._measure(self._fast_learn(keep), q).double()
            cols.append(out[:, 1:] - out[:, :1])
        return torch.cat(cols, dim=1).cpu()

    def unlearn(self, k: Any) -> nn.Module:
        """A copy of the model with group(s) ``k`` fast-unlearned (θ₋ₖ)."""
        drop = [int(g) for g in k] if isinstance(k, (list, tuple)) else [int(k)]
        if any(not 0 <= g < self.k for g in drop):
            raise ConfigError(f"group indices must be within [0, {self.k})")
        keep = torch.ones(1, self.k, dtype=torch.bool)
        keep[0, drop] = False
        params = self._fast_learn(keep)
        model = copy.deepcopy(self.task.model)
        model.load_state_dict(
            {**self.fixed, **{nm: p[0] for nm, p in params.items()}}, strict=False
        )
        return model

    def datamodel(
        self,
        queries: Any,
        n_subsets: int = 64,
        fraction: float = 0.5,
        seed: int = 0,
        ridge: float = 1e-3,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Datamodel mode: fast-learn on random subsets of groups (``fraction`` of them
        kept), and fit per query the linear datamodel of the removal effects,
        ``f(θ_S) − f(θ₀) ≈ Σ_{k ∉ S} A[j, k]`` (least squares, ``ridge`` on A). Returns
        ``(A, masks, outputs)``: A (n_query, K) in the units of :meth:`attribute`, masks
        bool (n_subsets, K) (True = kept), outputs (n_subsets, n_query)."""
        q = ExampleSource(queries, "queries")

        masks = subset_masks(self.k, n_subsets, fraction, seed)
        outs = []
        for s in range(0, n_subsets, 64):
            outs.append(self._measure(self._fast_learn(masks[s : s + 64]), q))
        outputs = torch.cat(outs, dim=1).T.double().cpu()  # (n_subsets, n_query)
        full = torch.ones(1, self.k, dtype=torch.bool)
        base = self._measure(self._fast_learn(full), q)[:, 0].double().cpu()
        removed = (~masks).double()
        reg = ridge * torch.eye(self.k, dtype=torch.float64)
        coef = torch.linalg.solve(removed.T @ removed + reg, removed.T @ (outputs - base))
        return coef.T.contiguous(), masks, outputs

    def group_scores_to_examples(self, scores: torch.Tensor) -> torch.Tensor:
        """Spread group scores to examples (n_query, n_train): each example gets its group's
        score divided by the group size (so they sum back to the group's)."""
        sizes = torch.bincount(self.group_ids, minlength=self.k).double()
        return (scores / sizes)[:, self.group_ids]

    # -- persistence -----------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the synsets and their settings to directory ``path`` (one checksummed
        safetensors file, ``fitted.safetensors``, replaced atomically)."""
        p = Path(path)
        persist.make_folder(p)
        d = asdict(self.ddm)
        d["groups"] = None
        meta = {
            "format": _FITTED_FORMAT.tag,
            "version": _FITTED_FORMAT.version,
            "ddm": d,
            "final": self.final.fingerprint(),
            "history": self.history,
            "step_size": self._step_size(),
        }
        tensors = {
            "syn_x": self.syn_x,
            "syn_y": self.syn_y,
            "weights": self.weights,
            "group_ids": self.group_ids,
        }
        persist.save_tensors(p / "fitted.safetensors", tensors, meta)
        (p / "fitted.json").unlink(missing_ok=True)  # a version-1 save's metadata: now stale

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], task: AbstractTask, final: Checkpoint
    ) -> FittedDistilledDatamodel:
        """Read what :meth:`save` wrote; ``final`` must be the checkpoint it was fitted at."""
        p = Path(path)
        if (p / "fitted.json").exists():
            raise StoreMismatchError(
                f"{p} was saved by an older datatrace (Distilled Datamodel format version 1, "
                f"this one reads {_FITTED_FORMAT.version}); {_FITTED_FORMAT.fix}"
            )
        if not (p / "fitted.safetensors").exists():
            raise StoreCorruptError(
                f"cannot read a fitted Distilled Datamodel from {p}: no fitted.safetensors; "
                "pass the directory given to save()"
            )
        t, meta = persist.load_tensors(p / "fitted.safetensors", _FITTED_FORMAT, _FITTED_FORMAT.fix)
        if meta.get("final") != final.fingerprint():
            raise StoreMismatchError(
                f"{p} was fitted at another final checkpoint ({meta.get('final')}, given "
                f"{final.fingerprint()}); pass that checkpoint, or fit again at this one"
            )
        if not {"syn_x", "syn_y", "weights", "group_ids"} <= set(t) or "ddm" not in meta:
            raise StoreCorruptError(
                f"{p / 'fitted.safetensors'} is incomplete; {_FITTED_FORMAT.fix}"
            )
        try:
            ddm = DistilledDatamodel(**{**meta["ddm"], "groups": t["group_ids"]})
        except (TypeError, ConfigError) as exc:
            raise StoreCorruptError(
                f"{p / 'fitted.safetensors'} holds unusable settings ({exc}); {_FITTED_FORMAT.fix}"
            ) from exc
        dev = model_device(task.model)
        out = cls(
            task,
            final,
            t["syn_x"].to(dev),
            t["syn_y"].to(dev),
            t["weights"].to(dev),
            t["group_ids"],
            ddm,
            [(float(a), float(b)) for a, b in meta.get("history", [])],
        )
        out._lr = meta.get("step_size", out._lr)
        return out
