"""`convert(src, out, weights=...)`: any supported source → a dsv3-jax block checkpoint, streamed block by block.

1. open the source (HF directory, official mp shards, PyTorch state dict) and its config;
2. plan the blocks and check every name, dtype, shape and FP8 scale from the headers alone (nothing written yet);
3. for each block: read its tensors, convert them (`blocks.convert_block`), save it, drop it. Three things overlap:
   the source reads the whole conversion's read plan (`blocks.read_plan`) ahead in large requests, up to 1 GB
   ahead (`dsv3_jax.ckpt.readahead`); `threads` workers convert the block's tensors in parallel (positional reads,
   numpy copies and XLA calls release the GIL); and one writer thread saves the previous block meanwhile — peak
   memory is about two blocks (the one being written and the one being converted, each in its own reused
   `direct.Arena`) plus the read-ahead; blocks are written with O_DIRECT (`blockfile.write_block`);
4. write config.json and manifest.json and rename the temporary directory onto `out`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import resource
import shutil
import sys
import time
from typing import TextIO

import jax
import numpy as np
from tqdm import tqdm

from dsv3_jax.ckpt import direct
from dsv3_jax.ckpt.blocks import (
    SCALE_SUFFIX,
    WEIGHTS,
    abstract_tree,
    check_source,
    convert_block,
    plan_blocks,
    read_plan,
)
from dsv3_jax.ckpt.detect import open_source
from dsv3_jax.ckpt.sources import Source
from dsv3_jax.ckpt.store import (
    FORMAT,
    MANIFEST,
    VERSION,
    BlockWriter,
    atomic_directory,
    check_output,
    deferred_interrupt,
    hf_config_with_section,
    write_json,
)
from dsv3_jax.config import ModelConfig
from dsv3_jax.errors import ConvertError


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclasses.dataclass(frozen=True)
class Summary:
    """What a conversion or export did: counts, bytes, seconds, peak memory."""

    action: str
    out: str
    blocks: int
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss: int

    def line(self) -> str:
        rate = self.bytes_read / self.seconds / 1e9 if self.seconds > 0 else 0.0
        return (f"{self.action} → {self.out}: {self.blocks} blocks, {self.tensors} tensors, "
                f"{self.bytes_read / 1e9:.3f} GB read, {self.bytes_written / 1e9:.3f} GB written in "
                f"{self.seconds:.1f} s ({rate:.2f} GB/s), peak RSS {self.peak_rss / 1e9:.2f} GB")


SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "generation_config.json")  # travel with the weights through convert and export


def carry_side_files(src_dir: str | os.PathLike, dst_dir: str) -> list[str]:
    """Copy the tokenizer, chat template and generation config files that `src_dir` has into `dst_dir`."""
    copied = []
    for name in SIDE_FILES:
        path = os.path.join(os.fspath(src_dir), name)
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(dst_dir, name))
            copied.append(name)
    return copied


def progress_bar(total_bytes: int, label: str, stream: TextIO | None) -> tqdm:
    """Bytes read or written so far, rate and ETA on stderr (tqdm)."""
    return tqdm(total=total_bytes, desc=label, unit="B", unit_scale=True, file=stream or sys.stderr, mininterval=1.0)


def _block_tensors(block, source: Source) -> dict[str, str]:
    """HF name → source dtype of every tensor the block reads (scales included)."""
    out = {}
    for entry in block.entries:
        for name in (entry.hf_name, entry.hf_name + SCALE_SUFFIX):
            if name in source:
                out[name] = source.info(name)[0]
    return out


def _target_bytes(target) -> int:
    return sum(np.dtype(s.dtype).itemsize * math.prod(s.shape) for s in jax.tree_util.tree_leaves(target))


def default_threads() -> int:
    """Reader / converter threads: two per core (reads wait on the disk), at most 8."""
    return min(8, 2 * (os.cpu_count() or 1))


def _convert_blocks(blocks, source, abstract, model_config, interleaved, writer, threads, bar):
    """Convert and save every block, overlapping: the next block's tensors are read ahead, a block's tensors are
    converted in a thread pool, and block i is saved by a writer thread while block i+1 converts.
    Returns (manifest records, bytes read, bytes written, tensors)."""
    records, read, written, tensors = [], 0, 0, 0
    pool = concurrent.futures.ThreadPoolExecutor(threads or default_threads(), "dsv3-convert")
    saving = concurrent.futures.ThreadPoolExecutor(1, "dsv3-write")
    pending: concurrent.futures.Future | None = None
    arenas = (direct.Arena(), direct.Arena())  # block i is built in arenas[i % 2] while block i - 1 is written
    try:
        for parity, arena in enumerate(arenas):  # sized once for its blocks: a growing arena faults pages again
            arena.take(max([_target_bytes(b.target(abstract)) for b in blocks[parity::2]], default=1))
        source.read_ahead([read_plan(b, source, b.target(abstract), interleaved) for b in blocks])
        for i, block in enumerate(blocks):
            arena = arenas[i % 2]
            tree, nread = convert_block(block, source, block.target(abstract), model_config, interleaved, pool,
                                        arena)
            if pending is not None:
                written += pending.result()  # at most one block waits for the disk
            pending = saving.submit(writer.write, block.name, tree, arena)
            del tree
            dtypes = _block_tensors(block, source)
            records.append({**block.record(), "hf_dtypes": dtypes, "copies": [c for c, _ in block.copies]})
            read, tensors = read + nread, tensors + len(dtypes)
            if bar:
                bar.set_postfix(block=block.name, rss_GB=f"{peak_rss_bytes() / 1e9:.2f}", refresh=False)
                bar.update(nread)
        if pending is not None:
            written += pending.result()
    finally:
        with deferred_interrupt(reraise=False):  # the block being saved finishes before cleanup
            saving.shutdown(wait=True)
            pool.shutdown(wait=True, cancel_futures=True)
            for arena in arenas:
                arena.release()
    return records, read, written, tensors


def convert(src: str | os.PathLike, out: str | os.PathLike, weights: str = "bf16", *,
            config: str | os.PathLike | ModelConfig | None = None, progress: bool = True,
            stream: TextIO | None = None, allow_nonfinite: bool = False, threads: int | None = None) -> Summary:
    """Convert a checkpoint at `src` into a new directory `out` (which must not exist); returns a Summary.

    weights: "fp32" / "bf16" (FP8 sources dequantised exactly, W = q · s[i//128, j//128], then rounded), or "fp8"
    (FP8 kept with its block scales as QuantArray; a bf16/fp32 source is quantised in 128×128 blocks).
    config: a config.json path (HF or the official repository's format) or a ModelConfig; default
    `config.json` next to the source. The MTP layer (index num_hidden_layers) becomes `mtp_0`.
    A tensor holding NaN or Inf is refused (ConvertError naming it and its file) unless `allow_nonfinite`.
    Ctrl-C waits for the block being written, then removes the temporary output; stale temporary outputs of dead
    runs next to `out` are removed first (and named on `stream`). `threads`: tensors read and converted at once
    (default `default_threads()`).
    """
    if weights not in WEIGHTS:
        raise ConvertError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    out = check_output(out)
    start = time.perf_counter()
    with open_source(src, config) as (source, model_config, interleaved, kind):
        source.allow_nonfinite = allow_nonfinite  # read by blocks.convert_entry
        source.direct_io = True  # every byte is read once: no use for the page cache
        blocks = plan_blocks(model_config, source.names())
        abstract = abstract_tree(model_config, weights)
        check_source(blocks, source, abstract)
        total = sum(source.nbytes(n) for b in blocks for n in _block_tensors(b, source))
        bar = progress_bar(total, "convert", stream) if progress else None
        with atomic_directory(out, log=lambda line: print(line, file=stream or sys.stderr)) as tmp:
            writer = BlockWriter(tmp)
            try:
                records, read, written, tensors = _convert_blocks(blocks, source, abstract, model_config,
                                                                  interleaved, writer, threads, bar)
            finally:
                writer.close()
            for record in records:
                record["bytes"] = writer.sizes[record["name"]]
            manifest = {"format": FORMAT, "version": VERSION, "weights": weights,
                        "source": {"path": os.path.abspath(os.fspath(src)), "kind": kind}, "blocks": records,
                        "tensors": tensors, "bytes_read": read, "bytes_written": written}
            write_json(os.path.join(tmp, "config.json"), hf_config_with_section(model_config, weights))
            write_json(os.path.join(tmp, MANIFEST), manifest)
            carry_side_files(src if os.path.isdir(src) else os.path.dirname(os.fspath(src)), tmp)
        if bar:
            bar.close()
    summary = Summary("convert", out, len(blocks), tensors, read, written, time.perf_counter() - start,
                      peak_rss_bytes())
    if progress:
        print(summary.line(), file=stream or sys.stderr)
    return summary
