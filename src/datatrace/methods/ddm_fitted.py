"""A fitted Distilled Datamodel: fast group removal online (heavy-ball unlearning on the
synthetic sets), the attribution and datamodel matrices, and save/load."""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Collection, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.func import grad, vmap

from ..core import persist
from ..core.checkpoint import Checkpoint
from ..core.data import ExampleSource
from ..core.errors import (
    ConfigError,
    DataError,
    StoreCorruptError,
    StoreMismatchError,
)
from ..core.fingerprint import model_fingerprint, task_fingerprint
from ..core.runtime import eval_mode, load_forward_ad_decompositions, model_device
from ..core.task import AbstractTask
from ..grads.per_example import bound_model
from ..retrain import measure_stacked, stacked_sgd_step, subset_masks
from ..truth.jobs import state_digest

if TYPE_CHECKING:
    from .datamodel import DistilledDatamodel


log = logging.getLogger("datatrace")

_FITTED_FORMAT = persist.StoreFormat(
    tag="datatrace-ddm",
    version=2,
    files=("fitted.safetensors",),
    fix="fit and save the Distilled Datamodel again",
)


def trained_and_buffers(
    model: nn.Module, names: Sequence[str], held: Collection[str]
) -> dict[str, Any]:
    """What of the model the Distilled Datamodel uses beyond its fingerprint and the
    checkpoints' bytes: the parameters it trains (``requires_grad``; name and dtype) and a
    digest of the buffers it reads from the model because the checkpoints (``held``: the
    names every one of them holds) do not."""
    params = dict(model.named_parameters())
    return {
        "trained": {nm: str(params[nm].dtype) for nm in names},
        "buffers": state_digest({k: v for k, v in model.named_buffers() if k not in held}),
    }


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
        fingerprint: dict[str, Any] | None = None,
    ) -> None:
        self.task, self.final, self.ddm = task, final, ddm
        #: what the synsets were distilled for (model, task, training data, trained
        #: parameters, buffers from the model), saved and checked by :meth:`load`; ``None``
        #: when loaded from a save that did not record it
        self.fingerprint = fingerprint
        if weights.dim() == 1:  # saved before per-example weights: every slot live
            weights = weights[:, None].expand(syn_x.shape[0], syn_x.shape[1]).contiguous()
        #: weight of each synthetic example, (K, m): |G_k| / (n m_k), 0 on padding slots
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
        self._anchor_grad: dict[str, torch.Tensor] | None = None
        #: fast-learned models stopped by the negative-curvature guard, over every call
        self.stopped_early = 0
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
        """2 / the largest eigenvalue of the distilled objective's Hessian at θ_T (heavy-ball
        with momentum μ is stable up to 2(1 + μ) / λ_max)."""
        w = self.weights.reshape(-1)

        def total(params: dict[str, torch.Tensor]) -> torch.Tensor:
            return (self._sample_losses(params) * w).sum()

        load_forward_ad_decompositions()
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
        return 2.0 / (top + self.ddm.weight_decay + 1e-12)

    def _anchor(self) -> dict[str, torch.Tensor]:
        """``∇L̂(θ_T) + λ_wd θ_T``: the gradient of the whole distilled objective at the final
        model, subtracted from every fast-learned model's gradient when ``stationary``."""
        if self._anchor_grad is None:
            w = self.weights.reshape(-1)
            live = {nm: p.detach().requires_grad_(True) for nm, p in self.start.items()}
            with eval_mode(self.task.model), torch.enable_grad():
                loss = (self._sample_losses(live) * w).sum()
                grads = torch.autograd.grad(loss, list(live.values()))
            wd = self.ddm.weight_decay
            self._anchor_grad = {
                nm: (g + wd * live[nm]).detach() for nm, g in zip(live, grads, strict=True)
            }
        return self._anchor_grad

    def _fast_learn(self, keep: torch.Tensor) -> dict[str, torch.Tensor]:
        """Train R models from θ_T at once, model r on the groups where ``keep[r]`` (R, K)
        is True; returns stacked parameters (R, ...)."""
        r_models = keep.shape[0]
        w = (self.weights[None] * keep.to(self.weights)[:, :, None]).reshape(r_models, -1)
        params = {
            nm: p.unsqueeze(0).repeat(r_models, *[1] * p.dim()) for nm, p in self.start.items()
        }
        velocity = {nm: torch.zeros_like(p) for nm, p in params.items()}
        lr, wd, mu = self._step_size(), self.ddm.weight_decay, self.ddm.unlearn_momentum
        per_model = vmap(self._sample_losses)
        anchor = self._anchor() if self.ddm.stationary else None
        # the guard: a model whose secant curvature along its own path from θ_T,
        # c = ⟨∇(θ) − ∇(θ_T), θ − θ_T⟩ / ‖θ − θ_T‖² (+ weight decay), is negative grows like
        # exp(τ|c|) after the learning time τ = Σ_steps lr (1 − μ^t) / (1 − μ): once
        # τ|c| > 1 the escape along negative curvature dominates its removal effect, and it
        # stops where it is (on a convex objective c > 0: it never fires)
        elapsed = 0.0
        frozen = torch.zeros(r_models, dtype=torch.bool, device=self.device)
        if anchor is not None:  # a model that keeps every group is θ_T itself: kept exactly
            frozen |= keep.all(1).to(self.device)
        first: tuple[torch.Tensor, ...] | None = None
        stopped_at: list[int] = []
        with eval_mode(self.task.model), torch.enable_grad():  # also when called under no_grad
            for step in range(1, self.ddm.unlearn_steps + 1):
                live = {nm: p.detach().requires_grad_(True) for nm, p in params.items()}
                loss = (per_model(live) * w).sum()
                grads = torch.autograd.grad(loss, list(live.values()))
                if anchor is not None:  # θ_T made stationary: the model with every group stays
                    grads = tuple(g - anchor[nm] for nm, g in zip(live, grads, strict=True))
                    if first is None:
                        first = grads
                    else:
                        curv = self._secant_curvature(params, grads, first)
                        escape = (curv * elapsed < -1) & ~frozen
                        if bool(escape.any()):
                            frozen |= escape
                            stopped_at += [step] * int(escape.sum())
                        if bool((frozen | torch.isinf(curv)).all()):
                            break  # every model stopped (or still at θ_T): nothing moves
                before = dict(params)  # stacked_sgd_step rebinds its entries
                elapsed += lr * (1 - mu**step) / (1 - mu)
                stacked_sgd_step(params, grads, velocity, lr, mu, wd)
                if bool(frozen.any()):
                    params = {
                        nm: torch.where(frozen.view(-1, *[1] * (p.dim() - 1)), before[nm], p)
                        for nm, p in params.items()
                    }
        if stopped_at:
            log.info(
                "Distilled Datamodel: %d of %d fast-learned models stopped early (at steps "
                "%s of %d): negative curvature along their path from θ_T, |c| τ > 1",
                len(stopped_at),
                r_models,
                sorted(set(stopped_at))[:10],
                self.ddm.unlearn_steps,
            )
        self.stopped_early += len(stopped_at)
        return params

    def _secant_curvature(
        self,
        params: dict[str, torch.Tensor],
        grads: Sequence[torch.Tensor],
        first: Sequence[torch.Tensor],
    ) -> torch.Tensor:
        """Each stacked model's curvature along its displacement from θ_T, (R,): the
        secant ``⟨g(θ) − g(θ_T), θ − θ_T⟩ / ‖θ − θ_T‖² + weight_decay`` (+inf where θ = θ_T)."""
        num = torch.zeros(len(grads[0]), dtype=torch.float64, device=self.device)
        den = torch.zeros_like(num)
        for (nm, p), g, g0 in zip(params.items(), grads, first, strict=True):
            d = (p - self.start[nm]).double().reshape(len(p), -1)
            num += ((g - g0).double().reshape(len(p), -1) * d).sum(1)
            den += (d * d).sum(1)
        out = num / den.clamp_min(1e-300) + self.ddm.weight_decay
        return torch.where(den > 0, out, torch.full_like(out, math.inf))

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
        meta: dict[str, Any] = {
            "format": _FITTED_FORMAT.tag,
            "version": _FITTED_FORMAT.version,
            "ddm": d,
            "final": self.final.fingerprint(),
            "history": self.history,
            "step_size": self._step_size(),
        }
        if self.fingerprint is not None:  # one loaded from an unchecked save stays unchecked
            meta["fingerprint"] = self.fingerprint
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
        cls,
        path: str | os.PathLike[str],
        task: AbstractTask,
        final: Checkpoint,
        *,
        train: Any = None,
    ) -> FittedDistilledDatamodel:
        """Read what :meth:`save` wrote, for the model and task it was fitted for; ``final``
        must be the checkpoint it was fitted at. With ``train`` (the training data it was
        distilled from) that is checked too.

        Raises:
            StoreMismatchError: another final checkpoint, model, task, trained parameters,
                buffers the checkpoint does not hold, or training data than the fit's
                (naming what differs).
        """
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
        saved = meta.get("fingerprint")
        if saved is None:
            log.warning(
                "%s was saved without the fingerprints of its model, task and training "
                "data (by an older datatrace): only its final checkpoint could be checked. "
                "If the model's architecture or the loss changed since, its scores are "
                "wrong; fit and save it again to have it checked",
                p,
            )
        else:
            _check_fit(p, saved, task, final, train)
        try:
            from .datamodel import DistilledDatamodel

            # saved before ``stationary`` existed: fast-learned without the anchor
            ddm = DistilledDatamodel(
                **{"stationary": False, **meta["ddm"], "groups": t["group_ids"]}
            )
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
            saved,
        )
        out._lr = meta.get("step_size", out._lr)
        return out


def fit_fingerprint(
    task: AbstractTask, train: ExampleSource, names: Sequence[str], held: Collection[str]
) -> dict[str, Any]:
    """What a fit is saved with and checked against on load: the model, task and training
    data (as every saved fit), the trained parameters and the buffers taken from the model."""
    from .saved import _fingerprint

    return persist.as_json(
        {**_fingerprint(task, train), **trained_and_buffers(task.model, names, held)}
    )


def _check_fit(
    path: Path, saved: dict[str, Any], task: AbstractTask, final: Checkpoint, train: Any
) -> None:
    """Refuse a fit saved for another model, task or training data (the last only when
    ``train`` is given), other trained parameters or other buffers from the model."""
    from .saved import _check_same

    names = [nm for nm, p in task.model.named_parameters() if p.requires_grad]
    given = persist.as_json(
        {
            "model": model_fingerprint(task.model),
            "task": task_fingerprint(task),
            **trained_and_buffers(task.model, names, final.state),
        }
    )
    keys = ["model", "task"]
    if train is not None:
        given["data"] = ExampleSource(train, "training data").fingerprint()
        keys.append("data")
    _check_same(path, {k: saved.get(k) for k in keys}, {k: given[k] for k in keys})
    details = persist.diff(
        {k: saved.get(k) for k in ("trained", "buffers")},
        {k: given[k] for k in ("trained", "buffers")},
    )
    if details:
        raise StoreMismatchError(
            f"the Distilled Datamodel saved in {path} was fitted with other parameters "
            "trained (requires_grad) or other model buffers (those the final checkpoint "
            "does not hold) "
            f"({'; '.join(details[:3]).replace('in the store', 'saved')}); load it with the "
            "model as it was fitted, or fit again"
        )
