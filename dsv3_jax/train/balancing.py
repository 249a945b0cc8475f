"""Auxiliary-loss-free load balancing (DESIGN.md §3): the per-expert correction bias is updated outside the
gradient path from the expert loads of the step's global batch.

The router collection and the sown statistics mirror each other: every `.../moe/bias` [.., E] in the "router"
collection has a `.../moe/expert_load` [.., E] sown next to it in "moe_stats" (a leading layer axis for scanned
stacks). `expert_loads` pairs them; a hook maps (bias, load, gamma) → new bias.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

BiasHook = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def sign_update(bias_LE: jax.Array, load_LE: jax.Array, gamma: jax.Array, *, center: bool = False) -> jax.Array:
    """b_i += γ · sign(mean_load - load_i) per layer (last axis = experts); optionally re-centre b to zero mean."""
    load = load_LE.astype(jnp.float32)
    new = bias_LE + gamma * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
    return new - jnp.mean(new, axis=-1, keepdims=True) if center else new


def centered_sign_update(bias_LE: jax.Array, load_LE: jax.Array, gamma: jax.Array) -> jax.Array:
    return sign_update(bias_LE, load_LE, gamma, center=True)


def _unwrap(sown):
    """sow() stores a tuple of values; one value per call site here."""
    return sown[0] if isinstance(sown, tuple) else sown


def expert_loads(router: dict, stats: dict) -> dict:
    """A tree shaped like `router` whose leaves are the matching sown expert-load counts (float32)."""
    if "bias" in router:
        return {"bias": _unwrap(stats["expert_load"]).astype(jnp.float32)}
    return {key: expert_loads(sub, stats[key]) for key, sub in router.items()}


def balance_terms(stats: dict) -> list[jax.Array]:
    """Every sown sequence-wise balance term (one scalar per MoE layer; [L] for a scanned stack)."""
    out = []
    for key, sub in stats.items():
        if key == "balance":
            out.append(_unwrap(sub))
        elif isinstance(sub, dict):
            out += balance_terms(sub)
    return out


def update_router(router: dict, loads: dict, gamma: jax.Array, hook: BiasHook = sign_update) -> dict:
    """Apply the bias hook to every MoE layer's bias with its load."""
    return jax.tree_util.tree_map(lambda b, load: hook(b, load, gamma), router, loads)


def per_layer_loads(loads: dict) -> jax.Array:
    """All MoE layers' loads stacked [num_moe_layers (+ MTP), E] in tree order, for metrics and heatmaps."""
    leaves = [leaf.reshape(-1, leaf.shape[-1]) for leaf in jax.tree_util.tree_leaves(loads)]
    return jnp.concatenate(leaves, axis=0)
