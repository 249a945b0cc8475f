"""Multi-host wiring on JAX's own distributed runtime (`jax.distributed`).

Launch one process per host (or per simulated host on one machine) with the same coordinator address:

    DSV3_COORDINATOR=10.0.0.1:1234 DSV3_NUM_PROCESSES=2 DSV3_PROCESS_ID=0 python experiments/multihost_step.py
    DSV3_COORDINATOR=10.0.0.1:1234 DSV3_NUM_PROCESSES=2 DSV3_PROCESS_ID=1 python experiments/multihost_step.py

On CPU the collectives use gloo (`jax_cpu_collectives_implementation`); on GPU/TPU JAX picks NCCL/ICI itself.
After `initialize`, `jax.devices()` lists every process's devices and one mesh spans them all.
"""

from __future__ import annotations

import os

import jax


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """jax.distributed.initialize from arguments or DSV3_COORDINATOR / DSV3_NUM_PROCESSES / DSV3_PROCESS_ID."""
    coordinator = coordinator or os.environ.get("DSV3_COORDINATOR")
    num_processes = num_processes or int(os.environ.get("DSV3_NUM_PROCESSES", "1"))
    process_id = int(os.environ.get("DSV3_PROCESS_ID", "0")) if process_id is None else process_id
    if num_processes <= 1:
        return
    if not coordinator:
        raise ValueError("multi-process run needs a coordinator address (host:port) or DSV3_COORDINATOR")
    if jax.config.jax_platforms in (None, "", "cpu") and "cuda" not in str(jax.config.jax_platforms):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
