"""Loading a HF DeepseekV3 directory (`config.json` + bf16/f16/fp32 safetensors) straight into memory.

The converter's own pieces do the work — the same `Source`, the same blocks, the same header checks before any
tensor is read, the same per-block conversion — only the blocks are gathered into one tree instead of written to
disk. FP8 checkpoints still go through `dsv3 convert` here.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from dsv3_jax.ckpt.blocks import FP8, SCALE_SUFFIX, check_source, convert_block, insert_block, plan_blocks
from dsv3_jax.ckpt.detect import open_source
from dsv3_jax.ckpt.sources import Source
from dsv3_jax.config import ModelConfig
from dsv3_jax.errors import CheckpointError
from dsv3_jax.model.api import Variables, abstract_variables


def _reject_fp8(source: Source) -> None:
    for name in sorted(source.names()):
        if name.endswith(SCALE_SUFFIX) or source.info(name)[0] == FP8:
            raise CheckpointError(f"{source.where(name)}: tensor {name} belongs to an FP8 checkpoint; convert it "
                                  "with `dsv3 convert` first")


def load_hf_directory(directory: str | os.PathLike, config: ModelConfig | None = None) -> tuple[ModelConfig, Variables]:
    """Read a HF DeepseekV3 directory into (config, variables) in the scan layout, dtype config.param_dtype."""
    directory = os.fspath(directory)
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise CheckpointError(f"{directory}: no config.json; expected a HF DeepseekV3 checkpoint directory")
    with open_source(directory) as (source, stored, interleaved, kind):
        if kind != "hf":
            raise CheckpointError(f"{directory}: a {kind} checkpoint; load HF safetensors directories here, "
                                  "convert others with `dsv3 convert`")
        config = config or stored
        _reject_fp8(source)
        blocks = plan_blocks(config, source.names())
        abstract = abstract_variables(config.replace(scan_layers=True))
        check_source(blocks, source, abstract)
        host: dict = {}
        for block in blocks:
            tree, _ = convert_block(block, source, block.target(abstract), config, interleaved)
            insert_block(host, block, tree, abstract)
    return config, jax.tree_util.tree_map(jnp.asarray, host)
