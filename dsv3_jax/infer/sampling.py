"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus). The one sampler, used by
every decoding loop in `infer.generate` and `infer.stream`.

`Sampling.vocab_limit` masks padded vocabulary rows: a trainer rounds the model's vocabulary up (259 byte ids →
320 rows) and the rows past the tokenizer's vocabulary must never be emitted, greedy or sampled.

Compiled decoding loops key their programs on `Sampling.mode()` (which stages run: greedy or sampled, top-k on,
top-p on, the vocabulary limit) and pass the values (`Sampling.knobs()`: temperature, top-k, top-p) as traced
arrays, so a new temperature, top-k or top-p reuses the compiled program.
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

    def mode(self) -> SamplingMode:
        """The static part: which stages run (the compile key of a decoding loop)."""
        greedy = self.temperature <= 0
        return SamplingMode(greedy, not greedy and self.top_k > 0, not greedy and self.top_p < 1.0, self.vocab_limit)

    def knobs(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The traced part: (temperature f32, top_k i32, top_p f32) scalars."""
        return (jnp.asarray(self.temperature, jnp.float32), jnp.asarray(self.top_k, jnp.int32),
                jnp.asarray(self.top_p, jnp.float32))


@dataclasses.dataclass(frozen=True)
class SamplingMode:
    greedy: bool = True
    top_k: bool = False
    top_p: bool = False
    vocab_limit: int | None = None


def mask_vocab(logits_BV: jax.Array, vocab_limit: int | None) -> jax.Array:
    """Logits with the rows at and past `vocab_limit` set to -inf (unchanged when the limit covers them all)."""
    if vocab_limit is None or vocab_limit >= logits_BV.shape[-1]:
        return logits_BV
    keep_V = jnp.arange(logits_BV.shape[-1]) < vocab_limit
    return jnp.where(keep_V, logits_BV, -jnp.inf)


def sample_logits(logits_BV: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
    """Next token [B] int32 below `sampling.vocab_limit`: greedy at temperature 0, else temperature / top-k /
    top-p (nucleus) sampling."""
    return sample_with(logits_BV, rng, sampling.mode(), *sampling.knobs())


def sample_with(logits_BV: jax.Array, rng: jax.Array, mode: SamplingMode, temperature: jax.Array,
                top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """`sample_logits` with the values traced: `mode` says which stages run; temperature > 0, 1 ≤ top_k ≤ V when
    mode.top_k, 0 < top_p < 1 when mode.top_p (scalars, possibly traced)."""
    logits_BV = mask_vocab(logits_BV.astype(jnp.float32), mode.vocab_limit)
    if mode.greedy:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / temperature
    if mode.top_k or mode.top_p:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]  # descending
    if mode.top_k:
        kth_B1 = jax.lax.dynamic_slice_in_dim(sorted_BV, top_k - 1, 1, axis=1)
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
        sorted_BV = jnp.where(sorted_BV < kth_B1, -jnp.inf, sorted_BV)  # still descending: the same values, masked
    if mode.top_p:
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        keep_BV = (jnp.cumsum(probs_BV, axis=-1) - probs_BV < top_p) | (jnp.arange(probs_BV.shape[-1]) == 0)
        threshold_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < threshold_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(rng, logits_BV).astype(jnp.int32)
