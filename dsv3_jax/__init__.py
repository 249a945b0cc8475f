"""dsv3-jax: DeepSeek-V3 in JAX/Flax.

The public surface, imported lazily (flax, optax, orbax and the model load on first use; importing the package
imports jax itself, to set its CPU dispatch before the backend starts: dsv3_jax/host.py):

    ModelConfig, RopeScaling, PRESETS           dsv3_jax.config
    init_variables, abstract_variables, logical_axes, check_tokens, forward, forward_with_mtp, param_counts,
    stacked_to_loop, Transformer                dsv3_jax.model
    generate, Generation                        dsv3_jax.infer
    load_pretrained                             dsv3_jax.ckpt
    ConfigError, InputError, ...                dsv3_jax.errors
"""

from __future__ import annotations

import importlib
from typing import Any

from dsv3_jax.host import inline_cpu_dispatch, keep_host_heap, several_cpu_devices

# Before XLA starts its threads: see dsv3_jax/host.py (DSV3_INLINE_CPU_DISPATCH=0, DSV3_KEEP_HOST_HEAP=0 turn them off)
keep_host_heap(one_arena=not inline_cpu_dispatch() or several_cpu_devices())

_EXPORTS = {
    "PRESETS": "dsv3_jax.config",
    "ModelConfig": "dsv3_jax.config",
    "RopeScaling": "dsv3_jax.config",
    "ConfigError": "dsv3_jax.errors",
    "InputError": "dsv3_jax.errors",
    "Dsv3Error": "dsv3_jax.errors",
    "Transformer": "dsv3_jax.model.transformer",
    "abstract_variables": "dsv3_jax.model.api",
    "check_tokens": "dsv3_jax.model.api",
    "forward": "dsv3_jax.model.api",
    "forward_with_mtp": "dsv3_jax.model.api",
    "init_variables": "dsv3_jax.model.api",
    "logical_axes": "dsv3_jax.model.api",
    "param_counts": "dsv3_jax.model.api",
    "stacked_to_loop": "dsv3_jax.model.api",
    "Generation": "dsv3_jax.infer.generate",
    "generate": "dsv3_jax.infer.generate",
    "load_pretrained": "dsv3_jax.ckpt.pretrained",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dsv3_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
