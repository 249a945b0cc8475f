"""Checkpoint IO: one name table (`names`), one safetensors reader (`safetensors`), sources (HF, official
model-parallel, PyTorch; `sources`, `official`, `detect`), conversion blocks and their checks (`blocks`), the block
store written with orbax (`store`), `convert`, `export`, and loading (`hf`, `pretrained`).

    load_pretrained(path, config=None, shardings=None) -> (ModelConfig, variables)
    convert(src, out, weights="bf16" | "fp32" | "fp8", config=None) -> Summary
    export(src, hf_dir, weights="bf16" | "fp8", max_shard_bytes=5e9) -> Summary
"""

from dsv3_jax.ckpt.conversion import Summary, convert
from dsv3_jax.ckpt.export import export
from dsv3_jax.ckpt.pretrained import load_pretrained
from dsv3_jax.ckpt.store import is_converted, load_converted

__all__ = ["Summary", "convert", "export", "is_converted", "load_converted", "load_pretrained"]
