"""Public entry points: build, initialise, run and count the model.

Variables are plain pytrees: {"params": ..., "router": ...}; logical axis names come separately from
`logical_axes(config)`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.errors import InputError
from dsv3_jax.host import compiler_options, init_compiler_options
from dsv3_jax.model.axes import STACKS, VARIABLE_COLLECTIONS
from dsv3_jax.model.transformer import Transformer
from dsv3_jax.quant.matmul import target_platform

Variables = dict[str, Any]



def _init_fn(config: ModelConfig):
    # Rolled layer stacks: the same numbers as an unrolled scan (`scan_unroll` only changes how the loop is
    # compiled), and one copy of each layer's initialisers to compile (tiny_stdlib's init 14.9 -> 11.8 s).
    model = Transformer(dataclasses.replace(config, scan_unroll=1))

    def init(rng: jax.Array) -> Variables:
        tokens = jnp.zeros((1, 2), jnp.int32)  # created per trace: a cached closure must not hold a tracer
        variables = model.init(rng, tokens, method=Transformer.forward_with_mtp)
        return {k: v for k, v in variables.items() if k in VARIABLE_COLLECTIONS}

    return init


def compile_init(config: ModelConfig, rng: Any, **jit_kwargs: Any) -> jax.stages.Compiled:
    """The random initialisation (boxed variables) compiled for keys like `rng` (an array or ShapeDtypeStruct), with
    `init_compiler_options` for its size; `jit_kwargs` go to `jax.jit` (e.g. out_shardings)."""
    traced = jax.jit(_init_fn(config), **jit_kwargs).trace(rng)
    size = sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(traced.out_info))
    return traced.lower().compile(compiler_options=init_compiler_options(target_platform(), size))


@functools.lru_cache(maxsize=32)
def _compiled_init(config: ModelConfig, rng_shape: tuple[int, ...], rng_dtype: Any) -> jax.stages.Compiled:
    return compile_init(config, jax.ShapeDtypeStruct(rng_shape, rng_dtype))


def init_variables(config: ModelConfig, rng: jax.Array | int = 0) -> Variables:
    """Randomly initialised variables (main model + MTP), unboxed plain arrays. Compiled once per config and key
    type (`compile_init`); traced into the program when called inside a trace."""
    rng = jax.random.key(rng) if isinstance(rng, int) else rng
    if isinstance(rng, jax.core.Tracer):  # inside a trace (eval_shape, jit): part of that program
        return nn.unbox(_init_fn(config)(rng))
    return nn.unbox(_compiled_init(config, rng.shape, rng.dtype)(rng))


def abstract_variables(config: ModelConfig) -> Variables:
    """ShapeDtypeStruct tree of every variable; allocates nothing. Traced once per config."""
    return jax.tree_util.tree_map(lambda x: x, _abstract_variables(config))  # a fresh container per call


@functools.cache
def _abstract_variables(config: ModelConfig) -> Variables:
    init = _init_fn(config)
    return jax.eval_shape(lambda rng: nn.unbox(init(rng)), jax.random.key(0))  # unboxed inside: no mesh needed


def logical_axes(config: ModelConfig) -> Variables:
    """Tree of PartitionSpecs holding logical axis names, one per variable (same structure as the variables)."""
    boxed = jax.eval_shape(_init_fn(config), jax.random.key(0))
    return nn.get_partition_spec(boxed)


def check_tokens(config: ModelConfig, tokens_BT: Any) -> jax.Array:
    """Validate a [B,T] integer token array (ids in range, length within max_position_embeddings)."""
    arr = np.asarray(tokens_BT) if not isinstance(tokens_BT, jax.core.Tracer) else tokens_BT
    if arr.ndim != 2:
        raise InputError(f"tokens must have shape [batch, seq], got shape {tuple(arr.shape)}")
    if not jnp.issubdtype(arr.dtype, jnp.integer):
        raise InputError(f"tokens must be integers, got dtype {arr.dtype}")
    if arr.shape[1] > config.max_position_embeddings:
        raise InputError(f"sequence length {arr.shape[1]} exceeds max_position_embeddings="
                         f"{config.max_position_embeddings}")
    if arr.shape[1] == 0 or arr.shape[0] == 0:
        raise InputError(f"tokens must be non-empty, got shape {tuple(arr.shape)}")
    if isinstance(arr, np.ndarray):
        bad = (arr < 0) | (arr >= config.vocab_size)
        if bad.any():
            b, t = np.argwhere(bad)[0]
            raise InputError(f"token id {int(arr[b, t])} at [{b}, {t}] is outside [0, vocab_size={config.vocab_size})")
    return jnp.asarray(arr, jnp.int32)


@functools.cache
def _jitted_forward(config: ModelConfig):
    model = Transformer(config)
    return jax.jit(lambda variables, tokens: model.apply(variables, tokens)[0],
                   compiler_options=compiler_options(target_platform()))


@functools.cache
def _jitted_forward_with_mtp(config: ModelConfig):
    model = Transformer(config)
    return jax.jit(lambda variables, tokens: model.apply(variables, tokens, method=Transformer.forward_with_mtp),
                   compiler_options=compiler_options(target_platform()))


def forward(config: ModelConfig, variables: Variables, tokens_BT: Any) -> jax.Array:
    """Float32 logits [B,T,V] for tokens [B,T] (positions 0..T-1, causal). Compiled once per config and shape."""
    return _jitted_forward(config)(variables, check_tokens(config, tokens_BT))


def forward_with_mtp(config: ModelConfig, variables: Variables, tokens_BT: Any) -> tuple[jax.Array, jax.Array]:
    """(logits [B,T,V], MTP logits [depth,B,T,V]); MTP depth k at position i predicts token i+k+1."""
    return _jitted_forward_with_mtp(config)(variables, check_tokens(config, tokens_BT))


def param_counts(config: ModelConfig) -> dict[str, int]:
    """Parameter counts from abstract shapes (no allocation). The router bias counts as a parameter.

    total: main model (embedding, layers, final norm, head); active: per token (shared experts and top-k routed
    experts only); mtp: the MTP module's own parameters (it shares the embedding and head).
    """
    variables = abstract_variables(config)
    sizes = {"main": 0, "mtp": 0, "routed": 0}
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        keys = [getattr(p, "key", str(p)) for p in path]
        size = int(np.prod(leaf.shape))
        sizes["mtp" if any(str(k).startswith("mtp_") for k in keys) else "main"] += size
        if keys[-1] in ("w_gate", "w_up", "w_down") and "moe" in keys and "shared" not in keys \
                and not any(str(k).startswith("mtp_") for k in keys):
            sizes["routed"] += size
    inactive = sizes["routed"] * (config.n_routed_experts - config.num_experts_per_tok) // max(
        config.n_routed_experts, 1) if config.num_moe_layers else 0
    return {"total": sizes["main"], "active": sizes["main"] - inactive, "mtp": sizes["mtp"]}


def stacked_to_loop(config: ModelConfig, variables: Variables) -> Variables:
    """Convert scan-layout variables (leading "layers" axis) to the `scan_layers=False` layout (layer_i)."""

    def convert(tree: dict) -> dict:
        out = dict(tree)
        for name, _ in STACKS:
            if name in out and "layers" in out[name]:
                stacked = out[name]["layers"]
                count = jax.tree_util.tree_leaves(stacked)[0].shape[0]
                out[name] = {f"layer_{i}": jax.tree_util.tree_map(lambda a, i=i: a[i], stacked)
                             for i in range(count)}
        return out

    return {k: convert(v) for k, v in variables.items()}
