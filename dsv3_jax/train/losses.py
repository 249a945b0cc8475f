"""Training losses: next-token cross-entropy, the multi-token-prediction loss and the balance statistics
(DESIGN.md §2-3). All in float32.

The training step never materialises the [B,T,V] float32 logits (V = 129,280 at 671B: 2 GB per 4K sequence, and as
much again for its cotangent, per head): `hidden_states_with_mtp` returns the final hidden states where the model
would return logits, and `chunked_cross_entropy` applies the output head `chunk` positions at a time under
`jax.checkpoint`, so one chunk's logits are live in the forward pass and recomputed chunk by chunk in the backward.
The result equals `token_cross_entropy` of the full logits (same head product, same float32 log-softmax).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.model.transformer import Transformer, head_logits
from dsv3_jax.quant.matmul import target_platform

LOSS_CHUNK = 512  # sequence positions per chunk of the chunked cross-entropy


def token_cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Per-position cross-entropy [B,T] in float32.

    The target's log-probability is picked by a select against the vocabulary index, not `take_along_axis`: the
    value is the same, but the gradient is then an elementwise select fused into the softmax backward instead of
    a scatter into a zero [B,T,V] buffer (XLA:CPU runs scatters as a slow loop)."""
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    hit_BTV = jax.lax.broadcasted_iota(jnp.int32, logp_BTV.shape, logp_BTV.ndim - 1) == targets_BT[..., None]
    return -jnp.sum(jnp.where(hit_BTV, logp_BTV, 0.0), axis=-1)


def _head_cross_entropy(h_BTD: jax.Array, lm_head_DV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """`token_cross_entropy` of the head's logits; on CPU over the flattened positions (see `layers.dense`: the
    head's weight gradient from [B,T,V] logits made XLA:CPU copy-transpose the whole logit cotangent first)."""
    if target_platform() != "cpu":
        return token_cross_entropy(head_logits(h_BTD, lm_head_DV), targets_BT)
    b, t, d = h_BTD.shape
    logits_MV = head_logits(h_BTD.reshape(b * t, d), lm_head_DV)
    return token_cross_entropy(logits_MV.reshape(b, t, -1), targets_BT)


def chunked_cross_entropy(h_BTD: jax.Array, lm_head_DV: jax.Array, targets_BT: jax.Array,
                          chunk: int = LOSS_CHUNK) -> jax.Array:
    """Per-position cross-entropy [B,T] of the head's logits, computed `chunk` positions at a time.

    h [B,T,D] are final hidden states (after the final norm), lm_head [D,V]. chunk <= 0 or >= T: one piece.
    """
    b, t, d = h_BTD.shape
    if chunk <= 0 or chunk >= t:
        return _head_cross_entropy(h_BTD, lm_head_DV, targets_BT)
    pieces = -(-t // chunk)
    pad = pieces * chunk - t
    h_OBCD = jnp.pad(h_BTD, ((0, 0), (0, pad), (0, 0))).reshape(b, pieces, chunk, d).swapaxes(0, 1)
    targets_OBC = jnp.pad(targets_BT, ((0, 0), (0, pad))).reshape(b, pieces, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(args):
        h_BCD, targets_BC = args
        return _head_cross_entropy(h_BCD, lm_head_DV, targets_BC)

    ce_OBC = jax.lax.map(one, (h_OBCD, targets_OBC))
    return ce_OBC.swapaxes(0, 1).reshape(b, pieces * chunk)[:, :t]


def masked_mean(values_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    mask = mask_BT.astype(jnp.float32)
    return jnp.sum(values_BT * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _mtp_targets(targets_BT: jax.Array, mask_BT: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(targets t_{i+k+1} = targets[i+k] [B,T], valid [B,T]) of MTP depth k; positions past the end are invalid."""
    t = targets_BT.shape[1]
    shifted_BT = jnp.pad(targets_BT[:, k:], ((0, 0), (0, k)))
    valid_BT = jnp.pad(mask_BT[:, k:], ((0, 0), (0, k))) & (jnp.arange(t) < t - k)[None]
    return shifted_BT, valid_BT


def mtp_losses(mtp_logits_KBTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
    """CE_k for each depth k = 1..K, [K]: depth k at position i predicts t_{i+k+1} = targets[i+k].

    Positions i with i + k >= T have no target and are excluded, as are positions whose target is masked.
    """
    out = []
    for k in range(1, mtp_logits_KBTV.shape[0] + 1):
        shifted_BT, valid_BT = _mtp_targets(targets_BT, mask_BT, k)
        out.append(masked_mean(token_cross_entropy(mtp_logits_KBTV[k - 1], shifted_BT), valid_BT))
    return jnp.stack(out) if out else jnp.zeros((0,), jnp.float32)


def chunked_mtp_losses(mtp_hidden_KBTD: jax.Array, lm_head_DV: jax.Array, targets_BT: jax.Array,
                       mask_BT: jax.Array, chunk: int = LOSS_CHUNK) -> jax.Array:
    """`mtp_losses` from the MTP depths' final hidden states [K,B,T,D] and the shared head, chunk by chunk."""
    out = []
    for k in range(1, mtp_hidden_KBTD.shape[0] + 1):
        shifted_BT, valid_BT = _mtp_targets(targets_BT, mask_BT, k)
        ce_BT = chunked_cross_entropy(mtp_hidden_KBTD[k - 1], lm_head_DV, shifted_BT, chunk)
        out.append(masked_mean(ce_BT, valid_BT))
    return jnp.stack(out) if out else jnp.zeros((0,), jnp.float32)


def hidden_states_with_mtp(model: Transformer, variables: dict, tokens_BT: jax.Array, **apply_kwargs):
    """`Transformer.forward_with_mtp` with the output head left out: ((final hidden [B,T,D], MTP depths' final
    hidden [K,B,T,D]), ...) where it returns logits — `Transformer.logits` is intercepted to hand back its input.
    `apply_kwargs` go to `model.apply` (e.g. mutable=[...])."""

    def keep_hidden(next_fun, args, kwargs, context):
        if context.method_name == "logits" and isinstance(context.module, Transformer):
            return args[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(keep_hidden):
        return model.apply(variables, tokens_BT, method=Transformer.forward_with_mtp, **apply_kwargs)


def max_violation(load_E: jax.Array) -> jax.Array:
    """MaxVio = (max_i load_i - mean load) / mean load over the last axis (DESIGN.md §3)."""
    load = load_E.astype(jnp.float32)
    mean = jnp.mean(load, axis=-1)
    return (jnp.max(load, axis=-1) - mean) / jnp.maximum(mean, 1e-9)
