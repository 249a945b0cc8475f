"""Rotary position embedding with YaRN scaling (DESIGN.md §2).

Layout: the released weights rotate *adjacent pairs* (x_2i, x_2i+1) as complex numbers; so does this module, and
so the decode cache holds k_pe in that pair order. HF's `rope_interleave=True` path computes the same rotation
but writes its output de-interleaved ([evens, odds]); q·k is identical.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig, RopeScaling, yarn_mscale


def _correction_dim(rotations: float, dim: int, base: float, length: int) -> float:
    return dim * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(base))


def yarn_ramp(dim: int, base: float, r: RopeScaling) -> np.ndarray:
    """ramp_i in [0, 1] for i < dim/2: 0 keeps the original frequency, 1 divides it by the factor."""
    low = _correction_dim(r.beta_fast, dim, base, r.original_max_position_embeddings)
    high = _correction_dim(r.beta_slow, dim, base, r.original_max_position_embeddings)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    return np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """f'_i for i < R/2 (float32): θ^(-2i/R), YaRN-interpolated when rope_scaling is set."""
    dim, base = config.qk_rope_head_dim, config.rope_theta
    freq = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    r = config.rope_scaling
    if r is not None:
        ramp = yarn_ramp(dim, base, r)
        freq = freq / r.factor * ramp + freq * (1.0 - ramp)
    return freq.astype(np.float32)


def cos_sin_factor(config: ModelConfig) -> float:
    """Magnitude applied to cos/sin (HF's attention_factor; 1.0 when mscale == mscale_all_dim)."""
    r = config.rope_scaling
    if r is None:
        return 1.0
    if r.attention_factor is not None:
        return float(r.attention_factor)
    if r.mscale and r.mscale_all_dim:
        return yarn_mscale(r.factor, r.mscale) / yarn_mscale(r.factor, r.mscale_all_dim)
    return yarn_mscale(r.factor)


def softmax_scale(config: ModelConfig) -> float:
    """(N + R)^-0.5, times mscale(factor, mscale_all_dim)² when yarn is on (671B: 0.1352338)."""
    scale = config.qk_head_dim ** -0.5
    r = config.rope_scaling
    if r is not None and r.mscale_all_dim:
        scale *= yarn_mscale(r.factor, r.mscale_all_dim) ** 2
    return scale


def rotary_tables(config: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape positions.shape + (R/2,), float32."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inverse_frequencies(config))
    factor = cos_sin_factor(config)
    return jnp.cos(angles) * factor, jnp.sin(angles) * factor


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate adjacent pairs of x's last axis (size R); cos/sin [..., R/2] broadcast against x[..., R/2]."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([real * cos - imag * sin, imag * cos + real * sin], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)
