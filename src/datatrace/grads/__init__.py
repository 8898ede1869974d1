"""Per-example gradients as pure functions, and the layer mechanics written once.

* :mod:`~datatrace.grads.per_example`: ``vmap`` per-example gradients and their loop twin.
* :mod:`~datatrace.grads.layers`: hooked ``nn.Linear``/``nn.Conv2d`` layers (inputs and
  output gradients from one batched pass), THE forward-hook capture (:func:`layer_calls`),
  THE Conv2d unfolding (:func:`conv_patches`), flat parameter offsets
  (:func:`flat_offsets`).
"""

from .layers import (
    NotFactorable,
    conv_grads,
    conv_patches,
    flat_offsets,
    hookable,
    layer_calls,
    layer_io,
)
from .per_example import (
    bound_model,
    flatten_grads,
    per_example_grads,
    per_example_grads_loop,
    select_parameters,
)

__all__ = [
    "NotFactorable",
    "bound_model",
    "conv_grads",
    "conv_patches",
    "flat_offsets",
    "flatten_grads",
    "hookable",
    "layer_calls",
    "layer_io",
    "per_example_grads",
    "per_example_grads_loop",
    "select_parameters",
]
