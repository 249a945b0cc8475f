"""Small building blocks shared by every module: parameter declaration with logical axes, RMSNorm, SwiGLU MLP.

Shape suffixes and logical axis names: see the legend in `dsv3_jax.model.axes`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.config import MatmulPolicy, ModelConfig
from dsv3_jax.quant.matmul import einsum, target_platform


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
    return _rms_norm(x, scale, eps)


def _rms_norm_fwd(x, scale, eps):
    x32 = x.astype(jnp.float32)
    rsqrt_1 = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(x.dtype) * (x32 * rsqrt_1).astype(x.dtype), (x, scale, rsqrt_1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """`rms_norm` with its own backward. Why: autodiff keeps float32 copies of x and of the normalised x per
    norm (four per decoder layer, stacked by the layer scan); this keeps only x and one rsqrt per row."""
    return _rms_norm_fwd(x, scale, eps)[0]


def _rms_norm_bwd(eps, residuals, g):
    x, scale, rsqrt_1 = residuals
    x32 = x.astype(jnp.float32)
    normed = x32 * rsqrt_1
    dscale = jnp.sum((g * normed.astype(x.dtype)).astype(jnp.float32), axis=tuple(range(x.ndim - 1)))
    dnormed = (g * scale.astype(x.dtype)).astype(jnp.float32)
    dx = rsqrt_1 * (dnormed - normed * jnp.mean(dnormed * normed, axis=-1, keepdims=True))
    return dx.astype(x.dtype), dscale.reshape(scale.shape).astype(scale.dtype)


_rms_norm.defvjp(lambda x, scale, eps: _rms_norm_fwd(x, scale, eps), _rms_norm_bwd)


class RMSNorm(nn.Module):
    config: ModelConfig
    dim: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = weight(self, "scale", (self.dim,), ("norm",), self.config, init="ones")
        return rms_norm(x, scale, self.config.rms_norm_eps)


def dense(x: jax.Array, w, policy: MatmulPolicy | None = None) -> jax.Array:
    """x[..., K] · w[K, N] → [..., N] through the one matmul wrapper.

    On CPU the leading axes are flattened first: with two or more of them autodiff's weight gradient contracts
    over several axes, and XLA:CPU then transposes the [..., N] cotangent into a fresh copy before the dot (a
    loop fusion that took as long as the dot itself; the MLP's value and gradients ran 1.7x slower). Elsewhere
    the einsum keeps its axes (a sequence-sharded T must not be merged into the batch).
    """
    if x.ndim <= 2 or target_platform() != "cpu":
        return einsum("...k,kn->...n", x, w, policy=policy)
    y_MN = einsum("mk,kn->mn", x.reshape(-1, x.shape[-1]), w, policy=policy)
    return y_MN.reshape(*x.shape[:-1], y_MN.shape[-1])


def swiglu(x_BTD: jax.Array, w_gate_DF: jax.Array, w_up_DF: jax.Array, w_down_FD: jax.Array,
           policy: MatmulPolicy | None = None) -> jax.Array:
    """W_down(silu(W_gate x) ⊙ W_up x) over the last axis of x."""
    gate = dense(x_BTD, w_gate_DF, policy)
    up = dense(x_BTD, w_up_DF, policy)
    return dense(jax.nn.silu(gate) * up, w_down_FD, policy)


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
