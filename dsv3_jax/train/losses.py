"""Training losses: next-token cross-entropy, the multi-token-prediction loss and the balance statistics
(DESIGN.md §2-3). All in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Per-position cross-entropy [B,T] in float32."""
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]


def masked_mean(values_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    mask = mask_BT.astype(jnp.float32)
    return jnp.sum(values_BT * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def mtp_losses(mtp_logits_KBTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """CE_k for each depth k = 1..K, [K]: depth k at position i predicts t_{i+k+1} = targets[i+k].

    Positions i with i + k >= T have no target and are excluded, as are positions whose target is masked.
    """
    depth, _, t = mtp_logits_KBTV.shape[:3]
    out = []
    for k in range(1, depth + 1):
        shifted_BT = jnp.pad(targets_BT[:, k:], ((0, 0), (0, k)))
        valid_BT = jnp.pad(mask_BT[:, k:], ((0, 0), (0, k))) & (jnp.arange(t) < t - k)[None]
        out.append(masked_mean(token_cross_entropy(mtp_logits_KBTV[k - 1], shifted_BT), valid_BT))
    return jnp.stack(out) if out else jnp.zeros((0,), jnp.float32)


def max_violation(load_E: jax.Array) -> jax.Array:
    """MaxVio = (max_i load_i - mean load) / mean load over the last axis (DESIGN.md §3)."""
    load = load_E.astype(jnp.float32)
    mean = jnp.mean(load, axis=-1)
    return (jnp.max(load, axis=-1) - mean) / jnp.maximum(mean, 1e-9)
