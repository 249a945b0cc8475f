"""dsv3-jax: DeepSeek-V3 in JAX/Flax."""

from dsv3_jax.api import (
    InputError,
    abstract_variables,
    check_tokens,
    forward,
    forward_with_mtp,
    init_variables,
    logical_axes,
    param_counts,
    stacked_to_loop,
)
from dsv3_jax.config import PRESETS, ConfigError, ModelConfig, RopeScaling
from dsv3_jax.generate import Generation, generate
from dsv3_jax.model import Transformer
from dsv3_jax.pretrained import load_pretrained

__all__ = [
    "PRESETS",
    "ConfigError",
    "Generation",
    "InputError",
    "ModelConfig",
    "RopeScaling",
    "Transformer",
    "abstract_variables",
    "check_tokens",
    "forward",
    "forward_with_mtp",
    "generate",
    "init_variables",
    "load_pretrained",
    "logical_axes",
    "param_counts",
    "stacked_to_loop",
]
__version__ = "0.1.0"
