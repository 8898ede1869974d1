"""Per-example gradients as pure functions, and the layer mechanics written once.

* :mod:`~datatrace.grads.per_example`: ``vmap`` per-example gradients and their loop twin.
* :mod:`~datatrace.grads.layers`: hooked ``nn.Linear``/``nn.Conv2d`` layers (inputs and
  output gradients from one batched pass), Conv2d unfolding, flat parameter offsets.
"""

from .layers import NotFactorable, conv_grads, hookable, layer_io
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
    "flatten_grads",
    "hookable",
    "layer_io",
    "per_example_grads",
    "per_example_grads_loop",
    "select_parameters",
]
