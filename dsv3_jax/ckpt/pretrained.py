"""`load_pretrained(path)`: the one entry point for weights on disk (HF directories and `dsv3 convert` output)."""

from __future__ import annotations

import os

from dsv3_jax.ckpt.hf import load_hf_directory
from dsv3_jax.ckpt.store import is_converted, load_converted, place_variables
from dsv3_jax.config import ModelConfig
from dsv3_jax.errors import CheckpointError
from dsv3_jax.model.api import Variables


def load_pretrained(path: str | os.PathLike, config: ModelConfig | None = None, *,
                    shardings=None) -> tuple[ModelConfig, Variables]:
    """(config, variables) in the scan layout from a checkpoint directory:

    - written by `dsv3 convert` (manifest.json + orbax blocks): arrays keep the stored dtype (fp32, bf16, or
      QuantArray FP8 values + 128×128 scales), and the returned config's param_dtype says which;
    - a HF DeepseekV3 directory (`config.json` + bf16/f16/fp32 safetensors; FP8 ones need `dsv3 convert`).

    `config` overrides the one read from the directory (e.g. to set dtype or scan_layers); its architecture
    fields must match the checkpoint's tensors. `shardings`: a tree of `jax.sharding.Sharding` with the structure
    of the variables (or one Sharding for all) to place each array; default: the default device.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    if is_converted(path):
        return load_converted(path, config, shardings=shardings)
    if os.path.exists(os.path.join(path, "config.json")):
        loaded_config, variables = load_hf_directory(path, config)
        return loaded_config, variables if shardings is None else place_variables(variables, shardings)
    raise CheckpointError(f"{path}: no config.json; expected a HF DeepseekV3 checkpoint directory")
