"""CPU benchmark: dsv3-jax vs HF transformers (torch) for the whole-model forward and for the MoE layer alone.

Run (defaults finish in about 2-3 minutes on 2 idle cores):

    python experiments/bench_forward.py
    python experiments/bench_forward.py --cores 1            # pin every process to 1 core (1 torch thread)
    python experiments/bench_forward.py --burst 4            # each sample: 4 calls back to back, median of the last 3
    python experiments/bench_forward.py --batch 2 --seq 512 --experts 8,64 --moe-impls blocks,dense --no-parts

Prints:
  1. Whole-model forward of a preset ("small": ~20.8M params, float32) at batch x seq: HF DeepseekV3ForCausalLM
     (torch CPU, torch.no_grad, use_cache=False, HF's default attention ("sdpa") and experts ("grouped_mm")
     implementations, torch threads = usable cores) vs dsv3-jax on the SAME weights (HF model saved to a temp dir,
     read back with `load_hf_directory`). Median and min ms after warm-up (block_until_ready for jax), ratio HF/dsv3
     (>1 = dsv3-jax faster), max |logit diff|, peak RSS of each side's own process, the compiled
     memory_analysis() argument/output/temp bytes, and (--parts) one MLA / MoE / dense MLP / head timed alone.
  2. The MoE layer alone (top-k 4, batch x seq tokens) for 8, 64, 256 routed experts (n_group 4, topk_group 2):
     dsv3-jax moe_impl "blocks", "ragged", "dense" (jitted, median ms, compiled temp MiB) next to HF DeepseekV3MoE on
     the same weights with experts "grouped_mm" (HF default) and "eager", plus max |out diff| (HF vs first impl).
     A cell leaves the rounds after --moe-repeats, or at 2 runs once it has spent --budget-s.
  3. A one-line summary of the key ratios, the load average; compile times per row.
Writes --out/bench_forward[_coresN][_burstN].json (every figure) and .png (ms per row, both frameworks).

Each side runs in its own spawned process: torch and XLA never share a process (their thread pools would fight over
the cores) and peak RSS is per framework. In each section both processes stay alive and every call (forward,
part, MoE cell) runs once per round, in turn (`interleave.py`): this machine's speed drifts by up to 2x within
minutes, and timing one framework after the other put that drift into the ratios and the 8 -> 256 growth.
Timings on a machine shared with other jobs are noisy; torch with as many
threads as cores is hit hardest (OpenMP barriers stall when a core is taken), so compare the min row or use --cores 1.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from interleave import add_burst_argument, output_tag, run_interleaved  # experiments/, also imported elsewhere

MiB = 1024 * 1024
PARTS = ("mla", "moe", "mlp", "head")


# ---------------------------------------------------------------- helpers (no torch / jax imports at module level)

def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pin_cores(cores: int | None) -> int:
    """Restrict this process to its first `cores` usable CPUs (all when None) before torch/jax start; the count."""
    usable = sorted(os.sched_getaffinity(0))
    if cores:
        os.sched_setaffinity(0, usable[:cores])
    return len(os.sched_getaffinity(0))


def torch_setup(args: argparse.Namespace) -> int:
    """Pin cores, set torch threads to them, silence HF progress bars; the thread count."""
    cores = pin_cores(args.cores)
    import torch
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.set_num_threads(cores)
    return cores


def make_tokens(vocab: int, batch: int, seq: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, vocab, (batch, seq)).astype(np.int32)


def preset_config(preset: str, **overrides: Any):
    from dsv3_jax import ModelConfig
    return ModelConfig.from_preset(preset, **overrides)


# ---------------------------------------------------------------- section 1: whole-model forward

def hf_forward_setup(args: argparse.Namespace, workdir: str):
    """Build a random HF model, save it to `workdir` (logits → workdir/hf_logits.npy): steps "forward" and the
    parts, finish → facts, for `interleave.run_interleaved`."""
    threads = torch_setup(args)
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    rss0 = peak_rss_mib()
    cfg = preset_config(args.preset)
    hf_config = DeepseekV3Config(**cfg.to_hf_config())
    if args.hf_attn:
        hf_config._attn_implementation = args.hf_attn
    torch.manual_seed(args.seed)
    model = DeepseekV3ForCausalLM(hf_config).eval()
    with torch.no_grad():  # a random non-zero correction bias so routing exercises it (as tests/conftest.py)
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.uniform_(-0.05, 0.05)
    model.save_pretrained(workdir)
    ids = torch.from_numpy(make_tokens(cfg.vocab_size, args.batch, args.seq).astype(np.int64))

    no_grad = torch.no_grad()  # torch's context manager, also a decorator
    forward = no_grad(lambda: model(input_ids=ids, use_cache=False))
    np.save(os.path.join(workdir, "hf_logits.npy"), forward().logits.numpy())
    steps = {"forward": forward, **{name: no_grad(fn) for name, fn in (hf_parts(args, model) if args.parts
                                                                       else {}).items()}}
    return steps, lambda: {"rss": peak_rss_mib(), "rss_import": rss0, "threads": threads,
                           "attn": model.config._attn_implementation,
                           "experts": getattr(model.config, "_experts_implementation", "?")}


def hf_parts(args: argparse.Namespace, model) -> dict[str, Callable[[], Any]]:
    """Calls of layer 1's attention and MoE, layer 0's dense MLP and the head, alone, on a random [B,T,D]."""
    import torch

    x = torch.randn(args.batch, args.seq, model.config.hidden_size)
    cos_sin = model.model.rotary_emb(x, torch.arange(args.seq)[None].expand(args.batch, -1))
    mask = None  # sdpa: causal via is_causal, as in the model; eager needs an explicit additive mask
    if model.config._attn_implementation != "sdpa":
        mask = torch.full((args.batch, 1, args.seq, args.seq), float("-inf")).triu(1)
    layer0, layer1 = model.model.layers[0], model.model.layers[1]
    calls = {"mla": lambda: layer1.self_attn(hidden_states=x, position_embeddings=cos_sin, attention_mask=mask),
             "moe": lambda: layer1.mlp(x), "mlp": lambda: layer0.mlp(x), "head": lambda: model.lm_head(x)}
    return {name: calls[name] for name in PARTS}


def jax_forward_setup(args: argparse.Namespace, workdir: str):
    """Load the HF checkpoint with load_hf_directory: steps "forward" (`dsv3_jax.forward`), "raw" (the compiled
    call) and the parts; finish → compile time, memory, logit diff, for `interleave.run_interleaved`."""
    pin_cores(args.cores)
    import jax

    import dsv3_jax
    from dsv3_jax import Transformer
    from dsv3_jax.ckpt.hf import load_hf_directory

    rss0 = peak_rss_mib()
    config, variables = load_hf_directory(workdir)
    tokens = make_tokens(config.vocab_size, args.batch, args.seq)
    tokens_dev = jax.numpy.asarray(tokens)
    t0 = time.perf_counter()
    compiled = jax.jit(lambda v, t: Transformer(config).apply(v, t)[0]).lower(variables, tokens_dev).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    logits = np.asarray(dsv3_jax.forward(config, variables, tokens))
    hf_logits = np.load(os.path.join(workdir, "hf_logits.npy"))
    steps = {"forward": lambda: dsv3_jax.forward(config, variables, tokens).block_until_ready(),
             "raw": lambda: compiled(variables, tokens_dev).block_until_ready(),
             **(jax_parts(args, config, variables) if args.parts else {})}
    return steps, lambda: {
        "compile_s": compile_s, "rss": peak_rss_mib(), "rss_import": rss0, "arg": mem.argument_size_in_bytes,
        "out": mem.output_size_in_bytes, "temp": mem.temp_size_in_bytes,
        "maxdiff": float(np.max(np.abs(logits - hf_logits))), "maxlogit": float(np.max(np.abs(hf_logits))),
        "impl": config.moe_impl, "backend": jax.default_backend()}


def jax_parts(args: argparse.Namespace, config, variables: dict) -> dict[str, Callable[[], Any]]:
    """Calls of one MLA, one MoE (first MoE layer), the dense MLP and the head, each jitted alone."""
    import jax
    import jax.numpy as jnp

    from dsv3_jax.model.attention import MLA
    from dsv3_jax.model.layers import MLP
    from dsv3_jax.model.moe import MoE

    def layer0(tree: dict) -> dict:
        return jax.tree_util.tree_map(lambda a: a[0], tree)

    p, r = variables["params"], variables["router"]
    x = jax.random.normal(jax.random.key(0), (args.batch, args.seq, config.hidden_size), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(args.seq, dtype=jnp.int32), (args.batch, args.seq))
    fns = {
        "mla": (jax.jit(lambda v, x: MLA(config).apply(v, x, pos)),
                {"params": layer0(p["moe_layers"]["layers"]["attn"])}),
        "moe": (jax.jit(lambda v, x: MoE(config).apply(v, x)),
                layer0({"params": p["moe_layers"]["layers"]["moe"], "router": r["moe_layers"]["layers"]["moe"]})),
        "mlp": (jax.jit(lambda v, x: MLP(config, config.intermediate_size).apply(v, x)),
                {"params": layer0(p["dense_layers"]["layers"]["mlp"])}),
        "head": (jax.jit(lambda w, x: jnp.einsum("btd,dv->btv", x, w)), p["lm_head"]),
    }
    return {name: lambda f=f, v=v: f(v, x).block_until_ready() for name, (f, v) in fns.items()}


# ---------------------------------------------------------------- section 2: MoE layer alone

def moe_config(args: argparse.Namespace, experts: int):
    """The preset with `experts` routed experts, top-k/groups from the flags, init_std 0.02 (non-degenerate routing)."""
    return preset_config(args.preset, n_routed_experts=experts, num_experts_per_tok=args.topk,
                         n_group=args.n_group, topk_group=args.topk_group, init_std=0.02)


def jax_moe_setup(args: argparse.Namespace, workdir: str):
    """For each expert count: init a MoE, save weights/input/output to workdir/moe_E.npz, compile every moe_impl;
    (steps "E impl", finish → compile s and XLA temp bytes per cell) for `interleave.run_interleaved`."""
    pin_cores(args.cores)
    import flax.linen as nn
    import jax

    from dsv3_jax.model.moe import MoE

    steps, info = {}, {}
    for experts in args.experts:
        base = moe_config(args, experts)
        x = jax.random.normal(jax.random.key(1), (args.batch, args.seq, base.hidden_size), jax.numpy.float32)
        boxed = MoE(base).init(jax.random.key(0), x)
        variables = nn.unbox({k: boxed[k] for k in ("params", "router")})
        row = info.setdefault(experts, {})
        for impl in args.moe_impls:
            cfg = base.replace(moe_impl=impl)
            t0 = time.perf_counter()
            compiled = jax.jit(lambda v, x, cfg=cfg: MoE(cfg).apply(v, x)).lower(variables, x).compile()
            row[impl + "_compile_s"] = time.perf_counter() - t0
            row[impl + "_temp"] = compiled.memory_analysis().temp_size_in_bytes
            steps[f"{experts} {impl}"] = lambda c=compiled, v=variables, x=x: c(v, x).block_until_ready()
            if impl == args.moe_impls[0]:
                out = np.asarray(compiled(variables, x))
        flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
                for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]}
        np.savez(os.path.join(workdir, f"moe_{experts}.npz"), x=np.asarray(x), out=out, **flat)
    return steps, lambda: info


def hf_moe_module(args: argparse.Namespace, experts: int, arrays: dict, experts_impl: str):
    """An HF DeepseekV3MoE holding the dsv3-jax MoE weights from `arrays` (jax layout → HF layout)."""
    import torch
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    hf_config = DeepseekV3Config(**moe_config(args, experts).to_hf_config())
    hf_config._experts_implementation = experts_impl
    module = DeepseekV3MoE(hf_config).eval()
    t = {k: torch.from_numpy(v) for k, v in arrays.items()}
    with torch.no_grad():
        module.gate.weight.copy_(t["params/gate"].T)
        module.gate.e_score_correction_bias.copy_(t["router/bias"])
        module.experts.gate_up_proj.copy_(torch.cat([t["params/w_gate"], t["params/w_up"]], -1).transpose(1, 2))
        module.experts.down_proj.copy_(t["params/w_down"].transpose(1, 2))
        module.shared_experts.gate_proj.weight.copy_(t["params/shared/w_gate"].T)
        module.shared_experts.up_proj.weight.copy_(t["params/shared/w_up"].T)
        module.shared_experts.down_proj.weight.copy_(t["params/shared/w_down"].T)
    return module


def hf_moe_setup(args: argparse.Namespace, workdir: str):
    """HF DeepseekV3MoE (grouped_mm and eager experts) on the weights saved by `jax_moe_setup`: (steps "E impl",
    finish → max |out diff| vs dsv3-jax per expert count) for `interleave.run_interleaved`."""
    torch_setup(args)
    import torch

    steps, info = {}, {}
    call = torch.no_grad()(lambda module, x: module(x))
    for experts in args.experts:
        arrays = dict(np.load(os.path.join(workdir, f"moe_{experts}.npz")))
        x = torch.from_numpy(arrays["x"])
        for impl in ("grouped_mm", "eager"):
            module = hf_moe_module(args, experts, arrays, impl)
            steps[f"{experts} {impl}"] = lambda m=module, x=x: call(m, x)
            if impl == "grouped_mm":
                info[experts] = {"maxdiff": float(np.max(np.abs(call(module, x).numpy() - arrays["out"])))}
    return steps, lambda: info


def run_forward(args: argparse.Namespace, workdir: str) -> tuple[dict, dict]:
    """Section 1, both frameworks alive and their calls timed in turn (`interleave.py`): (hf, jax) with "ms",
    "min_ms", "parts" (median ms each) and, for jax, "raw_ms"."""
    res = run_interleaved({"hf": (hf_forward_setup, (args, workdir)), "jax": (jax_forward_setup, (args, workdir))},
                          warmup=args.warmup, repeats=args.repeats, budget_s=args.budget_s, burst=args.burst)
    for r in res.values():
        steps = r.pop("steps")
        r.update(ms=steps["forward"]["median_s"] * 1e3, min_ms=steps["forward"]["min_s"] * 1e3,
                 parts={name: steps[name]["median_s"] * 1e3 for name in PARTS if name in steps})
        if "raw" in steps:
            r["raw_ms"] = steps["raw"]["median_s"] * 1e3
    return res["hf"], res["jax"]


def run_moe(args: argparse.Namespace, workdir: str) -> tuple[dict, dict]:
    """Section 2, both frameworks alive and their cells timed in turn (`interleave.py`): (jax, hf) as
    {experts: {impl: median ms, ...}}."""
    res = run_interleaved({"jax": (jax_moe_setup, (args, workdir)), "hf": (hf_moe_setup, (args, workdir))},
                          warmup=1, repeats=args.moe_repeats, budget_s=args.budget_s, min_rounds=2, burst=args.burst)
    out = []
    for name in ("jax", "hf"):
        steps = res[name].pop("steps")
        table = {e: dict(row) for e, row in res[name].items()}
        for key, stats in steps.items():
            e, impl = key.split(" ")
            table[int(e)][impl] = stats["median_s"] * 1e3
        out.append(table)
    return out[0], out[1]


# ---------------------------------------------------------------- printing

def print_forward(args: argparse.Namespace, hf: dict, jx: dict) -> None:
    print(f"\n== 1. Whole-model forward: preset {args.preset!r}, batch x seq = {args.batch} x {args.seq}, float32, "
          f"{hf['threads']} of {os.cpu_count()} cores, median/min of <= {args.repeats} runs after {args.warmup} "
          "warm-up" + (f", each the median of {args.burst - 1} calls after a first, back to back" if args.burst > 1
                       else "") + " ==")
    print(f"   HF: torch threads={hf['threads']}, attn={hf['attn']}, experts={hf['experts']}, no_grad, use_cache=False"
          f" | dsv3-jax: backend={jx['backend']}, moe_impl={jx['impl']}, compile {jx['compile_s']:.1f}s")
    print(f"   {'':30s}{'HF transformers':>16s}{'dsv3-jax':>12s}{'HF/dsv3':>10s}")
    rows = [("latency ms, median", hf["ms"], jx["ms"]), ("latency ms, min", hf["min_ms"], jx["min_ms"]),
            ("  raw compiled call, median", hf["ms"], jx["raw_ms"])]
    rows += [(f"  part alone: {name}, median", hf["parts"][name], jx["parts"][name]) for name in jx["parts"]]
    for label, a, b in rows:
        print(f"   {label:30s}{a:16.1f}{b:12.1f}{a / b:9.2f}x")
    print(f"   {'peak RSS MiB (own process)':30s}{hf['rss']:16.0f}{jx['rss']:12.0f}")
    print(f"   {'  RSS after imports MiB':30s}{hf['rss_import']:16.0f}{jx['rss_import']:12.0f}")
    print(f"   {'XLA arg/out/temp MiB':30s}{'':16s}{jx['arg'] / MiB:12.1f} / {jx['out'] / MiB:.1f} / "
          f"{jx['temp'] / MiB:.1f}")
    print(f"   max |logit diff| = {jx['maxdiff']:.2e}  (max |logit| = {jx['maxlogit']:.2f})")


def print_moe(args: argparse.Namespace, jx: dict, hf: dict) -> None:
    c = preset_config(args.preset)
    print(f"\n== 2. MoE layer alone: tokens {args.batch} x {args.seq}, top-{args.topk}, n_group={args.n_group}, "
          f"topk_group={args.topk_group}, D={c.hidden_size}, F={c.moe_intermediate_size}, "
          f"{c.n_shared_experts} shared expert, float32; median ms/call [XLA temp MiB] ==")
    head = "".join(f"{'jax ' + i:>21s}" for i in args.moe_impls)
    print(f"   {'experts':>7s}{head}{'HF grouped_mm':>15s}{'HF eager':>10s}{'max|diff|':>11s}")
    for e in args.experts:
        cells = "".join(f"{jx[e][i]:11.1f} [{jx[e][i + '_temp'] / MiB:6.1f}]" for i in args.moe_impls)
        compiles = ", ".join(f"{i} {jx[e][i + '_compile_s']:.1f}s" for i in args.moe_impls)
        print(f"   {e:7d}{cells}{hf[e]['grouped_mm']:15.1f}{hf[e]['eager']:10.1f}{hf[e]['maxdiff']:11.1e}"
              f"   (compile: {compiles})")


def print_summary(args: argparse.Namespace, fwd: tuple[dict, dict] | None, moe: tuple[dict, dict] | None) -> None:
    bits = []
    if fwd:
        hf, jx = fwd
        bits.append(f"forward {args.preset} {args.batch}x{args.seq}: HF {hf['ms']:.0f} ms vs dsv3-jax {jx['ms']:.0f} "
                    f"ms "
                    f"(HF/dsv3 median {hf['ms'] / jx['ms']:.2f}x, min {hf['min_ms'] / jx['min_ms']:.2f}x, "
                    f"max|dlogit| {jx['maxdiff']:.1e})")
    if moe:
        jx, hf = moe
        lo, hi = min(args.experts), max(args.experts)
        bits.append("MoE " + ", ".join(f"{i} {jx[hi][i] / jx[lo][i]:.1f}x" for i in args.moe_impls)
                    + f" slower at {hi} vs {lo} experts")
        bits.append(f"HF grouped_mm {hf[hi]['grouped_mm'] / hf[lo]['grouped_mm']:.1f}x")
        first = args.moe_impls[0]
        bits.append(f"HF grouped_mm/jax {first} @{lo}: {hf[lo]['grouped_mm'] / jx[lo][first]:.2f}x, "
                    f"@{hi}: {hf[hi]['grouped_mm'] / jx[hi][first]:.2f}x")
    print("\n== 3. Summary: " + "; ".join(bits))


# ---------------------------------------------------------------- main

def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10, help="timed runs per measurement (median)")
    p.add_argument("--budget-s", type=float, default=5.0, help="stop repeating after this many s (>= 3 runs)")
    p.add_argument("--cores", type=int, default=None, help="pin each process to this many cores (default: all)")
    add_burst_argument(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf-attn", default=None, help="HF attention implementation (default: HF's own, sdpa)")
    p.add_argument("--parts", action=argparse.BooleanOptionalAction, default=True,
                   help="also time one MLA / MoE / dense MLP / head alone on each side")
    p.add_argument("--experts", default="8,64,256", help="routed-expert counts for section 2")
    p.add_argument("--moe-impls", default="blocks,ragged,dense")
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--n-group", type=int, default=4)
    p.add_argument("--topk-group", type=int, default=2)
    p.add_argument("--moe-repeats", type=int, default=5, help="timed runs per MoE cell (>= 2, within --budget-s)")
    p.add_argument("--skip-forward", action="store_true")
    p.add_argument("--skip-moe", action="store_true")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                   help="writes bench_forward[_coresN][_burstN].json and .png here")
    args = p.parse_args()
    args.experts = [int(e) for e in args.experts.split(",")]
    args.moe_impls = args.moe_impls.split(",")
    return args


def main() -> None:
    args = parse_args()
    t0 = time.perf_counter()
    fwd = moe = None
    with tempfile.TemporaryDirectory(prefix="bench_dsv3_") as workdir:
        if not args.skip_forward:
            fwd = run_forward(args, workdir)
            print_forward(args, *fwd)
        if not args.skip_moe:
            moe = run_moe(args, workdir)
            print_moe(args, *moe)
    print_summary(args, fwd, moe)
    load = os.getloadavg()
    print(f"   (total wall time {time.perf_counter() - t0:.0f} s; load average at end "
          f"{load[0]:.1f}/{load[1]:.1f} (1/5 min) on {os.cpu_count()} cores)")
    write_results(args, fwd, moe, load)


def write_results(args: argparse.Namespace, fwd: tuple[dict, dict] | None, moe: tuple[dict, dict] | None,
                  load: tuple[float, float, float]) -> None:
    """bench_forward[_coresN][_burstN].json (every figure) and .png (ms per row, both frameworks) under --out."""
    import plots  # matplotlib: only in the process that writes

    os.makedirs(args.out, exist_ok=True)
    tag = output_tag(args.cores, args.burst)
    groups: dict[str, dict[str, float]] = {}
    if fwd:
        hf, jx = fwd
        groups[f"forward {args.preset}"] = {"HF": hf["ms"], "dsv3-jax": jx["ms"]}
        for name in jx["parts"]:
            groups[name] = {"HF": hf["parts"][name], "dsv3-jax": jx["parts"][name]}
    if moe:
        jx, hf = moe
        for e in args.experts:
            groups[f"MoE E={e}"] = {"HF": hf[e]["grouped_mm"], "dsv3-jax": jx[e][args.moe_impls[0]]}
    png = plots.bars(groups, os.path.join(args.out, f"bench_forward{tag}.png"), ylabel="ms (median)",
                     title=f"Forward, float32, CPU ({args.cores or os.cpu_count()} cores), load {load[0]:.1f}")
    strip = {"forward": {"hf": fwd[0], "jax": fwd[1]} if fwd else None,
             "moe": {"jax": moe[0], "hf": moe[1]} if moe else None}
    with open(os.path.join(args.out, f"bench_forward{tag}.json"), "w", encoding="utf-8") as f:
        json.dump({"args": vars(args), "load_avg": load, "cores": os.cpu_count(), "results": strip}, f, indent=1,
                  default=str)
    print(f"   wrote {png} and bench_forward{tag}.json")


if __name__ == "__main__":
    main()
