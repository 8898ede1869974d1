"""The curvature of the mean training loss at one checkpoint, as functions of a flat vector.

:class:`CurvatureProblem` gives the pieces every preconditioner needs, over the whole
training set (or one minibatch): Hessian- and Gauss–Newton-vector products for a batch of
vectors, and, for small models, the full Hessian ``H = (1/n) Σ_i ∇²ℓ_i`` and Gauss–Newton
matrix ``G = (1/n) Σ_i J_iᵀ ∇²_out ℓ_i J_i``. Vectors are flat, in the order of the
selected parameter names (the order of dense gradient features).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import hessian, jacfwd, jacrev, jvp, vjp, vmap

from ..core.data import ExampleSource, as_single_batch
from ..core.loop import TrailingPadding, length_groups, over_batches, over_groups
from ..core.runtime import load_forward_ad_decompositions
from ..core.task import AbstractTask
from ..grads.layers import flat_offsets, layer_calls
from ..grads.per_example import bound_model


class CurvatureProblem:
    """Mean training loss of the selected parameters of ``task.model`` at one checkpoint.

    Args:
        task: the model, loss and (for Gauss–Newton) outputs/output loss.
        names: selected parameter names (flat order).
        params, buffers: the checkpoint's values.
        train: the training examples.
        batch_size: examples per batch of every pass over the data.
    """

    def __init__(
        self,
        task: AbstractTask,
        names: Sequence[str],
        params: dict[str, torch.Tensor],
        buffers: dict[str, torch.Tensor],
        train: ExampleSource,
        batch_size: int,
        progress: bool | None = False,
    ) -> None:
        self.task = task
        #: progress bars for the passes that name themselves (K-FAC factors, eigenvalues)
        self.progress = progress
        self.names = list(names)
        self.shapes = [params[n].shape for n in self.names]
        self.sizes = [params[n].numel() for n in self.names]
        #: {name: (start, stop)} of each parameter in the flat vectors
        self.offsets = flat_offsets(self.names, self.sizes)
        self.theta = torch.cat([params[n].detach().reshape(-1) for n in self.names])
        self.fixed = {**buffers, **{k: v for k, v in params.items() if k not in self.names}}
        self.train = train
        self.batch_size = batch_size
        self.n = len(train)
        self._cached_pullback: Any = None
        #: the length-sorted batch groups of each batch size ([]: no token mask)
        self._groups: dict[int, list[torch.Tensor]] = {}
        self._padding = TrailingPadding(task)
        load_forward_ad_decompositions()  # Gauss-Newton and Hessian blocks use forward AD

    @property
    def p(self) -> int:
        return int(self.theta.numel())

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(flat, self.sizes)
        return {n: t.reshape(s) for n, t, s in zip(self.names, parts, self.shapes, strict=True)}

    def model_at(self, flat: torch.Tensor) -> Any:
        return bound_model(self.task.model, {**self.fixed, **self.unflatten(flat)})

    def batches(
        self, batch_size: int | None = None, desc: str | None = None, by_length: bool = False
    ) -> Iterator[Any]:
        """Every training example once, in order, on the parameters' device, with the model
        in eval mode while the pass runs (as features are computed: dropout off, batch-norm
        statistics read, never updated); through THE data loop. ``batch_size``: default the
        problem's; ``desc``: show a progress bar (when ``progress``) with this label;
        ``by_length``: sequences grouped by their number of real tokens
        (:func:`~datatrace.core.loop.length_groups`; the same order in every pass), for
        passes that sum over examples and cut padded positions. Each batch is cut after
        its longest sequence where that is exact (:class:`TrailingPadding`)."""
        size = batch_size or self.batch_size
        show = self.progress if desc is not None else False
        device, model = self.theta.device, self.task.model
        if by_length:
            if size not in self._groups:
                self._groups[size] = length_groups(self.train, self.task.token_mask, size) or []
            if groups := self._groups[size]:
                loop = over_groups(
                    self.train, groups, device=device, eval_module=model, progress=show, desc=desc
                )
                return (self._cut(batch) for _, batch in loop)
        batches = over_batches(
            self.train, size, device=device, eval_module=model, progress=show, desc=desc
        )
        return (self._cut(batch) for _, _, batch in batches)

    def _cut(self, batch: Any) -> Any:
        """The batch without the padding after every example's last real token, where
        the model's losses show it masks that padding out (:class:`TrailingPadding`)."""
        return self._padding(
            batch,
            lambda b, p: self.task.loss(self.model_at(p["theta"]), b),
            "loss",
            {"theta": self.theta},
        )

    def loss_sum(self, flat: torch.Tensor, batch: Any) -> torch.Tensor:
        return self.task.loss(self.model_at(flat), batch).sum()

    def outputs(self, flat: torch.Tensor, batch: Any) -> torch.Tensor:
        return self.task.outputs(self.model_at(flat), batch)

    # -- products -------------------------------------------------------------------------

    def hvp_batch(self, vectors: torch.Tensor, batch: Any) -> torch.Tensor:
        """``Σ_{i∈batch} ∇²ℓ_i v`` for each row v of ``vectors`` (m, p): reverse-over-reverse,
        one graph for the batch pulled back along every v (H is symmetric)."""
        return vmap(self._hvp_pullback(batch))(vectors)[0]

    def _hvp_pullback(self, batch: Any) -> Any:
        grad_fn = torch.func.grad(lambda t: self.loss_sum(t, batch))
        return vjp(grad_fn, self.theta)[1]

    def gnvp_batch(self, vectors: torch.Tensor, batch: Any) -> torch.Tensor:
        """``Σ_{i∈batch} J_iᵀ H_out,i J_i v`` for each row v of ``vectors`` (m, p)."""
        out, pullback = vjp(lambda t: self.outputs(t, batch), self.theta)[:2]
        h_out = self.output_hessians(out.detach(), batch)

        def one(v: torch.Tensor) -> torch.Tensor:
            jv = jvp(lambda t: self.outputs(t, batch), (self.theta,), (v,))[1]
            return pullback(torch.einsum("bij,bj->bi", h_out, jv.flatten(1)).view_as(out))[0]

        return torch.stack([one(v) for v in vectors])

    def _vector_group(self, minimum: int) -> int:
        """Vectors per vmapped product: about 12,500 / batch size, so that the intermediates
        (vectors × batch × width) stay cache- and heap-friendly."""
        return max(minimum, 12_500 // self.batch_size)

    def mean_product(self, vectors: torch.Tensor, gauss_newton: bool) -> torch.Tensor:
        """``H v`` or ``G v`` (mean over all training examples) for each row v (m, p).

        Vectors go through in groups of about 12,500 / batch-size rows: the vmapped
        intermediates (vectors × examples × width) then stay small enough to be reused
        from the heap instead of being mapped and page-faulted afresh on every call (a
        solver calls this once per iteration): 14% faster for CG on the benchmark MLP."""
        total = torch.zeros_like(vectors)
        step = self._vector_group(1)
        if gauss_newton:
            for batch in self.batches():
                for s in range(0, len(vectors), step):
                    total[s : s + step] += self.gnvp_batch(vectors[s : s + step], batch)
            return total / self.n
        # one graph per batch for all vector groups; with a single batch (the whole
        # training set), kept across calls: θ is fixed, so a solver's iterations share it
        if self.n <= self.batch_size:
            if self._cached_pullback is None:
                for batch in self.batches():  # the only batch; its graph built in eval mode
                    self._cached_pullback = vmap(self._hvp_pullback(batch))
            pullbacks: Iterator[Any] = iter([self._cached_pullback])
        else:
            pullbacks = (vmap(self._hvp_pullback(b)) for b in self.batches())
        for pullback in pullbacks:
            for s in range(0, len(vectors), step):
                total[s : s + step] += pullback(vectors[s : s + step])[0]
        return total / self.n

    def output_hessians(self, out: torch.Tensor, batch: Any) -> torch.Tensor:
        """``∇²_out ℓ_i`` per example, (batch, d, d), by autodiff of the output loss; outputs
        of more dimensions (a language model's (batch, T, vocab) logits) are flattened,
        d = T · vocab."""
        shape = out.shape[1:]

        def single(o: torch.Tensor, example: Any) -> torch.Tensor:
            return self.task.output_loss(o.view(shape)[None], as_single_batch(example))[0]

        return vmap(hessian(single), in_dims=(0, 0))(out.flatten(1), batch)

    # -- full matrices (small models only; callers check the size) --------------------------

    def hessian(
        self, chunk: int | None = None, symmetrize: bool = True, structured: bool = True
    ) -> torch.Tensor:
        """``H = (1/n) Σ_i ∇²ℓ_i``, (p, p).

        Rows come from Hessian-vector products with ``chunk`` basis vectors at a time
        (small chunks keep the vmapped intermediates, chunk × batch × width, in cache;
        ``None``: 12,500 / batch size, at least 8 — on 2 cores 25 vectors per 500-example
        batch made the products 1.3× (MLP) to 3× (CNN) faster than 128). With
        ``structured`` (default), the diagonal block of the largest eligible ``nn.Linear``
        layer (called once per forward on (batch, features) inputs) is formed in closed form
        instead, ``Σ_i (ã_i ã_iᵀ) ⊗ ∂²ℓ_i/∂s²`` (ã = the layer's input with a 1 for the
        bias, s = its output), and its rows of the other columns by symmetry: for an MLP
        whose first layer holds most parameters that replaces most of the products. The
        same matrix as the all-products path (:meth:`hessian_by_products`), to round-off.
        ``symmetrize=False`` skips averaging H with Hᵀ (Cholesky reads one triangle)."""
        layer = self._kronecker_layer() if structured else None
        if layer is None:
            return self.hessian_by_products(chunk, symmetrize)
        w_idx, b_idx = layer[1], layer[2]
        block = torch.cat([w_idx, b_idx]) if b_idx is not None else w_idx
        in_block = torch.zeros(self.p, dtype=torch.bool)
        in_block[block] = True
        rows = torch.nonzero(~in_block).flatten().to(self.theta.device)
        total = self._rows_by_products(rows, chunk)
        block = block.to(self.theta.device)
        total[block[:, None], rows[None, :]] = total[rows[:, None], block[None, :]].T
        self._kronecker_block(layer, total)
        if symmetrize:
            total = (total + total.T) / 2
        return total.div_(self.n)

    def hessian_by_products(
        self, chunk: int | None = None, symmetrize: bool = True
    ) -> torch.Tensor:
        """``H`` from ``p`` Hessian-vector products (any model)."""
        total = self._rows_by_products(torch.arange(self.p, device=self.theta.device), chunk)
        if symmetrize:
            total = (total + total.T) / 2
        return total.div_(self.n)

    def _rows_by_products(self, rows: torch.Tensor, chunk: int | None) -> torch.Tensor:
        """A (p, p) matrix holding ``Σ_i ∇²ℓ_i`` in the given rows (zeros elsewhere)."""
        chunk = chunk or self._vector_group(8)
        dev, dt = self.theta.device, self.theta.dtype
        total = torch.zeros(self.p, self.p, dtype=dt, device=dev)
        for batch in self.batches():
            for s in range(0, rows.numel(), chunk):
                part = rows[s : s + chunk]
                basis = torch.zeros(part.numel(), self.p, dtype=dt, device=dev)
                basis[torch.arange(part.numel(), device=dev), part] = 1
                total[part] += self.hvp_batch(basis, batch)
        return total

    def _kronecker_layer(self) -> tuple[str, torch.Tensor, torch.Tensor | None] | None:
        """(module name, flat indices of its weight, of its bias or None) of the largest
        selected ``nn.Linear`` whose diagonal Hessian block has the Kronecker closed form:
        called exactly once per forward, on a (batch, features) input, weight selected.
        None when no layer qualifies (or the model does not run one example at a time)."""
        offsets = self.offsets
        candidates = {
            mname: mod
            for mname, mod in self.task.model.named_modules()
            if type(mod) is nn.Linear and (f"{mname}.weight" if mname else "weight") in offsets
        }
        if not candidates:
            return None
        try:
            with layer_calls(candidates) as calls, torch.no_grad():
                for batch in self.batches():  # the first batch shows how layers are called
                    self.task.loss(self.model_at(self.theta), batch)
                    break
        except Exception:
            return None
        best = None
        for mname in candidates:
            if [x.dim() for x, _ in calls[mname]] != [2]:
                continue
            w = offsets[f"{mname}.weight" if mname else "weight"]
            b = offsets.get(f"{mname}.bias" if mname else "bias")
            size = (w[1] - w[0]) + (0 if b is None else b[1] - b[0])
            if best is None or size > best[0]:
                best = (size, mname, w, b)
        if best is None or best[0] < 2 * self.p // 10:
            return None  # not worth it: the products would still do most of the work
        _, mname, w, b = best
        w_idx = torch.arange(w[0], w[1])
        b_idx = None if b is None else torch.arange(b[0], b[1])
        return mname, w_idx, b_idx

    def _kronecker_block(
        self, layer: tuple[str, torch.Tensor, torch.Tensor | None], total: torch.Tensor
    ) -> None:
        """Write ``Σ_i ∇²ℓ_i`` restricted to the layer's own parameters into ``total``."""
        mname, w_idx, b_idx = layer
        module = self.task.model.get_submodule(mname)
        assert isinstance(module, nn.Linear)
        d_out, d_in = module.out_features, module.in_features
        dev, dt = self.theta.device, self.theta.dtype

        def loss_of_probe(probe: torch.Tensor, example: Any) -> tuple[torch.Tensor, Any]:
            # the zero probe added to the layer's output: d loss / d probe = ∂ℓ/∂s
            with layer_calls({mname: module}, probes={mname: probe}) as calls:
                loss = self.task.loss(self.model_at(self.theta), as_single_batch(example)).sum()
            return loss, calls[mname][0][0][0]

        curvature = vmap(
            jacfwd(torch.func.grad(loss_of_probe, has_aux=True), has_aux=True),
            in_dims=(None, 0),
        )
        probe = torch.zeros(d_out, dtype=dt, device=dev)
        ww = torch.zeros(d_out * d_out, d_in * d_in, dtype=dt, device=dev)
        wb = torch.zeros(d_out, d_in, d_out, dtype=dt, device=dev)
        bb = torch.zeros(d_out, d_out, dtype=dt, device=dev)
        step = max(1, min(self.batch_size, (1 << 24) // max(1, d_out * d_out + d_in * d_in)))
        for batch in self.batches(step):
            m_i, a_i = curvature(probe, batch)  # (b, out, out), (b, in)
            m_i = (m_i + m_i.transpose(1, 2)) / 2
            outer = (a_i[:, :, None] * a_i[:, None, :]).reshape(len(a_i), -1)
            ww.addmm_(m_i.reshape(len(m_i), -1).T, outer)
            wb += torch.einsum("bop,bj->ojp", m_i, a_i)
            bb += m_i.sum(0)
        w_rows = w_idx.to(dev)
        w0 = int(w_idx[0])
        if not bool((w_idx == torch.arange(w0, w0 + w_idx.numel())).all()):
            raise AssertionError("weight indices must be contiguous")
        view = total[w0 : w0 + d_out * d_in, w0 : w0 + d_out * d_in].view(d_out, d_in, d_out, d_in)
        view.copy_(ww.view(d_out, d_out, d_in, d_in).permute(0, 2, 1, 3))
        if b_idx is not None:
            b_rows = b_idx.to(dev)
            total[w_rows[:, None], b_rows[None, :]] = wb.reshape(d_out * d_in, d_out)
            total[b_rows[:, None], w_rows[None, :]] = wb.reshape(d_out * d_in, d_out).T
            total[b_rows[:, None], b_rows[None, :]] = bb

    def gauss_newton(self) -> torch.Tensor:
        """``G = (1/n) Σ_i J_iᵀ ∇²_out ℓ_i J_i``, (p, p), positive semi-definite for convex ℓ."""
        total = torch.zeros(self.p, self.p, dtype=self.theta.dtype, device=self.theta.device)
        for batch in self.batches():
            out = self.outputs(self.theta, batch).detach()
            h_out = self.output_hessians(out, batch)

            def single(t: torch.Tensor, example: Any) -> torch.Tensor:
                return self.outputs(t, as_single_batch(example))[0].flatten()

            jac = vmap(jacrev(single), in_dims=(None, 0))(self.theta, batch)  # (b, d, p)
            total += torch.einsum("bip,bij,bjq->pq", jac, h_out, jac)
        return total / self.n
