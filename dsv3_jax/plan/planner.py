"""Resource planner: parameters, weight/scale bytes, KV cache, training memory, FLOPs, minimum chips and a decode
throughput bound for a config on a mesh layout — all derived from the model's abstract parameter tree
(`abstract_variables`, `logical_axes`, `param_counts`) and the sharding rules (`sharding.get_layout`,
`sharding.to_mesh_spec`), never from hand-typed model constants.

Units: bytes (B; GB = 10⁹ B in tables), FLOPs, tokens/s. "Per device" figures are for one chip of the mesh.

Weight storage (`weights=`), DESIGN.md §4-5:
  - "fp8": every linear weight of attention, dense MLP, shared and routed experts (MTP block included) is 1 byte
    plus one float32 scale per 128×128 block (ceil(K/128)·ceil(N/128) per matrix, per layer/expert for stacked
    arrays); embedding, lm_head, norms and eh_proj stay bf16; router gate and correction bias fp32.
  - "bf16" / "fp32": every weight in that dtype except the router gate and bias (always fp32).
A linear weight is recognised from its logical axes: two matrix axes besides the stacking axes ("layers",
"expert") and none of "vocab", "norm", "router_expert", "mtp_concat".

Placement: a leaf sharded over mesh axes of total size k stores 1/k of its bytes; replicated leaves are stored
whole. With `layout=None` and `chips=N` the default placement is expert parallelism over gcd(N, n_routed_experts)
devices, everything else replicated, and the batch (attention, KV cache, activations) split over all N devices
("DP attention + EP experts"). Activations and the KV cache are split over the mesh axes of the layout's
"act_batch" rule (ceil(B/k) sequences per device); logits over the "vocab" rule.

Training memory per device: fp32 master parameters (+ the fp32 router bias), fp32 gradients, AdamW first moment in
`moment_dtype` (report default bf16) and fp32 second moment, plus activations (`activation_breakdown`).

Activation formula (per device, N = B_local·T tokens, a = compute-dtype bytes, f = 4, H heads, S = T keys),
measured against the residuals JAX saves for the backward pass (`jax.ad_checkpoint.print_saved_residuals`) and
against XLA's compiled memory analysis of `train_step` (tests/test_planner.py):
  - every RMSNorm keeps w·a + f bytes per token (its input and one fp32 rsqrt: it has its own backward);
  - attention per layer and token: norm(D) twice (attention and FFN norms, covering the residual stream),
    norm(Q) (q_lora), norm(C), a·H·(2(N + R) + 3U) (the core's q, k, v and output, the output again for o_proj)
    and the probabilities H·S·a (the naive core has its own backward; this port materialises [B,H,T,S]);
  - dense MLP: 6·a·F (gate, up, the silu internals, product); MoE: router D·f + 3·E·f + X·(3f + 4),
    the per-pair outputs a·X·D, the shared expert 6·a·F_shared, and the dispatch buffers: for "ragged" (GPU/TPU)
    M = N·X sorted pairs × a·(D + 6F); for "blocks" (CPU, `moe.tiles` with its own backward) the padded tile
    rows × 2·a·F (gate and up); int32 permutation indices;
  - compute-dtype copies of the fp32 master weights used by the matmuls (only when the compute dtype is not fp32);
  - heads (main + each MTP depth): 3·V·f + V per token (the log-softmax and the selected log-probabilities
    autodiff keeps, the logits' cotangent, the target mask),
    plus the final norm; MTP extras: embedding, enorm, hnorm, the [2D] concat and the eh_proj output; the causal
    mask broadcast per stack, H·S·(1 + f);
  - remat "none": the sum over layers of the above; remat "full": each layer keeps only its input a·D, plus the
    heads and MTP extras, plus the backward working set of the largest layer = its recomputed residuals + twice its
    score tensors + its dispatch (or dense-MLP) buffers (the cotangents live at the peak; measured on CPU).
Flash-style attention (not in this port) would remove the H·S terms.

FLOPs per token: forward = 2 × (active parameters − embedding) + per layer 2·H·S·(N + R) + 2·H·S·U (scores and
values over S = T keys, as the implementation computes the full masked square); training = 3 × (forward + the MTP
depths' forward); decode (absorbed attention over a cache of T) = 2 × (active − embedding) + per layer
2·H·T·(2C + R).

Decode bound: per step each device reads its share of the non-embedding main-model weights (routed experts only
in the expected touched fraction 1 − (1 − X/E)^B for a batch of B tokens) and its KV cache shard; tokens/s ≤
B · bandwidth / (bytes read per device). MTP weights are not read (no speculative decoding in the bound).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from dsv3_jax import config as config_lib
from dsv3_jax.config import PRESETS, ModelConfig
from dsv3_jax.errors import PlanError
from dsv3_jax.model.attention import resolve_attention_impl
from dsv3_jax.model.moe.dispatch import tile_plan
from dsv3_jax.plan.chips import CHIPS, Chip
from dsv3_jax.plan.counts import (
    F32,
    WEIGHT_MODES,
    check_choice,
    checkpoint_element_counts,
    count_params,
    flops_per_token,
    itemsize,
    kv_bytes_per_token,
    kv_naive_bytes_per_token,
    model_leaves,
    value_bytes,
    weight_bytes_by_dtype,
)
from dsv3_jax.plan.placement import (
    Placement,
    default_layout,
    leaf_mesh_axes,
    mesh_axes_of,
    moe_rows,
    plan_layout,
    resolve_mesh,
    rule_factor,
    shard_factors,
)
from dsv3_jax.plan.result import Plan
from dsv3_jax.train.losses import LOSS_CHUNK

MODES = ("infer", "train")
REMATS = ("none", "full")
MOE_IMPLS = tuple(i for i in config_lib.MOE_IMPLS if i in ("ragged", "blocks"))  # what the planner sizes
MOMENT_DTYPES = ("bfloat16", "float32")
MAX_SEARCH_CHIPS = 65536

# ---------------------------------------------------------------- KV cache, activations, FLOPs


def _norm(width: int, a: int) -> int:
    """Bytes per token an RMSNorm keeps for the backward pass (its own backward): its input and one fp32 rsqrt."""
    return width * a + F32


def _attention_bytes_per_token(c: ModelConfig, a: int) -> int:
    """Per-layer attention residuals per token, excluding the [H,S] score tensors (see module docstring)."""
    q = _norm(c.q_lora_rank, a) if c.q_lora_rank else 0
    k = c.qk_nope_head_dim + c.qk_rope_head_dim
    heads = a * c.num_attention_heads * (2 * k + 3 * c.v_head_dim)  # q, k, v, output (core and o_proj)
    return 2 * _norm(c.hidden_size, a) + q + _norm(c.kv_lora_rank, a) + heads


def _dispatch_bytes(c: ModelConfig, tokens: int, experts: int, a: int, moe_impl: str,
                    rows: int | None = None) -> int:
    """Routed-expert dispatch buffers of one MoE layer on one device (balanced routing, `experts` local experts).

    rows: rows the expert FFN runs on under expert parallelism (one round of every destination's capacity,
    `moe_rows`); the send / receive / return buffers are rows × D each, the pair-ordered copies pairs × D."""
    d, f = c.hidden_size, c.moe_intermediate_size
    pairs = tokens * c.num_experts_per_tok
    if rows is not None:
        return rows * (a * (4 * d + 6 * f) + 2 * 4) + 2 * pairs * d * a
    if moe_impl == "ragged":
        return pairs * (a * (d + 6 * f) + 2 * 4)
    tile, _, tiles = tile_plan(pairs, experts)  # "blocks" (CPU): `moe.tiles` keeps each padded row's gate and up
    return tiles * tile * (2 * a * f + 4) + 3 * pairs * 4


def activation_breakdown(config: ModelConfig, batch: int, seq: int, *, remat: str = "full", moe_impl: str = "ragged",
                         batch_shards: int = 1, local_experts: int | None = None, vocab_shards: int = 1,
                         weight_copy_bytes: int = 0, head_copy_bytes: int = 0, attention_impl: str = "naive",
                         dispatch_rows: int | None = None, loss_chunk: int = 0,
                         hoisted_copies: bool = False) -> dict[str, int]:
    """Training activation bytes per device by part (formula in the module docstring).

    batch_shards: devices the batch is split over; local_experts: routed experts held per device (default all);
    weight_copy_bytes: compute-dtype copies of the per-device layer weights (0 when computing in fp32);
    head_copy_bytes: the same for lm_head (per head use) and eh_proj. attention_impl: "naive" keeps the [B,H,T,S]
    scores, "blockwise" one [B,H,block,block] block at a time; dispatch_rows: rows of one expert-parallel round
    (see `_dispatch_bytes`); loss_chunk: positions per chunk of the chunked cross-entropy (0: whole logits);
    hoisted_copies: the TPU compiler casts each layer stack to the compute dtype once, before the layer loops, so
    every layer's copy is live (else one layer's at a time).
    """
    check_choice("remat", remat, REMATS)
    check_choice("moe_impl", moe_impl, MOE_IMPLS)
    c, a = config, itemsize(config.dtype)
    n = math.ceil(batch / batch_shards) * seq
    experts = c.n_routed_experts if local_experts is None else local_experts
    d, h, v = c.hidden_size, c.num_attention_heads, math.ceil(c.vocab_size / vocab_shards)
    b_local = math.ceil(batch / batch_shards)
    block = min(c.attention_block, seq)
    scores = n * h * seq * a if attention_impl == "naive" else 4 * b_local * h * block * block * (F32 + a)
    attn = n * _attention_bytes_per_token(c, a)
    dense_mlp = n * 6 * a * c.intermediate_size
    router = n * (d * F32 + 3 * c.n_routed_experts * F32 + c.num_experts_per_tok * (3 * F32 + 4)
                  + a * c.num_experts_per_tok * d + 6 * a * c.moe_intermediate_size * c.n_shared_experts)
    dispatch = _dispatch_bytes(c, n, experts, a, moe_impl, dispatch_rows) if c.n_routed_experts else 0
    depth = c.num_nextn_predict_layers
    layers = c.num_hidden_layers + depth
    per_layer_copy = 0 if hoisted_copies else weight_copy_bytes // max(layers, 1)
    dense_layer = attn + scores + dense_mlp + per_layer_copy
    moe_layer = attn + scores + router + dispatch + per_layer_copy
    use_moe_mtp = c.n_routed_experts > 0
    if 0 < loss_chunk < seq:  # one chunk's float32 logits, their log-softmax and cotangent at a time
        heads = n * _norm(d, a) + 3 * b_local * loss_chunk * v * F32 + head_copy_bytes
    else:
        heads = n * ((3 * v * F32 + v) * (1 + depth) + _norm(d, a)) + head_copy_bytes
    mtp_extra = depth * n * (a * d + 3 * _norm(d, a) + 3 * a * d)
    stacks = (int(c.num_dense_layers > 0) + int(c.num_moe_layers > 0) + depth) * n * h * seq * (1 + F32) if (
        attention_impl == "naive") else 0  # blockwise derives its masks from positions inside each block
    out = {"heads": heads, "mtp_extra": mtp_extra}
    if hoisted_copies:
        out["weight_copies"] = weight_copy_bytes
    if remat == "none":
        out["layers"] = (c.num_dense_layers * dense_layer + c.num_moe_layers * moe_layer
                         + depth * (moe_layer if use_moe_mtp else dense_layer))
        out["masks"] = stacks
        return out
    out["layer_inputs"] = layers * n * a * d
    working = []
    if c.num_dense_layers or not use_moe_mtp:
        working.append(dense_layer + 2 * scores + dense_mlp)
    if c.num_moe_layers or (depth and use_moe_mtp):
        working.append(moe_layer + 2 * scores + dispatch)
    if hoisted_copies:  # the loss's chunk loop and the layers' backward run one after the other: the larger counts
        working.append(out.pop("heads"))
    out["working_set"] = max(working)
    return out


# ---------------------------------------------------------------- the plan


def _check_positive(field: str, value: Any) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise PlanError(f"{field}: must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Settings:
    mode: str
    weights: str
    batch: int
    seq: int
    moment_dtype: str
    remat: str
    moe_impl: str
    mtp: bool
    backend: str = "cpu"  # "tpu": the TPU compiler's program (plan.aot) — see activation_breakdown's options


def device_memory(config: ModelConfig, placement: Placement, s: Settings) -> tuple[dict[str, int], dict[str, int]]:
    """(breakdown counted against the chip, extra figures) for one device under a placement."""
    leaves = model_leaves(config)
    factors = shard_factors(config, placement)
    kept = [(leaf, k) for leaf, k in zip(leaves, factors, strict=True) if s.mtp or not leaf.mtp]
    batch_shards = rule_factor(placement, "act_batch")
    b_local = math.ceil(s.batch / batch_shards)
    a = itemsize(config.dtype)
    extra: dict[str, int] = {}
    if s.mode == "infer":
        values = sum(math.ceil(leaf.size / k) * value_bytes(leaf, s.weights) for leaf, k in kept)
        scales = sum(math.ceil(leaf.scale_count / k) * F32 for leaf, k in kept) if s.weights == "fp8" else 0
        cache = b_local * s.seq * kv_bytes_per_token(config)
        vocab = math.ceil(config.vocab_size / rule_factor(placement, "vocab"))
        working = b_local * (config.num_attention_heads * s.seq * (F32 + a) + 2 * vocab * F32
                             + 16 * a * config.hidden_size)
        out = {"weights": values, "fp8_scales": scales, "kv_cache": cache, "decode_working_set": working}
        return {k: v for k, v in out.items() if v or k != "fp8_scales"}, extra
    params = [(leaf, k) for leaf, k in kept if leaf.collection == "params"]
    master = sum(math.ceil(leaf.size / k) for leaf, k in params)
    router = sum(math.ceil(leaf.size / k) for leaf, k in kept if leaf.collection != "params")
    local_experts = math.ceil(config.n_routed_experts / rule_factor(placement, "expert"))
    copies = head_copies = 0
    if a != F32:  # the matmuls cast the fp32 masters to the compute dtype; autodiff keeps the copies
        layer_kinds = ("linear",)
        copies = sum(math.ceil(leaf.size / k) * a for leaf, k in params if leaf.kind in layer_kinds
                     and (s.moe_impl == "ragged" or not leaf.routed))
        heads = 1 + (config.num_nextn_predict_layers if s.mtp else 0)
        head_copies = sum(math.ceil(leaf.size / k) * a * (heads if leaf.kind == "head" else 1)
                          for leaf, k in params if leaf.kind in ("head", "mtp_proj"))
    cfg = config if s.mtp else config.replace(num_nextn_predict_layers=0)
    compiled = (_compiled_options(cfg, placement, s, params) if s.backend == "tpu"
                else {"attention_impl": resolve_attention_impl(config, s.seq, s.seq)})
    head_copies += compiled.pop("head_gathered", 0)
    acts = {remat: sum(activation_breakdown(
        cfg, s.batch, s.seq, remat=remat, moe_impl=s.moe_impl, batch_shards=batch_shards,
        local_experts=local_experts, vocab_shards=rule_factor(placement, "vocab"),
        weight_copy_bytes=copies, head_copy_bytes=head_copies, **compiled).values()) for remat in REMATS}
    extra.update(activation_bytes_none=acts["none"], activation_bytes_full=acts["full"])
    out = {"params_fp32": master * F32 + router * F32, "grads_fp32": master * F32,
           "adam_m": master * itemsize(s.moment_dtype), "adam_v": master * F32,
           "activations": acts[s.remat]}
    return out, extra


def _compiled_options(config: ModelConfig, placement: Placement, s: Settings, params) -> dict[str, Any]:
    """activation_breakdown options for the TPU program `plan.aot` compiles: the attention the model picks at this
    length, expert-parallel rounds, the chunked loss, hoisted weight copies, and the output head gathered whole
    (bf16 copy + float32 gradient) when FSDP splits it along D."""
    b_local = math.ceil(s.batch / rule_factor(placement, "act_batch"))
    tokens = b_local * s.seq
    pairs, rows = moe_rows(config, placement, tokens)
    head_gathered = 0
    for leaf, k in params:
        if leaf.kind == "head" and k > 1:
            vocab = math.ceil(leaf.size / config.hidden_size / rule_factor(placement, "vocab"))
            head_gathered += config.hidden_size * vocab * (itemsize(config.dtype) + F32)
    return {"attention_impl": resolve_attention_impl(config, s.seq, s.seq),
            "dispatch_rows": rows if rows != pairs else None, "loss_chunk": LOSS_CHUNK, "hoisted_copies": True,
            "head_gathered": head_gathered}


def _fits(total: int, chip: Chip, headroom: float) -> bool:
    return total <= chip.memory_bytes * (1.0 - headroom)


def _candidate_placements(config: ModelConfig, layout_name: str | None, batch: int):
    """Placements in increasing chip count for the minimum-chips search.

    Default placement: per-device memory is smallest once the experts are fully spread (E | chips) and every
    device holds at most one sequence, so the search stops at the first multiple of E that is >= batch.
    """
    if layout_name is None:
        for chips in range(1, _default_search_limit(config, batch) + 1):
            layout = default_layout(config, chips)
            yield Placement(layout, resolve_mesh(layout, chips))
        return
    layout = plan_layout(layout_name)
    sizes = dict(layout.mesh_axes)
    known = math.prod(size for size in sizes.values() if size != -1)
    free = [name for name, size in sizes.items() if size == -1]
    if not free:
        yield Placement(layout, resolve_mesh(layout, known))
        return
    for multiple in range(1, _free_axis_limit(config, layout, free[0], batch) + 1):
        if known * multiple > MAX_SEARCH_CHIPS:
            return
        yield Placement(layout, resolve_mesh(layout, known * multiple))


def _free_axis_limit(config: ModelConfig, layout, axis: str, batch: int) -> int:
    """Past this size of the -1 axis nothing more is split over it (largest dimension it shards, or the batch)."""
    rules = layout.rules_dict
    useful = batch if axis in mesh_axes_of(rules.get("act_batch")) else 1
    for leaf, dims in zip(model_leaves(config), leaf_mesh_axes(config, layout), strict=True):
        useful = max([useful] + [size for size, names in zip(leaf.shape, dims, strict=True) if axis in names])
    return useful


def _default_search_limit(config: ModelConfig, batch: int) -> int:
    experts = max(config.n_routed_experts, 1)
    return min(MAX_SEARCH_CHIPS, experts * math.ceil(batch / experts))


def min_chips(config: ModelConfig, chip: Chip, settings: Settings, layout_name: str | None = None,
              headroom: float = 0.1) -> int | None:
    """Fewest chips of `chip` whose per-device memory fits (1 − headroom) of HBM; None if none up to the limit.

    Placements that do not divide the model (e.g. experts over a mesh axis that does not divide them) are skipped.
    """
    for placement in _candidate_placements(config, layout_name, settings.batch):
        try:
            breakdown, _ = device_memory(config, placement, settings)
        except PlanError:
            continue
        if _fits(sum(breakdown.values()), chip, headroom):
            return placement.chips
    return None


def _decode_bound(config: ModelConfig, placement: Placement, s: Settings, chip: Chip) -> float:
    """Upper bound on decode tokens/s: batch / (bytes each device reads per step / HBM bandwidth)."""
    leaves = model_leaves(config)
    factors = shard_factors(config, placement)
    x, e = config.num_experts_per_tok, config.n_routed_experts
    touched = 1.0 - (1.0 - x / e) ** s.batch if e else 1.0
    read = 0.0
    for leaf, k in zip(leaves, factors, strict=True):
        if leaf.mtp or leaf.kind == "embedding":
            continue
        nbytes = math.ceil(leaf.size / k) * value_bytes(leaf, s.weights)
        if s.weights == "fp8":
            nbytes += math.ceil(leaf.scale_count / k) * F32
        read += nbytes * (touched if leaf.routed else 1.0)
    b_local = math.ceil(s.batch / rule_factor(placement, "act_batch"))
    read += b_local * s.seq * kv_bytes_per_token(config)
    return s.batch * chip.bandwidth / read


def _notes(placement: Placement, s: Settings, hw: Chip, chip: str) -> list[str]:
    """What the figures assume, in words."""
    notes: list[str] = []
    batch, mode, weights = s.batch, s.mode, s.weights
    batch_shards = rule_factor(placement, "act_batch")
    if batch % batch_shards:
        notes.append(f"batch {batch} is not a multiple of the {batch_shards} devices it is split over: "
                     f"figures are for the fullest device ({math.ceil(batch / batch_shards)} sequence(s))")
    if mode == "train":
        notes.append("training keeps fp32 master weights whatever --weights says; AdamW second moment in fp32")
        if rule_factor(placement, "expert") > 1:
            notes.append("dispatch buffers assume balanced routing (each device receives its share of the "
                         "token-expert pairs); a worst-case-sized all-to-all buffer is expert-axis times larger")
    else:
        notes.append("KV cache: main-model layers only (an MTP drafter adds one layer's worth)")
    if weights == "fp8" and not hw.native_fp8 and mode == "infer":
        notes.append(f"{chip} has no FP8 units: FP8 weights are stored as FP8 and dequantised per matmul")
    return notes


def _check_inputs(config, weights, mode, batch, seq, chips, chip, headroom, moment_dtype, remat, moe_impl) -> str:
    """Every plan() argument checked (PlanError naming the field); returns the MoE dispatch to size."""
    if not isinstance(config, ModelConfig):
        raise PlanError(f"config: expected a ModelConfig, got {type(config).__name__}")
    check_choice("weights", weights, WEIGHT_MODES)
    check_choice("mode", mode, MODES)
    check_choice("chip", chip, tuple(CHIPS))
    check_choice("remat", remat, REMATS)
    check_choice("moment_dtype", moment_dtype, MOMENT_DTYPES)
    _check_positive("batch", batch)
    _check_positive("seq", seq)
    if chips is not None:
        _check_positive("chips", chips)
    if not 0.0 <= headroom < 1.0:
        raise PlanError(f"headroom: must be in [0, 1), got {headroom!r}")
    if seq > config.max_position_embeddings:
        raise PlanError(f"seq: {seq} exceeds the config's max_position_embeddings={config.max_position_embeddings}")
    impl = moe_impl or (config.moe_impl if config.moe_impl in MOE_IMPLS else "ragged")
    check_choice("moe_impl", impl, MOE_IMPLS)
    return impl


def plan(config: ModelConfig, weights: str = "fp8", mode: str = "infer", batch: int = 1, seq: int = 4096,
         layout: str | None = None, chips: int | None = None, chip: str = "h100-80g", *, headroom: float = 0.1,
         moment_dtype: str = "bfloat16", remat: str = "full", moe_impl: str | None = None, mtp: bool = True,
         config_name: str | None = None) -> Plan:
    """Plan memory, FLOPs and chips for `config` (see the module docstring for every formula).

    weights: storage for inference ("fp8" | "bf16" | "fp32"; training always keeps fp32 masters); mode: "infer" |
    "train"; batch × seq: sequences × tokens (inference: context length of the KV cache); layout: a name from
    sharding.LAYOUTS (None: the default expert-parallel placement); chips: mesh size (None: the minimum that fits);
    chip: a key of chips.CHIPS; headroom: HBM fraction kept free; remat: "none" | "full" for the training total;
    moe_impl: "ragged" (GPU/TPU) | "blocks" (CPU) dispatch buffers (None: the config's, "auto" → ragged);
    mtp: include the MTP module's weights (and in training its activations).
    """
    impl = _check_inputs(config, weights, mode, batch, seq, chips, chip, headroom, moment_dtype, remat, moe_impl)
    hw = CHIPS[chip]
    settings = Settings(mode, weights, batch, seq, moment_dtype, remat, impl, mtp,
                        backend="tpu" if chip.startswith("tpu") else "cpu")
    notes: list[str] = []

    fewest = min_chips(config, hw, settings, layout, headroom)
    size = chips if chips is not None else fewest  # the chip count the per-device figures are for
    if layout is not None:
        lay = plan_layout(layout)
    else:
        size = size or _default_search_limit(config, batch)
        lay = default_layout(config, size)
    if chips is None and fewest is None:
        notes.append(f"nothing fits up to the search limit: per-device figures for {size or 'the smallest'} mesh")
    placement = Placement(lay, resolve_mesh(lay, size))
    breakdown, extra = device_memory(config, placement, settings)  # raises PlanError if the mesh does not divide
    total = sum(breakdown.values())

    counts = count_params(config)
    leaves = [leaf for leaf in model_leaves(config) if mtp or not leaf.mtp]
    by_dtype = weight_bytes_by_dtype(config, weights, mtp=mtp)
    ckpt = checkpoint_element_counts(config)
    flops = flops_per_token(config, seq)
    notes += _notes(placement, settings, hw, chip)
    return Plan(
        config_name=config_name or _preset_name(config), mode=mode, weights=weights, batch=batch, seq=seq, chip=chip,
        chips=placement.chips,
        layout=placement.layout.name, mesh=dict(placement.mesh),
        params_total=counts["total"], params_active=counts["active"], params_mtp=counts["mtp"],
        weight_elements=sum(leaf.size for leaf in leaves),
        scale_elements=sum(leaf.scale_count for leaf in leaves) if weights == "fp8" else 0,
        checkpoint_weight_elements=ckpt["weights"], checkpoint_scale_elements=ckpt["scales"],
        weight_bytes=sum(by_dtype.values()), weight_bytes_by_dtype=by_dtype,
        kv_bytes_per_token=kv_bytes_per_token(config), kv_naive_bytes_per_token=kv_naive_bytes_per_token(config),
        kv_cache_bytes=batch * seq * kv_bytes_per_token(config),
        flops_per_token_forward=flops["forward"], flops_per_token_train=flops["train"],
        flops_per_token_decode=flops["decode"], moment_dtype=moment_dtype, remat=remat, moe_impl=impl,
        breakdown_per_device=breakdown, activation_bytes_none=extra.get("activation_bytes_none"),
        activation_bytes_full=extra.get("activation_bytes_full"), total_per_device=total,
        chip_memory_bytes=hw.memory_bytes, headroom=headroom, fits=_fits(total, hw, headroom), min_chips=fewest,
        native_fp8=hw.native_fp8,
        decode_tokens_per_s_bound=_decode_bound(config, placement, settings, hw) if mode == "infer" else None,
        notes=notes,
    )


def _preset_name(config: ModelConfig) -> str:
    for name, preset in PRESETS.items():
        if preset == config:
            return name
    return "custom"



