"""`export(src, hf_dir, weights=...)`: a converted dsv3-jax checkpoint back to HF safetensors, block by block.

Names and layout are the released ones (`hf_names`): linear weights [out, in], one tensor per routed expert, the
MTP layer at index num_hidden_layers with its own copies of the embedding and head. The linear weights the FP8
recipe covers are written as bf16, or as float8_e4m3fn with a float32 `weight_scale_inv` [ceil(out/128),
ceil(in/128)] (kept scales when the checkpoint holds FP8, else quantised in 128×128 blocks); every other tensor
is written in the dtype its source had (recorded in the manifest). Shards and the index come from
`safetensors_io.write_sharded`, which holds one shard at a time; the directory appears atomically.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from typing import TextIO

import numpy as np
from tqdm import tqdm

from dsv3_jax.ckpt.blocks import (
    FP8,
    SCALE_SUFFIX,
    Block,
    Tree,
    abstract_tree,
    dequantize_fp8,
    plan_blocks,
    quantize_fp8,
)
from dsv3_jax.ckpt.conversion import Summary, carry_side_files, peak_rss_bytes, progress_bar
from dsv3_jax.ckpt.names import Entry
from dsv3_jax.ckpt.safetensors import DTYPES, write_sharded
from dsv3_jax.ckpt.store import (
    atomic_directory,
    check_output,
    read_block,
    read_manifest,
    write_json,
)
from dsv3_jax.config import ModelConfig
from dsv3_jax.errors import ConvertError, SafetensorsError, os_error_of
from dsv3_jax.quant.fp8 import FP8_WEIGHT_NAMES, QuantArray

EXPORT_WEIGHTS = ("bf16", "fp8")
DEFAULT_SHARD_BYTES = 5 * 10**9
QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": [128, 128]}


def _is_fp8_weight(entry: Entry) -> bool:
    return entry.transpose and entry.path[-1] in FP8_WEIGHT_NAMES


def export_entry(entry: Entry, value, weights: str, source_dtype: str | None) -> list[tuple[str, np.ndarray]]:
    """Our value of one HF tensor ([in, out] array or QuantArray) → [(HF name, HF-layout array), (scale, ...)]."""
    name = entry.hf_name
    if _is_fp8_weight(entry) and weights == "fp8":
        q = value if isinstance(value, QuantArray) else quantize_fp8(np.asarray(value, np.float32))
        return [(name, q.values.T), (name + SCALE_SUFFIX, q.scales.T)]
    w = dequantize_fp8(value.values, value.scales) if isinstance(value, QuantArray) else value
    w = w.T if entry.transpose else w
    if _is_fp8_weight(entry) or source_dtype in (None, FP8) or source_dtype not in DTYPES:
        dtype = "F32" if entry.path[-1] == "bias" else "BF16"
    else:
        dtype = source_dtype
    return [(name, np.asarray(w).astype(DTYPES[dtype], copy=False))]


def _value(tree: Tree, block: Block, entry: Entry):
    collection, path, index = block.local(entry)
    leaf = tree[collection]
    for key in path:
        leaf = leaf[key]
    return leaf[index] if index else leaf


class _Exporter:
    """Yields (HF name, array) for every block of a converted checkpoint, reading one block at a time."""

    def __init__(self, path: str, manifest: dict, config: ModelConfig, weights: str, bar: tqdm | None,
                 allow_nonfinite: bool = False):
        self.path, self.manifest, self.weights, self.bar = path, manifest, weights, bar
        self.allow_nonfinite = allow_nonfinite
        self.abstract = abstract_tree(config.replace(param_dtype="float32"), manifest["weights"])
        self.records = {r["name"]: r for r in manifest["blocks"]}
        self.dtypes = {k: v for r in manifest["blocks"] for k, v in r.get("hf_dtypes", {}).items()}
        names = set(self.dtypes) | {n for r in manifest["blocks"] for n in r.get("copies", [])}
        self.blocks = plan_blocks(config, names)
        self.tensors = 0
        missing = [b.name for b in self.blocks if b.name not in self.records]
        if missing:
            raise ConvertError(f"{path}: manifest lacks blocks {missing[:5]}")

    def _read(self, block: Block) -> Tree:
        return read_block(self.path, block, block.target(self.abstract), allow_nonfinite=self.allow_nonfinite)

    def _tensors(self, block: Block) -> Iterator[tuple[str, np.ndarray]]:
        tree = self._read(block)
        for entry in block.entries:
            yield from export_entry(entry, _value(tree, block, entry), self.weights, self.dtypes.get(entry.hf_name))

    def _main_tensor(self, name: str) -> np.ndarray:
        for block in self.blocks:
            for entry in block.entries:
                if entry.hf_name == name:
                    tree = self._read(block)
                    return export_entry(entry, _value(tree, block, entry), self.weights, self.dtypes.get(name))[0][1]
        raise ConvertError(f"{self.path}: no block holds {name}")

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        for block in self.blocks:
            nbytes = 0
            for name, array in self._tensors(block):
                nbytes += array.nbytes
                self.tensors += 1
                yield name, array
            for copy, main in block.copies:
                self.tensors += 1
                yield copy, self._main_tensor(main)
            if self.bar:
                self.bar.set_postfix(block=block.name, rss_GB=f"{peak_rss_bytes() / 1e9:.2f}", refresh=False)
                self.bar.update(self.records[block.name]["bytes"])


def _write_shards(exporter: _Exporter, tmp: str, max_shard_bytes: int) -> dict[str, str]:
    """write_sharded, its failures as ConvertError or (disk full, read-only, ...) OSError."""
    try:
        return write_sharded(exporter, tmp, max_shard_bytes, metadata={"format": "pt"})
    except (OSError, ConvertError):
        raise
    except Exception as e:  # SafetensorsError, or the safetensors library's own errors
        cause = os_error_of(e)
        if cause is not None:
            raise OSError(cause.errno, f"{cause.strerror} while writing shards", tmp) from e
        if isinstance(e, SafetensorsError):
            raise ConvertError(str(e)) from e
        raise


def export(src: str | os.PathLike, out: str | os.PathLike, weights: str = "bf16", *,
           max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True, stream: TextIO | None = None,
           allow_nonfinite: bool = False) -> Summary:
    """Write the converted checkpoint `src` as a HF DeepseekV3 directory `out` (which must not exist). Blocks
    holding NaN / Inf are refused unless `allow_nonfinite`; a failed write (disk full, ...) leaves no `out`."""
    if weights not in EXPORT_WEIGHTS:
        raise ConvertError(f"export weights must be one of {EXPORT_WEIGHTS}, got {weights!r}")
    src, out = os.path.abspath(os.fspath(src)), check_output(out)
    start = time.perf_counter()
    manifest, config = read_manifest(src)
    bar = progress_bar(manifest["bytes_written"], "export", stream) if progress else None
    exporter = _Exporter(src, manifest, config, weights, bar, allow_nonfinite)
    with atomic_directory(out, log=lambda line: print(line, file=stream or sys.stderr)) as tmp:
        weight_map = _write_shards(exporter, tmp, max_shard_bytes)
        hf = {**config.to_hf_config(), "torch_dtype": "bfloat16"}
        if weights == "fp8":
            hf["quantization_config"] = QUANTIZATION_CONFIG
        write_json(os.path.join(tmp, "config.json"), hf)
        carry_side_files(src, tmp)
    if bar:
        bar.close()
    written = sum(os.path.getsize(os.path.join(out, f)) for f in set(weight_map.values()))
    summary = Summary("export", out, len(exporter.blocks), exporter.tensors, manifest["bytes_written"], written,
                      time.perf_counter() - start, peak_rss_bytes())
    if progress:
        print(summary.line(), file=stream or sys.stderr)
    return summary
