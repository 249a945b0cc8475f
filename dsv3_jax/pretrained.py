"""`load_pretrained(path)`: the one entry point for weights on disk (HF directories today)."""

from __future__ import annotations

import os

from dsv3_jax.api import Variables
from dsv3_jax.config import ModelConfig
from dsv3_jax.hf_loader import CheckpointError, load_hf_directory


def load_pretrained(path: str | os.PathLike, config: ModelConfig | None = None) -> tuple[ModelConfig, Variables]:
    """(config, variables) from a HF DeepseekV3 directory (`config.json` + bf16/f16/fp32 safetensors).

    `config` overrides the one read from the directory (e.g. to set dtype or scan_layers); its architecture
    fields must match the checkpoint's tensors.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: not a directory")
    if os.path.exists(os.path.join(path, "config.json")):
        return load_hf_directory(path, config)
    raise CheckpointError(f"{path}: no config.json; expected a HF DeepseekV3 checkpoint directory")
