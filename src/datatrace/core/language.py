"""Causal language modelling: :class:`LanguageModelingTask`.

A sequence's training loss is its **summed** next-token negative log-likelihood (the
per-example loss whose mean over a data set Hugging Face's ``Trainer`` minimises, up to the
constant token count); a query's measurement is the negative log-likelihood of its
*completion* (prompt tokens masked), optionally divided by the completion's length.

Batches are dicts of tensors with a leading example dimension (a bare ``input_ids`` tensor
also works):

* ``input_ids`` (batch, T): token ids;
* ``attention_mask`` (batch, T), optional: 1 for real tokens, 0 for padding;
* ``labels`` (batch, T), optional: the targets as Hugging Face's collators write them, with
  ``-100`` at every position that does not count (padding, prompt); default ``input_ids``;
* ``prompt_length`` (batch,), optional: the first ``prompt_length`` tokens are the prompt;
* ``completion_mask`` (batch, T), optional: 1 at the tokens whose likelihood is measured.

Token t counts (is predicted from tokens < t) when t ≥ 1, its label is not ``-100`` and both
it and token t − 1 are attended. The measurement additionally needs t to be in the
completion: ``t ≥ prompt_length`` or ``completion_mask[t] = 1`` (with neither key, and no
``-100`` labels, the whole sequence is the completion).

Sign: the measurement is the completion's log-likelihood *negated* (its NLL), so scores
keep datatrace's convention: a positive score marks a proponent, a training sequence whose
removal is predicted to lower the completion's likelihood.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .data import ExampleSource
from .errors import ConfigError, DataError
from .task import AbstractTask, ModelFn, _as_tensor_output, _take_first

IGNORE_INDEX = -100

#: batch keys that are never passed to the model
_TARGET_KEYS = ("labels", "prompt_length", "completion_mask")


class LanguageModelingTask(AbstractTask):
    """Causal language modelling: loss = a sequence's summed token NLL; measurement = the
    NLL of a query completion (prompt masked), see the module docstring for the batch keys.

    Args:
        model: a causal LM, called as ``model(input_ids=..., attention_mask=...)`` (any
            other batch keys except ``labels``/``prompt_length``/``completion_mask`` are
            passed too); it returns logits (batch, T, vocab) or an object with ``.logits``
            (Hugging Face's ``GPT2LMHeadModel`` and friends).
        length_normalised: divide the measurement by the number of completion tokens
            (mean instead of summed NLL); the training loss stays summed.
        input_key: the key of the token ids in dict batches.

    :meth:`outputs` are the logits (batch, T, vocab) and :meth:`output_loss` the summed NLL
    of them, for Gauss–Newton-type curvature.
    """

    runtime_state = ("_vocab",)

    def __init__(
        self, model: nn.Module, length_normalised: bool = False, input_key: str = "input_ids"
    ) -> None:
        super().__init__(model)
        if not isinstance(length_normalised, bool):
            raise ConfigError(f"length_normalised must be True or False, got {length_normalised!r}")
        self.length_normalised = length_normalised
        self.input_key = input_key
        self._vocab: int | None = None

    # -- what the model sees ---------------------------------------------------------------

    def _fields(self, batch: Any) -> Mapping[str, torch.Tensor]:
        if isinstance(batch, torch.Tensor):
            return {self.input_key: batch}
        if isinstance(batch, (tuple, list)) and len(batch) == 1:
            return {self.input_key: batch[0]}
        if isinstance(batch, Mapping):
            if self.input_key not in batch:
                raise DataError(
                    f"language-model batch has no {self.input_key!r} key (keys: "
                    f"{sorted(batch)}); pass input_key=... to the task"
                )
            return batch
        raise DataError(
            "a language-model batch is a dict with input_ids (and optionally attention_mask, "
            f"labels, prompt_length, completion_mask) or an input_ids tensor; got "
            f"{type(batch).__name__}"
        )

    def outputs(self, model: ModelFn, batch: Any) -> torch.Tensor:
        """Logits (batch, T, vocab)."""
        fields = self._fields(batch)
        inputs = {k: v for k, v in fields.items() if k not in _TARGET_KEYS}
        logits = _as_tensor_output(model(**inputs))
        ids = fields[self.input_key]
        if logits.dim() != 3 or logits.shape[:2] != ids.shape:
            raise DataError(
                f"a causal LM must return logits (batch, T, vocab) for input_ids (batch, T); "
                f"got {tuple(logits.shape)} for {tuple(ids.shape)}"
            )
        return logits

    # -- which tokens count ------------------------------------------------------------------

    def token_mask(self, batch: Any) -> torch.Tensor | None:
        """The attention mask (batch, T) (1 = real token), or ``None`` without one."""
        mask = self._fields(batch).get("attention_mask")
        return None if mask is None else mask

    def targets(self, batch: Any, completion: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(next-token targets (batch, T−1) with uncounted positions set to 0, and the
        boolean mask (batch, T−1) of counted positions); ``completion``: only the
        completion's tokens count."""
        fields = self._fields(batch)
        ids = fields[self.input_key]
        labels = fields.get("labels", ids)
        target = labels[:, 1:]
        keep = target != IGNORE_INDEX
        attention = fields.get("attention_mask")
        if attention is not None:
            keep = keep & attention[:, 1:].bool() & attention[:, :-1].bool()
        if completion:
            if "completion_mask" in fields:
                keep = keep & fields["completion_mask"][:, 1:].bool()
            if "prompt_length" in fields:
                pos = torch.arange(1, ids.shape[1], device=ids.device)
                keep = keep & (pos[None, :] >= fields["prompt_length"].reshape(-1, 1))
        return torch.where(keep, target, 0), keep

    def _token_nll(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        return -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)

    # -- loss and measurement ----------------------------------------------------------------

    def output_loss(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor:
        """Summed NLL (batch,) of the counted tokens, from logits (batch, T, vocab)."""
        target, keep = self.targets(batch, completion=False)
        return (self._token_nll(outputs, target) * keep.to(outputs.dtype)).sum(dim=1)

    def cross_entropy_rows(self, outputs: torch.Tensor, batch: Any) -> torch.Tensor | None:
        """The counted next-token positions (batch × T grid, flat): the summed NLL is a
        cross-entropy of weight 1 at each (the last position predicts nothing)."""
        _, keep = self.targets(batch, completion=False)
        grid = torch.zeros(outputs.shape[:2], dtype=torch.bool, device=outputs.device)
        grid[:, :-1] = keep
        return grid.flatten().nonzero().flatten()

    def loss(self, model: ModelFn, batch: Any) -> torch.Tensor:
        return self.output_loss(self.outputs(model, batch), batch)

    def measurement(self, model: ModelFn, batch: Any) -> torch.Tensor:
        """NLL (batch,) of the completion tokens (divided by their number when
        ``length_normalised``)."""
        logits = self.outputs(model, batch)
        target, keep = self.targets(batch, completion=True)
        keep = keep.to(logits.dtype)
        nll = (self._token_nll(logits, target) * keep).sum(dim=1)
        if self.length_normalised:
            nll = nll / keep.sum(dim=1).clamp_min(1.0)
        return nll

    # -- validation ----------------------------------------------------------------------------

    def check_data(self, data: Any, name: str) -> None:
        self._check_fields(data, name, 0)

    def _check_fields(self, data: Any, name: str, offset: int) -> None:
        """Token ids, the masks' shapes, ``prompt_length`` and a token to predict in every
        example (``offset``: the index of the first)."""
        fields = self._fields(data)
        ids = fields[self.input_key]
        if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise DataError(
                f"{name}: {self.input_key} must be integer token ids of shape (examples, "
                f"tokens), got dtype {ids.dtype} and shape {tuple(ids.shape)}"
            )
        for key in ("attention_mask", "labels", "completion_mask"):
            if key in fields and tuple(fields[key].shape) != tuple(ids.shape):
                raise DataError(
                    f"{name}: {key} has shape {tuple(fields[key].shape)}, {self.input_key} "
                    f"{tuple(ids.shape)}; they must match"
                )
        if "prompt_length" in fields:
            p = fields["prompt_length"]
            if p.dtype.is_floating_point or p.numel() != ids.shape[0]:
                raise DataError(
                    f"{name}: prompt_length must be one integer per example, got dtype "
                    f"{p.dtype} and shape {tuple(p.shape)}"
                )
        _, keep = self.targets(data, completion=True)
        empty = (keep.sum(dim=1) == 0).nonzero().flatten()
        if empty.numel():
            raise DataError(
                f"{name}: examples {(empty[:10] + offset).tolist()} have no token to predict "
                "(need at least two attended tokens, with labels not -100, after the prompt)"
            )

    def check_queries(self, queries: ExampleSource) -> None:
        """Queries need token ids; unlike other tasks' queries they may have another length
        than the training sequences, and keys of their own (``prompt_length``, ...)."""
        shapes = queries.example_shapes()
        if self.input_key not in shapes and "0" not in shapes:
            raise DataError(
                f"{queries.name} have parts {sorted(shapes)} and no {self.input_key!r}; pass "
                "them as a dict like the training data"
            )

    def check_batch(self, model: ModelFn, batch: Any, offset: int) -> None:
        # the whole-data checks again, per batch: a Dataset or DataLoader is not checked whole
        self._check_fields(batch, "sequences", offset)
        ids = self._fields(batch)[self.input_key]
        labels = self._fields(batch).get("labels", ids)
        vocab = self._vocab
        if vocab is None:  # read once from the model (runtime state, not fingerprinted)
            with torch.no_grad():
                vocab = self._vocab = int(self.outputs(model, _take_first(batch)).shape[-1])
        bad = ((labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))).any(dim=1)
        idx = bad.nonzero().flatten()
        if idx.numel():
            raise DataError(
                f"token ids out of range [0, {vocab}) in examples {(idx[:10] + offset).tolist()}"
            )
