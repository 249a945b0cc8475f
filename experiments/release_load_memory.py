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
    python experiments/release_load_memory.py --processes 2      # 2 processes x 4 devices, one 8-device mesh
    python experiments/release_load_memory.py --dir CONVERTED    # a `dsv3 convert` output, same measurement

With `--processes 2` each process (jax.distributed on localhost, 4 simulated devices each) loads into the global
8-device mesh and holds only its own shards; each reports its own peak against the bytes it holds. `--digest`
(used by tests/test_release_multihost.py) also prints a digest of every shard the process holds.
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
FP8_MODULES = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj",
               "down_proj")  # every linear weight of attention, dense MLP and experts (not the router, not eh_proj)


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
        fp8 = entry.transpose and entry.hf_name.split(".")[-2] in FP8_MODULES  # as the release stores them
        kind = "fp8" if fp8 else ("f32" if leaf.dtype == np.float32 else "bf16")
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


def shard_digests(variables) -> dict[str, list[str]]:
    """Leaf → sorted ["index:blake2b of the shard's bytes"] over the shards this process holds."""
    import hashlib

    import jax

    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
        rows = set()
        for shard in leaf.addressable_shards:
            data = np.ascontiguousarray(np.asarray(shard.data)).view(np.uint8)
            index = ",".join(f"{s.start}:{s.stop}" for s in shard.index)
            rows.add(f"{index}:{hashlib.blake2b(data.tobytes(), digest_size=8).hexdigest()}")
        out[jax.tree_util.keystr(path)] = sorted(rows)
    return out


def load_child(directory: str, layout_name: str, weights: str | None, digest: bool = False) -> dict:
    """Runs in the child process: baseline, load, peak (after `jax.distributed` when DSV3_NUM_PROCESSES > 1)."""
    from dsv3_jax.parallel import distributed

    distributed.initialize()
    import jax

    import dsv3_jax as d
    from dsv3_jax.ckpt import is_converted
    from dsv3_jax.ckpt.place import shard_bytes
    from dsv3_jax.parallel import api as sa
    from dsv3_jax.parallel import get_layout, make_mesh

    layout = get_layout(layout_name)
    mesh = make_mesh(layout)
    config = d.ModelConfig.from_hf_config(directory)
    shardings = sa.variable_shardings(config, layout, mesh)
    jax.block_until_ready(jax.device_put(np.zeros(8), jax.local_devices()[0]))
    baseline = _status_gb("VmHWM")
    start = time.perf_counter()
    _, variables = d.load_pretrained(directory, shardings=shardings, weights=weights)
    jax.block_until_ready(variables)
    seconds = time.perf_counter() - start
    held_bytes = shard_bytes(variables)
    held = held_bytes / 1e9
    peak = _status_gb("VmHWM")
    disk = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(directory) for f in fs) / 1e9
    row = {"layout": layout_name, "weights": weights or "default", "checkpoint_GB": round(disk, 3),
           "held_GB": round(held, 3), "held_bytes": held_bytes, "baseline_GB": round(baseline, 3),
           "peak_GB": round(peak, 3),
           "ratio": round((peak - baseline) / held, 3), "seconds": round(seconds, 1),
           "read_GB_per_s": round(disk / seconds, 3), "devices": len(jax.devices()),
           "local_devices": len(jax.local_devices()), "process": jax.process_index(),
           "processes": jax.process_count(), "converted": is_converted(directory)}
    if digest:
        row["digests"] = shard_digests(variables)
    return row


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_children(directory: str, layout: str, weights: str | None, processes: int, digest: bool = False,
                 timeout: float = 3600) -> list[dict]:
    """`processes` fresh children (8 // processes simulated devices each, jax.distributed on localhost when more
    than one); their result rows, by process index."""
    port = _free_port()
    procs = []
    for i in range(processes):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // processes}",
               "JAX_PLATFORMS": "cpu", "DSV3_COORDINATOR": f"127.0.0.1:{port}",
               "DSV3_NUM_PROCESSES": str(processes), "DSV3_PROCESS_ID": str(i),
               "PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(HERE), os.environ.get("PYTHONPATH")]))}
        cmd = [sys.executable, __file__, "--child", "--dir", directory, "--layout", layout]
        cmd += (["--weights", weights] if weights else []) + (["--digest"] if digest else [])
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    rows, errors = [], []
    for i, proc in enumerate(procs):
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        if proc.returncode:
            errors.append(f"process {i} rc={proc.returncode}:\n{err[-3000:]}")
        else:
            rows.append(json.loads(out.strip().splitlines()[-1]))
    if errors:
        raise RuntimeError("\n".join(errors))
    return sorted(rows, key=lambda r: r["process"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", default="/tmp/dsv3_release_671b_shape")
    p.add_argument("--layers", type=int, default=3, help="decoder layers (1 dense + the rest MoE) besides MTP")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--layout", default="gpu-8-infer")
    p.add_argument("--weights", default=None, choices=("fp8", "bf16"))
    p.add_argument("--processes", type=int, default=1, choices=(1, 2, 4, 8), help="processes sharing the mesh")
    p.add_argument("--digest", action="store_true", help="print a digest of every shard held (tests)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(load_child(args.dir, args.layout, args.weights, args.digest)))
        return 0
    if not os.path.isfile(os.path.join(args.dir, "config.json")):
        print(f"building {args.dir} ...", flush=True)
        build(args.dir, args.layers, args.experts)
    rows = run_children(args.dir, args.layout, args.weights, args.processes, args.digest)
    print(f"load average {os.getloadavg()[0]:.1f}")
    for row in rows:
        row.pop("digests", None)
        print(f"process {row['process']} of {row['processes']}:")
        for key, value in row.items():
            print(f"  {key:>15}: {value}")
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    results = {}
    if os.path.isfile(RESULTS):
        with open(RESULTS) as f:
            results = json.load(f)
        results = results if "runs" in results else {"runs": {"hf_fp8_1_process": results}}
    kind = "converted" if rows[0]["converted"] else "hf"
    results["runs"][f"{kind}_{rows[0]['weights']}_{args.processes}_process"] = rows
    with open(RESULTS, "w") as f:
        json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
