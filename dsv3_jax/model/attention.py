"""Multi-head Latent Attention (MLA).

Two paths over the same parameters:
  - naive (training, and the reference): keys/values expanded per head from the latent, [B,S,H,N+U];
  - absorbed (decoding, `cache_len > 0`): W_kvb's key half folded into the query and its value half applied after
    attention, so the cache holds only the normalised latent c_kv [C] and the rotated shared key k_pe [R] per
    token — 576 values per token per layer at 671B, against H·(N+R+U) = 40,960 for a per-head cache of
    keys and values.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.model import flash
from dsv3_jax.model.axes import CACHE_COLLECTION
from dsv3_jax.model.layers import constrain, dense, rms_norm, weight
from dsv3_jax.model.rope import apply_rotary, rotary_tables, softmax_scale
from dsv3_jax.quant.matmul import as_dense, dot_f32, einsum


class MLA(nn.Module):
    """q from a low-rank (or full) projection, keys/values from a normalised latent c_kv, one shared rotary key."""

    config: ModelConfig
    cache_len: int = 0  # > 0: absorbed attention over a latent cache of this many slots ("cache" collection)

    def _query(self, x_BTD: jax.Array) -> jax.Array:
        c = self.config
        width = c.num_attention_heads * c.qk_head_dim
        if c.q_lora_rank is None:
            wq = weight(self, "wq", (c.hidden_size, width), ("embed", "q_heads"), c)
            return dense(x_BTD, wq, c.matmul_policy)
        wq_a = weight(self, "wq_a", (c.hidden_size, c.q_lora_rank), ("embed", "q_lora"), c)
        q_norm = weight(self, "q_norm", (c.q_lora_rank,), ("norm",), c, init="ones")
        wq_b = weight(self, "wq_b", (c.q_lora_rank, width), ("q_lora", "q_heads"), c)
        q_BTQ = rms_norm(dense(x_BTD, wq_a, c.matmul_policy), q_norm, c.rms_norm_eps)
        return dense(q_BTQ, wq_b, c.matmul_policy)

    def _latent(self, x_BTD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Normalised latent c_kv [B,T,C] and the un-rotated shared rotary key k_pe [B,T,R]."""
        c = self.config
        wkv_a = weight(self, "wkv_a", (c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim), ("embed", "kv_a"), c)
        kv_norm = weight(self, "kv_norm", (c.kv_lora_rank,), ("norm",), c, init="ones")
        kv_BTA = dense(x_BTD, wkv_a, c.matmul_policy)
        ckv_BTC, kpe_BTR = jnp.split(kv_BTA, [c.kv_lora_rank], axis=-1)
        return rms_norm(ckv_BTC, kv_norm, c.rms_norm_eps), kpe_BTR

    @nn.compact
    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array) -> jax.Array:
        """x [B,T,D], positions [B,T] int → [B,T,D]. A query sees every key at a position ≤ its own (keys are the
        same tokens while training and prefilling, the cache slots 0..position while decoding)."""
        c = self.config
        b, t, _ = x_BTD.shape
        h, n, u = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim
        wkv_b = weight(self, "wkv_b", (c.kv_lora_rank, h * (n + u)), ("kv_lora", "kv_heads"), c)
        wo = weight(self, "wo", (h * u, c.hidden_size), ("o_heads", "embed"), c)
        if self.cache_len:
            return self._decode(x_BTD, positions_BT, wkv_b, wo)

        with jax.named_scope("mla_project"):
            q_BTHK = self._query(x_BTD).reshape(b, t, h, c.qk_head_dim)
            qnope_BTHN, qpe_BTHR = jnp.split(q_BTHK, [n], axis=-1)
            ckv_BSC, kpe_BSR = self._latent(x_BTD)
            cos, sin = rotary_tables(c, positions_BT)
            qpe_BTHR = apply_rotary(qpe_BTHR, cos[:, :, None, :], sin[:, :, None, :])
            kpe_BSR = apply_rotary(kpe_BSR, cos, sin)
        return self._output(self._attend_tokens(qnope_BTHN, qpe_BTHR, ckv_BSC, kpe_BSR, positions_BT, wkv_b), wo)

    def _attend_tokens(self, qnope_BTHN, qpe_BTHR, ckv_BSC, kpe_BSR, positions_BT, wkv_b) -> jax.Array:
        """Per-head keys and values expanded from the same tokens' latents (rotary parts already applied), then
        causal attention among those tokens → [B,T,H,U]."""
        c = self.config
        b, t, h = qnope_BTHN.shape[:3]
        n, u = c.qk_nope_head_dim, c.v_head_dim
        with jax.named_scope("mla_project"):
            kv_BSHJ = dense(ckv_BSC, wkv_b, c.matmul_policy).reshape(b, t, h, n + u)
            knope_BSHN, v_BSHU = jnp.split(kv_BSHJ, [n], axis=-1)
        with jax.named_scope("mla_attend"):
            q_BTHK = jnp.concatenate([qnope_BTHN, qpe_BTHR], axis=-1)
            k_BSHK = jnp.concatenate([knope_BSHN, jnp.broadcast_to(kpe_BSR[:, :, None], (b, t, h, kpe_BSR.shape[-1]))],
                                     axis=-1)
            return attention(q_BTHK, k_BSHK, v_BSHU, positions_BT, positions_BT, c)

    def _output(self, out_BTHU: jax.Array, wo: jax.Array) -> jax.Array:
        b, t = out_BTHU.shape[:2]
        out_BTD = dense(out_BTHU.reshape(b, t, -1), wo, self.config.matmul_policy)
        return constrain(out_BTD, ("act_batch", "act_seq", "act_embed"))


    def _decode(self, x_BTD, positions_BT, wkv_b, wo) -> jax.Array:
        """Absorbed attention: write (c_kv, rotated k_pe) of the new tokens at their positions, attend the cache.

        The cache has S = cache_len slots; slot s holds the token at position s of that row. A chunk that creates
        the cache (the first chunk of a prefill, positions from 0) attends only its own tokens: it takes the per-head
        path instead, over T keys rather than all S slots and without the absorbed projections.
        """
        c = self.config
        b, t, _ = x_BTD.shape
        h, n, u = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim
        q_BTHK = self._query(x_BTD).reshape(b, t, h, c.qk_head_dim)
        qnope_BTHN, qpe_BTHR = jnp.split(q_BTHK, [n], axis=-1)
        ckv_BTC, kpe_BTR = self._latent(x_BTD)
        cos, sin = rotary_tables(c, positions_BT)
        qpe_BTHR = apply_rotary(qpe_BTHR, cos[:, :, None, :], sin[:, :, None, :])
        kpe_BTR = apply_rotary(kpe_BTR, cos, sin)
        fresh = not self.has_variable(CACHE_COLLECTION, "ckv")
        ckv_BSC, kpe_BSR = self._write_cache(ckv_BTC, kpe_BTR, positions_BT)
        if fresh and t > 1:
            return self._output(self._attend_tokens(qnope_BTHN, qpe_BTHR, ckv_BTC, kpe_BTR, positions_BT, wkv_b), wo)
        wkv_CHJ = as_dense(wkv_b, x_BTD.dtype).reshape(c.kv_lora_rank, h, n + u)
        with jax.named_scope("mla_absorbed"):
            qlat_BTHC = einsum("bthn,chn->bthc", qnope_BTHN, wkv_CHJ[..., :n])
            q_BTHK = jnp.concatenate([qlat_BTHC, qpe_BTHR.astype(qlat_BTHC.dtype)], axis=-1)
            k_BSK = jnp.concatenate([ckv_BSC, kpe_BSR], axis=-1)  # one latent "head" shared by every query head
            slots_BS = jnp.broadcast_to(jnp.arange(self.cache_len, dtype=jnp.int32), (b, self.cache_len))
            olat_BTHC = attention(q_BTHK, k_BSK, ckv_BSC, positions_BT, slots_BS, c)
            out_BTHU = einsum("bthc,chu->bthu", olat_BTHC, wkv_CHJ[..., n:])
        return self._output(out_BTHU, wo)

    def _write_cache(self, ckv_BTC, kpe_BTR, positions_BT):
        c, b = self.config, ckv_BTC.shape[0]
        ckv = self.variable(CACHE_COLLECTION, "ckv", jnp.zeros, (b, self.cache_len, c.kv_lora_rank), ckv_BTC.dtype)
        kpe = self.variable(CACHE_COLLECTION, "kpe", jnp.zeros, (b, self.cache_len, c.qk_rope_head_dim), kpe_BTR.dtype)
        rows_BT = jnp.broadcast_to(jnp.arange(b)[:, None], positions_BT.shape)
        ckv.value = ckv.value.at[rows_BT, positions_BT].set(ckv_BTC.astype(ckv.value.dtype), mode="drop")
        kpe.value = kpe.value.at[rows_BT, positions_BT].set(kpe_BTR.astype(kpe.value.dtype), mode="drop")
        return ckv.value, kpe.value


NAIVE_MAX_SCORES = 1 << 20  # "auto": T·S up to this many scores per head use the naive path


def resolve_attention_impl(config: ModelConfig, t: int, s: int) -> str:
    """The implementation `attention` runs for T queries over S keys: the config's, or for "auto" naive while
    T·S ≤ NAIVE_MAX_SCORES (small scores: one fused pass is fastest) and blockwise beyond (memory linear in T)."""
    if config.attention_impl != "auto":
        return config.attention_impl
    return "naive" if t * s <= NAIVE_MAX_SCORES else "blockwise"


def attention(q_BTHK: jax.Array, k_BSHK: jax.Array, v_BSHU: jax.Array, qpos_BT: jax.Array, kpos_BS: jax.Array,
              config: ModelConfig) -> jax.Array:
    """The one attention core the model calls: query t sees key s iff kpos[b,s] <= qpos[b,t] → [B,T,H,U].

    q concatenates the no-rope and rotary parts ([q_nope; q_pe], or [q_latent; q_pe] on the absorbed path) so one
    contraction gives q_nope·k_nope + q_pe·k_pe. Keys/values without a head axis ([B,S,K], [B,S,U]) are shared
    by every query head (the absorbed path). Scores and softmax in float32 whatever the implementation.
    """
    impl = resolve_attention_impl(config, q_BTHK.shape[1], k_BSHK.shape[1])
    scale, block = softmax_scale(config), config.attention_block
    if impl == "naive":
        return naive_attention(q_BTHK, k_BSHK, v_BSHU, kpos_BS[:, None, :] <= qpos_BT[:, :, None], scale)
    if impl == "blockwise":
        return flash.blockwise_attention(q_BTHK, k_BSHK, v_BSHU, qpos_BT, kpos_BS, scale, block_q=block,
                                         block_k=block)
    if impl == "cudnn":
        return flash.dot_product_attention_gpu(q_BTHK, k_BSHK, v_BSHU, qpos_BT, kpos_BS, scale)
    return flash.splash_attention_tpu(q_BTHK, k_BSHK, v_BSHU, qpos_BT, kpos_BS, scale, block_q=block, block_k=block)


def naive_attention(q_BTHK: jax.Array, k_BSHK: jax.Array, v_BSHU: jax.Array, mask_BTS: jax.Array,
                    scale: float) -> jax.Array:
    """softmax(scale · q·k masked) · v with float32 scores [B,H,T,S] and softmax → [B,T,H,U] (the reference).

    Per-head keys/values (training, prefill) go through `_per_head_attention`, whose backward keeps only the
    probabilities; keys/values shared by all heads (the absorbed decode path) through plain autodiff."""
    if k_BSHK.ndim == 4:
        q_BHTK, k_BHSK, v_BHSU = (jnp.swapaxes(a, 1, 2) for a in (q_BTHK, k_BSHK, v_BSHU))
        return jnp.swapaxes(_per_head_attention(q_BHTK, k_BHSK, v_BHSU, mask_BTS, scale), 1, 2)
    probs_BHTS = _probs(dot_f32("bthk,bsk->bhts", q_BTHK, k_BSHK), mask_BTS, scale).astype(v_BSHU.dtype)
    return dot_f32("bhts,bsu->bthu", probs_BHTS, v_BSHU).astype(v_BSHU.dtype)


def _probs(scores_BHTS: jax.Array, mask_BTS: jax.Array, scale: float) -> jax.Array:
    """Float32 softmax of the scaled scores, masked positions at float32 min."""
    scores_BHTS = jnp.where(mask_BTS[:, None], scores_BHTS * scale, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores_BHTS, axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _per_head_attention(q_BHTK: jax.Array, k_BHSK: jax.Array, v_BHSU: jax.Array, mask_BTS: jax.Array,
                        scale: float) -> jax.Array:
    """The naive core in head-major layout → [B,H,T,U], with its own backward.

    Why: autodiff of the softmax saves the exponentials and the masked scores besides the probabilities (two
    extra [B,H,T,S] float32 residuals per layer, stacked by the layer scan) and reduces p·dp over S; this
    backward keeps only p and uses the FlashAttention identity Σ_s p·dp = Σ_u dO·O (a reduction over U)."""
    return _per_head_fwd(q_BHTK, k_BHSK, v_BHSU, mask_BTS, scale)[0]


def _per_head_fwd(q_BHTK, k_BHSK, v_BHSU, mask_BTS, scale):
    scores_BHTS = dot_f32("bhtk,bhsk->bhts", q_BHTK, k_BHSK)
    probs_BHTS = _probs(scores_BHTS, mask_BTS, scale).astype(v_BHSU.dtype)
    out_BHTU = dot_f32("bhts,bhsu->bhtu", probs_BHTS, v_BHSU).astype(v_BHSU.dtype)
    return out_BHTU, (q_BHTK, k_BHSK, v_BHSU, probs_BHTS, out_BHTU)


def _per_head_bwd(scale, residuals, dout_BHTU):
    q_BHTK, k_BHSK, v_BHSU, probs_BHTS, out_BHTU = residuals
    f32 = jnp.float32
    dv_BHSU = dot_f32("bhts,bhtu->bhsu", probs_BHTS, dout_BHTU)
    dprobs_BHTS = dot_f32("bhtu,bhsu->bhts", dout_BHTU, v_BHSU)
    delta_BHT1 = jnp.sum(dout_BHTU.astype(f32) * out_BHTU.astype(f32), axis=-1, keepdims=True)
    dscores_BHTS = (probs_BHTS.astype(f32) * (dprobs_BHTS - delta_BHT1) * scale).astype(q_BHTK.dtype)
    dq_BHTK = dot_f32("bhts,bhsk->bhtk", dscores_BHTS, k_BHSK)
    dk_BHSK = dot_f32("bhts,bhtk->bhsk", dscores_BHTS, q_BHTK)
    return (dq_BHTK.astype(q_BHTK.dtype), dk_BHSK.astype(k_BHSK.dtype), dv_BHSU.astype(v_BHSU.dtype), None)


_per_head_attention.defvjp(_per_head_fwd, _per_head_bwd)
