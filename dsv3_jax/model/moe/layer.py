"""The DeepSeekMoE layer: route once (`router`), run the routed experts through a dropless dispatch (`dispatch`, or
expert-parallel `expert_parallel` when a caller activated it), add the shared experts."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.axes import ROUTER_COLLECTION, STATS_COLLECTION
from dsv3_jax.model.layers import MLP, weight
from dsv3_jax.model.moe.dispatch import expert_ffn
from dsv3_jax.model.moe.expert_parallel import current_expert_parallel
from dsv3_jax.model.moe.router import balance_term, expert_load, gate_logits, route


def routed_experts(x_BTD: jax.Array, gate_DE: jax.Array, bias_E: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                   w_down: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Route and run the routed experts → (out [B,T,D], expert load [E], balance term).

    Loads and the balance term are over the whole (possibly sharded) batch.
    """
    b, t, d = x_BTD.shape
    e = config.n_routed_experts
    x_ND = x_BTD.reshape(b * t, d)
    with jax.named_scope("moe_route"):
        weights_NX, experts_NX, scores_NE = route(gate_logits(x_ND, gate_DE), bias_E, config)
    with jax.named_scope("moe_experts"):
        ep = current_expert_parallel()
        if ep is None:
            routed_ND = expert_ffn(config.moe_impl)(x_ND, experts_NX, weights_NX, w_gate, w_up, w_down,
                                                    config.matmul_policy)
        else:
            routed_ND = ep.expert_ffn(x_ND, experts_NX, weights_NX, w_gate, w_up, w_down, config)
    balance = balance_term(scores_NE.reshape(b, t, e), experts_NX.reshape(b, t, -1), e)
    return routed_ND.reshape(b, t, d), expert_load(experts_NX, e), balance


class MoE(nn.Module):
    """Routed experts (dropless) + shared experts. Sows expert loads and the balance term into "moe_stats".

    Inside `expert_parallel.use_expert_parallel(...)` the routed experts run expert-parallel (shard_map +
    all-to-all).
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        c = self.config
        d, e, f = c.hidden_size, c.n_routed_experts, c.moe_intermediate_size
        gate_DE = weight(self, "gate", (d, e), ("embed", "router_expert"), c, dtype=jnp.float32)
        bias_E = self.variable(ROUTER_COLLECTION, "bias", nn.with_logical_partitioning(
            jnp.zeros, ("router_expert",)), (e,), jnp.float32).value
        w_gate = weight(self, "w_gate", (e, d, f), ("expert", "expert_embed", "expert_mlp"), c)
        w_up = weight(self, "w_up", (e, d, f), ("expert", "expert_embed", "expert_mlp"), c)
        w_down = weight(self, "w_down", (e, f, d), ("expert", "expert_mlp", "expert_embed"), c)
        out_BTD, load_E, balance = routed_experts(x_BTD, gate_DE, nn.unbox(bias_E), w_gate, w_up, w_down, c)
        self.sow(STATS_COLLECTION, "expert_load", load_E)
        self.sow(STATS_COLLECTION, "balance", balance)
        if c.n_shared_experts > 0:
            out_BTD = out_BTD + MLP(c, f * c.n_shared_experts, "expert_mlp", name="shared")(x_BTD)
        return out_BTD
