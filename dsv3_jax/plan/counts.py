"""What the model holds, by shape alone: every variable as a `Leaf` (storage class, logical axes, FP8 blocks),
parameter and checkpoint counts, weight bytes by dtype, latent-cache bytes and FLOPs per token (formulas in the
docstring of `plan.planner`)."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec

from dsv3_jax.config import FP8_BLOCK, ModelConfig
from dsv3_jax.errors import PlanError
from dsv3_jax.model.api import abstract_variables, logical_axes, param_counts

F32 = 4  # bytes
STACK_AXES = ("layers", "expert")  # leading axes of stacked arrays: one matrix per index
WEIGHT_MODES = ("fp8", "bf16", "fp32")


def check_choice(field: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise PlanError(f"{field}: {value!r} is not one of {', '.join(map(str, allowed))}")


# ---------------------------------------------------------------- the parameter tree


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One variable of the model: where it lives, its shape, logical axes and storage class."""

    collection: str  # "params" or "router"
    path: str  # e.g. "params/moe_layers/layers/moe/w_gate"
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical axis names, one per dimension
    kind: str  # "linear" | "embedding" | "head" | "norm" | "router_gate" | "router_bias" | "mtp_proj" | "other"
    mtp: bool  # belongs to the MTP module

    @property
    def size(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def routed(self) -> bool:
        """A routed-expert weight (stacked over the "expert" axis)."""
        return "expert" in self.axes

    @property
    def scale_count(self) -> int:
        """FP8 block scales: ceil(K/128)·ceil(N/128) per matrix × the stacked layer/expert count (0: not linear)."""
        if self.kind != "linear":
            return 0
        lead = math.prod(d for d, a in zip(self.shape, self.axes, strict=True) if a in STACK_AXES)
        k, n = (d for d, a in zip(self.shape, self.axes, strict=True) if a not in STACK_AXES)
        return lead * math.ceil(k / FP8_BLOCK) * math.ceil(n / FP8_BLOCK)


def _classify(collection: str, axes: tuple[str | None, ...]) -> str:
    """Storage class of a variable from its logical axes (see the module docstring)."""
    if collection != "params":
        return "router_bias" if "router_expert" in axes else "other"
    core = [a for a in axes if a not in STACK_AXES]
    if "norm" in core:
        return "norm"
    if "router_expert" in core:
        return "router_gate"
    if core == ["vocab", "embed"]:
        return "embedding"
    if core == ["embed", "vocab"]:
        return "head"
    if "mtp_concat" in core:
        return "mtp_proj"
    return "linear" if len(core) == 2 else "other"


@functools.lru_cache(maxsize=16)
def model_leaves(config: ModelConfig) -> tuple[Leaf, ...]:
    """Every variable of `config` (main model + MTP), from `abstract_variables` and `logical_axes` (no allocation)."""
    shapes = jax.tree_util.tree_flatten_with_path(abstract_variables(config))[0]
    specs = jax.tree_util.tree_flatten_with_path(
        logical_axes(config), is_leaf=lambda x: isinstance(x, PartitionSpec))[0]
    leaves = []
    for (path, leaf), (spec_path, spec) in zip(shapes, specs, strict=True):
        keys = [str(getattr(p, "key", p)) for p in path]
        if keys != [str(getattr(p, "key", p)) for p in spec_path]:
            raise PlanError(f"abstract_variables and logical_axes disagree at {'/'.join(keys)}")
        axes = tuple(spec) + (None,) * (len(leaf.shape) - len(spec))
        leaves.append(Leaf(keys[0], "/".join(keys), tuple(int(d) for d in leaf.shape), axes,
                           _classify(keys[0], axes), any(k.startswith("mtp_") for k in keys)))
    return tuple(leaves)


@functools.lru_cache(maxsize=16)
def count_params(config: ModelConfig) -> dict[str, int]:
    """`dsv3_jax.param_counts`, cached per config (it traces the model)."""
    return param_counts(config)


def value_bytes(leaf: Leaf, weights: str) -> int:
    """Bytes per element of a leaf's values under a weight mode (scales not included)."""
    if weights == "fp32" or leaf.kind in ("router_gate", "router_bias"):
        return 4
    if weights == "fp8" and leaf.kind == "linear":
        return 1
    return 2


def weight_bytes_by_dtype(config: ModelConfig, weights: str = "fp8", *, mtp: bool = True) -> dict[str, int]:
    """Stored bytes of every weight (main model, + MTP when mtp) by dtype: {"fp8", "bf16", "fp32", "fp8_scales"}."""
    check_choice("weights", weights, WEIGHT_MODES)
    names = {1: "fp8", 2: "bf16", 4: "fp32"}
    out = {"fp8": 0, "bf16": 0, "fp32": 0, "fp8_scales": 0}
    for leaf in model_leaves(config):
        if leaf.mtp and not mtp:
            continue
        nbytes = value_bytes(leaf, weights)
        out[names[nbytes]] += leaf.size * nbytes
        if weights == "fp8":
            out["fp8_scales"] += leaf.scale_count * F32
    return out


def checkpoint_element_counts(config: ModelConfig) -> dict[str, int]:
    """Elements a HF DeepSeek-V3 FP8 checkpoint stores: {"weights", "scales"}.

    weights: every variable of the main model and MTP (router bias included) plus, per MTP depth, its own copy of
    embed_tokens and shared_head.head (DESIGN.md §5); scales: one per 128×128 block of every FP8 linear weight.
    671B: 684,489,845,504 and 41,540,496.
    """
    leaves = model_leaves(config)
    copies = sum(leaf.size for leaf in leaves if leaf.kind in ("embedding", "head") and not leaf.mtp)
    return {"weights": sum(leaf.size for leaf in leaves) + config.num_nextn_predict_layers * copies,
            "scales": sum(leaf.scale_count for leaf in leaves)}


def itemsize(name: str) -> int:
    return int(np.dtype(jax.numpy.dtype(name)).itemsize)


def kv_bytes_per_token(config: ModelConfig, dtype_bytes: int | None = None) -> int:
    """Latent MLA cache: (kv_lora_rank + qk_rope_head_dim) × layers × dtype bytes (compute dtype by default)."""
    a = itemsize(config.dtype) if dtype_bytes is None else dtype_bytes
    return (config.kv_lora_rank + config.qk_rope_head_dim) * config.num_hidden_layers * a


def kv_naive_bytes_per_token(config: ModelConfig, dtype_bytes: int | None = None) -> int:
    """A per-head cache of keys and values: H·(N + R + U) × layers × dtype bytes."""
    a = itemsize(config.dtype) if dtype_bytes is None else dtype_bytes
    per_layer = config.num_attention_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
    return per_layer * config.num_hidden_layers * a


def flops_per_token(config: ModelConfig, seq: int) -> dict[str, int]:
    """FLOPs per token: {"forward", "train", "decode"} at sequence / context length `seq` (module docstring)."""
    c = config
    leaves = model_leaves(c)
    embed = sum(leaf.size for leaf in leaves if leaf.kind == "embedding" and not leaf.mtp)
    active = count_params(c)["active"] - embed
    frac = c.num_experts_per_tok / c.n_routed_experts if c.n_routed_experts else 0.0
    mtp_active = sum(leaf.size * (frac if leaf.routed else 1.0) for leaf in leaves if leaf.mtp)
    head = sum(leaf.size for leaf in leaves if leaf.kind == "head" and not leaf.mtp)
    h = c.num_attention_heads
    attn = 2 * h * seq * (c.qk_head_dim + c.v_head_dim)
    forward = 2 * active + c.num_hidden_layers * attn
    mtp = c.num_nextn_predict_layers * (2 * (mtp_active + head) + attn)
    decode = 2 * active + c.num_hidden_layers * 2 * h * seq * (2 * c.kv_lora_rank + c.qk_rope_head_dim)
    return {"forward": int(forward), "train": int(3 * (forward + mtp)), "decode": int(decode)}
