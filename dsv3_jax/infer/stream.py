"""Token-by-token generation for one prompt, yielded as each token is decoded (chat, streaming CLIs).

The prefill is `generate`'s own (chunked, absorbed attention against the latent cache); each further token is
one compiled decode step driven from Python, so the caller sees it at once. Greedy output equals `generate`'s.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.errors import InputError
from dsv3_jax.host import compiler_options
from dsv3_jax.infer.generate import (
    CACHE_BUCKET,
    DEFAULT_PREFILL_CHUNK,
    _check_sampling,
    _chunked,
    _pad_prompts,
    _prefill,
)
from dsv3_jax.infer.sampling import Sampling, SamplingMode, sample_with
from dsv3_jax.model.axes import CACHE_COLLECTION
from dsv3_jax.model.check import check_variables
from dsv3_jax.model.transformer import Transformer
from dsv3_jax.quant.matmul import target_platform


@functools.lru_cache(maxsize=16)
def _programs(config: ModelConfig, cache_len: int, mode: SamplingMode, chunk: int):
    """(prefill(params, prompt, lengths, rng, knobs) → (token, cache), step(params, cache, token, position, rng,
    knobs) → (token, cache)), compiled once per shape and sampling mode (the values are traced knobs)."""
    model = Transformer(config, cache_len)

    def prefill(params, prompt_BT, lengths_B, rng, knobs):
        last_BV, cache, _ = _prefill(model, params, prompt_BT, lengths_B, chunk, False)
        return sample_with(last_BV, rng, mode, *knobs), cache

    def step(params, cache, token_B, position_B, rng, knobs):
        (logits, _), state = model.apply({**params, CACHE_COLLECTION: cache}, token_B[:, None], position_B[:, None],
                                         mutable=[CACHE_COLLECTION])
        return sample_with(logits[:, 0], rng, mode, *knobs), state[CACHE_COLLECTION]

    options = compiler_options(target_platform())
    return jax.jit(prefill, compiler_options=options), jax.jit(step, donate_argnums=(1,), compiler_options=options)


def stream(config: ModelConfig, variables: dict, prompt_ids: Sequence[int], max_new_tokens: int,
           temperature: float = 0.0, *, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
           stop_ids: Sequence[int] | None = None, vocab_limit: int | None = None,
           prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> Iterator[int]:
    """Yield up to max_new_tokens new ids for one prompt as they are decoded; a stop id, when hit, is the last.
    Arguments as `generate`'s (stop_ids default to (config.eos_token_id,))."""
    if max_new_tokens <= 0:
        raise InputError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    _check_sampling(config, temperature, top_k, top_p)
    if vocab_limit is not None and not 0 < vocab_limit <= config.vocab_size:
        raise InputError(f"vocab_limit must be in [1, vocab_size={config.vocab_size}], got {vocab_limit}")
    check_variables(config, variables)
    padded, lengths = _pad_prompts(config, [list(prompt_ids)], max_new_tokens)
    padded, chunk = _chunked(padded, prefill_chunk)
    needed = max(padded.shape[1], int(lengths.max()) + max_new_tokens + 2)
    cache_len = int(-(-needed // CACHE_BUCKET) * CACHE_BUCKET)
    limit = None if vocab_limit is None or vocab_limit >= config.vocab_size else int(vocab_limit)
    sampling = Sampling(temperature, top_k, top_p, limit)
    prefill, step = _programs(config, cache_len, sampling.mode(), chunk)
    knobs = sampling.knobs()
    stops = {int(s) for s in ((config.eos_token_id,) if stop_ids is None else stop_ids)}
    params = {k: v for k, v in variables.items() if k in ("params", "router")}
    rng = jax.random.key(seed)
    rng, sub = jax.random.split(rng)
    token, cache = prefill(params, padded, lengths, sub, knobs)
    position = jnp.asarray(lengths)
    for i in range(max_new_tokens):
        value = int(np.asarray(token)[0])
        yield value
        if value in stops or i + 1 == max_new_tokens:
            return
        rng, sub = jax.random.split(rng)
        token, cache = step(params, cache, token, position, sub, knobs)
        position = position + 1
