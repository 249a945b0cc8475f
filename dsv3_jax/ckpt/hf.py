"""Loading a HF DeepseekV3 directory — bf16 / f16 / fp32 safetensors, or the released FP8 checkpoint itself
(F8_E4M3 weights with `weight_scale_inv` block scales, possibly in other shards than their weights).

The converter's own pieces do the work — the same `Source`, the same blocks, the same header checks before any
tensor is read, the same per-tensor conversion — and `place.place_from_source` reads each device's shard straight
into its sharding: no step holds the whole model in host memory.
"""

from __future__ import annotations

import os

from dsv3_jax.ckpt.blocks import FP8, WEIGHTS, abstract_tree, check_source, plan_blocks
from dsv3_jax.ckpt.detect import open_source
from dsv3_jax.ckpt.place import place_from_source
from dsv3_jax.ckpt.sources import Source
from dsv3_jax.config import ModelConfig
from dsv3_jax.errors import CheckpointError
from dsv3_jax.model.api import Variables

PARAM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp8": "bfloat16"}  # fp8: the leaves that stay unquantised


def is_fp8(source: Source) -> bool:
    return any(source.info(name)[0] == FP8 for name in source.names())


def default_weights(source: Source, stored: ModelConfig) -> str:
    """FP8 sources stay FP8-resident; others keep their stored precision (bf16 unless the files are float32)."""
    if is_fp8(source):
        return "fp8"
    return "fp32" if stored.param_dtype == "float32" else "bf16"


def load_hf_directory(directory: str | os.PathLike, config: ModelConfig | None = None, *, weights: str | None = None,
                      shardings=None) -> tuple[ModelConfig, Variables]:
    """(config, variables) of a HF DeepseekV3 directory in the scan layout.

    weights: "fp8" (QuantArray values + 128×128 scales for every linear weight the FP8 recipe covers; an FP8
    source is kept as is, a bf16/fp32 one quantised), "bf16" or "fp32" (FP8 dequantised once, exactly, then
    rounded); default: FP8 for an FP8 source, else the files' precision. The router gate and bias stay float32.
    shardings: one `jax.sharding.Sharding` or a tree matching the variables (a QuantArray leaf takes one, its
    values'); default: the default device.
    """
    directory = os.fspath(directory)
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise CheckpointError(f"{directory}: no config.json; expected a HF DeepseekV3 checkpoint directory")
    with open_source(directory) as (source, stored, interleaved, kind):
        if kind != "hf":
            raise CheckpointError(f"{directory}: a {kind} checkpoint; load HF safetensors directories here, "
                                  "convert others with `dsv3 convert`")
        weights = weights or default_weights(source, stored)
        if weights not in WEIGHTS:
            raise CheckpointError(f"weights must be one of {WEIGHTS}, got {weights!r}")
        config = (config or stored).replace(param_dtype=PARAM_DTYPES[weights])
        blocks = plan_blocks(config, source.names())
        abstract = abstract_tree(config, weights)
        check_source(blocks, source, abstract)
        variables = place_from_source(source, blocks, abstract, config, interleaved, shardings)
    return config, variables
