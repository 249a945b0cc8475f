"""Batched generation on the MLA latent cache: prefill, incremental decode in one compiled while-loop, sampling,
stop tokens, and greedy speculative decoding with the MTP module as the drafter.

Prompts of different lengths are right-padded; row b's token at position p lives in cache slot p. Pad tokens
write junk into slots past the prompt, which causality hides until the row's own decoded token overwrites them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.errors import InputError
from dsv3_jax.host import compiler_options
from dsv3_jax.infer.sampling import Sampling, SamplingMode, sample_with
from dsv3_jax.model.axes import CACHE_COLLECTION
from dsv3_jax.model.check import check_variables
from dsv3_jax.model.transformer import Transformer
from dsv3_jax.quant.matmul import target_platform

CACHE_BUCKET = 64  # cache slots are rounded up to a multiple of this: decode cost follows the live length
PROMPT_BUCKET = 16  # prompt widths are rounded up to a multiple of this (fewer recompiles)
DEFAULT_PREFILL_CHUNK = 2048  # prompt tokens per prefill step against the latent cache


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # new tokens per prompt (a stop token, when hit, is the last one)
    drafted: int = 0  # speculative decoding: MTP draft tokens checked
    accepted: int = 0  # ... and accepted by the main model

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else float("nan")


def _emit(out_BN, count_B, token_B, allowed_B):
    """Write token at column count for rows where allowed; returns (out, count + allowed)."""
    rows = jnp.arange(out_BN.shape[0])
    column = jnp.where(allowed_B, count_B, out_BN.shape[1])  # out of range → dropped
    return out_BN.at[rows, column].set(token_B, mode="drop"), count_B + allowed_B.astype(jnp.int32)


def _last_in_chunk(h_BCD, lengths_B, start: jax.Array, best_BD):
    """Keep each row's hidden state at its last prompt position when that position lies in this chunk."""
    c = h_BCD.shape[1]
    index_B = lengths_B - 1 - start
    inside_B = (index_B >= 0) & (index_B < c)
    picked_BD = h_BCD[jnp.arange(h_BCD.shape[0]), jnp.clip(index_B, 0, c - 1)]
    return jnp.where(inside_B[:, None], picked_BD, best_BD), inside_B


def _prefill(model, params, prompt_BT, lengths_B, chunk: int, speculative: bool):
    """Run the prompt through the cached model `chunk` tokens at a time (absorbed attention against the cache
    filled so far), so memory follows one chunk, not the prompt. Returns (last-position logits [B,V] float32,
    cache, MTP draft [B] at the last position or None). With speculative decoding each chunk also fills the
    MTP layer's cache, fed the next prompt token (and the greedy first token at the row's last position)."""
    b, t = prompt_BT.shape
    n = t // chunk
    next_BT = jnp.pad(prompt_BT[:, 1:], ((0, 0), (0, 1)))

    def step(carry, i):
        cache, h_last_BD, draft_B = carry
        start = i * chunk
        tokens_BC = jax.lax.dynamic_slice_in_dim(prompt_BT, start, chunk, axis=1)
        positions_BC = jnp.broadcast_to(start + jnp.arange(chunk, dtype=jnp.int32), (b, chunk))
        variables = params if cache is None else {**params, CACHE_COLLECTION: cache}
        h_BCD, state = model.apply(variables, tokens_BC, positions_BC, method=Transformer.hidden_states,
                                   mutable=[CACHE_COLLECTION])
        cache = state[CACHE_COLLECTION]
        h_last_BD, inside_B = _last_in_chunk(h_BCD, lengths_B, start, h_last_BD)
        if speculative:
            first_B = _greedy(model.apply(params, h_last_BD[:, None], method=Transformer.logits)[:, 0])
            next_BC = jax.lax.dynamic_slice_in_dim(next_BT, start, chunk, axis=1)
            last_BC = positions_BC == (lengths_B - 1)[:, None]
            next_BC = jnp.where(last_BC, first_B[:, None], next_BC)
            drafts_BC, cache = _mtp(model, params, cache, h_BCD, next_BC, positions_BC)
            index_B = jnp.clip(lengths_B - 1 - start, 0, chunk - 1)
            draft_B = jnp.where(inside_B, drafts_BC[jnp.arange(b), index_B], draft_B)
        return (cache, h_last_BD, draft_B), None

    # The first chunk creates the cache (zeros: the attention layers' initialiser) as it fills it, so a prompt of
    # one chunk, the common case, is one pass of the model: no loop and no separate trace for the cache's shapes
    # (tiny_stdlib's first generate call compiled in 9.7 s instead of 10.9, medians of 3, the same tokens).
    h0_BD = jnp.zeros((b, model.config.hidden_size), model.config.compute_dtype)
    carry, _ = step((None, h0_BD, jnp.zeros(b, jnp.int32)), 0)
    if n > 1:
        carry, _ = jax.lax.scan(step, carry, jnp.arange(1, n))
    cache, h_last_BD, draft_B = carry
    logits_BV = model.apply(params, h_last_BD[:, None], method=Transformer.logits)[:, 0]
    return logits_BV, cache, draft_B if speculative else None


def _greedy(logits_BV: jax.Array) -> jax.Array:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)


def _plain_loop(model, params, cache, first_B, lengths_B, rng, max_new, mode, knobs, stops):
    b = first_B.shape[0]
    out, count = _emit(jnp.zeros((b, max_new), jnp.int32), jnp.zeros(b, jnp.int32), first_B, jnp.ones(b, bool))
    done = jnp.isin(first_B, stops) | (count >= max_new)

    def body(carry):
        cache, token, position, out, count, done, rng = carry
        rng, sub = jax.random.split(rng)
        (logits, _), state = model.apply({**params, CACHE_COLLECTION: cache}, token[:, None], position[:, None],
                                         mutable=[CACHE_COLLECTION])
        new = sample_with(logits[:, 0], sub, mode, *knobs)
        out, count = _emit(out, count, new, ~done)
        done = done | jnp.isin(new, stops) | (count >= max_new)
        return state[CACHE_COLLECTION], new, position + 1, out, count, done, rng

    carry = (cache, first_B, lengths_B, out, count, done, rng)
    carry = jax.lax.while_loop(lambda c: ~jnp.all(c[5]), body, carry)
    return carry[3], carry[4], jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)


def _mtp(model, params, cache, h_BTD, next_BT, positions_BT):
    logits, state = model.apply({**params, CACHE_COLLECTION: cache}, h_BTD, next_BT, positions_BT,
                                method=Transformer.mtp_draft, mutable=[CACHE_COLLECTION])
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), state[CACHE_COLLECTION]


def _speculative_loop(model, params, cache, first_B, draft_B, lengths_B, max_new, stops):
    """Greedy decoding where each main forward checks [token, MTP draft]: 1 or 2 tokens per step, ≡ greedy."""
    b = first_B.shape[0]
    out, count = _emit(jnp.zeros((b, max_new), jnp.int32), jnp.zeros(b, jnp.int32), first_B, jnp.ones(b, bool))
    done = jnp.isin(first_B, stops) | (count >= max_new)

    def body(carry):
        cache, token, draft, position, out, count, done, drafted, accepted = carry
        positions = position[:, None] + jnp.arange(2)[None]
        (logits, h), state = model.apply({**params, CACHE_COLLECTION: cache}, jnp.stack([token, draft], 1),
                                         positions, mutable=[CACHE_COLLECTION])
        greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [B,2]
        ok = (greedy[:, 0] == draft) & ~done
        out, count = _emit(out, count, greedy[:, 0], ~done)
        stop1 = jnp.isin(greedy[:, 0], stops)
        usable = ~done & ~stop1 & (count < max_new)  # the draft could extend the output this step
        second = ok & usable
        out, count = _emit(out, count, greedy[:, 1], second)
        drafted, accepted = drafted + jnp.sum(usable), accepted + jnp.sum(second)
        done = done | stop1 | (second & jnp.isin(greedy[:, 1], stops)) | (count >= max_new)
        mtp_drafts, cache = _mtp(model, params, state[CACHE_COLLECTION], h, greedy, positions)
        token = jnp.where(ok, greedy[:, 1], greedy[:, 0])
        draft = jnp.where(ok, mtp_drafts[:, 1], mtp_drafts[:, 0])
        return cache, token, draft, position + 1 + ok, out, count, done, drafted, accepted

    zero = jnp.zeros((), jnp.int32)
    carry = (cache, first_B, draft_B, lengths_B, out, count, done, zero, zero)
    carry = jax.lax.while_loop(lambda c: ~jnp.all(c[6]), body, carry)
    return carry[4], carry[5], carry[7], carry[8]


@functools.lru_cache(maxsize=32)
def _compiled(config: ModelConfig, cache_len: int, max_new: int, mode: SamplingMode, speculative: bool,
              stops: tuple[int, ...], chunk: int):
    """The jitted generation program `run(params, prompt, lengths, rng, knobs)`. Keyed on the sampling mode only:
    temperature, top-k and top-p arrive traced in `knobs` (`Sampling.knobs()`), so new values do not recompile."""
    model = Transformer(config, cache_len)
    stops_arr = jnp.asarray(stops if stops else (-1,), jnp.int32)

    def run(params, prompt_BT, lengths_B, rng, knobs):
        rng, sub = jax.random.split(rng)
        last_BV, cache, draft_B = _prefill(model, params, prompt_BT, lengths_B, chunk, speculative)
        first_B = sample_with(last_BV, sub, mode, *knobs)
        if speculative:
            return _speculative_loop(model, params, cache, first_B, draft_B, lengths_B, max_new, stops_arr)
        return _plain_loop(model, params, cache, first_B, lengths_B, rng, max_new, mode, knobs, stops_arr)

    return jax.jit(run, compiler_options=compiler_options(target_platform()))


def _pad_prompts(config: ModelConfig, prompts: Sequence[Sequence[int]], max_new: int) -> tuple[np.ndarray, np.ndarray]:
    if not prompts:
        raise InputError("no prompts given")
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    if (lengths == 0).any():
        raise InputError(f"prompt {int(np.argmin(lengths))} is empty")
    if lengths.max() + max_new > config.max_position_embeddings:
        raise InputError(f"prompt of {lengths.max()} tokens + max_new_tokens={max_new} exceeds "
                         f"max_position_embeddings={config.max_position_embeddings}")
    width = int(-(-lengths.max() // PROMPT_BUCKET) * PROMPT_BUCKET)  # bucket prompt widths to limit recompiles
    padded = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        ids = np.asarray(p)
        bad = (ids < 0) | (ids >= config.vocab_size)
        if bad.any():
            raise InputError(f"prompt {i}: token id {int(ids[bad][0])} is outside [0, vocab_size={config.vocab_size})")
        padded[i, : len(ids)] = ids
    return padded, lengths


def _chunked(padded_BT: np.ndarray, chunk: int) -> tuple[np.ndarray, int]:
    """(prompts padded to a whole number of prefill chunks, the chunk length used)."""
    if not isinstance(chunk, (int, np.integer)) or isinstance(chunk, bool) or chunk <= 0 or chunk % PROMPT_BUCKET:
        raise InputError(f"prefill_chunk must be a positive multiple of {PROMPT_BUCKET}, got {chunk!r}")
    width = padded_BT.shape[1]
    if width <= chunk:
        return padded_BT, width
    full = -(-width // chunk) * chunk
    return np.pad(padded_BT, ((0, 0), (0, full - width))), int(chunk)


def _as_prompt_list(prompt_ids) -> list[list[int]]:
    """A flat id sequence is one prompt; a nested sequence or a 2-D array is a batch."""
    if isinstance(prompt_ids, (np.ndarray, jax.Array)):
        arr = np.asarray(prompt_ids)
        if arr.ndim not in (1, 2):
            raise InputError(f"prompt_ids must be 1-D or 2-D, got shape {arr.shape}")
        return [arr.tolist()] if arr.ndim == 1 else arr.tolist()
    prompt_ids = list(prompt_ids)
    if prompt_ids and isinstance(prompt_ids[0], (int, np.integer)):
        return [prompt_ids]
    return [list(p) for p in prompt_ids]


def _check_sampling(config: ModelConfig, temperature: float, top_k: int, top_p: float) -> None:
    if not np.isfinite(temperature) or temperature < 0:
        raise InputError(f"temperature must be a finite number >= 0, got {temperature}")
    if not 0 <= top_k <= config.vocab_size:
        raise InputError(f"top_k must be in [0, vocab_size={config.vocab_size}], got {top_k}")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")


def generate(config: ModelConfig, variables: dict, prompt_ids: Sequence[Sequence[int]] | Sequence[int],
             max_new_tokens: int, temperature: float = 0.0, *, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop_ids: Sequence[int] | None = None, speculative: bool = False,
             prefill_chunk: int = DEFAULT_PREFILL_CHUNK, vocab_limit: int | None = None) -> Generation:
    """Generate up to max_new_tokens per prompt (a flat list of ids is one prompt).

    stop_ids default to (config.eos_token_id,); pass () to never stop early. speculative=True drafts with the MTP
    module and verifies with the main model (greedy only); the output equals plain greedy decoding.
    prefill_chunk: prompts longer than this are prefilled this many tokens at a time against the latent cache
    (a positive multiple of 16; memory follows one chunk, the result is the same).
    vocab_limit: ids >= this are never emitted (a tokenizer's vocabulary inside a padded model vocabulary);
    speculative decoding drafts unmasked and falls back to masked plain greedy if it ever emits one.
    """
    prompt_ids = _as_prompt_list(prompt_ids)
    if vocab_limit is not None and not 0 < vocab_limit <= config.vocab_size:
        raise InputError(f"vocab_limit must be in [1, vocab_size={config.vocab_size}], got {vocab_limit}")
    if vocab_limit is not None and top_k > vocab_limit:
        raise InputError(f"top_k must be <= vocab_limit={vocab_limit}, got {top_k}")
    if max_new_tokens <= 0:
        raise InputError(f"max_new_tokens must be > 0, got {max_new_tokens}")
    _check_sampling(config, temperature, top_k, top_p)
    if speculative and (temperature > 0 or config.num_nextn_predict_layers < 1):
        raise InputError("speculative decoding needs greedy decoding (temperature 0) and an MTP module")
    check_variables(config, variables, need_mtp=speculative)
    padded, lengths = _pad_prompts(config, prompt_ids, max_new_tokens)
    padded, chunk = _chunked(padded, prefill_chunk)
    needed = max(padded.shape[1], int(lengths.max()) + max_new_tokens + 2)
    cache_len = int(-(-needed // CACHE_BUCKET) * CACHE_BUCKET)
    stops = tuple(int(s) for s in ((config.eos_token_id,) if stop_ids is None else stop_ids))
    limit = None if vocab_limit is None or vocab_limit >= config.vocab_size else int(vocab_limit)
    sampling = Sampling(temperature, top_k, top_p, limit)
    fn = _compiled(config, cache_len, max_new_tokens, sampling.mode(), speculative, stops, chunk)
    params = {k: v for k, v in variables.items() if k in ("params", "router")}
    out, count, drafted, accepted = jax.device_get(fn(params, padded, lengths, jax.random.key(seed), sampling.knobs()))
    tokens = [out[i, : count[i]].tolist() for i in range(len(lengths))]
    if speculative and limit is not None and any(t >= limit for row in tokens for t in row):
        # the verifier's argmax is unmasked; unmasked greedy picked a padded id, so decode masked greedy instead
        return generate(config, variables, prompt_ids, max_new_tokens, stop_ids=stops, seed=seed,
                        prefill_chunk=prefill_chunk, vocab_limit=limit)
    return Generation(tokens, int(drafted), int(accepted))
