"""Long context: the blockwise attention path equals the naive one inside the whole model (logits and gradients,
past YaRN's original length), chunked prefill equals one-shot prefill token for token, YaRN rotary tables match
HF's at positions up to max_position_embeddings, and bad settings are clear errors."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import dsv3_jax as d
from dsv3_jax.errors import ConfigError, InputError
from dsv3_jax.model.attention import NAIVE_MAX_SCORES, resolve_attention_impl
from dsv3_jax.model.rope import rotary_tables
from tests.conftest import TINY, random_tokens

LONG = dataclasses.replace(TINY, max_position_embeddings=512)  # yarn original length 32: positions far past it
NAIVE = LONG.replace(attention_impl="naive")
BLOCKWISE = LONG.replace(attention_impl="blockwise", attention_block=32)


@pytest.fixture(scope="module")
def variables():
    return d.init_variables(LONG, 3)


def test_auto_picks_naive_for_small_scores_and_blockwise_beyond():
    assert resolve_attention_impl(LONG, 64, 64) == "naive"
    assert resolve_attention_impl(LONG, NAIVE_MAX_SCORES, 2) == "blockwise"
    assert resolve_attention_impl(BLOCKWISE, 4, 4) == "blockwise"


def test_blockwise_forward_equals_naive_past_yarn_length(variables):
    tokens = random_tokens(LONG, 2, 200, seed=1)  # 200 > original_max_position_embeddings = 32, 7 blocks of 32
    naive, mtp_naive = d.forward_with_mtp(NAIVE, variables, tokens)
    blockwise, mtp_blockwise = d.forward_with_mtp(BLOCKWISE, variables, tokens)
    np.testing.assert_allclose(np.asarray(blockwise), np.asarray(naive), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(mtp_blockwise), np.asarray(mtp_naive), atol=1e-4, rtol=0)


def _loss(config, params, router, tokens):
    logits = d.Transformer(config).apply({"params": params, "router": router}, tokens)[0]
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def test_blockwise_gradients_equal_naive(variables):
    tokens = jnp.asarray(random_tokens(LONG, 2, 96, seed=2))
    grads = {}
    for name, config in (("naive", NAIVE), ("blockwise", BLOCKWISE)):
        fn = jax.jit(jax.grad(lambda p, c=config: _loss(c, p, variables["router"], tokens)))
        grads[name] = fn(variables["params"])
    flat_naive = jax.tree_util.tree_leaves_with_path(grads["naive"])
    flat_block = jax.tree_util.tree_leaves(grads["blockwise"])
    for (path, g_naive), g_block in zip(flat_naive, flat_block, strict=True):
        scale = max(float(jnp.max(jnp.abs(g_naive))), 1e-6)
        err = float(jnp.max(jnp.abs(g_block - g_naive))) / scale
        assert err <= 1e-4, f"{jax.tree_util.keystr(path)}: relative gradient error {err:.2e}"


@pytest.mark.parametrize("speculative", [False, True], ids=["greedy", "speculative"])
def test_chunked_prefill_equals_one_shot(variables, speculative):
    """Prompts of 150 and 97 tokens prefilled 16 tokens at a time (10 chunks) give the same greedy tokens as one
    prefill pass (chunk 2048)."""
    prompts = [random_tokens(LONG, 1, 150, seed=4)[0].tolist(), random_tokens(LONG, 1, 97, seed=5)[0].tolist()]
    one = d.generate(NAIVE, variables, prompts, 24, stop_ids=(), speculative=speculative)
    chunked = d.generate(NAIVE, variables, prompts, 24, stop_ids=(), speculative=speculative, prefill_chunk=16)
    blockwise = d.generate(BLOCKWISE, variables, prompts, 24, stop_ids=(), speculative=speculative, prefill_chunk=32)
    assert chunked.tokens == one.tokens
    assert blockwise.tokens == one.tokens
    assert all(len(t) == 24 for t in one.tokens)


def test_chunked_prefill_logits_equal_naive_forward(variables):
    """The first generated token after a 150-token prompt is the argmax of the naive full forward's last row."""
    prompt = random_tokens(LONG, 1, 150, seed=6)
    expected = int(np.argmax(np.asarray(d.forward(NAIVE, variables, prompt))[0, -1]))
    got = d.generate(BLOCKWISE, variables, prompt[0].tolist(), 1, stop_ids=(), prefill_chunk=32).tokens[0]
    assert got == [expected]


def test_first_prefill_chunk_per_head_equals_absorbed(variables):
    """The chunk that creates the latent cache attends its own tokens per head (`MLA._decode`); given an existing
    all-zero cache the same chunk takes the absorbed path over every slot. Hidden states and the written cache
    agree (float32, atol 1e-5), so the shortcut changes only the cost."""
    model = d.Transformer(NAIVE, 64)
    tokens = jnp.asarray(random_tokens(NAIVE, 2, 24, seed=7))
    positions = jnp.broadcast_to(jnp.arange(24, dtype=jnp.int32), (2, 24))
    params = {"params": variables["params"], "router": variables["router"]}
    fresh_BTD, fresh = model.apply(params, tokens, positions, method=d.Transformer.hidden_states, mutable=["cache"])
    zeros = jax.tree_util.tree_map(jnp.zeros_like, fresh["cache"])
    absorbed_BTD, absorbed = model.apply({**params, "cache": zeros}, tokens, positions,
                                         method=d.Transformer.hidden_states, mutable=["cache"])
    np.testing.assert_allclose(fresh_BTD, absorbed_BTD, atol=1e-5, rtol=1e-5)
    assert float(jnp.max(jnp.abs(fresh_BTD))) > 0.1
    for a, b in zip(jax.tree_util.tree_leaves(fresh["cache"]), jax.tree_util.tree_leaves(absorbed["cache"]),
                    strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_yarn_tables_match_hf_up_to_max_positions():
    """cos/sin of the 671B rope (yarn factor 40, original 4096) equal HF's DeepseekV3 rotary embedding at positions
    on both sides of 4096 and up to max_position_embeddings - 1, to the precision float32 angles allow (both
    compute position × frequency in float32: a few ulp of the angle, which grows with the position), and equal
    the float64 formula to the same bound. A wrong ramp, factor or frequency differs by O(1) past position 4096."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    from dsv3_jax.model.rope import inverse_frequencies

    config = d.ModelConfig.from_preset("deepseek-v3-671b")
    positions = np.array([[0, 1, 4095, 4096, 4097, 32767, 65536, 131071, 163839]], np.int32)
    cos, sin = (np.asarray(a)[0] for a in rotary_tables(config, jnp.asarray(positions)))
    hf = DeepseekV3RotaryEmbedding(DeepseekV3Config(**config.to_hf_config()))
    x = torch.zeros(1, positions.shape[1], 1)
    hf_cos, hf_sin = (t.numpy()[0] for t in hf(x, torch.from_numpy(positions.astype(np.int64))))
    half = config.qk_rope_head_dim // 2  # HF returns each frequency twice ([f_0..f_31, f_0..f_31])
    angles = positions[0, :, None].astype(np.float64) * inverse_frequencies(config).astype(np.float64)
    bound = 4 * 2.0**-24 * np.abs(angles) + 2e-6
    for ours, theirs, exact in ((cos, hf_cos[:, :half], np.cos(angles)), (sin, hf_sin[:, :half], np.sin(angles))):
        assert np.all(np.abs(ours - theirs) <= 2 * bound), np.max(np.abs(ours - theirs) - 2 * bound)
        assert np.all(np.abs(ours - exact) <= bound), np.max(np.abs(ours - exact) - bound)
    freqs, base = inverse_frequencies(config), 10000.0 ** (-np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(freqs[:11], base[:11], rtol=1e-6)  # DESIGN.md §2: i ≤ 10 unchanged,
    np.testing.assert_allclose(freqs[23:], base[23:] / 40, rtol=1e-6)  # i ≥ 23 divided by the factor 40,
    assert np.all((freqs[11:23] < base[11:23]) & (freqs[11:23] > base[11:23] / 40))  # the ramp in between


def test_bad_long_context_settings_are_clear_errors(variables):
    too_long = np.zeros((1, LONG.max_position_embeddings + 1), np.int32)
    with pytest.raises(InputError, match="max_position_embeddings"):
        d.forward(BLOCKWISE, variables, too_long)
    with pytest.raises(InputError, match="prefill_chunk must be a positive multiple of 16"):
        d.generate(NAIVE, variables, [1, 2, 3], 2, prefill_chunk=24)
    with pytest.raises(ConfigError, match="attention_block"):
        LONG.replace(attention_block=12)
    with pytest.raises(ConfigError, match="splash kernel needs a multiple of 128"):
        LONG.replace(attention_impl="splash", attention_block=64)
    with pytest.raises(ConfigError, match="attention_impl"):
        LONG.replace(attention_impl="flash9")


def test_training_memory_is_linear_in_sequence_length():
    """Compiled gradient of the whole model (layer scan, MTP) with blockwise attention at 4K and 16K tokens: XLA's
    temporaries grow ~linearly (measured 2.2×-2.6× for 4× the tokens). Quadratic growth would be 16× — it was 12×
    before the block masks stopped being hoisted out of the layer scan as loop-invariant work."""
    config = LONG.replace(max_position_embeddings=16384, attention_impl="blockwise", attention_block=1024)
    abstract = d.abstract_variables(config)

    def temp_bytes(length):
        def loss(params, router, tokens):
            logits = d.Transformer(config).apply({"params": params, "router": router}, tokens)[0]
            return jnp.mean(logits)

        tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
        compiled = jax.jit(jax.grad(loss)).lower(abstract["params"], abstract["router"], tokens).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    short, long = temp_bytes(4096), temp_bytes(16384)
    assert long < 6 * short, f"4K: {short / 1e6:.0f} MB, 16K: {long / 1e6:.0f} MB"
