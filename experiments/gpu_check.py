"""GPU figures for experiments/gpu_check.sh, written to one JSON: dsv3-jax against HF transformers (torch) on the
same GPU, bf16.

Sections (each timed within --budget-s; a failing section records its error and the rest still run):
  device     name, vendor peak bf16 TFLOP/s and HBM GB/s (table below), measured copy bandwidth
  fp8        [M,K]x[K,N] matmul TFLOP/s: bf16, FP8 W8A8 ("blockwise": 1x128 activation tiles, 128x128 weight
             blocks), FP8 weight-only (dequantised per block, bf16 compute)
  small      the `small` preset: forward tokens/s (8x512), decode tokens/s (bs1/bs8, prompt 64, 64 new) with
             HBM-bandwidth utilisation (weight bytes read per decode step / step time / peak), AdamW train step
             tokens/s and MFU (6 x active params x tokens/s / peak); HF DeepseekV3ForCausalLM alongside
  layer      one real-width layer (hidden 7168, 128 heads, MLA ranks 1536/512, 256 experts top-8, 1 shared):
             MLA and MoE forward at 4x1024 tokens (ms, TFLOP/s, MFU), the MoE at 8 tokens (a bs8 decode step:
             bytes of the experts touched / time = HBM utilisation); HF DeepseekV3Attention / DeepseekV3MoE alongside

    python experiments/gpu_check.py --dry-run      # CPU, tiny shapes: checks the code paths, figures meaningless
HF runs in its own spawned process (the two frameworks never share GPU memory pools); jax does not preallocate.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

SPECS = {"H200": (989.0, 4800.0), "H100": (989.0, 3350.0), "H800": (989.0, 3350.0), "GH200": (989.0, 4000.0),
         "A100": (312.0, 2039.0), "L40S": (362.0, 864.0), "L4": (121.0, 300.0), "A10": (125.0, 600.0)}


def peak_of(name: str) -> tuple[float | None, float | None]:
    """(dense bf16 TFLOP/s, HBM GB/s) from the vendor table for a device name, (None, None) if unknown."""
    for key, spec in sorted(SPECS.items(), key=lambda kv: -len(kv[0])):
        if key.lower() in name.lower():
            return spec
    return None, None


def median_s(fn: Callable[[], object], warmup: int = 2, repeats: int = 10, sync: Callable = lambda r: r) -> float:
    for _ in range(warmup):
        sync(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_isolated(fn, *args):
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


# ---------------------------------------------------------------- jax side

def jax_sync(r):
    import jax
    return jax.block_until_ready(r)


def device_section(args) -> dict:
    import jax
    import jax.numpy as jnp

    dev = jax.devices()[0]
    name = getattr(dev, "device_kind", str(dev))
    tflops, gbs = peak_of(name)
    n = 1 << (20 if args.dry_run else 28)
    x = jnp.ones((n,), jnp.float32)
    t = median_s(lambda: jax.jit(lambda a: a * 2.0)(x), sync=jax_sync)
    return {"device": name, "platform": dev.platform, "jax": jax.__version__, "peak_bf16_tflops": tflops,
            "peak_hbm_gbs": gbs, "copy_gbs_measured": 2 * n * 4 / t / 1e9}


def fp8_section(args) -> dict:
    import jax
    import jax.numpy as jnp

    from dsv3_jax.quant.fp8 import quantize_weight, quantized_matmul

    out = {}
    for size in ((256,) if args.dry_run else (4096, 8192)):
        kx, kw = jax.random.split(jax.random.key(0))
        x = jax.random.normal(kx, (size, size), jnp.bfloat16)
        w = jax.random.normal(kw, (size, size), jnp.bfloat16)
        wq = jax.jit(quantize_weight)(w)
        fns = {"bf16": jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)),
               "fp8_w8a8_blockwise": jax.jit(lambda x, w: quantized_matmul(x, w, "blockwise")),
               "fp8_weight_only": jax.jit(lambda x, w: quantized_matmul(x, w, "weight_only"))}
        row = {}
        for name, f in fns.items():
            operand = w if name == "bf16" else wq
            t = median_s(lambda f=f, x=x, operand=operand: f(x, operand), sync=jax_sync)
            row[name] = {"ms": t * 1e3, "tflops": 2 * size ** 3 / t / 1e12}
        out[str(size)] = row
    return out


def dtype_of(args) -> str:
    """bf16 on the GPU; float32 for --dry-run on CPU (XLA:CPU lacks some bf16 x bf16 -> f32 dots)."""
    return "float32" if args.dry_run else "bfloat16"


def small_config(args):
    from dsv3_jax import ModelConfig
    dtype = dtype_of(args)
    return ModelConfig.from_preset("tiny" if args.dry_run else "small", dtype=dtype, param_dtype=dtype)


def jax_small_section(args, peak: dict) -> dict:
    import jax
    import numpy as np

    import dsv3_jax as d
    from dsv3_jax.train.step import TrainConfig, init_state, jit_train_step, make_optimizer, make_train_step

    config = small_config(args)
    variables = d.init_variables(config, 0)
    counts = d.param_counts(config)
    weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(variables))
    b, t = (2, 32) if args.dry_run else (8, 512)
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (b, t)).astype(np.int32)
    fwd = median_s(lambda: d.forward(config, variables, tokens), sync=jax_sync)
    out = {"forward_tok_s": b * t / fwd, "params_active": counts["active"], "weight_bytes": weight_bytes}
    for batch in (1, 8):
        prompts = np.random.RandomState(1).randint(3, config.vocab_size, (batch, 16 if args.dry_run else 64))
        new = 8 if args.dry_run else 64
        full = median_s(lambda p=prompts, n=new: d.generate(config, variables, p, n, stop_ids=()), 1, 3)
        one = median_s(lambda p=prompts: d.generate(config, variables, p, 1, stop_ids=()), 1, 3)
        step_s = (full - one) / (new - 1) if full > one else None  # None: too fast to separate from the prefill
        out[f"decode_bs{batch}"] = {"tok_s": batch / step_s if step_s else None, "prefill_ms": one * 1e3,
                                    "hbm_util": weight_bytes / step_s / 1e9 / peak["gbs"] if step_s and peak["gbs"]
                                    else None}
    tc = TrainConfig(batch_size=b, seq_len=t, lr=1e-3, warmup_steps=1)
    optimizer = make_optimizer(tc)  # as `dsv3 train`: Adam moments per parameter
    state = {"s": init_state(d.init_variables(config, 0), optimizer)}
    batch = {"inputs": tokens, "targets": np.roll(tokens, -1, axis=1)}
    step = jit_train_step(make_train_step(config, tc, optimizer))
    t0 = time.perf_counter()
    compiled = step.lower(state["s"], batch).compile()
    compile_s = time.perf_counter() - t0

    def one_step():
        state["s"], metrics = compiled(state["s"], batch)
        return metrics["loss"]

    step_s = median_s(one_step, sync=jax_sync, repeats=5)
    tps = b * t / step_s
    out["train"] = {"tok_s": tps, "compile_s": compile_s,
                    "mfu": 6 * counts["active"] * tps / (peak["tflops"] * 1e12) if peak["tflops"] else None}
    return out


def layer_config(args):
    from dsv3_jax import ModelConfig
    if args.dry_run:
        return ModelConfig.from_preset("small", dtype="float32", param_dtype="float32", n_routed_experts=32,
                                       num_experts_per_tok=8, n_group=8, topk_group=4)
    return ModelConfig.from_preset("deepseek-v3-671b", dtype="bfloat16", param_dtype="bfloat16")


def layer_flops(config, tokens: int) -> dict[str, float]:
    """Forward FLOPs of one MLA's projections and one MoE (routed top-k + shared experts) for `tokens` tokens."""
    c = config
    h, dq = c.num_attention_heads, c.qk_head_dim
    q = (c.hidden_size * c.q_lora_rank + c.q_lora_rank * h * dq) if c.q_lora_rank else c.hidden_size * h * dq
    kv = c.hidden_size * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank * h * (c.qk_nope_head_dim
                                                                                          + c.v_head_dim)
    proj = q + kv + h * c.v_head_dim * c.hidden_size
    moe = 3 * c.hidden_size * c.moe_intermediate_size * (c.num_experts_per_tok + c.n_shared_experts)
    return {"mla_proj": 2 * tokens * proj, "moe": 2 * tokens * moe}


def jax_layer_section(args, peak: dict) -> dict:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from dsv3_jax.model.attention import MLA
    from dsv3_jax.model.moe import MoE

    config = layer_config(args)
    b, t = (1, 64) if args.dry_run else (4, 1024)
    x = jax.random.normal(jax.random.key(0), (b, t, config.hidden_size), jnp.dtype(config.dtype))
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    flops = layer_flops(config, b * t)
    out = {}
    mla = MLA(config)
    v = nn.unbox(jax.jit(mla.init)(jax.random.key(1), x, pos))
    f = jax.jit(mla.apply)
    s = median_s(lambda: f(v, x, pos), sync=jax_sync)
    attn_flops = 2 * b * t * t * config.num_attention_heads * (config.qk_head_dim + config.v_head_dim) / 2
    total = flops["mla_proj"] + attn_flops
    out["mla_forward"] = {"ms": s * 1e3, "tflops": total / s / 1e12,
                          "mfu": total / s / (peak["tflops"] * 1e12) if peak["tflops"] else None}
    del v
    moe = MoE(config)
    v = nn.unbox({k: val for k, val in jax.jit(moe.init)(jax.random.key(2), x).items() if k in ("params", "router")})
    f = jax.jit(moe.apply)
    s = median_s(lambda: f(v, x), sync=jax_sync)
    out["moe_forward"] = {"ms": s * 1e3, "tflops": flops["moe"] / s / 1e12,
                          "mfu": flops["moe"] / s / (peak["tflops"] * 1e12) if peak["tflops"] else None}
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(moe.apply({**v, "params": p}, x).astype(jnp.float32) ** 2)))
    s = median_s(lambda: grad(v["params"], x), sync=jax_sync, repeats=3)
    out["moe_train_fwd_bwd"] = {"ms": s * 1e3, "tflops": 3 * flops["moe"] / s / 1e12,
                                "mfu": 3 * flops["moe"] / s / (peak["tflops"] * 1e12) if peak["tflops"] else None}
    x8 = x[:8, :1] if b >= 8 else x.reshape(-1, 1, config.hidden_size)[:8]
    s = median_s(lambda: f(v, x8), sync=jax_sync)
    experts = min(config.n_routed_experts, 8 * config.num_experts_per_tok)  # at most this many experts touched
    bytes_read = 3 * config.hidden_size * config.moe_intermediate_size * 2 * (experts + config.n_shared_experts)
    out["moe_decode_bs8"] = {"ms": s * 1e3, "gbs_upper_bound": bytes_read / s / 1e9,
                             "hbm_util_upper_bound": bytes_read / s / 1e9 / peak["gbs"] if peak["gbs"] else None}
    return out


# ---------------------------------------------------------------- HF side (own process)

def hf_child(args) -> dict:
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and not args.dry_run:
        return {"skipped": "torch has no CUDA"}

    def sync(r):
        if dev == "cuda":
            torch.cuda.synchronize()
        return r

    return {"device": dev, "torch": torch.__version__, **hf_small(args, dev, sync), **hf_layer(args, dev, sync)}


def hf_small(args, dev: str, sync) -> dict:
    """HF DeepseekV3ForCausalLM of the small preset, bf16: forward, greedy generate, AdamW train step."""
    import numpy as np
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = small_config(args)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**config.to_hf_config())).to(dev, torch.bfloat16).eval()
    b, t = (2, 32) if args.dry_run else (8, 512)
    ids = torch.from_numpy(np.random.RandomState(0).randint(0, config.vocab_size, (b, t))).to(dev)
    new = 8 if args.dry_run else 64
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    out = {}
    with torch.no_grad():
        out["small_forward_tok_s"] = b * t / median_s(lambda: model(input_ids=ids, use_cache=False), sync=sync)
        for batch in (1, 8):
            prompt = ids[:batch, :16 if args.dry_run else 64]
            full = median_s(lambda p=prompt: model.generate(p, max_new_tokens=new, min_new_tokens=new, **kw), 1, 3,
                            sync)
            one = median_s(lambda p=prompt: model.generate(p, max_new_tokens=1, **kw), 1, 3, sync)
            out[f"small_decode_bs{batch}_tok_s"] = batch * (new - 1) / (full - one) if full > one else None
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def train_step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    out["small_train_tok_s"] = b * t / median_s(train_step, sync=sync, repeats=5)
    return out


def hf_layer(args, dev: str, sync) -> dict:
    """HF DeepseekV3Attention and DeepseekV3MoE at the real width, bf16, forward."""
    import torch
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3Attention,
        DeepseekV3MoE,
        DeepseekV3RotaryEmbedding,
    )

    lc = layer_config(args)
    hf_config = DeepseekV3Config(**lc.to_hf_config())
    b, t = (1, 64) if args.dry_run else (4, 1024)
    x = torch.randn(b, t, lc.hidden_size, device=dev, dtype=torch.bfloat16)
    out = {}
    with torch.no_grad():
        attn = DeepseekV3Attention(hf_config, layer_idx=0).to(dev, torch.bfloat16).eval()
        cos_sin = DeepseekV3RotaryEmbedding(hf_config).to(dev)(x, torch.arange(t, device=dev)[None].expand(b, -1))
        mask = torch.full((b, 1, t, t), float("-inf"), device=dev, dtype=torch.bfloat16).triu(1)
        out["layer_mla_forward_ms"] = 1e3 * median_s(
            lambda: attn(hidden_states=x, position_embeddings=cos_sin, attention_mask=mask), sync=sync)
        attn.to("meta")
        moe = DeepseekV3MoE(hf_config).to(dev, torch.bfloat16).eval()
        out["layer_moe_forward_ms"] = 1e3 * median_s(lambda: moe(x), sync=sync)
        out["layer_moe_decode_bs8_ms"] = 1e3 * median_s(lambda: moe(x.reshape(-1, 1, lc.hidden_size)[:8]), sync=sync)
    return out


# ---------------------------------------------------------------- main

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "gpu_check.json"))
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: exercise every code path quickly")
    p.add_argument("--budget-s", type=float, default=400.0, help="skip sections once this many s are spent")
    p.add_argument("--parity-rc", type=int, default=None, help="exit status of the GPU parity pytest run")
    p.add_argument("--parity-log", default=None)
    p.add_argument("--skip-hf", action="store_true")
    args = p.parse_args()
    if args.dry_run:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    start = time.perf_counter()
    report: dict = {"dry_run": args.dry_run, "parity": {"rc": args.parity_rc}}
    if args.parity_log and os.path.exists(args.parity_log):
        with open(args.parity_log, encoding="utf-8") as f:
            report["parity"]["summary"] = f.read().strip().splitlines()[-1:]

    def section(name: str, fn, *a) -> None:
        if time.perf_counter() - start > args.budget_s:
            report[name] = {"skipped": "time budget spent"}
            return
        t0 = time.perf_counter()
        try:
            report[name] = fn(*a)
        except Exception as e:  # one failing section must not lose the others' figures
            report[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        report.setdefault("section_s", {})[name] = time.perf_counter() - t0
        print(f"[gpu_check] {name}: {time.perf_counter() - t0:.1f} s", flush=True)

    if not args.skip_hf:
        section("hf", run_isolated, hf_child, args)
    section("device", device_section, args)
    dev = report.get("device", {})
    peak = {"tflops": dev.get("peak_bf16_tflops"), "gbs": dev.get("peak_hbm_gbs")}
    section("fp8", fp8_section, args)
    section("small", jax_small_section, args, peak)
    section("layer", jax_layer_section, args, peak)
    report["ratios"] = ratios(report)
    report["total_s"] = time.perf_counter() - start
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, default=str)
    print(json.dumps(report["ratios"], indent=1))
    print(f"wrote {args.out} ({report['total_s']:.0f} s)")


def ratios(report: dict) -> dict:
    """dsv3-jax / HF speed per row (> 1: dsv3-jax faster), where both sides ran."""
    hf, small, layer = report.get("hf", {}), report.get("small", {}), report.get("layer", {})
    out = {}

    def put(name, ours, theirs, higher_is_better=True):
        if isinstance(ours, (int, float)) and isinstance(theirs, (int, float)) and ours and theirs:
            out[name] = ours / theirs if higher_is_better else theirs / ours

    put("small_forward", small.get("forward_tok_s"), hf.get("small_forward_tok_s"))
    for batch in (1, 8):
        put(f"small_decode_bs{batch}", small.get(f"decode_bs{batch}", {}).get("tok_s"),
            hf.get(f"small_decode_bs{batch}_tok_s"))
    put("small_train", small.get("train", {}).get("tok_s"), hf.get("small_train_tok_s"))
    put("layer_mla_forward", layer.get("mla_forward", {}).get("ms"), hf.get("layer_mla_forward_ms"), False)
    put("layer_moe_forward", layer.get("moe_forward", {}).get("ms"), hf.get("layer_moe_forward_ms"), False)
    put("layer_moe_decode_bs8", layer.get("moe_decode_bs8", {}).get("ms"), hf.get("layer_moe_decode_bs8_ms"), False)
    return out


if __name__ == "__main__":
    main()
