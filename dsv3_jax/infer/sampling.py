"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus). The one sampler, used by
every decoding loop in `infer.generate`.

`Sampling.vocab_limit` masks padded vocabulary rows: a trainer rounds the model's vocabulary up (259 byte ids →
320 rows) and the rows past the tokenizer's vocabulary must never be emitted, greedy or sampled.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    vocab_limit: int | None = None  # ids >= this are never emitted (None: every row of the logits)


def mask_vocab(logits_BV: jax.Array, vocab_limit: int | None) -> jax.Array:
    """Logits with the rows at and past `vocab_limit` set to -inf (unchanged when the limit covers them all)."""
    if vocab_limit is None or vocab_limit >= logits_BV.shape[-1]:
        return logits_BV
    keep_V = jnp.arange(logits_BV.shape[-1]) < vocab_limit
    return jnp.where(keep_V, logits_BV, -jnp.inf)


def sample_logits(logits_BV: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
    """Next token [B] int32 below `sampling.vocab_limit`: greedy at temperature 0, else temperature / top-k /
    top-p (nucleus) sampling."""
    logits_BV = mask_vocab(logits_BV.astype(jnp.float32), sampling.vocab_limit)
    if sampling.temperature <= 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / sampling.temperature
    if sampling.top_k:
        kth_B1 = jax.lax.top_k(logits_BV, sampling.top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if sampling.top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        keep_BV = (jnp.cumsum(probs_BV, axis=-1) - probs_BV < sampling.top_p) | (jnp.arange(probs_BV.shape[-1]) == 0)
        threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(rng, logits_BV).astype(jnp.int32)
