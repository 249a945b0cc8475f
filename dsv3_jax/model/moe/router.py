"""The DeepSeek-V3 router: sigmoid scores, group-limited top-k chosen with the correction bias (DESIGN.md §2),
and the sequence-wise balance term computed from the same dispatched top-k (§3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig


def gate_logits(x_ND: jax.Array, gate_DE: jax.Array) -> jax.Array:
    """Router logits [N,E] from the float32 gate, in float32 at HIGHEST precision whatever the backend's default
    (one bf16 pass on TPU, TF32 on GPU would change 0.2–2% of tokens' expert sets at 671B shapes)."""
    return jnp.einsum("nd,de->ne", x_ND.astype(jnp.float32), gate_DE.astype(jnp.float32),
                      precision=jax.lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def route(logits_NE: jax.Array, bias_E: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sigmoid group-limited top-k (DESIGN.md §2). Returns (weights [N,X] f32, experts [N,X] int32, scores [N,E]).

    The bias only chooses experts; the weights are the unbiased scores, normalised and scaled.
    """
    c = config
    n = logits_NE.shape[0]
    scores_NE = jax.nn.sigmoid(logits_NE.astype(jnp.float32))
    choice_NE = scores_NE + bias_E.astype(jnp.float32)
    group_NGI = choice_NE.reshape(n, c.n_group, c.experts_per_group)
    group_score_NG = jax.lax.top_k(group_NGI, 2)[0].sum(axis=-1)
    _, kept_groups = jax.lax.top_k(group_score_NG, c.topk_group)
    keep_NG = jnp.zeros((n, c.n_group), bool).at[jnp.arange(n)[:, None], kept_groups].set(True)
    choice_NE = jnp.where(jnp.repeat(keep_NG, c.experts_per_group, axis=1), choice_NE, -jnp.inf)
    _, experts_NX = jax.lax.top_k(choice_NE, c.num_experts_per_tok)
    weights_NX = jnp.take_along_axis(scores_NE, experts_NX, axis=1)
    if c.norm_topk_prob:
        weights_NX = weights_NX / (weights_NX.sum(axis=-1, keepdims=True) + 1e-20)
    return weights_NX * c.routed_scaling_factor, experts_NX.astype(jnp.int32), scores_NE


def balance_term(scores_BTE: jax.Array, experts_BTX: jax.Array, num_experts: int) -> jax.Array:
    """Sequence-wise balance Σ_i f_i·P_i, mean over sequences (DESIGN.md §3, without α), from the dispatched top-k."""
    _, t, x = experts_BTX.shape
    hits_BE = jax.nn.one_hot(experts_BTX, num_experts, dtype=jnp.float32).sum(axis=(1, 2))
    f_BE = hits_BE * num_experts / (x * t)
    p_BE = jnp.mean(scores_BTE / scores_BTE.sum(axis=-1, keepdims=True), axis=1)
    return jnp.mean(jnp.sum(f_BE * p_BE, axis=-1))


def expert_load(experts_NX: jax.Array, num_experts: int) -> jax.Array:
    """Number of token-expert pairs per expert [E] (global when the pairs are sharded: jit sums across shards)."""
    return jnp.bincount(experts_NX.reshape(-1), length=num_experts)
