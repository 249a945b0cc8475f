"""Checkpoint conversion: HF / official model-parallel / PyTorch checkpoints (FP8 or not) → a dsv3-jax block
checkpoint written block by block with orbax, loaded back by `dsv3_jax.load_pretrained`, and exported to HF.

    convert(src, out, weights="bf16" | "fp32" | "fp8", config=None) -> Summary
    export(src, hf_dir, weights="bf16" | "fp8", max_shard_bytes=5e9) -> Summary
    load_converted(path, config=None, shardings=None) -> (ModelConfig, variables)
"""

from dsv3_jax.convert.errors import ConvertError
from dsv3_jax.convert.export import export
from dsv3_jax.convert.pipeline import Summary, convert
from dsv3_jax.convert.writer import is_converted, load_converted

__all__ = ["ConvertError", "Summary", "convert", "export", "is_converted", "load_converted"]
