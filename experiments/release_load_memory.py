"""Peak memory of loading a release-shaped FP8 checkpoint at the REAL 671B widths straight into sharded arrays.

Builds (once) a directory in the released layout — F8_E4M3 linear weights with float32 `weight_scale_inv`
(some in another shard than their weight), bf16 embedding / head / norms, float32 router bias, an index,
`quantization_config`, the MTP layer with its own embedding and head copies — at hidden 7168, q_lora 1536,
kv_lora 512, 128 heads, expert FFN 2048, dense FFN 18432, vocab 129,280, with few layers and experts. Then loads
it in a fresh process on 8 simulated devices under an inference layout and reports the process's peak RSS
against the bytes of the arrays it ends up holding (the goal: ≤ 1.15 × those bytes + the interpreter's
baseline, i.e. no second copy of the model anywhere).

    python experiments/release_load_memory.py --dir /tmp/release_671b_shape          # build if absent, load
    python experiments/release_load_memory.py --dir D --layout gpu-8-infer --weights fp8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "release_load_memory.json")


def _config(layers: int, experts: int):
    import dsv3_jax as d

    return d.ModelConfig.from_preset("deepseek-v3-671b", num_hidden_layers=layers, first_k_dense_replace=1,
                                     n_routed_experts=experts, n_group=8, topk_group=4)


def _tensor(shape, dtype, rng):
    import ml_dtypes

    if dtype == "fp8":  # finite e4m3 codes only (0x7F / 0xFF are NaN)
        codes = rng.integers(0, 0x7F, size=shape, dtype=np.uint8) | (rng.integers(0, 2, size=shape,
                                                                                 dtype=np.uint8) << 7)
        return codes.view(ml_dtypes.float8_e4m3fn)
    if dtype == "scale":
        return rng.uniform(1e-4, 1e-3, size=shape).astype(np.float32)
    if dtype == "f32":
        return rng.normal(0, 1e-3, size=shape).astype(np.float32)
    return (rng.standard_normal(size=shape, dtype=np.float32) * 0.02).astype(ml_dtypes.bfloat16)


def _hf_tensors(config):
    """[(HF name, shape, kind)] of the release layout for `config`, from the package's one name table."""
    from dsv3_jax.ckpt.blocks import abstract_tree, plan_blocks
    from dsv3_jax.ckpt.names import main_entries, mtp_entries, mtp_shared_copies
    from dsv3_jax.model.check import leaf_at

    entries = main_entries(config) + mtp_entries(config, 0)
    abstract = abstract_tree(config, "bf16")
    out = []
    for entry in entries:
        leaf = leaf_at(abstract[entry.collection], entry.path)
        shape = tuple(leaf.shape[len(entry.index):])
        shape = shape[::-1] if entry.transpose else shape
        linear = entry.transpose and entry.hf_name.endswith("proj.weight") and "eh_proj" not in entry.hf_name
        kind = "fp8" if linear and ".mlp.gate." not in entry.hf_name else (
            "f32" if leaf.dtype == np.float32 else "bf16")
        out.append((entry.hf_name, shape, kind))
    for copy, main in mtp_shared_copies(config, 0).items():
        out.append((copy, next(s for n, s, _ in out if n == main), "bf16"))
    assert plan_blocks(config, {n for n, _, _ in out})
    return out


def build(directory: str, layers: int, experts: int) -> None:
    """Write the checkpoint one shard (one layer, or the embedding, or the head) at a time."""
    from dsv3_jax.ckpt.safetensors import save_file

    config = _config(layers, experts)
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    groups: dict[str, list] = {}
    for name, shape, kind in _hf_tensors(config):
        parts = name.split(".")
        key = f"layer{int(parts[2]):02d}" if parts[1] == "layers" else parts[1]
        groups.setdefault(key, []).append((name, shape, kind))
    keys = sorted(groups)
    weight_map, total = {}, 0
    moved = None  # the first FP8 scale goes into the next shard: the index must resolve it
    for i, key in enumerate(keys):
        file = f"model-{i + 1:05d}-of-{len(keys):05d}.safetensors"
        tensors = {}
        if moved is not None:
            tensors[moved[0]] = moved[1]
            moved = None
        for name, shape, kind in groups[key]:
            tensors[name] = _tensor(shape, kind, rng)
            if kind == "fp8":
                scale = _tensor(tuple(-(-s // 128) for s in shape), "scale", rng)
                if moved is None and i + 1 < len(keys) and not weight_map:
                    moved = (name + "_scale_inv", scale)
                else:
                    tensors[name + "_scale_inv"] = scale
        save_file(tensors, os.path.join(directory, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.nbytes for t in tensors.values())
        print(f"  wrote {file}: {sum(t.nbytes for t in tensors.values()) / 1e9:.2f} GB", flush=True)
        del tensors
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f)
    hf = {**config.to_hf_config(), "torch_dtype": "bfloat16", "quantization_config": {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}}
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)


def _status_gb(field: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process from /proc: unlike ru_maxrss, the peak is not inherited from
    the parent across fork + exec."""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / 1e9
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9)


def load_child(directory: str, layout_name: str, weights: str | None) -> dict:
    """Runs in the child process: baseline, load, peak."""
    import jax

    import dsv3_jax as d
    from dsv3_jax.ckpt.place import shard_bytes
    from dsv3_jax.parallel import api as sa
    from dsv3_jax.parallel import get_layout, make_mesh

    layout = get_layout(layout_name)
    mesh = make_mesh(layout)
    config = d.ModelConfig.from_hf_config(directory)
    shardings = sa.variable_shardings(config, layout, mesh)
    jax.block_until_ready(jax.device_put(np.zeros(8), jax.devices()[0]))
    baseline = _status_gb("VmHWM")
    start = time.perf_counter()
    _, variables = d.load_pretrained(directory, shardings=shardings, weights=weights)
    jax.block_until_ready(variables)
    seconds = time.perf_counter() - start
    held = shard_bytes(variables) / 1e9
    peak = _status_gb("VmHWM")
    disk = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)) / 1e9
    return {"layout": layout_name, "weights": weights or "default", "checkpoint_GB": round(disk, 3),
            "held_GB": round(held, 3), "baseline_GB": round(baseline, 3), "peak_GB": round(peak, 3),
            "ratio": round((peak - baseline) / held, 3), "seconds": round(seconds, 1),
            "read_GB_per_s": round(disk / seconds, 3), "devices": len(jax.devices())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", default="/tmp/dsv3_release_671b_shape")
    p.add_argument("--layers", type=int, default=3, help="decoder layers (1 dense + the rest MoE) besides MTP")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--layout", default="gpu-8-infer")
    p.add_argument("--weights", default=None, choices=("fp8", "bf16"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(load_child(args.dir, args.layout, args.weights)))
        return 0
    if not os.path.isfile(os.path.join(args.dir, "config.json")):
        print(f"building {args.dir} ...", flush=True)
        build(args.dir, args.layers, args.experts)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, __file__, "--child", "--dir", args.dir, "--layout", args.layout]
    if args.weights:
        cmd += ["--weights", args.weights]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        print(out.stderr[-3000:], file=sys.stderr)
        return out.returncode
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"load average {os.getloadavg()[0]:.1f}")
    for key, value in row.items():
        print(f"  {key:>15}: {value}")
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(row, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
