"""FP8 inference figures: weight memory (fp32 / bf16 / fp8 trees), logits error vs bf16 and forward latency of the
"blockwise" and "dequant" FP8 implementations, on the "small" preset (random init) and, by shape only, the 671B.

Weights trees:
    fp32   init_variables as created (param_dtype float32)
    bf16   every float leaf in bf16 except the router gate (fp32 in the recipe)
    fp8    quantize_params (attention / dense MLP / shared + routed experts / MTP block weights → e4m3 values +
           fp32 128x128 block scales), the remaining leaves as in the bf16 tree
Forward variants (jitted `Transformer.apply`, logits [B,T,V] float32):
    fp32               dtype float32, fp32 weights
    bf16               dtype bfloat16, bf16 weights
    fp8-blockwise      dtype bfloat16, FP8-resident weights, per-128-of-K fp32 promotion (one dot per K block)
    fp8-dequant        dtype bfloat16, FP8-resident weights, operands dequantised and summed in one dot
    fp8-plain          dtype bfloat16, bf16 weights quantised on the fly every call (matmul_precision "fp8")

CPU has no FP8 units: XLA emulates e4m3 with converts, so the FP8 variants are *slower* here; the latency columns
measure this emulation, not what FP8 GEMMs do on H800/H100-class hardware. Random-init weights (init_std 0.006)
give near-uniform logits: the errors are indicative only (experiments/fp8_training.py measures a trained model).

Run:  python experiments/bench_fp8.py            (defaults: batch 4 x 256 tokens, 5 timed runs; ~1-3 min)
Writes experiments/results/fp8_bench.json and fp8_bench.md (and prints the tables).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.api import abstract_variables, init_variables, param_counts
from dsv3_jax.model.transformer import Transformer
from dsv3_jax.quant import fp8

HERE = os.path.dirname(os.path.abspath(__file__))
CPU_NOTE = ("CPU has no FP8 units: e4m3 is emulated by XLA (converts + fp32 dots), so FP8 latency here measures the "
            "emulation, not FP8 hardware speed.")


def is_quant(x) -> bool:
    return isinstance(x, fp8.QuantArray)


def bf16_tree(params):
    def cast(path, leaf):
        if is_quant(leaf) or getattr(path[-1], "key", "") == "gate":
            return leaf
        return leaf.astype(jnp.bfloat16)
    return jax.tree_util.tree_map_with_path(cast, params, is_leaf=is_quant)


def abstract_nbytes(tree) -> int:
    leaves = jax.tree_util.tree_leaves(tree)
    return int(sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize for leaf in leaves))


def memory_rows(params32, label: str, nbytes=fp8.tree_nbytes) -> dict:
    """fp32 / bf16 / fp8 bytes of a (concrete or abstract) parameter tree; quantised vs kept split."""
    p16 = jax.eval_shape(bf16_tree, params32) if nbytes is abstract_nbytes else bf16_tree(params32)
    p8 = jax.eval_shape(lambda p: bf16_tree(fp8.quantize_params(p)), params32) if nbytes is abstract_nbytes else \
        bf16_tree(fp8.quantize_params(params32))
    flat8 = jax.tree_util.tree_leaves(p8, is_leaf=is_quant)
    quant = [x for x in flat8 if is_quant(x)]
    out = {"model": label, "fp32": nbytes(params32), "bf16": nbytes(p16), "fp8": nbytes(p8),
           "fp8_values": sum(nbytes(x.values) for x in quant), "fp8_scales": sum(nbytes(x.scales) for x in quant),
           "kept_bf16_fp32": sum(nbytes(x) for x in flat8 if not is_quant(x))}
    out["fp8/bf16"] = out["fp8"] / out["bf16"]
    out["fp8/fp32"] = out["fp8"] / out["fp32"]
    out["quantised_share_of_bf16"] = 2 * out["fp8_values"] / out["bf16"]
    return out


def fmt_bytes(n: float) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:,.2f} {unit}"
    return f"{n:,.0f} B"


def time_forward(config: ModelConfig, params, router, tokens, repeats: int) -> tuple[np.ndarray, float, float]:
    model = Transformer(config)
    fwd = jax.jit(lambda v, t: model.apply(v, t)[0])
    variables = {"params": params, "router": router}
    t0 = time.perf_counter()
    compiled = fwd.lower(variables, tokens).compile()
    compile_s = time.perf_counter() - t0
    out = jax.block_until_ready(compiled(variables, tokens))  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(variables, tokens))
        times.append(time.perf_counter() - t0)
    return np.asarray(out), statistics.median(times), compile_s


def table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-671b", action="store_true", help="skip the shape-only memory figures of the 671B config")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args()

    base = ModelConfig.from_preset(args.preset, dtype="float32", param_dtype="float32")
    counts = param_counts(base)
    print(f"preset {args.preset}: {counts['total'] / 1e6:.2f}M params (+{counts['mtp'] / 1e6:.2f}M MTP), D="
          f"{base.hidden_size}, {base.num_dense_layers} dense + {base.num_moe_layers} MoE layers, "
          f"{base.n_routed_experts} experts top-{base.num_experts_per_tok}, vocab {base.vocab_size}; jax "
          f"{jax.__version__} on {jax.default_backend()}")
    print(CPU_NOTE)
    variables = init_variables(base, args.seed)
    params32, router = variables["params"], variables["router"]

    # ---- memory
    mem = [memory_rows(params32, args.preset)]
    if not args.no_671b:
        full = abstract_variables(ModelConfig.from_preset("deepseek-v3-671b", param_dtype="float32"))["params"]
        mem.append(memory_rows(full, "deepseek-v3-671b (shapes only, incl. MTP)", abstract_nbytes))
    mem_table = table(["model", "fp32", "bf16", "fp8", "fp8/bf16", "fp8/fp32", "fp8 values", "fp8 scales",
                       "kept (embed/head/norms/gate/eh_proj)", "quantised share of bf16 bytes"],
                      [[m["model"], fmt_bytes(m["fp32"]), fmt_bytes(m["bf16"]), fmt_bytes(m["fp8"]),
                        f"{m['fp8/bf16']:.3f}", f"{m['fp8/fp32']:.3f}", fmt_bytes(m["fp8_values"]),
                        fmt_bytes(m["fp8_scales"]), fmt_bytes(m["kept_bf16_fp32"]),
                        f"{m['quantised_share_of_bf16']:.3f}"] for m in mem])
    print("\nWeight memory (tree_nbytes)\n" + mem_table)

    # ---- logits error and latency
    tokens = jnp.asarray(np.random.default_rng(args.seed).integers(3, base.vocab_size, (args.batch, args.seq)),
                         jnp.int32)
    p16 = bf16_tree(params32)
    p8 = bf16_tree(fp8.quantize_params(params32))
    bf = base.replace(dtype="bfloat16")
    variants = {
        "fp32": (base, params32),
        "bf16": (bf, p16),
        "fp8-blockwise": (bf.replace(fp8_impl="blockwise"), p8),
        "fp8-dequant": (bf.replace(fp8_impl="dequant"), p8),
        "fp8-plain (on-the-fly, dequant)": (bf.replace(matmul_precision="fp8", fp8_impl="dequant"), p16),
    }
    logits, timing = {}, {}
    for name, (cfg, tree) in variants.items():
        logits[name], step_s, compile_s = time_forward(cfg, tree, router, tokens, args.repeats)
        timing[name] = {"forward_s": step_s, "compile_s": compile_s,
                        "tokens_per_s": args.batch * args.seq / step_s, "weight_bytes": fp8.tree_nbytes(tree)}
        print(f"  {name:32s} forward {step_s * 1e3:8.1f} ms  (compile {compile_s:.1f} s)", flush=True)

    def rel(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    rows, errors = [], {}
    for name in variants:
        lg = logits[name]
        e = {"rel_l2_vs_bf16": rel(lg, logits["bf16"]), "rel_l2_vs_fp32": rel(lg, logits["fp32"]),
             "max_abs_vs_bf16": float(np.abs(lg - logits["bf16"]).max()),
             "top1_agree_vs_bf16": float(np.mean(lg.argmax(-1) == logits["bf16"].argmax(-1))),
             "logit_std": float(lg.std())}
        errors[name] = e
        t = timing[name]
        rows.append([name, fmt_bytes(t["weight_bytes"]), f"{e['rel_l2_vs_bf16']:.2e}", f"{e['rel_l2_vs_fp32']:.2e}",
                     f"{e['max_abs_vs_bf16']:.2e}", f"{e['top1_agree_vs_bf16']:.3f}", f"{t['forward_s'] * 1e3:.1f}",
                     f"{t['forward_s'] / timing['bf16']['forward_s']:.2f}x", f"{t['compile_s']:.1f}"])
    bw_vs_dq = rel(logits["fp8-blockwise"], logits["fp8-dequant"])
    fwd_table = table(["variant", "weights", "rel. L2 logits vs bf16", "vs fp32", "max |diff| vs bf16",
                       "top-1 agree vs bf16", "forward ms (median)", "vs bf16", "compile s"], rows)
    print(f"\nForward on {args.batch} x {args.seq} random tokens, random-init weights (logit std "
          f"{errors['bf16']['logit_std']:.3f})\n" + fwd_table)
    print(f"fp8-blockwise vs fp8-dequant logits: rel. L2 {bw_vs_dq:.2e} (same math, different summation order)")
    print(CPU_NOTE)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fp8_bench.json"), "w", encoding="utf-8") as f:
        json.dump({"args": vars(args), "note": CPU_NOTE, "memory": mem, "timing": timing, "errors": errors,
                   "blockwise_vs_dequant_rel_l2": bw_vs_dq, "device": str(jax.devices()[0])}, f, indent=1)
    with open(os.path.join(args.out, "fp8_bench.md"), "w", encoding="utf-8") as f:
        f.write(f"# FP8 inference bench ({args.preset} preset, {jax.default_backend()})\n\n{CPU_NOTE}\n\n"
                f"## Weight memory (tree_nbytes; bf16 and fp8 trees keep the router gate in fp32)\n\n{mem_table}\n\n"
                f"## Logits error and forward latency ({args.batch} x {args.seq} tokens, random-init weights, "
                f"median of {args.repeats} runs)\n\n{fwd_table}\n\nfp8-blockwise vs fp8-dequant logits: rel. L2 "
                f"{bw_vs_dq:.2e}.\n\nRandom-init logits are nearly uniform (std {errors['bf16']['logit_std']:.3f}); "
                f"experiments/fp8_training.py reports the FP8-resident inference error of a trained model.\n")
    print(f"\nwrote {os.path.join(args.out, 'fp8_bench.json')} and fp8_bench.md")


if __name__ == "__main__":
    main()
