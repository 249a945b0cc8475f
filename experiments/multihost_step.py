"""One sharded train step of the tiny model across processes (`jax.distributed`), printing the result as JSON.

Each process owns some of the mesh's devices; together they form one global mesh under a named layout. The model
is initialised straight into its shardings (each process materialises only the shards on its own devices), the
global batch is assembled from per-process pieces, and one `make_sharded_train_step` step runs across all of them.

Two simulated hosts with 4 CPU devices each (one 8-device mesh; collectives over gloo):

    for i in 0 1; do
      XLA_FLAGS=--xla_force_host_platform_device_count=4 DSV3_COORDINATOR=127.0.0.1:12345 \
      DSV3_NUM_PROCESSES=2 DSV3_PROCESS_ID=$i python experiments/multihost_step.py --layout cpu-8 &
    done; wait

One process with 8 devices (the reference the multi-process run must equal):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/multihost_step.py --layout cpu-8

Each process prints one line `RESULT {json}`: loss, grad norm, expert loads, a checksum of the updated
parameters, the process's device counts and the parameter bytes it holds. `run_step()` is importable (the tests
call it in-process for the single-process reference).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __name__ == "__main__":  # before jax is imported: the devices this process simulates
    _procs = int(os.environ.get("DSV3_NUM_PROCESSES", "1"))
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={max(8 // _procs, 1)}")

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.parallel import api as sa
from dsv3_jax.parallel import get_layout, make_mesh
from dsv3_jax.train.step import TrainConfig, init_state, make_optimizer

# The tiny preset cut to one dense + one MoE layer and no MTP block (compile time on 2 shared cores; --mtp adds it),
# init std 0.05 so the router's choices are not all bias.
CONFIG = ModelConfig.from_preset("tiny", init_std=0.05, num_hidden_layers=2, first_k_dense_replace=1,
                                 num_nextn_predict_layers=0)
TRAIN = TrainConfig(steps=10, batch_size=8, seq_len=16, lr=1e-3, warmup_steps=0, final_lr_ratio=1.0, eps=1e-3,
                    balance_alpha=1e-2, bias_gamma=0.05)


def global_batch(config: ModelConfig = CONFIG, tc: TrainConfig = TRAIN, seed: int = 1) -> dict[str, np.ndarray]:
    """The whole batch as numpy (every process derives the same one; each then places only its rows)."""
    tokens = np.random.RandomState(seed).randint(0, config.vocab_size, (tc.batch_size, tc.seq_len + 1))
    tokens = tokens.astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def fetch(x) -> np.ndarray:
    """A global array as numpy on every process (replicated ones are read locally, others gathered)."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def run_step(layout_name: str = "cpu-8", config: ModelConfig = CONFIG, tc: TrainConfig = TRAIN, seed: int = 0):
    """Init sharded, one train step on the global batch; returns a JSON-able dict (identical on every process)."""
    layout = get_layout(layout_name)
    mesh = make_mesh(layout)  # all devices of all processes
    variables = sa.init_sharded(config, layout, mesh, rng=seed)
    local_param_bytes = sum(sa.memory_report(variables).values())
    full_param_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(variables))

    optimizer = make_optimizer(tc)
    abstract = jax.eval_shape(lambda v: init_state(v, optimizer), variables)
    step, state_sh = sa.make_sharded_train_step(config, tc, optimizer, abstract, layout, mesh)
    state = jax.jit(lambda v: init_state(v, optimizer), out_shardings=state_sh)(variables)

    # Each process supplies the rows of the global batch that live on its devices.
    batch_sh = sa.batch_sharding(layout, mesh)
    host = global_batch(config, tc)
    batch = {k: jax.make_array_from_callback(v.shape, batch_sh, lambda index, v=v: v[index]) for k, v in host.items()}

    state, metrics = step(state, batch)
    checksum = jax.jit(lambda p: sum(jnp.sum(jnp.abs(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(p)),
                       out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))(state.params)
    loads = fetch(metrics["expert_load"])
    return {
        "process": jax.process_index(), "processes": jax.process_count(), "layout": layout_name,
        "devices": jax.device_count(), "local_devices": jax.local_device_count(),
        "loss": float(fetch(metrics["loss"])), "grad_norm": float(fetch(metrics["grad_norm"])),
        "expert_load": loads.tolist(), "param_abs_sum": float(fetch(checksum)), "step": int(fetch(state.step)),
        "local_param_bytes": int(local_param_bytes), "full_param_bytes": int(full_param_bytes),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", default="cpu-8", help="a layout name from sharding/rules.py")
    parser.add_argument("--mtp", action="store_true", help="with the tiny preset's MTP block (depth 1)")
    args = parser.parse_args(argv)

    from dsv3_jax.parallel.distributed import initialize

    initialize()  # DSV3_COORDINATOR / DSV3_NUM_PROCESSES / DSV3_PROCESS_ID; a no-op for one process
    jax.config.update("jax_default_matmul_precision", "highest")
    result = run_step(args.layout, CONFIG.replace(num_nextn_predict_layers=1) if args.mtp else CONFIG)
    print("RESULT " + json.dumps(result), flush=True)
    if jax.process_count() > 1:
        jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
