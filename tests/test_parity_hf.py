"""Parity with HF transformers' DeepseekV3ForCausalLM: components, whole model and MTP, float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import PARITY_CONFIGS, build_hf_model, random_tokens
from hf_reference import (
    add_shard_with_index,
    causal_additive_mask,
    hf_block_state,
    hf_position_embeddings,
    layer_variables,
    random_mtp_layer,
    to_torch,
)

import dsv3_jax as d
from dsv3_jax.ckpt.hf import load_hf_directory
from dsv3_jax.model import layers, rope
from dsv3_jax.model.attention import MLA
from dsv3_jax.model.moe import MoE, route
from dsv3_jax.model.transformer import DecoderLayer

LOGIT_TOL = 1e-4
ACT_TOL = 1e-5
SEQ = 48  # longer than the yarn configs' original_max_position_embeddings (32 and 16)


@pytest.fixture(scope="module")
def loaded(hf_checkpoints):
    return {name: (model, *load_hf_directory(path)) for name, (model, path) in hf_checkpoints.items()}


def _hidden(config, seed=0, batch=2, seq=SEQ):
    return np.random.RandomState(seed).randn(batch, seq, config.hidden_size).astype(np.float32)


def _positions(batch, seq):
    positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq))
    return positions


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_whole_model_logits(loaded, name):
    hf_model, config, variables = loaded[name]
    tokens = random_tokens(config, 2, SEQ, seed=1)
    with torch.no_grad():
        expected = hf_model(torch.from_numpy(tokens).long()).logits.numpy()
    got = np.asarray(d.forward(config, variables, tokens))
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=LOGIT_TOL, rtol=0)


def test_rope_interleave_false_checkpoint(tmp_path):
    """HF's half-split rotary layout (rope_interleave=false) is permuted to pairs on load: same logits."""
    config = PARITY_CONFIGS["yarn_groups_bias"]
    hf_model = build_hf_model(config, seed=7, rope_interleave=False)
    hf_model.save_pretrained(tmp_path)
    loaded_config, variables = load_hf_directory(tmp_path)
    tokens = random_tokens(config, 2, SEQ, seed=2)
    with torch.no_grad():
        expected = hf_model(torch.from_numpy(tokens).long()).logits.numpy()
    np.testing.assert_allclose(d.forward(loaded_config, variables, tokens), expected, atol=LOGIT_TOL, rtol=0)


def test_rms_norm_matches_hf():
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

    norm = DeepseekV3RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    x = np.random.RandomState(0).randn(3, 5, 64).astype(np.float32) * 3
    got = layers.rms_norm(x, norm.weight.detach().numpy(), 1e-6)
    np.testing.assert_allclose(got, norm(to_torch(x)).detach().numpy(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["yarn_groups_bias", "plain_rope", "yarn_mscale"])
def test_rope_matches_hf(loaded, name):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave

    hf_model, config, _ = loaded[name]
    np.testing.assert_allclose(rope.inverse_frequencies(config), hf_model.model.rotary_emb.inv_freq.numpy(),
                               rtol=2e-7, atol=0)
    assert rope.cos_sin_factor(config) == pytest.approx(hf_model.model.rotary_emb.attention_scaling, rel=1e-12)
    assert rope.softmax_scale(config) == pytest.approx(hf_model.model.layers[0].self_attn.scaling, rel=1e-12)
    rng = np.random.RandomState(3)
    q = rng.randn(2, 4, SEQ, config.qk_rope_head_dim).astype(np.float32)  # HF layout [B,H,T,R]
    k = rng.randn(2, 1, SEQ, config.qk_rope_head_dim).astype(np.float32)
    (cos_t, sin_t), _ = hf_position_embeddings(hf_model, to_torch(q[:, 0]))
    hf_q, hf_k = apply_rotary_pos_emb_interleave(to_torch(q), to_torch(k), cos_t, sin_t)
    positions = np.broadcast_to(np.arange(SEQ), (2, SEQ))
    cos, sin = rope.rotary_tables(config, positions)
    ours_q = np.asarray(rope.apply_rotary(q, cos[:, None], sin[:, None]))
    half = config.qk_rope_head_dim // 2
    deinterleave = np.concatenate([np.arange(0, 2 * half, 2), np.arange(1, 2 * half, 2)])
    np.testing.assert_allclose(ours_q[..., deinterleave], hf_q.numpy(), atol=2e-6, rtol=0)
    ours_k = np.asarray(rope.apply_rotary(k[:, 0], cos, sin))
    np.testing.assert_allclose(ours_k[..., deinterleave], hf_k[:, 0].numpy(), atol=2e-6, rtol=0)


def test_671b_rope_and_softmax_facts():
    config = d.ModelConfig.from_preset("deepseek-v3-671b")
    assert rope.softmax_scale(config) == pytest.approx(192 ** -0.5 * 1.8738542, rel=1e-7)
    assert rope.softmax_scale(config) == pytest.approx(0.1352338, abs=5e-8)
    base = 1.0 / 10000 ** (np.arange(0, 64, 2) / 64)
    ratio = base / rope.inverse_frequencies(config)
    np.testing.assert_allclose(ratio[:11], 1.0, rtol=1e-6)  # i <= 10 unchanged
    np.testing.assert_allclose(ratio[23:], 40.0, rtol=1e-6)  # i >= 23 divided by 40
    assert np.all((ratio[11:23] > 1) & (ratio[11:23] < 40))


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_attention_matches_hf(loaded, name):
    hf_model, config, variables = loaded[name]
    x = _hidden(config)
    layer_vars, _ = layer_variables(config, variables, 0)
    positions = _positions(*x.shape[:2])
    got = MLA(config).apply({"params": layer_vars["params"]["attn"]}, x, positions)
    xt = to_torch(x)
    pos_emb, _ = hf_position_embeddings(hf_model, xt)
    with torch.no_grad():
        expected, _ = hf_model.model.layers[0].self_attn(xt, pos_emb, causal_additive_mask(*x.shape[:2]))
    np.testing.assert_allclose(got, expected.numpy(), atol=ACT_TOL, rtol=0)


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_gate_choices_match_hf(loaded, name):
    hf_model, config, variables = loaded[name]
    i = config.first_k_dense_replace
    layer_vars, _ = layer_variables(config, variables, i)
    x = _hidden(config, seed=4).reshape(-1, config.hidden_size)
    logits = x @ np.asarray(layer_vars["params"]["moe"]["gate"])
    weights, experts, _ = route(logits, layer_vars["router"]["moe"]["bias"], config)
    with torch.no_grad():
        hf_logits, hf_weights, hf_experts = hf_model.model.layers[i].mlp.gate(to_torch(x))
    np.testing.assert_allclose(logits, hf_logits.numpy(), atol=1e-5, rtol=0)
    ours_order, hf_order = np.argsort(np.asarray(experts), 1), np.argsort(hf_experts.numpy(), 1)
    np.testing.assert_array_equal(np.take_along_axis(np.asarray(experts), ours_order, 1),
                                  np.take_along_axis(hf_experts.numpy(), hf_order, 1))
    np.testing.assert_allclose(np.take_along_axis(np.asarray(weights), ours_order, 1),
                               np.take_along_axis(hf_weights.numpy(), hf_order, 1), atol=1e-6, rtol=0)
    # The bias matters: with it zeroed, some choices change (so this test exercises bias-aware selection).
    _, unbiased, _ = route(logits, np.zeros(config.n_routed_experts, np.float32), config)
    assert not np.array_equal(np.sort(np.asarray(unbiased), 1), np.sort(np.asarray(experts), 1))


@pytest.mark.parametrize("impl", ["blocks", "ragged", "dense"])
@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_moe_matches_hf(loaded, name, impl):
    hf_model, config, variables = loaded[name]
    config = config.replace(moe_impl=impl)
    i = config.first_k_dense_replace
    layer_vars, _ = layer_variables(config, variables, i)
    x = _hidden(config, seed=5)
    got = MoE(config).apply({"params": layer_vars["params"]["moe"], "router": layer_vars["router"]["moe"]}, x)
    with torch.no_grad():
        expected = hf_model.model.layers[i].mlp(to_torch(x)).numpy()
    np.testing.assert_allclose(got, expected, atol=ACT_TOL, rtol=0)


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_decoder_blocks_match_hf(loaded, name):
    hf_model, config, variables = loaded[name]
    x = _hidden(config, seed=6)
    positions = _positions(*x.shape[:2])
    xt = to_torch(x)
    pos_emb, pos_ids = hf_position_embeddings(hf_model, xt)
    for i in (0, config.num_hidden_layers - 1):
        layer_vars, use_moe = layer_variables(config, variables, i)
        got, _ = DecoderLayer(config, use_moe).apply(layer_vars, x, positions)
        with torch.no_grad():
            expected = hf_model.model.layers[i](xt, attention_mask=causal_additive_mask(*x.shape[:2]),
                                                position_ids=pos_ids, position_embeddings=pos_emb)
        np.testing.assert_allclose(got, expected.numpy(), atol=ACT_TOL, rtol=0, err_msg=f"layer {i}")


@pytest.mark.parametrize("name", ["yarn_groups_bias", "two_dense"])
def test_mtp_matches_hf_mtp_layer(hf_checkpoints, name, tmp_path):
    """MTP logits vs HF's MtpLayer around a DeepseekV3 decoder layer with the shared embedding and head."""
    import shutil

    hf_model, path = hf_checkpoints[name]
    directory = shutil.copytree(path, tmp_path / "ckpt")
    config = PARITY_CONFIGS[name]
    mtp = random_mtp_layer(hf_model, config, seed=11)
    prefix = f"model.layers.{config.num_hidden_layers}."
    state = {k.replace("mtp_block.", "").replace("post_norm.", "shared_head.norm."): v
             for k, v in mtp.state_dict().items()}
    tensors = hf_block_state(prefix, state, config.moe_intermediate_size)
    tensors[prefix + "embed_tokens.weight"] = hf_model.model.embed_tokens.weight.detach().numpy()
    tensors[prefix + "shared_head.head.weight"] = hf_model.lm_head.weight.detach().numpy()
    add_shard_with_index(str(directory), tensors, "model-mtp.safetensors")
    loaded_config, variables = load_hf_directory(directory)
    assert "mtp_0" in variables["params"]

    tokens = random_tokens(config, 2, SEQ, seed=9)
    with torch.no_grad():
        tokens_t = torch.from_numpy(tokens).long()
        h = hf_model.model(tokens_t).last_hidden_state[:, :-1]
        emb = hf_model.model.embed_tokens(tokens_t[:, 1:])
        pos_emb, pos_ids = hf_position_embeddings(hf_model, h)
        out = mtp(emb, h, pos_emb, causal_additive_mask(2, SEQ - 1), pos_ids, None)
        expected = hf_model.lm_head(out).numpy()
    logits, mtp_logits = d.forward_with_mtp(loaded_config, variables, tokens)
    assert mtp_logits.shape == (1, 2, SEQ, config.vocab_size)
    np.testing.assert_allclose(mtp_logits[0, :, :-1], expected, atol=LOGIT_TOL, rtol=0)
    np.testing.assert_allclose(logits, hf_model(tokens_t).logits.detach().numpy(), atol=LOGIT_TOL, rtol=0)
