"""`load_pretrained(path)`: the one entry point for weights on disk (HF directories and `dsv3 convert` output)."""

from __future__ import annotations

import os

from dsv3_jax.ckpt.hf import load_hf_directory
from dsv3_jax.ckpt.store import is_converted, load_converted
from dsv3_jax.config import ModelConfig
from dsv3_jax.errors import CheckpointError
from dsv3_jax.model.api import Variables


def load_pretrained(path: str | os.PathLike, config: ModelConfig | None = None, *, shardings=None,
                    weights: str | None = None) -> tuple[ModelConfig, Variables]:
    """(config, variables) in the scan layout from a checkpoint directory:

    - a HF DeepseekV3 directory (`config.json` + safetensors): bf16 / f16 / fp32, or the released FP8 checkpoint
      itself, read straight into `shardings` (see `hf.load_hf_directory`; `weights` "fp8" | "bf16" | "fp32",
      default FP8-resident for FP8 files, else the files' precision);
    - written by `dsv3 convert` (manifest.json + orbax blocks): arrays keep the stored dtype (fp32, bf16, or
      QuantArray FP8 values + 128×128 scales), and the returned config's param_dtype says which; read straight
      into `shardings` too (`store.load_converted`: per-device slices of the blocks' zarr arrays).

    `config` overrides the one read from the directory (e.g. to set dtype or scan_layers); its architecture
    fields must match the checkpoint's tensors. `shardings`: one `jax.sharding.Sharding`, or a tree with the
    structure of the variables (a QuantArray weight takes one Sharding, its values'; its scales follow);
    default: the default device.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    if is_converted(path):
        if weights is not None:
            raise CheckpointError(f"{path}: a converted checkpoint keeps the weights it was converted to; "
                                  "`weights` applies to HF directories")
        return load_converted(path, config, shardings=shardings)
    if os.path.exists(os.path.join(path, "config.json")):
        return load_hf_directory(path, config, weights=weights, shardings=shardings)
    raise CheckpointError(f"{path}: no config.json; expected a HF DeepseekV3 checkpoint directory")
