"""Simple sampling without a KV cache: one fixed-size buffer, one compiled forward, greedy or temperature."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import Transformer


@functools.cache
def _step_fn(config: ModelConfig):
    model = Transformer(config)

    def step(variables, buffer_1S, position, rng, temperature):
        logits_V = model.apply(variables, buffer_1S)[0][0, position]
        greedy = jnp.argmax(logits_V)
        sampled = jax.random.categorical(rng, logits_V / jnp.maximum(temperature, 1e-6))
        return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)

    return jax.jit(step)


def sample_tokens(config: ModelConfig, variables: dict, prompt_ids: list[int], num_tokens: int,
                  temperature: float = 0.0, seed: int = 0, stop_id: int | None = None) -> list[int]:
    """Continue `prompt_ids` by up to `num_tokens` tokens (recomputes the prefix each step; for demos and tests)."""
    length = len(prompt_ids) + num_tokens
    if not prompt_ids or length > config.max_position_embeddings:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens + {num_tokens} new tokens must be non-empty and fit "
                         f"max_position_embeddings={config.max_position_embeddings}")
    buffer = np.zeros((1, length), np.int32)
    buffer[0, : len(prompt_ids)] = prompt_ids
    step, rng = _step_fn(config), jax.random.key(seed)
    out = []
    for position in range(len(prompt_ids) - 1, length - 1):
        rng, sub = jax.random.split(rng)
        token = int(step(variables, buffer, position, sub, jnp.float32(temperature)))
        buffer[0, position + 1] = token
        out.append(token)
        if token == stop_id:
            break
    return out
