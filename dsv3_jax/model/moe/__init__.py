"""DeepSeekMoE: `router` (sigmoid group-limited top-k with the correction bias, balance term), `dispatch`
(dropless expert FFNs: blocks / ragged / dense), `expert_parallel` (shard_map + all-to-all around dispatch and
combine), `layer` (the `MoE` module)."""

from dsv3_jax.model.axes import ROUTER_COLLECTION, STATS_COLLECTION
from dsv3_jax.model.moe.dispatch import (
           EXPERT_FFNS,
           blocks_ffn,
           dense_ffn,
           permute_rows,
           ragged_ffn,
           resolve_impl,
           tile_size,
)
from dsv3_jax.model.moe.expert_parallel import ExpertParallel, current_expert_parallel, use_expert_parallel
from dsv3_jax.model.moe.layer import MoE, routed_experts
from dsv3_jax.model.moe.router import balance_term, expert_load, gate_logits, route

__all__ = ["EXPERT_FFNS", "ROUTER_COLLECTION", "STATS_COLLECTION", "ExpertParallel", "MoE", "balance_term",
           "blocks_ffn", "current_expert_parallel", "dense_ffn", "expert_load", "gate_logits", "permute_rows",
           "ragged_ffn", "resolve_impl", "route", "routed_experts", "tile_size", "use_expert_parallel"]
