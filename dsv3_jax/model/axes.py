"""Names shared by every model module: the shape-suffix legend, the logical axes, the variable collections.

Shape-suffix legend used in every module of the package (einsum strings use the same letters):

    B batch            T query positions     S key positions       D hidden (embed)
    H attention heads  N qk_nope_head_dim    R qk_rope_head_dim    U v_head_dim
    K q·k width of one head: N+R (naive) or C+R (absorbed)         J N+U (one head's rows of W_kvb)
    Q q_lora_rank      C kv_lora_rank        A C+R (W_kva output)  V vocabulary          F feed-forward hidden
    E routed experts   X experts per token   G expert groups       I experts per group (E/G)
    N also tokens of a flattened batch (B·T) in the MoE modules    M token-expert pairs (N·X)
    L layers           P padded rows         Z tiles               W rows per tile
    Y devices along the expert-parallel mesh axis                  O chunks of a sequence

Logical axis names (mapped to mesh axes by the rules table of `dsv3_jax.parallel`, never named in model code):
    "vocab", "embed", "q_lora", "kv_lora", "q_heads" (H·(N+R)), "kv_heads" (H·(N+U)), "o_heads" (H·U),
    "kv_a" (C+R), "mlp", "expert", "expert_embed", "expert_mlp", "router_expert", "mtp_concat", "norm", "layers";
    activations: "act_batch", "act_seq", "act_embed".
"""

from __future__ import annotations

PARAM_AXES = ("layers", "norm", "vocab", "embed", "q_lora", "kv_lora", "kv_a", "q_heads", "kv_heads", "o_heads",
              "mlp", "mtp_concat", "expert", "expert_embed", "expert_mlp", "router_expert")
ACTIVATION_AXES = ("act_batch", "act_seq", "act_embed")
LOGICAL_AXES = PARAM_AXES + ACTIVATION_AXES

PARAMS = "params"
ROUTER_COLLECTION = "router"  # non-trainable: the per-expert correction bias lives here, not in "params"
STATS_COLLECTION = "moe_stats"  # sown per layer: expert load counts and the sequence-wise balance term
CACHE_COLLECTION = "cache"  # decoding: per-layer latent cache (c_kv, rotated k_pe)
VARIABLE_COLLECTIONS = (PARAMS, ROUTER_COLLECTION)  # what init returns and checkpoints hold

# The two layer stacks, in model order: (variable name, whether its layers are MoE).
STACKS = (("dense_layers", False), ("moe_layers", True))
STACK_NAMES = tuple(name for name, _ in STACKS)
