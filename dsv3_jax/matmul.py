"""The one matmul wrapper: every projection of the model goes through `einsum`.

Weights arrive as plain arrays today; a quantised-weight pytree (values + scales) plugs in here without the model
code branching on it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def einsum(eq: str, x: jax.Array, w: jax.Array, *, dtype: jnp.dtype | None = None) -> jax.Array:
    """`jnp.einsum(eq, x, w)` with both operands in `dtype` (default x.dtype), fp32 accumulation, result in dtype."""
    dtype = jnp.dtype(dtype or x.dtype)
    out = jnp.einsum(eq, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
    return out.astype(dtype)
