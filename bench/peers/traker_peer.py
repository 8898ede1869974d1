"""traker 0.3.2: ``TRAKer`` scores (the TRAK benchmark) and featurization (the scale run);
``lambda_reg = n k lam / p``, per-checkpoint inverse rescaling off, ``finalize_scores`` per
checkpoint (see bench/README.md, TRAK)."""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from typing import Any

import numpy as np
import torch
from harness import Clock
from workloads import batches

from peers import TrakSettings


def _traker(model: Any, n: int, save_dir: str, proj_dim: int, **kw: Any) -> Any:
    from trak import TRAKer

    return TRAKer(model=model, task="image_classification", train_set_size=n, save_dir=save_dir,
                  device="cpu", proj_dim=proj_dim, logging_level=logging.ERROR,
                  use_half_precision=False, **kw)  # fmt: skip


def trak(wl: Any, st: TrakSettings) -> tuple[torch.Tensor, dict[str, float]]:
    from trak.score_computers import BasicScoreComputer

    class _Unscaled(BasicScoreComputer):
        """traker's BasicScoreComputer without ``xtx_inv /= xtx_inv.abs().mean()``."""

        def get_x_xtx_inv(self, grads: torch.Tensor, xtx: torch.Tensor) -> torch.Tensor:
            eye = torch.eye(xtx.shape[0], dtype=xtx.dtype, device=xtx.device)
            return grads @ torch.linalg.inv((xtx + self.lambda_reg * eye).float()).to(self.dtype)

    model = copy.deepcopy(wl.model)
    n, p = wl.n_train, sum(q.numel() for q in model.parameters() if q.requires_grad)
    # a fresh save_dir: load_from_save_dir=False is broken in 0.3.2 (no experiments.json)
    with tempfile.TemporaryDirectory(prefix="bench-trak-traker-") as save_dir:
        clock = Clock()
        traker = _traker(model, n, save_dir, st.proj_dim, projector_seed=st.seed, score_computer=_Unscaled,
                         lambda_reg=n * st.proj_dim * st.damping / p)  # fmt: skip
        for c, (sd, _) in enumerate(wl.ckpts):
            traker.load_checkpoint(sd, model_id=c)
            for xb, yb in batches(wl.train, st.batch_size):
                traker.featurize(batch=(xb, yb), num_samples=len(yb))
        traker.finalize_features()
        for c, (sd, _) in enumerate(wl.ckpts):
            traker.start_scoring_checkpoint(
                exp_name="bench", checkpoint=sd, model_id=c, num_targets=wl.n_test
            )
            for xb, yb in batches(wl.test, st.batch_size):
                traker.score(batch=(xb, yb), num_samples=len(yb))
        clock.lap("featurize+score")
        total = sum(
            torch.from_numpy(np.array(traker.finalize_scores("bench", model_ids=[c])))
            for c in range(len(wl.ckpts))
        )  # scores_c x Q_c, one checkpoint at a time
        clock.lap("finalize_scores")
    return (total / len(wl.ckpts)).T.contiguous(), clock.times


def featurize(model: Any, train: tuple, queries: tuple, cks: list, dim: int, batch: int) -> tuple:
    """Featurization of the training set only (timed), plus (untimed) the queries, whose
    features turn into projected loss-gradient inner products for the agreement: for
    cross-entropy grad loss = -(1 - p) grad margin, so S[j, i] = sum_c w_c (1 - p_j)(1 - p_i)
    <phi_j, phi_i> grad_dim / k (features / sqrt(grad_dim), projection N(0, 1))."""
    n, nq = len(train[1]), len(queries[1])
    S = torch.zeros(nq, n, dtype=torch.float64)
    timed = 0.0
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        tr = _traker(model, n + nq, d, dim)  # the queries go after the training set
        for c, (sd, w) in enumerate(cks):
            t0 = t0 if c == 0 else time.perf_counter()
            tr.load_checkpoint(sd, model_id=c)
            for xb, yb in batches(train, batch):
                tr.featurize((xb, yb), num_samples=len(yb))
            timed += time.perf_counter() - t0
            for xb, yb in batches(queries, batch):
                tr.featurize((xb, yb), num_samples=len(yb))
            store = tr.saver.current_store
            phi = torch.from_numpy(np.array(store["grads"], dtype=np.float64))
            otl = torch.from_numpy(np.array(store["out_to_loss"], dtype=np.float64)).reshape(-1)
            g = phi * otl[:, None] * (float(tr.normalize_factor) / dim**0.5)
            S += w * (g[n:] @ g[:n].T)
    return S.float(), {
        "seconds": timed,
        "featurize_seconds": timed,
        "grad_dim": tr.num_params_for_grad,
    }
