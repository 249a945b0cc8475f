"""Sharded entry points: place or initialise variables in their shardings, and run forward / train_step under a
layout (jit with shardings, logical activation constraints, expert-parallel MoE via shard_map)."""

from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dsv3_jax.ckpt.place import scale_sharding
from dsv3_jax.config import ModelConfig
from dsv3_jax.errors import ShardingError
from dsv3_jax.infer.generate import generate as generate_local
from dsv3_jax.model.api import check_tokens, compile_init, logical_axes
from dsv3_jax.model.check import check_variables
from dsv3_jax.model.moe.expert_parallel import ExpertParallel, use_expert_parallel
from dsv3_jax.model.transformer import Transformer
from dsv3_jax.parallel.rules import Layout, get_layout, make_mesh, param_shardings
from dsv3_jax.quant.fp8 import QuantArray
from dsv3_jax.train.step import jit_train_step, make_train_step


def _mesh_axes(value) -> tuple[str, ...]:
    return () if value is None else (value,) if isinstance(value, str) else tuple(value)


def batch_axes(layout: Layout) -> tuple[str, ...]:
    """Mesh axes the batch (sequences, and the latent cache) is split over: the "act_batch" rule."""
    return _mesh_axes(layout.rules_dict.get("act_batch"))


def seq_axes(layout: Layout) -> tuple[str, ...]:
    """Mesh axes each sequence's tokens are split over (sequence parallelism for long prompts): "act_seq"."""
    return _mesh_axes(layout.rules_dict.get("act_seq"))


def token_axes(layout: Layout) -> tuple[str, ...]:
    """Mesh axes of the flattened token dimension N = B·T: the batch's (major), then the sequence's."""
    return batch_axes(layout) + seq_axes(layout)


def tokens_spec(layout: Layout) -> PartitionSpec:
    """PartitionSpec of token ids [B,T] under `layout`."""
    return PartitionSpec(batch_axes(layout) or None, seq_axes(layout) or None)


def expert_parallel_for(layout: Layout, mesh: Mesh) -> ExpertParallel | None:
    """Expert-parallel dispatch when experts are sharded over an axis the tokens are also sharded over."""
    expert = _mesh_axes(layout.rules_dict.get("expert"))
    if len(expert) != 1 or expert[0] not in token_axes(layout) or mesh.shape[expert[0]] == 1:
        return None
    return ExpertParallel(mesh, expert[0], token_axes(layout))


@contextlib.contextmanager
def activate(layout: Layout, mesh: Mesh):
    """Mesh, logical-axis rules and expert parallelism for tracing under `layout`."""
    rules = [(k, v) for k, v in layout.rules]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules), use_expert_parallel(expert_parallel_for(layout, mesh)):
        yield


def check_divisible(config: ModelConfig, layout: Layout, mesh: Mesh, batch: int | None = None,
                    seq: int | None = None) -> None:
    """The mesh must divide the experts, heads, batch and sequence (tokens per step) it shards; else
    ShardingError naming the field."""
    rules = layout.rules_dict

    def size(logical: str) -> int:
        return int(np.prod([mesh.shape[a] for a in _mesh_axes(rules.get(logical))]))

    checks = [("n_routed_experts", config.n_routed_experts, size("expert")),
              ("num_attention_heads", config.num_attention_heads, size("q_heads")),
              ("vocab_size", config.vocab_size, size("vocab"))]
    if batch is not None:
        checks.append(("batch", batch, size("act_batch")))
    if seq is not None:
        checks.append(("sequence (tokens per step)", seq, size("act_seq")))
    for name, value, parts in checks:
        if parts > 1 and value % parts:
            raise ShardingError(f"layout {layout.name!r}: {name}={value} is not divisible by its mesh axes "
                                f"(size {parts})")


def _pruned(axes, variables):
    """The logical-axes tree restricted to the collections/keys present in `variables`."""
    if isinstance(variables, dict):
        return {k: _pruned(axes[k], v) for k, v in variables.items()}
    return axes


def variable_shardings(config: ModelConfig, layout: Layout, mesh: Mesh, variables=None):
    """NamedSharding per variable under `layout`. With `variables`, the tree follows theirs: only the keys they
    have, and an FP8-resident weight (QuantArray) gets a QuantArray of shardings — its values', and its block
    scales' (the same partition where the scale counts divide it)."""
    axes = logical_axes(config)
    if variables is None:
        return param_shardings(axes, layout, mesh)
    shardings = param_shardings(_pruned(axes, variables), layout, mesh)
    return jax.tree_util.tree_map(
        lambda v, s: QuantArray(s, scale_sharding(s, v.values.shape, v.scales.shape)) if isinstance(v, QuantArray)
        else s, variables, shardings, is_leaf=lambda x: isinstance(x, QuantArray))


def shard_variables(config: ModelConfig, variables, layout: Layout, mesh: Mesh):
    """Place existing variables into their shardings."""
    check_divisible(config, layout, mesh)
    return jax.device_put(variables, variable_shardings(config, layout, mesh, variables))


def init_sharded(config: ModelConfig, layout: Layout, mesh: Mesh, rng: int = 0):
    """Initialise straight into the shardings: no host or device ever holds the unsharded model."""
    check_divisible(config, layout, mesh)
    shardings = variable_shardings(config, layout, mesh)
    key = jax.random.key(rng)
    return nn.unbox(compile_init(config, key, out_shardings=shardings)(key))


def batch_sharding(layout: Layout, mesh: Mesh) -> NamedSharding:
    """Sharding of token ids [B,T]."""
    return NamedSharding(mesh, tokens_spec(layout))


@functools.lru_cache(maxsize=16)
def _sharded_forward(config: ModelConfig, layout: Layout, mesh: Mesh):
    model = Transformer(config)
    return jax.jit(lambda variables, tokens: model.apply(variables, tokens)[0])


def forward(config: ModelConfig, variables, tokens_BT, layout: Layout, mesh: Mesh) -> jax.Array:
    """Float32 logits [B,T,V] with variables and the batch sharded under `layout`."""
    tokens = check_tokens(config, tokens_BT)
    check_divisible(config, layout, mesh, tokens.shape[0])
    with activate(layout, mesh):
        return _sharded_forward(config, layout, mesh)(variables, jax.device_put(tokens, batch_sharding(layout, mesh)))


def state_shardings(optimizer: optax.GradientTransformation, abstract_state, param_sh, router_sh, mesh: Mesh):
    """TrainState shardings: optimizer moments follow their parameters, counters are replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    opt_sh = optax.tree_map_params(optimizer, lambda _, sh: sh, abstract_state.opt_state, param_sh,
                                   transform_non_params=lambda _: replicated)
    return abstract_state.replace(step=replicated, params=param_sh, router=router_sh, opt_state=opt_sh)


def make_sharded_train_step(config: ModelConfig, train_config, optimizer, abstract_state, layout: Layout,
                            mesh: Mesh):
    """(jitted step under the layout, state shardings): call step(state, batch) with any placement."""

    check_divisible(config, layout, mesh, train_config.batch_size // train_config.grad_accum)
    shardings = variable_shardings(config, layout, mesh, {"params": abstract_state.params,
                                                           "router": abstract_state.router})
    st_sh = state_shardings(optimizer, abstract_state, shardings["params"], shardings["router"], mesh)
    batch_sh = batch_sharding(layout, mesh)
    jitted = jit_train_step(make_train_step(config, train_config, optimizer), st_sh, batch_sh)

    def step(state, batch):
        with activate(layout, mesh):
            return jitted(state, batch)

    return step, st_sh


def mesh_train_step(rc, optimizer, abstract_state):
    """The training loop's step under rc.run.mesh (see `train.loop.train`): every process holds the same global
    batch (same data stream and seed) and contributes its own shards of it."""
    layout = get_layout(rc.run.mesh)
    mesh = make_mesh(layout)
    step, shardings = make_sharded_train_step(rc.model, rc.train, optimizer, abstract_state, layout, mesh)
    batch_sh = batch_sharding(layout, mesh)

    def global_step(state, batch):
        arrays = {k: jax.make_array_from_callback(v.shape, batch_sh, lambda index, v=v: v[index])
                  for k, v in batch.items()}
        return step(state, arrays)

    return global_step, shardings


def generate(config: ModelConfig, variables, prompt_ids, max_new_tokens: int, layout: Layout, mesh: Mesh, **kwargs):
    """`dsv3_jax.infer.generate` with variables sharded under `layout` (heads, experts, vocab as the rules say).

    Decoding batches are small, so the MoE runs with GSPMD collectives rather than the all-to-all dispatch.
    """

    check_divisible(config, layout, mesh)
    check_variables(config, variables, need_mtp=bool(kwargs.get("speculative")))
    variables = shard_variables(config, variables, layout, mesh)
    with decoding(layout, mesh):
        return generate_local(config, variables, prompt_ids, max_new_tokens, **kwargs)


@contextlib.contextmanager
def decoding(layout: Layout, mesh: Mesh):
    """Trace decoding under `layout`: weights as the rules say, the (small) batch unsharded, the MoE through
    GSPMD collectives rather than the all-to-all dispatch."""
    rules = [(k, v) for k, v in layout.rules if k not in ("act_batch", "act_seq")]
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def memory_report(variables) -> dict[str, int]:
    """Bytes of placed variables held by each device (addressable shards), keyed by device id."""
    per_device: dict[str, int] = {}
    for leaf in jax.tree_util.tree_leaves(variables):
        for shard in leaf.addressable_shards:
            key = str(shard.device.id)
            per_device[key] = per_device.get(key, 0) + shard.data.nbytes
    return per_device
