"""Conversion memory and throughput on a synthetic FP8 checkpoint of several GB in the released layout.

    python experiments/bench_convert.py                 # 0.6 GB and 2.5 GB sources, each to fp8 and to bf16
    python experiments/bench_convert.py --size-gb 12    # larger: peak RSS should not move
    python experiments/bench_convert.py --weights bf16 --dir /data/bench

The synthetic model (DeepSeek-V3-shaped, hidden 1024, 64 experts of 512, one MoE layer ≈ 106 MB in FP8) gets as
many layers as the size asks for; its shards (256 MB by default) are written with random FP8 values and scales.
Each conversion runs in a fresh subprocess; the report gives its peak RSS (VmHWM, and ru_maxrss) against the
checkpoint size, the largest layer (source and converted bytes) and the largest tensor, the baseline RSS of a
process that only imports jax/orbax/dsv3_jax and traces the abstract parameter trees, and GB/s read and written.
The source was just written, so it is read from the page cache; writing is bounded by the disk (its plain
fsync'd write speed is printed at the end).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

from dsv3_jax.ckpt.safetensors import write_sharded
from dsv3_jax.config import ModelConfig, RopeScaling

BASE = ModelConfig(
    vocab_size=32000, hidden_size=1024, intermediate_size=4096, moe_intermediate_size=512, num_hidden_layers=4,
    first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64,
    qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=6, n_group=8,
    topk_group=4, max_position_embeddings=16384, num_nextn_predict_layers=1,
    rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=4096), dtype="float32")
FP8_MODULES = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj",
               "up_proj", "down_proj")
QUANT = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}


def _layer_names(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF name → HF shape of every tensor (from the shared name table and the abstract tree)."""
    from dsv3_jax.ckpt.blocks import abstract_tree, plan_blocks

    prefix = f"model.layers.{config.num_hidden_layers}."
    mtp = {prefix + "enorm.weight", prefix + "embed_tokens.weight", prefix + "shared_head.head.weight"}
    abstract = abstract_tree(config, "fp32")
    out = {}
    for block in plan_blocks(config, mtp):
        target = block.target(abstract)
        for entry in block.entries:
            collection, path, index = block.local(entry)
            leaf = target[collection]
            for key in path:
                leaf = leaf[key]
            shape = tuple(leaf.shape[len(index):])
            out[entry.hf_name] = shape[::-1] if entry.transpose else shape
        for copy, main in block.copies:
            out[copy] = out[main]  # the MTP layer's own embedding / head (embedding and head come first)
    return out


def _tensors(shapes: dict[str, tuple[int, ...]], seed: int):
    """(name, array) in layer order: FP8 values + F32 scales for linear weights, bf16 / fp32 for the rest."""
    rng = np.random.default_rng(seed)
    for name, shape in shapes.items():
        parts = name.split(".")
        if parts[-2] in FP8_MODULES:
            raw = rng.integers(0, 256, size=shape, dtype=np.uint8)
            raw[(raw & 0x7F) == 0x7F] = 0  # no e4m3 NaN codes
            yield name, raw.view(ml_dtypes.float8_e4m3fn)
            scale = (rng.random((math.ceil(shape[0] / 128), math.ceil(shape[1] / 128)), np.float32) + 0.5) * 1e-3
            yield name + "_scale_inv", scale
        elif name.endswith("e_score_correction_bias"):
            yield name, rng.standard_normal(shape, np.float32)
        else:
            yield name, (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)


def write_synthetic(directory: str, size_gb: float, shard_bytes: int) -> tuple[ModelConfig, dict]:
    """A synthetic FP8 checkpoint of about `size_gb` GB; returns (config, layer statistics)."""
    per_layer = _layer_bytes(BASE)
    fixed = 2 * BASE.vocab_size * BASE.hidden_size * 2
    layers = max(2, round((size_gb * 1e9 - fixed) / per_layer) - 1)  # minus one for the MTP layer
    config = BASE.replace(num_hidden_layers=layers)
    shapes = _layer_names(config)
    os.makedirs(directory, exist_ok=True)
    write_sharded(_tensors(shapes, 0), directory, shard_bytes, metadata={"format": "pt"})
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({**config.to_hf_config(), "quantization_config": QUANT, "torch_dtype": "bfloat16"}, f)
    largest = max(shapes.items(), key=lambda kv: math.prod(kv[1]) * (1 if kv[0].split(".")[-2] in FP8_MODULES
                                                                       else 2))
    return config, {"layers": layers, "layer_bytes_fp8": per_layer, "largest_tensor": largest[0],
                    "largest_tensor_shape": list(largest[1])}


def _layer_bytes(config: ModelConfig) -> int:
    """Source bytes of one MoE layer (FP8 weights + scales + bf16 norms and gate + fp32 bias)."""
    shapes = {n: s for n, s in _layer_names(config.replace(num_hidden_layers=2)).items()
              if n.startswith("model.layers.1.")}
    total = 0
    for name, shape in shapes.items():
        fp8 = name.split(".")[-2] in FP8_MODULES
        total += math.prod(shape) * (1 if fp8 else 2 if "bias" not in name else 4)
        total += 4 * math.ceil(shape[0] / 128) * math.ceil(shape[1] / 128) if fp8 else 0
    return total


CHILD = """
import json, resource, sys
mode, src, out, weights = sys.argv[1:5]
if mode == "baseline":  # imports plus the abstract parameter trees (fixed costs, independent of checkpoint size)
    import orbax.checkpoint  # noqa: F401
    from dsv3_jax.config import ModelConfig
    from dsv3_jax.ckpt.blocks import abstract_tree
    for w in ("fp32", "bf16", "fp8"):
        abstract_tree(ModelConfig.from_hf_config(src), w)
    summary = None
else:
    from dsv3_jax.ckpt import convert
    summary = convert(src, out, weights)
with open("/proc/self/status") as f:
    hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"vm_hwm": hwm, "ru_maxrss": rss, "summary": summary and summary.__dict__}))
"""


def run_child(mode: str, src: str, out: str, weights: str) -> dict:
    """One conversion in a fresh process; its peak RSS as VmHWM (this process image only: ru_maxrss also keeps
    the parent's high-water mark from before exec) and as ru_maxrss."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, src, out, weights], capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        raise SystemExit(f"child failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall"] = time.perf_counter() - start
    result["progress_tail"] = proc.stderr.strip().splitlines()[-3:]
    return result


def disk_write_speed(directory: str, nbytes: int = 256 * 10**6) -> float:
    """GB/s of a plain fsync'd sequential write into `directory` (the ceiling for any converter here)."""
    path = os.path.join(directory, "probe.bin")
    data = np.random.default_rng(0).integers(0, 256, nbytes, np.uint8).tobytes()
    start = time.perf_counter()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    os.remove(path)
    return nbytes / seconds / 1e9


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def bench_size(work: str, size_gb: float, shard_mb: int, weights_list: list[str]) -> None:
    src = os.path.join(work, f"src_{size_gb:g}")
    start = time.perf_counter()
    gen = subprocess.run([sys.executable, __file__, "--generate", src, "--size-gb", str(size_gb), "--shard-mb",
                          str(shard_mb)], capture_output=True, text=True, check=False)
    if gen.returncode != 0:
        raise SystemExit(f"generation failed:\n{gen.stderr[-4000:]}")
    stats = json.loads(gen.stdout.strip().splitlines()[-1])
    size = _dir_bytes(src)
    shards = len([f for f in os.listdir(src) if f.endswith(".safetensors")])
    print(f"\nsource {size / 1e9:.2f} GB in {shards} shards: {stats['layers']} layers + MTP, one MoE layer "
          f"{stats['layer_bytes_fp8'] / 1e6:.0f} MB (fp8), largest tensor {stats['largest_tensor']} "
          f"{stats['largest_tensor_shape']}; generated in {time.perf_counter() - start:.0f} s")
    base = run_child("baseline", src, "", "")
    print(f"  baseline (imports + abstract parameter trees): VmHWM {base['vm_hwm'] / 1e9:.2f} GB")
    for weights in weights_list:
        out = os.path.join(work, f"out_{weights}")
        result = run_child("convert", src, out, weights)
        s = result["summary"]
        blocks = os.path.join(out, "blocks")
        layer_out = max(_dir_bytes(os.path.join(blocks, b)) for b in os.listdir(blocks))
        print(f"  --weights {weights}: peak RSS {result['vm_hwm'] / 1e9:.2f} GB (VmHWM; ru_maxrss "
              f"{result['ru_maxrss'] / 1e9:.2f}), {(result['vm_hwm'] - base['vm_hwm']) / 1e9:.2f} GB over baseline; "
              f"largest converted block {layer_out / 1e6:.0f} MB; {s['bytes_read'] / 1e9:.2f} GB read, "
              f"{s['bytes_written'] / 1e9:.2f} GB written in {s['seconds']:.1f} s = "
              f"{s['bytes_read'] / s['seconds'] / 1e9:.3f} GB/s read, {s['bytes_written'] / s['seconds'] / 1e9:.3f} "
              "GB/s written")
        shutil.rmtree(out)
    shutil.rmtree(src)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, nargs="+", default=[0.6, 2.5],
                        help="synthetic source sizes (default 0.6 2.5: peak RSS should not grow with size)")
    parser.add_argument("--shard-mb", type=int, default=256, help="source shard size in MB (default 256)")
    parser.add_argument("--weights", nargs="+", default=["fp8", "bf16"], choices=["fp8", "bf16", "fp32"])
    parser.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed after)")
    parser.add_argument("--generate", default=None, help=argparse.SUPPRESS)  # child mode: write one source
    args = parser.parse_args(argv)
    if args.generate:
        _, stats = write_synthetic(args.generate, args.size_gb[0], args.shard_mb * 10**6)
        print(json.dumps(stats))
        return
    work = args.dir or tempfile.mkdtemp(prefix="bench_convert-")
    os.makedirs(work, exist_ok=True)
    try:
        print(f"CPUs {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}")
        for size_gb in args.size_gb:
            bench_size(work, size_gb, args.shard_mb, args.weights)
        print(f"\ndisk: plain fsync'd sequential write {disk_write_speed(work):.2f} GB/s (the ceiling for writing); "
              f"load average {os.getloadavg()[0]:.1f}")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
