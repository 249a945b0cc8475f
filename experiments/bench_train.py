"""CPU training-throughput benchmark: dsv3-jax's jitted train step vs a plain PyTorch AdamW loop over HF transformers'
DeepseekV3ForCausalLM, same model config, same batch, float32.

Run (defaults: the "small" preset at 4 x 256 and the tiny_stdlib.toml model at 16 x 128; about 4-5 minutes on
2 idle cores, most of it XLA compilation):

    python experiments/bench_train.py
    python experiments/bench_train.py --cases small:4x256 --repeats 10          # one case, more timed steps
    python experiments/bench_train.py --cases small:8x512,tiny_stdlib:32x256    # larger batches
    python experiments/bench_train.py --cores 1     # every process pinned to 1 core (1 torch thread): on a machine
                                                    # shared with other jobs, torch with 2 threads stalls badly
    python experiments/bench_train.py --burst 3     # each sample: 3 steps back to back, median of the last 2

For each case (model, batch x seq) three variants run, each in its own spawned process (torch and XLA never share
a process or its thread pools; peak RSS is per variant). Each sets itself up alone (compile, first step), then the
variants step in turn, one timed step each per round (`interleave.py`): this machine's speed drifts by up to 2x
within minutes, and timing one framework after the other put that drift into their ratio. `--sequential` times
each variant alone, one after another, as before:

    jax (MTP off)  dsv3-jax `jit_train_step(make_train_step(...))` with num_nextn_predict_layers = 0: next-token CE +
                   sequence-wise balance loss (alpha 1e-4), clip 1.0, AdamW, aux-loss-free bias update -- the
                   apples-to-apples row (HF has no MTP module)
    jax (MTP on)   the same with the config's MTP module (1 layer, lambda 0.3)
    torch          HF DeepseekV3ForCausalLM (config = `ModelConfig.to_hf_config()`, float32, train mode, HF's default
                   attention/experts implementations), loss = model(input_ids, labels=..., shift_labels=targets) (HF's
                   own causal-LM loss on the same next tokens), backward, clip_grad_norm_(1.0), torch.optim.AdamW
                   (same lr/betas/eps/wd), torch.set_num_threads(os.cpu_count())

Both sides see the same int32 batch (random tokens from a fixed seed) every step. Reported per variant: tokens/s
per optimizer step (batch*seq / median step time after --warmup steps, median of --repeats), median/min ms,
compile time (jax: `.lower().compile()` alone, not counted in the step times; torch: first step, eager), XLA
temp bytes, peak RSS of the process, and the jax/torch throughput ratio (> 1 = dsv3-jax faster).

Writes --out/bench_train[_coresN][_burstN].json, .md and .png (tokens/s per case and variant; with --burst N each
timed sample is the median of N - 1 steps after a first, back to back).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from interleave import add_burst_argument, output_tag, run_interleaved  # noqa: E402  (experiments/)

MiB = 1024 * 1024
VARIANTS = ("jax (MTP off)", "jax (MTP on)", "torch")


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_for(name: str, mtp_layers: int):
    """"small": the library preset (vocab 4096, D 256, 1 dense + 5 MoE layers); "tiny_stdlib": the run file's model
    with the byte tokenizer's vocabulary (259). Both with their stacks unrolled (`scan_unroll = 0`, as the run
    file sets it: the CPU training setting the README gives)."""
    from dsv3_jax import ModelConfig
    from dsv3_jax.train.run_config import load_run_config

    if name == "tiny_stdlib":
        model = load_run_config(os.path.join(HERE, "configs", "tiny_stdlib.toml")).model.replace(vocab_size=259)
    else:
        model = ModelConfig.from_preset(name)
    return model.replace(num_nextn_predict_layers=mtp_layers, dtype="float32", param_dtype="float32", scan_unroll=0)


def train_config(case: dict):
    """tiny_stdlib.toml's [train] settings at the case's batch shape (lr is past warm-up: a real update)."""
    from dsv3_jax.train.run_config import load_run_config

    base = load_run_config(os.path.join(HERE, "configs", "tiny_stdlib.toml")).train
    return dataclasses.replace(base, batch_size=case["batch"], seq_len=case["seq"], warmup_steps=1, decay_start=1000,
                               steps=1000)


def make_batch(vocab: int, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    window = np.random.RandomState(seed).randint(3, vocab, (batch, seq + 1)).astype(np.int32)
    return {"inputs": window[:, :-1], "targets": window[:, 1:]}


# ---------------------------------------------------------------- children

def pin_cores(cores: int) -> int:
    """Restrict this process to its first `cores` usable CPUs (0: all) before torch/jax start; the count."""
    usable = sorted(os.sched_getaffinity(0))
    if cores:
        os.sched_setaffinity(0, usable[:cores])
    return len(os.sched_getaffinity(0))


def jax_setup(case: dict, mtp_layers: int, args: argparse.Namespace):
    """(step, finish) of dsv3-jax's jitted train step (see `interleave`); compile time and first step included."""
    pin_cores(args.cores)
    import jax

    from dsv3_jax.model.api import init_variables, param_counts
    from dsv3_jax.train.step import init_state, jit_train_step, make_optimizer, make_train_step

    model = model_for(case["model"], mtp_layers)
    tc = train_config(case)
    optimizer = make_optimizer(tc)  # as `dsv3 train`: Adam moments per parameter
    state = init_state(init_variables(model, args.seed), optimizer)
    batch = jax.device_put(make_batch(model.vocab_size, case["batch"], case["seq"], args.seed))
    step_fn = jit_train_step(make_train_step(model, tc, optimizer))
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    holder = {"state": state}
    losses = []

    def step():
        holder["state"], metrics = compiled(holder["state"], batch)
        losses.append(float(jax.block_until_ready(metrics["loss"])))

    t0 = time.perf_counter()
    step()
    first_s = time.perf_counter() - t0
    counts = param_counts(model)
    return {"train": step}, lambda: {
        "compile_s": compile_s, "first_s": first_s, "rss": peak_rss_mib(), "temp_mib": mem.temp_size_in_bytes / MiB,
        "impl": model.moe_impl, "params": counts["total"] + counts["mtp"], "loss_first": losses[0],
        "loss_last": losses[-1], "threads": len(os.sched_getaffinity(0))}


def torch_setup(case: dict, args: argparse.Namespace):
    """(step, finish) of HF DeepseekV3ForCausalLM's eager train step with torch AdamW (see `interleave`)."""
    cores = pin_cores(args.cores)
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.set_num_threads(args.torch_threads or (cores if args.cores else os.cpu_count()))
    model_cfg = model_for(case["model"], 0)
    tc = train_config(case)
    hf_config = DeepseekV3Config(**model_cfg.to_hf_config())
    torch.manual_seed(args.seed)
    model = DeepseekV3ForCausalLM(hf_config).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(tc.b1, tc.b2), eps=tc.eps,
                            weight_decay=tc.weight_decay)
    batch = make_batch(model_cfg.vocab_size, case["batch"], case["seq"], args.seed)
    inputs = torch.from_numpy(np.ascontiguousarray(batch["inputs"], np.int64))
    targets = torch.from_numpy(np.ascontiguousarray(batch["targets"], np.int64))
    losses = []

    def step():
        opt.zero_grad(set_to_none=True)
        # HF's own causal-LM loss; shift_labels = the next tokens (inputs shifted by one), as the jax side's targets.
        loss = model(input_ids=inputs, labels=inputs, shift_labels=targets, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_norm)
        opt.step()
        losses.append(float(loss.detach()))

    t0 = time.perf_counter()
    step()
    first_s = time.perf_counter() - t0
    return {"train": step}, lambda: {
        "compile_s": 0.0, "first_s": first_s, "rss": peak_rss_mib(), "temp_mib": float("nan"),
        "params": sum(p.numel() for p in model.parameters()), "attn": model.config._attn_implementation,
        "experts": getattr(model.config, "_experts_implementation", "?"), "loss_first": losses[0],
        "loss_last": losses[-1], "threads": torch.get_num_threads(), "torch": torch.__version__}


# ---------------------------------------------------------------- main

def parse_cases(spec: str) -> list[dict]:
    cases = []
    for item in spec.split(","):
        name, _, shape = item.partition(":")
        b, _, t = shape.partition("x")
        cases.append({"model": name, "batch": int(b), "seq": int(t), "label": f"{name} {b}x{t}"})
    return cases


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", default="small:4x256,tiny_stdlib:16x128",
                   help="comma list of MODEL:BATCHxSEQ, MODEL = a preset name or tiny_stdlib")
    p.add_argument("--variants", default=",".join(VARIANTS), help="subset of: " + ", ".join(VARIANTS))
    p.add_argument("--warmup", type=int, default=2, help="untimed steps (incl. the first) before timing")
    p.add_argument("--repeats", type=int, default=8, help="timed optimizer steps per variant (median)")
    p.add_argument("--budget-s", type=float, default=20.0, help="stop timing after this many s per variant (>= 3)")
    p.add_argument("--sequential", action="store_true",
                   help="time each variant alone, one after another (default: a case's variants in turn)")
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch threads (default 0: os.cpu_count(), or --cores when given)")
    p.add_argument("--cores", type=int, default=0,
                   help="pin every child process to this many cores (0: all); outputs get a _coresN suffix")
    add_burst_argument(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args()
    args.warmup = max(args.warmup, 1)
    variants = [v.strip() for v in args.variants.split(",")]
    import plots

    t_start = time.perf_counter()
    results: dict[str, dict[str, dict]] = {}
    for case in parse_cases(args.cases):
        jobs = {v: (torch_setup, (case, args)) if v == "torch" else (jax_setup, (case, 1 if "on" in v else 0, args))
                for v in variants}
        print(f"... {case['label']}: {', '.join(variants)}" + (" (one after another)" if args.sequential else
                                                              " (set up one by one, then timed in turn)"), flush=True)
        groups = [{v: job} for v, job in jobs.items()] if args.sequential else [jobs]
        row = results.setdefault(case["label"], {})
        for group in groups:
            for variant, r in run_interleaved(group, args.warmup - 1, args.repeats, args.budget_s,
                                              burst=args.burst).items():
                stats = r.pop("steps")["train"]
                row[variant] = {**r, **stats, "load1_after": os.getloadavg()[0]}
        for variant, r in row.items():
            r["tokens_per_s"] = case["batch"] * case["seq"] / r["median_s"]
            print(f"    {variant:14s} {r['tokens_per_s']:8.0f} tok/s  median {r['median_s'] * 1e3:.0f} ms  min "
                  f"{r['min_s'] * 1e3:.0f} ms  compile {r['compile_s']:.1f}s  first step {r['first_s']:.1f}s  "
                  f"peak RSS {r['rss']:.0f} MiB  loss {r['loss_first']:.3f}->{r['loss_last']:.3f}", flush=True)

    headers = ["case", "variant", "params", "tokens/s", "ms/step (median)", "ms/step (min)", "jax/torch tok/s",
               "compile s", "first step s", "XLA temp MiB", "peak RSS MiB", "load avg"]
    rows = []
    for label, row in results.items():
        torch_tps = row.get("torch", {}).get("tokens_per_s")
        for variant, r in row.items():
            ratio = f"{r['tokens_per_s'] / torch_tps:.2f}x" if torch_tps and variant != "torch" else "-"
            rows.append([label, variant, f"{r['params'] / 1e6:.2f}M", f"{r['tokens_per_s']:.0f}",
                         f"{r['median_s'] * 1e3:.0f}", f"{r['min_s'] * 1e3:.0f}", ratio,
                         f"{r['compile_s']:.1f}" if variant != "torch" else "- (eager)", f"{r['first_s']:.2f}",
                         "-" if variant == "torch" else f"{r['temp_mib']:.0f}", f"{r['rss']:.0f}",
                         f"{r['load1_after']:.1f}"])
    table = plots.markdown_table(headers, rows)
    torch_info = next((r for row in results.values() for v, r in row.items() if v == "torch"), None) or {}
    load = os.getloadavg()
    pinned = f"children pinned to {args.cores} core(s)" if args.cores else "no pinning"
    pinned += f", {args.burst} steps back to back per sample" if args.burst > 1 else ""
    setup = (f"float32, {os.cpu_count()} cores, {pinned} (torch threads {torch_info.get('threads', '-')}, HF "
             f"attn {torch_info.get('attn', '-')}, experts {torch_info.get('experts', '-')}); "
             f"{args.warmup} warm-up steps, median of <= {args.repeats} timed steps"
             f"{' per variant, one variant after another' if args.sequential else ', the variants stepping in turn'}"
             f"; 'load avg' = 1-min load after each variant ({load[0]:.1f}/{load[1]:.1f} 1/5-min at the end). "
             "On a loaded machine every number is noisy; torch with all cores' threads suffers most (OpenMP "
             "barriers stall when a core is taken).")
    print("\n" + setup + "\n" + table)
    print(f"(total wall time {time.perf_counter() - t_start:.0f} s)")

    os.makedirs(args.out, exist_ok=True)
    tag = output_tag(args.cores, args.burst)
    png = plots.bars({label: {v: r["tokens_per_s"] for v, r in row.items()} for label, row in results.items()},
                     os.path.join(args.out, f"bench_train{tag}.png"),
                     title=f"Training throughput (float32, CPU, {pinned})",
                     ylabel="tokens / s per optimizer step")
    with open(os.path.join(args.out, f"bench_train{tag}.json"), "w", encoding="utf-8") as f:
        json.dump({"setup": setup, "args": vars(args), "results": results}, f, indent=1)
    with open(os.path.join(args.out, f"bench_train{tag}.md"), "w", encoding="utf-8") as f:
        f.write(setup + "\n\n" + table + "\n")
    print(f"wrote {png}, bench_train{tag}.json, bench_train{tag}.md")


if __name__ == "__main__":
    main()
