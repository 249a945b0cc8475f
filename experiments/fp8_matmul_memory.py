"""TPU compiler memory, FLOPs and cycle estimates of one FP8 projection, compiled for a TPU chip on this CPU host.

No TPU is needed (DESIGN.md §8): libtpu compiles for the abstract devices of a topology. Two problems, operands
already quantised (e4m3 values; float32 scales: activations 1×128 tiles along K, weight 128×128 blocks), one chip:

    dense    [M, K] · [K, N], default M=4096 K=7168 N=18432 (the 671B's dense-MLP up projection)
    experts  [E, C, K] · [E, K, N], default E=8 C=512 K=7168 N=2048 (routed-expert gate/up projections)

Variants (dense; the expert rows use the batched form of each):
    bf16               x bf16 · w bf16, f32 accumulation → bf16 (the baseline)
    fp8-dequant        quant.fp8.scaled_matmul(impl="dequant"): both operands dequantised to f32, one dot → f32
    fp8-blockwise-old  quant.fp8.scaled_matmul(impl="blockwise"): the [M, K/128, N] einsum → f32 (experts: vmap,
                       as quant.matmul.einsum calls it)
    fp8-scan-gG        quant.blockwise.scaled_matmul_scan(group=G): f32 [M, N] carry, G K blocks per step → f32
    fp8-scan-g1-bf16   the same, out_dtype bf16 (the f32 carry can no longer be the output buffer)
    fp8-scan-g1-fp8    the same, compute_dtype None: e4m3 straight into each block's dot
    weight-only        x bf16 · (weight dequantised to bf16 per 128×128 block) → bf16
    native-fp8-dot     lax.dot_general(e4m3, e4m3, preferred_element_type=f32), no scales (does FP8 compile?)

Columns: `memory_analysis()` temp / argument / output bytes; `cost_analysis()` FLOPs and bytes accessed; `cycles`,
the sum of the TPU compiler's own per-kernel "estimated_cycles" (its cost model: a relative speed estimate, not a
measurement). `cost_analysis()` counts a while loop's body once, so each scan is compiled a second time with the
loop fully unrolled and FLOPs / bytes / cycles come from that program (the rolled body's as `*_rolled`); the
unrolled program's own temporaries (`temp_unrolled`) can be far larger, as XLA then hoists the dots. A cycle sum
of 2^62 or more is the compiler's "unknown" sentinel and is reported as null.

Also `dot_probe`: the cycle estimate of a plain 4096³ dot with bf16, float8_e4m3fn and int8 operands per topology
(whether the chip runs FP8 dots natively: an FP8 dot at about half the bf16 cycles means it does).

Run:  python experiments/fp8_matmul_memory.py [--topology v5p:2x2x1 tpu7x:2x2x1] [--problem dense experts]
Writes experiments/results/fp8_matmul_memory.json and prints a table per topology and problem (~10 min on 2 cores).
TPU_ACCELERATOR_TYPE / worker hostname warnings at start-up are harmless (no TPU is attached).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: other processes may hold libtpu's lock

import jax
import jax.numpy as jnp
from jax.experimental import topologies

from dsv3_jax.quant import blockwise, fp8

HERE = os.path.dirname(os.path.abspath(__file__))
E4M3, BF16, F32 = jnp.float8_e4m3fn, jnp.bfloat16, jnp.float32
BLOCK = 128
UNKNOWN_CYCLES = 2**62
PROBLEMS = {"dense": (None, 4096, 7168, 18432), "experts": (8, 512, 7168, 2048)}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def variants(e: int | None, m: int, k: int, n: int) -> dict:
    """name → (function, [(shape, dtype)] arguments, the fully unrolled function or None)."""
    lead = () if e is None else (e,)
    kb, nb = _cdiv(k, BLOCK), _cdiv(n, BLOCK)
    quant = [((*lead, m, k), E4M3), ((*lead, m, kb), F32), ((*lead, k, n), E4M3), ((*lead, kb, nb), F32)]
    x_bf16, w_bf16 = ((*lead, m, k), BF16), ((*lead, k, n), BF16)
    batched = (lambda f: f) if e is None else jax.vmap

    def scan(group=1, out_dtype=F32, compute_dtype=BF16):
        def make(unroll):
            return lambda *a: blockwise.scaled_matmul_scan(*a, block=BLOCK, group=group, out_dtype=out_dtype,
                                                           compute_dtype=compute_dtype, unroll=unroll)
        return make(1), quant, make(True)

    def matmul_f32(a, b):
        return jnp.einsum("...mk,...kn->...mn", a, b, preferred_element_type=F32)

    return {
        "bf16": (lambda x, w: matmul_f32(x, w).astype(BF16), [x_bf16, w_bf16], None),
        "fp8-dequant": (batched(lambda *a: fp8.scaled_matmul(*a, impl="dequant", block=BLOCK)), quant, None),
        "fp8-blockwise-old": (batched(lambda *a: fp8.scaled_matmul(*a, impl="blockwise", block=BLOCK)), quant, None),
        "fp8-scan-g1": scan(1),
        "fp8-scan-g8": scan(8),
        "fp8-scan-g28": scan(28),
        "fp8-scan-g1-bf16": scan(1, out_dtype=BF16),
        "fp8-scan-g1-fp8": scan(1, compute_dtype=None),
        "weight-only": (lambda x, w, s: blockwise.weight_only_matmul(x, w, s, block=BLOCK),
                        [x_bf16, ((*lead, k, n), E4M3), ((*lead, kb, nb), F32)], None),
        "native-fp8-dot": (matmul_f32, [((*lead, m, k), E4M3), ((*lead, k, n), E4M3)], None),
    }


def estimated_cycles(compiled) -> int | None:
    """Sum of the TPU compiler's per-kernel `estimated_cycles` over the optimised program (None: unknown)."""
    total = sum(int(c) for c in re.findall(r'"estimated_cycles":"(\d+)"', compiled.as_text()))
    return None if total >= UNKNOWN_CYCLES else total


def _costs(compiled) -> dict:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return {"flops": float(cost.get("flops", 0.0)), "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
            "cycles": estimated_cycles(compiled)}


def measure(fn, shapes, sharding, unrolled=None) -> dict:
    """Compile `fn` for the chip of `sharding`; memory, costs, and (for a loop) the unrolled program's costs."""
    args = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes]
    t0 = time.time()
    try:
        compiled = jax.jit(fn).lower(*args).compile()
    except Exception as e:  # report (e.g. an FP8 dot the chip rejects) and go on
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    mem = compiled.memory_analysis()
    row = {"temp": int(mem.temp_size_in_bytes), "argument": int(mem.argument_size_in_bytes),
           "output": int(mem.output_size_in_bytes), "compile_s": round(time.time() - t0, 2), **_costs(compiled)}
    if unrolled is not None:
        un = jax.jit(unrolled).lower(*args).compile()
        row.update({f"{key}_rolled": row[key] for key in ("flops", "bytes_accessed", "cycles")})
        row.update(_costs(un), temp_unrolled=int(un.memory_analysis().temp_size_in_bytes))
    return row


def dot_probe(sharding, n: int = 4096) -> dict:
    """Estimated cycles of an n³ dot per operand dtype (f32 / int32 accumulation)."""
    out = {}
    for dtype, acc in ((BF16, F32), (E4M3, F32), (jnp.int8, jnp.int32)):
        a = jax.ShapeDtypeStruct((n, n), dtype, sharding=sharding)
        compiled = jax.jit(lambda x, y, acc=acc: jnp.dot(x, y, preferred_element_type=acc)).lower(a, a).compile()
        out[jnp.dtype(dtype).name] = estimated_cycles(compiled)
    return out


def table(rows: dict, shape: str) -> str:
    base = rows["bf16"]
    lines = [f"{shape}\n", "| variant | temp GB | args GB | out GB | TFLOP | GB accessed | Mcycles | ×bf16 cycles |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} | | | | | | |")
            continue
        cyc = "n/a" if r["cycles"] is None else f"{r['cycles'] / 1e6:.2f}"
        ratio = "n/a" if r["cycles"] is None or not base.get("cycles") else f"{r['cycles'] / base['cycles']:.2f}"
        lines.append(f"| {name} | {r['temp'] / 1e9:.3f} | {r['argument'] / 1e9:.3f} | {r['output'] / 1e9:.3f} | "
                     f"{r['flops'] / 1e12:.3f} | {r['bytes_accessed'] / 1e9:.2f} | {cyc} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--topology", nargs="+", default=["v5p:2x2x1", "tpu7x:2x2x1"])
    parser.add_argument("--problem", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--only", nargs="*", help="variant names to run (default all; bf16 always runs)")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "fp8_matmul_memory.json"))
    args = parser.parse_args()
    result = {"jax": jax.__version__, "block": BLOCK, "problems": {p: PROBLEMS[p] for p in args.problem},
              "topologies": {}}
    for topo_name in args.topology:
        dev = topologies.get_topology_desc(platform="tpu", topology_name=topo_name).devices[0]
        sharding = jax.sharding.SingleDeviceSharding(dev)
        entry = {"device_kind": dev.device_kind, "dot_probe_4096": dot_probe(sharding)}
        print(f"{topo_name} ({dev.device_kind}) 4096³ dot estimated cycles: {entry['dot_probe_4096']}", flush=True)
        for problem in args.problem:
            e, m, k, n = PROBLEMS[problem]
            rows = {}
            for name, (fn, shapes, unrolled) in variants(e, m, k, n).items():
                if args.only and name != "bf16" and name not in args.only:
                    continue
                rows[name] = measure(fn, shapes, sharding, unrolled)
                print(f"  {topo_name} {problem} {name}: {rows[name]}", flush=True)
            entry[problem] = rows
            dims = f"M={m} K={k} N={n}" if e is None else f"E={e} C={m} K={k} N={n}"
            print("\n" + table(rows, f"## {topo_name} ({dev.device_kind}), {problem}: {dims}") + "\n", flush=True)
        result["topologies"][topo_name] = entry
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
