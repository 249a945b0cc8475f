"""What node-limited routing could save in the expert-parallel dispatch (#16): the all-to-all volume per token.

`model.moe.expert_parallel` sends one copy of a token per (token, expert) pair: 8 copies per token at 671B
(top-8), whatever devices the experts sit on. DeepSeek-V3's group-limited routing (8 groups of 32 experts, each
token in at most topk_group = 4 of them; DESIGN.md §2) lets a dispatch that sends a token ONCE per destination
device (and combines there) move fewer rows; with groups = nodes, once per node across the slow links.

This script routes random tokens through the real router at the 671B routing config (256 experts, 8 groups,
top-4 groups, top-8, random gate at the preset's init std and a random correction bias) and counts, per token,
the pairs (rows sent today), the distinct destination devices (rows a per-device dedup would send), and the
distinct groups of 8 devices ("nodes" of 8 GPUs). Experts are laid out contiguously, as the layouts shard them.

    python experiments/node_limited_dispatch.py        # ~20 s; writes experiments/results/node_limited_dispatch.json
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.moe.router import gate_logits, route

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "node_limited_dispatch.json")
TOKENS = 8192
DEVICES = (8, 16, 32, 64, 128, 256)
GPUS_PER_NODE = 8


def _distinct_per_token(owner_NX: np.ndarray) -> float:
    """Mean number of distinct values per row."""
    ordered = np.sort(owner_NX, axis=1)
    return float(np.mean(1 + np.sum(ordered[:, 1:] != ordered[:, :-1], axis=1)))


def routed_experts(config: ModelConfig, tokens: int, seed: int = 0) -> np.ndarray:
    """experts [N,X] chosen by the real router for random hidden states."""
    kx, kg, kb = jax.random.split(jax.random.key(seed), 3)
    x_ND = jax.random.normal(kx, (tokens, config.hidden_size), jnp.float32)
    gate_DE = config.init_std * jax.random.normal(kg, (config.hidden_size, config.n_routed_experts), jnp.float32)
    bias_E = 1e-3 * jax.random.normal(kb, (config.n_routed_experts,), jnp.float32)
    _, experts_NX, _ = route(gate_logits(x_ND, gate_DE), bias_E, config)
    return np.asarray(experts_NX)


def savings(config: ModelConfig, experts_NX: np.ndarray) -> list[dict]:
    rows = []
    pairs = experts_NX.shape[1]
    for devices in DEVICES:
        per_device = config.n_routed_experts // devices
        device_NX = experts_NX // per_device
        distinct = _distinct_per_token(device_NX)
        nodes = _distinct_per_token(device_NX // GPUS_PER_NODE) if devices >= GPUS_PER_NODE else 1.0
        rows.append({"devices": devices, "experts_per_device": per_device, "pairs_per_token": pairs,
                     "distinct_devices_per_token": round(distinct, 3), "distinct_nodes_per_token": round(nodes, 3),
                     "dedup_saving": round(1 - distinct / pairs, 3)})
    return rows


def main() -> None:
    config = ModelConfig.from_preset("deepseek-v3-671b")
    experts_NX = routed_experts(config, TOKENS)
    groups = _distinct_per_token(experts_NX // config.experts_per_group)
    rows = savings(config, experts_NX)
    print(f"groups per token: {groups:.2f} (topk_group = {config.topk_group})")
    print("| devices | experts / device | pairs / token | distinct devices / token | rows saved by per-device "
          "dedup | distinct nodes of 8 / token |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['devices']} | {r['experts_per_device']} | {r['pairs_per_token']} | "
              f"{r['distinct_devices_per_token']:.2f} | {r['dedup_saving']:.0%} | "
              f"{r['distinct_nodes_per_token']:.2f} |")
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    tmp = OUT + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"tokens": TOKENS, "groups_per_token": groups, "rows": rows}, f, indent=1)
    os.replace(tmp, OUT)


if __name__ == "__main__":
    main()
