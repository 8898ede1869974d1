"""Per-example gradients as pure functions, and the layer mechanics written once.

* :mod:`~datatrace.grads.per_example`: ``vmap`` per-example gradients and their loop twin.
* :mod:`~datatrace.grads.layers`: hooked ``nn.Linear``/``nn.Conv2d`` layers (inputs and
  output gradients from one batched pass), THE forward-hook capture (:func:`layer_calls`),
  THE Conv2d unfolding (:func:`conv_patches`), flat parameter offsets
  (:func:`flat_offsets`).
* :mod:`~datatrace.grads.rules`: the hook rules (Linear on any ``(B, ..., in)`` input,
  transformers' Conv1D, Conv2d, Embedding, LayerNorm; tied parameters summed):
  :func:`hook_plan`, :func:`capture`, :func:`call_grads`, :class:`Term`, :func:`form`.
"""

from .layers import (
    NotFactorable,
    conv_grads,
    conv_patches,
    flat_offsets,
    hookable,
    layer_calls,
)
from .per_example import (
    bound_model,
    flatten_grads,
    per_example_grads,
    per_example_grads_loop,
    select_parameters,
)
from .rules import HookPlan, Term, call_grads, capture, form, hook_plan, hooked_grads, rule_kind

__all__ = [
    "HookPlan",
    "NotFactorable",
    "Term",
    "bound_model",
    "call_grads",
    "capture",
    "conv_grads",
    "conv_patches",
    "flat_offsets",
    "flatten_grads",
    "form",
    "hook_plan",
    "hookable",
    "hooked_grads",
    "layer_calls",
    "per_example_grads",
    "per_example_grads_loop",
    "rule_kind",
    "select_parameters",
]
