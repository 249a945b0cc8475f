"""Multi-head Latent Attention (MLA), naive (expanded per-head keys/values) path for training and prefill."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.layers import constrain, rms_norm, weight
from dsv3_jax.matmul import einsum
from dsv3_jax.rope import apply_rotary, rotary_tables, softmax_scale


class MLA(nn.Module):
    """q from a low-rank (or full) projection, keys/values from a normalised latent c_kv, one shared rotary key."""

    config: ModelConfig

    def _query(self, x_BTD: jax.Array) -> jax.Array:
        c = self.config
        width = c.num_attention_heads * c.qk_head_dim
        if c.q_lora_rank is None:
            wq = weight(self, "wq", (c.hidden_size, width), ("embed", "q_heads"), c)
            return einsum("btd,dk->btk", x_BTD, wq)
        wq_a = weight(self, "wq_a", (c.hidden_size, c.q_lora_rank), ("embed", "q_lora"), c)
        q_norm = weight(self, "q_norm", (c.q_lora_rank,), ("norm",), c, init="ones")
        wq_b = weight(self, "wq_b", (c.q_lora_rank, width), ("q_lora", "q_heads"), c)
        q_BTQ = rms_norm(einsum("btd,dq->btq", x_BTD, wq_a), q_norm, c.rms_norm_eps)
        return einsum("btq,qk->btk", q_BTQ, wq_b)

    def _latent(self, x_BTD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Normalised latent c_kv [B,T,C] and the un-rotated shared rotary key k_pe [B,T,R]."""
        c = self.config
        wkv_a = weight(self, "wkv_a", (c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim), ("embed", "kv_a"), c)
        kv_norm = weight(self, "kv_norm", (c.kv_lora_rank,), ("norm",), c, init="ones")
        kv_BTA = einsum("btd,da->bta", x_BTD, wkv_a)
        ckv_BTC, kpe_BTR = jnp.split(kv_BTA, [c.kv_lora_rank], axis=-1)
        return rms_norm(ckv_BTC, kv_norm, c.rms_norm_eps), kpe_BTR

    @nn.compact
    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, mask_BTS: jax.Array) -> jax.Array:
        """x [B,T,D], positions [B,T] int, mask [B,T,S] bool (True = may attend) → [B,T,D]."""
        c = self.config
        b, t, _ = x_BTD.shape
        h, n, u = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim
        wkv_b = weight(self, "wkv_b", (c.kv_lora_rank, h * (n + u)), ("kv_lora", "kv_heads"), c)
        wo = weight(self, "wo", (h * u, c.hidden_size), ("o_heads", "embed"), c)

        with jax.named_scope("mla_project"):
            q_BTHK = self._query(x_BTD).reshape(b, t, h, c.qk_head_dim)
            qnope_BTHN, qpe_BTHR = jnp.split(q_BTHK, [n], axis=-1)
            ckv_BSC, kpe_BSR = self._latent(x_BTD)
            kv_BSHZ = einsum("bsc,cz->bsz", ckv_BSC, wkv_b).reshape(b, t, h, n + u)
            knope_BSHN, v_BSHU = jnp.split(kv_BSHZ, [n], axis=-1)
            cos, sin = rotary_tables(c, positions_BT)
            qpe_BTHR = apply_rotary(qpe_BTHR, cos[:, :, None, :], sin[:, :, None, :])
            kpe_BSR = apply_rotary(kpe_BSR, cos, sin)
        with jax.named_scope("mla_attend"):
            out_BTHU = attend(qnope_BTHN, qpe_BTHR, knope_BSHN, kpe_BSR, v_BSHU, mask_BTS, softmax_scale(c))
        out_BTD = einsum("btk,kd->btd", out_BTHU.reshape(b, t, h * u), wo)
        return constrain(out_BTD, ("act_batch", "act_seq", "act_embed"))


def attend(qnope_BTHN: jax.Array, qpe_BTHR: jax.Array, knope_BSHN: jax.Array, kpe_BSR: jax.Array,
           v_BSHU: jax.Array, mask_BTS: jax.Array, scale: float) -> jax.Array:
    """softmax(scale · (q_nope·k_nope + q_pe·k_pe) masked) · v, scores and softmax in float32 → [B,T,H,U]."""
    scores_BHTS = jnp.einsum("bthn,bshn->bhts", qnope_BTHN, knope_BSHN, preferred_element_type=jnp.float32)
    scores_BHTS += jnp.einsum("bthr,bsr->bhts", qpe_BTHR, kpe_BSR, preferred_element_type=jnp.float32)
    scores_BHTS = jnp.where(mask_BTS[:, None], scores_BHTS * scale, jnp.finfo(jnp.float32).min)
    probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1).astype(v_BSHU.dtype)
    return jnp.einsum("bhts,bshu->bthu", probs_BHTS, v_BSHU, preferred_element_type=jnp.float32).astype(
        v_BSHU.dtype)
