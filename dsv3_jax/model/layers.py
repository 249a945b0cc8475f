"""Small building blocks shared by every module: parameter declaration with logical axes, RMSNorm, SwiGLU MLP.

Shape suffixes and logical axis names: see the legend in `dsv3_jax.model.axes`.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.config import MatmulPolicy, ModelConfig
from dsv3_jax.quant.matmul import einsum


def weight(module: nn.Module, name: str, shape: Sequence[int], axes: Sequence[str], config: ModelConfig,
           *, dtype: jnp.dtype | None = None, init: str = "normal") -> jax.Array:
    """Declare a parameter with logical axis names; `init` is "normal" (std config.init_std) or "ones"/"zeros"."""
    initializer = {"normal": nn.initializers.normal(config.init_std), "ones": nn.initializers.ones,
                   "zeros": nn.initializers.zeros}[init]
    dtype = config.weight_dtype if dtype is None else dtype
    return module.param(name, nn.with_logical_partitioning(initializer, tuple(axes)), tuple(shape), dtype)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Logical sharding constraint on an activation (no-op outside a mesh with rules)."""
    return nn.with_logical_constraint(x, tuple(axes))


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x · rsqrt(mean(x²) + eps), computed in float32 and cast back to x.dtype before the scale (as HF)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * normed.astype(x.dtype)


class RMSNorm(nn.Module):
    config: ModelConfig
    dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = weight(self, "scale", (self.dim,), ("norm",), self.config, init="ones")
        return rms_norm(x, scale, self.config.rms_norm_eps)


def swiglu(x_BTD: jax.Array, w_gate_DF: jax.Array, w_up_DF: jax.Array, w_down_FD: jax.Array,
           policy: MatmulPolicy | None = None) -> jax.Array:
    """W_down(silu(W_gate x) ⊙ W_up x) over the last axis of x."""
    gate = einsum("...d,df->...f", x_BTD, w_gate_DF, policy=policy)
    up = einsum("...d,df->...f", x_BTD, w_up_DF, policy=policy)
    return einsum("...f,fd->...d", jax.nn.silu(gate) * up, w_down_FD, policy=policy)


class MLP(nn.Module):
    """Dense SwiGLU feed-forward (dense layers and the shared experts)."""

    config: ModelConfig
    hidden: int
    mlp_axis: str = "mlp"

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        c, f = self.config, self.hidden
        w_gate = weight(self, "w_gate", (c.hidden_size, f), ("embed", self.mlp_axis), c)
        w_up = weight(self, "w_up", (c.hidden_size, f), ("embed", self.mlp_axis), c)
        w_down = weight(self, "w_down", (f, c.hidden_size), (self.mlp_axis, "embed"), c)
        with jax.named_scope("mlp"):
            return swiglu(x_BTD, w_gate, w_up, w_down, c.matmul_policy)
