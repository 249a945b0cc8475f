"""The DeepSeek-V3 model: `axes` (shape legend, logical axes, collections), `layers`, `rope` (YaRN), `attention`
(MLA), `moe/` (router, dispatch, expert parallelism, the MoE layer), `transformer` (stacks, MTP), `api` (init,
forward, counts), `check` (the one variables checker)."""

from dsv3_jax.model.api import (
    Variables,
    abstract_variables,
    check_tokens,
    forward,
    forward_with_mtp,
    init_variables,
    logical_axes,
    param_counts,
    stacked_to_loop,
)
from dsv3_jax.model.transformer import Transformer

__all__ = ["Transformer", "Variables", "abstract_variables", "check_tokens", "forward", "forward_with_mtp",
           "init_variables", "logical_axes", "param_counts", "stacked_to_loop"]
