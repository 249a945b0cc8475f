"""Per-device memory of the programs `plan.aot` compiles (prefill, decode, train), in the planner's terms.

Compiled TPU programs (`program_memory`, checked against XLA's memory analysis by `plan.aot` and
experiments/aot_compile.py): prefill and decode hold the weights (no MTP), the latent cache twice (the program's
output or donated input, and the layer scan's working copy), one layer's slice of the stacked weights and the
largest layer's forward working set — under expert parallelism 4 × rows × D (send, receive, expert output,
return; rows = devices × the round's capacity) + 3 × rows × F_local + 2 × pairs × D, attention
tokens × heads × (4C + 2R) (absorbed), the residual stream 8a + 2f per token and element of D; FP8 experts are
dequantised for ragged_dot (2f + a per element). Training on the TPU adds to the formulas above: the compiler casts
every layer stack to the compute dtype once, before the layer loops (all copies live), the chunked loss keeps one
chunk's logits (3 × chunk × V_local × f) plus the output head gathered whole (a + f per element) when FSDP splits
it, blockwise attention keeps no [H,T,S] scores, and the loss phase and the layers' backward do not overlap.
"""

from __future__ import annotations

import math

from dsv3_jax.config import ModelConfig
from dsv3_jax.plan.counts import F32, check_choice, itemsize, kv_bytes_per_token, model_leaves, value_bytes
from dsv3_jax.plan.placement import (
    Placement,
    local_tokens,
    moe_rows,
    plan_layout,
    resolve_mesh,
    rule_factor,
    seq_shards,
    shard_factors,
)
from dsv3_jax.plan.planner import Settings, device_memory

PROGRAMS = ("prefill", "decode", "train")


def _moe_layer_leaves(config: ModelConfig, placement: Placement):
    """(leaf, devices it is split over, layers it stacks) of the MoE stack: one layer's weights are a slice."""
    factors = shard_factors(config, placement)
    for leaf, k in zip(model_leaves(config), factors, strict=True):
        if "moe_layers" in leaf.path.split("/") and not leaf.mtp:
            yield leaf, k, max(config.num_moe_layers, 1)


def _forward_working_set(config: ModelConfig, placement: Placement, tokens: int, weights: str,
                         cached: bool, split: bool = True) -> dict[str, int]:
    """Bytes one device holds at the peak of the largest layer's forward (an MoE layer), for `tokens` local tokens
    (formulas measured against the TPU compiler's buffer assignment, tests/test_aot.py)."""
    c, a = config, itemsize(config.dtype)
    d, h = c.hidden_size, math.ceil(c.num_attention_heads / rule_factor(placement, "q_heads"))
    f_local = math.ceil(c.moe_intermediate_size / rule_factor(placement, "expert_mlp"))
    pairs, rows = moe_rows(c, placement, tokens, split)
    out = {"moe_dispatch": rows * (4 * d * a + 3 * f_local * a) + 2 * pairs * d * a}
    if c.num_moe_layers > 1:  # this layer's slice of the scanned stacks (a stack of one is used in place)
        out["layer_weights"] = sum(math.ceil(leaf.size / k) // n * value_bytes(leaf, weights) for leaf, k, n in
                                   _moe_layer_leaves(c, placement))
    if weights == "fp8":  # experts dequantised for ragged_dot: float32 products, bf16 result
        out["fp8_dequantised"] = sum(math.ceil(leaf.size / k) // n * (2 * F32 + a) for leaf, k, n in
                                     _moe_layer_leaves(c, placement) if leaf.routed)
    width = 4 * c.kv_lora_rank + 2 * c.qk_rope_head_dim if cached else (
        2 * c.qk_nope_head_dim + c.qk_rope_head_dim + 2 * c.v_head_dim)
    out["attention"] = tokens * h * width * a
    out["residual_stream"] = tokens * d * (8 * a + 2 * F32)
    return out


def program_memory(config: ModelConfig, program: str, batch: int, seq: int, *, layout: str, chips: int,
                   weights: str = "bf16", prefill_chunk: int | None = None,
                   moment_dtype: str = "bfloat16") -> dict[str, int]:
    """Per-device bytes of one program compiled by `plan.aot` (what XLA's argument + output + temp − alias holds).

    prefill: weights (no MTP: generation without drafting), the latent cache written (output) and its working copy
    (the layer scan's carry), the forward working set of one chunk of `prefill_chunk` tokens per sequence; decode:
    weights, the donated cache and the layer scan's copy of it, the working set of one token per sequence; train:
    `plan`'s training breakdown (fp32 masters, gradients, AdamW moments, activations with remat "full").
    """
    check_choice("program", program, PROGRAMS)
    lay = plan_layout(layout)
    placement = Placement(lay, resolve_mesh(lay, chips))
    if program == "train":
        settings = Settings("train", "fp32", batch, seq, moment_dtype, "full", "ragged", True, backend="tpu")
        return device_memory(config, placement, settings)[0]
    factors = shard_factors(config, placement)
    kept = [(leaf, k) for leaf, k in zip(model_leaves(config), factors, strict=True) if not leaf.mtp]
    b_local = math.ceil(batch / rule_factor(placement, "act_batch"))
    cache = b_local * seq * kv_bytes_per_token(config)  # split over the batch's axes only
    step = 1 if program == "decode" else (prefill_chunk or seq)
    tokens = local_tokens(placement, batch, step)
    split = rule_factor(placement, "act_seq") == 1 or seq_shards(placement, step) > 1
    out = {"weights": sum(math.ceil(leaf.size / k) * value_bytes(leaf, weights) for leaf, k in kept)}
    if weights == "fp8":
        out["fp8_scales"] = sum(math.ceil(leaf.scale_count / k) * F32 for leaf, k in kept)
    out.update(kv_cache=cache, kv_cache_copy=cache)
    out.update(_forward_working_set(config, placement, tokens, weights, cached=True, split=split))
    out["logits"] = b_local * math.ceil(config.vocab_size / rule_factor(placement, "vocab")) * F32
    return out
