"""The Distilled Datamodel's offline phase: group the training data (:func:`kmeans_groups`)
and distil one small synthetic set per group by reverse gradient matching along the
training trajectory (:class:`_Distiller`), resumable from a checksummed run store."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.func import grad, vmap

from ..core import distributed, persist
from ..core.checkpoint import Checkpoint
from ..core.data import ExampleSource
from ..core.errors import (
    DataError,
    StoreCorruptError,
    StoreError,
    StoreMismatchError,
)
from ..core.fingerprint import model_fingerprint, task_fingerprint
from ..core.loop import over_batches
from ..core.runtime import model_device, show_progress
from ..core.task import AbstractTask
from ..grads.per_example import bound_model
from .ddm_fitted import FittedDistilledDatamodel, fit_fingerprint, trained_and_buffers

if TYPE_CHECKING:
    from .datamodel import DistilledDatamodel

log = logging.getLogger("datatrace")


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


def synset_sizes(sizes: torch.Tensor, m: int, fraction: float) -> torch.Tensor:
    """Synthetic examples per group: ``m_k = min(|G_k|, max(m, ceil(fraction · |G_k|)))``
    (every member of a group smaller than m; a fixed share of a large group)."""
    sizes = sizes.long()
    share = torch.ceil(sizes.double() * fraction).long()
    return torch.minimum(sizes, torch.clamp(share, min=m))


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


# version 2: checksummed safetensors with their metadata inside (core.persist); version 1
# wrote fitted.json beside fitted.safetensors, and synsets without a checksum
_RUN_FORMAT = persist.StoreFormat(
    tag="datatrace-ddm-run",
    version=2,
    files=("synset.safetensors",),
    fix="use another store directory, or delete this one to distil again",
)


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
        per_group = synset_sizes(sizes, ddm.synset_per_group, ddm.synset_fraction)
        m = int(per_group.max())
        small = torch.nonzero(sizes < ddm.synset_per_group).flatten().tolist()
        if small:
            log.info(
                "Distilled Datamodel: %d group(s) smaller than synset_per_group=%d (e.g. "
                "groups %s of sizes %s) get a synset of every member, min(m, |G_k|)",
                len(small),
                ddm.synset_per_group,
                small[:10],
                sizes[small[:10]].tolist(),
            )
        big = torch.nonzero(per_group > ddm.synset_per_group).flatten().tolist()
        if big:
            log.info(
                "Distilled Datamodel: %d group(s) larger than synset_per_group / "
                "synset_fraction get ceil(%g |G_k|) synthetic examples (groups %s: sizes %s "
                "-> synsets %s)",
                len(big),
                ddm.synset_fraction,
                big[:10],
                sizes[big[:10]].tolist(),
                per_group[big[:10]].tolist(),
            )
        self.ids, self.sizes, self.n, self.k = ids, sizes, n, len(sizes)
        g = torch.Generator().manual_seed(ddm.seed)
        # (K, m) training indices; a group of m_k < m members fills its m slots by cycling
        # through them, and only its first m_k slots carry weight (the rest are padding)
        init = []
        for k in range(self.k):
            members = torch.nonzero(ids == k).flatten()[torch.randperm(int(sizes[k]), generator=g)]
            init.append(members[torch.arange(m) % len(members)])
        self.init_index = torch.stack(init)
        self.syn_x = self.x[self.init_index.to(self.device)].clone()  # (K, m, ...)
        self.syn_y = self.y[self.init_index.to(self.device)].clone()
        #: weight of each synthetic example in ĝ_k, (K, m): |G_k| / (n m_k), 0 on padding
        live = torch.arange(m)[None, :] < per_group[:, None]
        weights = live.double() * (sizes.double() / (n * per_group.double()))[:, None]
        self.weights = weights.to(self.device, self.x.dtype)
        self.scale = float(self.x.std()) or 1.0
        self.names = [nm for nm, p in task.model.named_parameters() if p.requires_grad]
        self.final = final
        #: state names every trajectory point holds (buffers not among them: the model's)
        self.held: set[str] = set(final.state)
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
        for s, e, (xb, yb) in over_batches(ExampleSource((self.x, self.y)), 512):
            per = vmap(grad(self._loss1), in_dims=(None, None, 0, 0))(params, fixed, xb, yb)
            gb = ids[s:e]
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
            ghat = (t.reshape(k, m, -1) * self.weights[:, :, None]).sum(1)
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
        distributed.ensure_initialized(self.device)  # under torchrun: its process group
        rank, size = distributed.world()
        if size == 1:
            with persist.locked(path):  # another fitter of this store waits, resumes its end
                self._run(points, fingerprints, path, progress)
            return
        # torchrun (every rank calls fit): the distillation is one sequence of steps, not
        # shared out. Rank 0 takes the lock, then the others wait for it as long as rank 0
        # lives (however long the distillation takes), and read the finished run (or, if
        # rank 0 died, resume it). If rank 0 cannot take it, every rank says so.
        key, error = None, None
        if rank == 0:
            try:
                key = persist.acquire(path, exclusive=True)
            except StoreError as exc:
                error = exc
        ok = float(rank == 0 and error is None)  # summed over ranks: rank 0's alone
        taken = distributed.all_sum(torch.tensor([ok], device=self.device))
        if float(taken[0]) == 0.0:
            raise error or StoreError(f"rank 0 could not take the lock of {path}; see its error")
        try:
            with persist.locked(path, patient=True):
                self._run(points, fingerprints, path, progress)
        finally:
            persist.release(key, exclusive=True)

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
        settings = self._settings(fingerprints, [w for _, w in points])
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
            start_x = syn.detach().clone()
            # Adam ignores the scale of the loss: weight each point through its step size
            for group in opt.param_groups:
                group["lr"] = ddm.lr * self.scale * weight / total_w * len(points)
            for _ in range(ddm.steps_per_point):
                opt.zero_grad()
                loss = self.objective(syn, state, target)
                loss.backward()
                opt.step()
            after = float(self.objective(syn.detach(), state, target))
            if not after <= before:  # Adam's scale-free steps can leave a good match: undo
                with torch.no_grad():
                    syn.copy_(start_x)
                after = before
            self.history.append((before, after))
            if path is not None:
                self._save(path, settings, syn, opt, p + 1)
        self.syn_x = syn.detach()

    def _settings(self, fingerprints: list[str], weights: list[float]) -> dict[str, Any]:
        """Everything the synsets depend on: a run store holding other settings is refused."""
        d = asdict(self.ddm)
        d["groups"] = None if self.ddm.groups is None else "given"
        return {
            "ddm": d,
            "model": model_fingerprint(self.task.model),
            "task": task_fingerprint(self.task),
            "group_ids": self.ids.tolist(),
            "train": self.train.fingerprint(),
            "points": fingerprints,
            # each point's Adam step size is scaled by its weight (the learning rate)
            "weights": [float(w) for w in weights],
            **trained_and_buffers(self.task.model, self.names, self.held),
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
            fingerprint=fit_fingerprint(self.task, self.train, self.names, self.final.state),
        )
