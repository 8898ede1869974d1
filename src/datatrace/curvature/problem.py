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
from torch.func import functional_call, hessian, jacrev, jvp, vjp, vmap

from ..data import ExampleSource, batch_to
from ..grads import _unsqueeze
from ..task import AbstractTask


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
    ) -> None:
        self.task = task
        self.names = list(names)
        self.shapes = [params[n].shape for n in self.names]
        self.sizes = [params[n].numel() for n in self.names]
        self.theta = torch.cat([params[n].detach().reshape(-1) for n in self.names])
        self.fixed = {**buffers, **{k: v for k, v in params.items() if k not in self.names}}
        self.train = train
        self.batch_size = batch_size
        self.n = len(train)

    @property
    def p(self) -> int:
        return int(self.theta.numel())

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(flat, self.sizes)
        return {n: t.reshape(s) for n, t, s in zip(self.names, parts, self.shapes, strict=True)}

    def model_at(self, flat: torch.Tensor) -> Any:
        state = {**self.fixed, **self.unflatten(flat)}

        def model(*args: Any, **kwargs: Any) -> Any:
            return functional_call(self.task.model, state, args, kwargs)

        return model

    def batches(self) -> Iterator[Any]:
        """Every training example once, in order, on the parameters' device."""
        for s, e in self.train.ranges(self.batch_size):
            yield batch_to(self.train.batch(s, e), self.theta.device)

    def loss_sum(self, flat: torch.Tensor, batch: Any) -> torch.Tensor:
        return self.task.loss(self.model_at(flat), batch).sum()

    def outputs(self, flat: torch.Tensor, batch: Any) -> torch.Tensor:
        return self.task.outputs(self.model_at(flat), batch)

    # -- products -------------------------------------------------------------------------

    def hvp_batch(self, vectors: torch.Tensor, batch: Any) -> torch.Tensor:
        """``Σ_{i∈batch} ∇²ℓ_i v`` for each row v of ``vectors`` (m, p): reverse-over-reverse,
        one graph for the batch pulled back along every v (H is symmetric)."""
        grad_fn = torch.func.grad(lambda t: self.loss_sum(t, batch))
        pullback = vjp(grad_fn, self.theta)[1]
        return vmap(pullback)(vectors)[0]

    def gnvp_batch(self, vectors: torch.Tensor, batch: Any) -> torch.Tensor:
        """``Σ_{i∈batch} J_iᵀ H_out,i J_i v`` for each row v of ``vectors`` (m, p)."""
        out, pullback = vjp(lambda t: self.outputs(t, batch), self.theta)[:2]
        h_out = self.output_hessians(out.detach(), batch)

        def one(v: torch.Tensor) -> torch.Tensor:
            jv = jvp(lambda t: self.outputs(t, batch), (self.theta,), (v,))[1]
            return pullback(torch.einsum("bij,bj->bi", h_out, jv))[0]

        return torch.stack([one(v) for v in vectors])

    def mean_product(self, vectors: torch.Tensor, gauss_newton: bool) -> torch.Tensor:
        """``H v`` or ``G v`` (mean over all training examples) for each row v (m, p)."""
        total = torch.zeros_like(vectors)
        for batch in self.batches():
            prod = self.gnvp_batch if gauss_newton else self.hvp_batch
            total += prod(vectors, batch)
        return total / self.n

    def output_hessians(self, out: torch.Tensor, batch: Any) -> torch.Tensor:
        """``∇²_out ℓ_i`` per example, (batch, d, d), by autodiff of the output loss."""

        def single(o: torch.Tensor, example: Any) -> torch.Tensor:
            return self.task.output_loss(o[None], _unsqueeze(example))[0]

        return vmap(hessian(single), in_dims=(0, 0))(out, batch)

    # -- full matrices (small models only; callers check the size) --------------------------

    def hessian(self, chunk: int = 128, symmetrize: bool = True) -> torch.Tensor:
        """``H = (1/n) Σ_i ∇²ℓ_i``, (p, p), from Hessian-vector products with ``chunk`` basis
        vectors at a time. Small chunks keep the vmapped intermediates (chunk × batch ×
        width) in cache: 128 builds a 9,610-parameter MLP's Hessian twice as fast as 1,024.
        ``symmetrize=False`` skips averaging H with Hᵀ (round-off only; Cholesky reads one
        triangle anyway) and saves a p × p temporary."""
        total = torch.zeros(self.p, self.p, dtype=self.theta.dtype, device=self.theta.device)
        eye = torch.eye(chunk, dtype=self.theta.dtype, device=self.theta.device)
        for batch in self.batches():
            for s in range(0, self.p, chunk):
                m = min(chunk, self.p - s)
                basis = torch.zeros(m, self.p, dtype=self.theta.dtype, device=self.theta.device)
                basis[:, s : s + m] = eye[:m, :m]
                total[s : s + m] += self.hvp_batch(basis, batch)
        if symmetrize:
            total = (total + total.T) / 2
        return total.div_(self.n)

    def gauss_newton(self) -> torch.Tensor:
        """``G = (1/n) Σ_i J_iᵀ ∇²_out ℓ_i J_i``, (p, p), positive semi-definite for convex ℓ."""
        total = torch.zeros(self.p, self.p, dtype=self.theta.dtype, device=self.theta.device)
        for batch in self.batches():
            out = self.outputs(self.theta, batch).detach()
            h_out = self.output_hessians(out, batch)

            def single(t: torch.Tensor, example: Any) -> torch.Tensor:
                return self.outputs(t, _unsqueeze(example))[0]

            jac = vmap(jacrev(single), in_dims=(None, 0))(self.theta, batch)  # (b, d, p)
            total += torch.einsum("bip,bij,bjq->pq", jac, h_out, jac)
        return total / self.n
