"""Placement of the planner: a layout with the sizes of its mesh axes, the devices each parameter leaf and each
logical activation axis is split over, and the rows the expert FFN runs on under expert parallelism.

A leaf sharded over mesh axes of total size k stores 1/k of its bytes; replicated leaves are stored whole. With no
layout and N chips the default placement is expert parallelism over gcd(N, n_routed_experts) devices, everything
else replicated, and the batch split over all N devices ("DP attention + EP experts"). Tokens are split over the
mesh axes of the "act_batch" rule (sequences) times those of "act_seq" (each sequence's tokens: sequence
parallelism for long prompts).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

from jax.sharding import PartitionSpec

from dsv3_jax.config import ModelConfig
from dsv3_jax.errors import PlanError, ShardingError
from dsv3_jax.model.moe.expert_parallel import capacity
from dsv3_jax.parallel import Layout, get_layout, to_mesh_spec
from dsv3_jax.plan.counts import model_leaves

HEAD_AXES = ("q_heads", "kv_heads", "o_heads")

# Logical axis → the config field whose size it carries (for error messages).
_AXIS_FIELDS = {
    "vocab": "vocab_size", "embed": "hidden_size", "expert_embed": "hidden_size", "mlp": "intermediate_size",
    "expert_mlp": "moe_intermediate_size", "expert": "n_routed_experts", "router_expert": "n_routed_experts",
    "q_lora": "q_lora_rank", "kv_lora": "kv_lora_rank", "kv_a": "kv_lora_rank + qk_rope_head_dim",
    "q_heads": "num_attention_heads * qk_head_dim", "kv_heads": "num_attention_heads * (qk_nope + v_head_dim)",
    "o_heads": "num_attention_heads * v_head_dim", "mtp_concat": "2 * hidden_size", "layers": "num_hidden_layers",
    "norm": "norm width",
}

@dataclasses.dataclass(frozen=True)
class Placement:
    """A layout and the sizes of its mesh axes (axis name → devices)."""

    layout: Any  # sharding.Layout
    mesh: dict[str, int]

    @property
    def chips(self) -> int:
        return math.prod(self.mesh.values())


def plan_layout(name: str):
    """The named layout, or a PlanError in words."""
    try:
        return get_layout(name)
    except ShardingError as e:
        raise PlanError(f"layout: {e}") from None


def default_layout(config: ModelConfig, chips: int):
    """The placement used with --chips N and no layout: experts over gcd(N, E), the rest replicated, batch over N."""
    experts = math.gcd(chips, config.n_routed_experts) if config.n_routed_experts else 1
    rules = dict(plan_layout("single").rules)
    rules.update(expert="expert", act_batch=("data", "expert"))
    return Layout(f"auto-ep{experts}", (("data", -1), ("expert", experts)), tuple(rules.items()))


def resolve_mesh(layout, chips: int | None) -> dict[str, int]:
    """Mesh axis sizes: -1 takes the devices the other axes leave (1 when chips is None)."""
    sizes = dict(layout.mesh_axes)
    free = [name for name, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise PlanError(f"layout: {layout.name!r} has more than one -1 axis: {sizes}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if chips is None:
        return {name: 1 if size == -1 else size for name, size in sizes.items()}
    if chips % known or (not free and chips != known):
        need = f"a multiple of {known}" if free else f"exactly {known}"
        raise PlanError(f"chips: layout {layout.name!r} with axes {sizes} needs {need} chips, got {chips}")
    return {name: chips // known if size == -1 else size for name, size in sizes.items()}


def mesh_axes_of(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


@functools.lru_cache(maxsize=64)
def leaf_mesh_axes(config: ModelConfig, layout) -> tuple[tuple[tuple[str, ...], ...], ...]:
    """Per leaf, per dimension, the mesh axes the layout shards it over (via sharding.to_mesh_spec)."""
    out = []
    for leaf in model_leaves(config):
        try:
            spec = to_mesh_spec(PartitionSpec(*leaf.axes), layout, leaf.path)
        except ShardingError as e:
            raise PlanError(f"layout: {e}") from None
        out.append(tuple(mesh_axes_of(entry) for entry in tuple(spec) + (None,) * (len(leaf.shape) - len(spec))))
    return tuple(out)


def rule_factor(placement: Placement, logical: str) -> int:
    """Devices a logical activation axis is split over under the layout's rules (1 = replicated)."""
    rules = placement.layout.rules_dict
    return math.prod(placement.mesh.get(name, 1) for name in mesh_axes_of(rules.get(logical)))


def shard_factors(config: ModelConfig, placement: Placement) -> tuple[int, ...]:
    """Per leaf, the number of devices it is split over; raises PlanError when a mesh axis does not divide it."""
    factors = []
    for leaf, dims in zip(model_leaves(config), leaf_mesh_axes(config, placement.layout), strict=True):
        total = 1
        for size, logical, names in zip(leaf.shape, leaf.axes, dims, strict=True):
            missing = [n for n in names if n not in placement.mesh]
            if missing:
                raise PlanError(f"layout: {placement.layout.name!r} maps {logical!r} to unknown mesh axes {missing}")
            k = math.prod(placement.mesh[n] for n in names)
            field = _AXIS_FIELDS.get(str(logical), str(logical))
            if logical in HEAD_AXES and config.num_attention_heads % k:
                raise PlanError(f"num_attention_heads={config.num_attention_heads} is not divisible by mesh axes "
                                f"{names} of size {k} (layout {placement.layout.name!r}, {leaf.path})")
            if size % k:
                raise PlanError(f"{field}={size} is not divisible by mesh axes {names} of size {k} "
                                f"(layout {placement.layout.name!r}, {leaf.path})")
            total *= k
        factors.append(total)
    return tuple(factors)

def seq_shards(placement: Placement, step_tokens: int) -> int:
    """Devices each sequence's `step_tokens` tokens are split over (the "act_seq" rule), 1 when they do not
    divide (one decode token: replicated)."""
    k = rule_factor(placement, "act_seq")
    return k if step_tokens % k == 0 else 1


def local_tokens(placement: Placement, batch: int, step_tokens: int) -> int:
    """Tokens one device holds of a step of `batch` sequences × `step_tokens` tokens."""
    return math.ceil(batch / rule_factor(placement, "act_batch")) * step_tokens // seq_shards(placement, step_tokens)


def moe_rows(config: ModelConfig, placement: Placement, tokens: int, split: bool = True) -> tuple[int, int]:
    """(token-expert pairs of `tokens` local tokens, rows the expert FFN runs on one device): with expert
    parallelism (experts over a mesh axis the tokens are split over — batch or sequence — and `split`, the tokens
    really divided) each of the Y destinations gets a round of `capacity` rows (model.moe.expert_parallel);
    otherwise the FFN runs on the local pairs."""
    pairs = tokens * config.num_experts_per_tok
    rules = placement.layout.rules_dict
    expert_axes = mesh_axes_of(rules.get("expert"))
    token_axes = mesh_axes_of(rules.get("act_batch")) + mesh_axes_of(rules.get("act_seq"))
    ep = rule_factor(placement, "expert")
    if len(expert_axes) == 1 and expert_axes[0] in token_axes and ep > 1 and split:
        return pairs, ep * capacity(pairs, ep)
    return pairs, pairs
