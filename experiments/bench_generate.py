"""CPU generation benchmark: dsv3-jax's latent-cache decoding vs HF transformers `generate` on the same weights.

Run (defaults take a few minutes on 2 idle cores):

    python experiments/bench_generate.py
    python experiments/bench_generate.py --preset small --prompt-len 64 --new-tokens 64 --batches 1,8 --cores 1

Prints, for each batch size: prefill latency (ms) and decode tokens/s of HF `generate(do_sample=False)` (torch,
float32, HF's own cache) and of `dsv3_jax.infer.generate` (greedy, stop tokens off, compiled once — compile time shown
apart), their ratio (> 1 = dsv3-jax faster), whether the tokens agree, and the cache bytes per token per layer
of the latent MLA cache against a naive per-head key/value cache, peak RSS per side and the load average. Each
framework runs in its own process; unpinned (all cores) unless --cores. Both processes stay alive and their
prefill and generate calls run in turn, round after round (`interleave.py`): this machine's speed drifts by up
to 2x within minutes, and timing one framework after the other put that drift into the ratios. Writes
--out/bench_generate[_coresN][_burstN].json and .png (`--burst N`: each sample the median of N - 1 calls after a
first, back to back).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from interleave import add_burst_argument, output_tag, run_interleaved  # experiments/, also imported elsewhere


def pin_cores(cores: int | None) -> None:
    if cores:
        os.sched_setaffinity(0, set(range(cores)))


def prompts(vocab: int, batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(3, vocab, (batch, length)).astype(np.int64)


def build_checkpoint(preset: str, directory: str) -> None:
    """A random HF DeepseekV3ForCausalLM of the preset (weights ×3 so greedy decoding is not degenerate)."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    import dsv3_jax as d

    config = d.ModelConfig.from_preset(preset)
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**config.to_hf_config())).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(3.0)
    model.save_pretrained(directory)


def hf_setup(args, directory: str, batch: int):
    """HF `generate` on the checkpoint: steps "prefill" (one forward filling the cache) and "generate" (the whole
    greedy run), for `interleave.run_interleaved`; finish → tokens and peak RSS."""
    pin_cores(args.cores)
    import torch
    from transformers import DeepseekV3ForCausalLM

    torch.set_num_threads(args.cores or os.cpu_count())
    model = DeepseekV3ForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    ids = torch.from_numpy(prompts(model.config.vocab_size, batch, args.prompt_len))
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0, min_new_tokens=args.new_tokens)

    no_grad = torch.no_grad()  # torch's context manager, also a decorator
    no_grad(lambda: model.generate(ids, max_new_tokens=2, **kwargs))()  # warm-up
    full = no_grad(lambda: model.generate(ids, max_new_tokens=args.new_tokens, **kwargs))
    tokens = full()[:, args.prompt_len:].numpy()
    steps = {"prefill": no_grad(lambda: model(ids, use_cache=True)), "generate": full}
    return steps, lambda: {"tokens": tokens, "rss_mib": peak_rss_mib()}


def jax_setup(args, directory: str, batch: int):
    """`dsv3_jax.infer.generate` (greedy, stop tokens off) on the same checkpoint: steps "prefill" (prompt + first
    token) and "generate"; compile time measured here; finish → tokens, cache sizes, compile s, peak RSS."""
    pin_cores(args.cores)
    import jax

    import dsv3_jax as d
    from dsv3_jax.infer.generate import generate

    config, variables = d.load_pretrained(directory)
    ids = prompts(config.vocab_size, batch, args.prompt_len)
    start = time.perf_counter()
    tokens = np.asarray(generate(config, variables, ids, args.new_tokens, stop_ids=()).tokens)
    compile_s = time.perf_counter() - start
    one = time.perf_counter()
    generate(config, variables, ids, 1, stop_ids=())  # prefill + first token (compiles once more)
    compile_s += time.perf_counter() - one
    cache = jax.eval_shape(lambda: d.Transformer(config, 64).init(
        jax.random.key(0), np.zeros((1, 1), np.int32), np.zeros((1, 1), np.int32)))["cache"]
    per_layer = sum(np.prod(x.shape[-1:]) for x in jax.tree_util.tree_leaves(cache["dense_layers"]))
    naive = config.num_attention_heads * (config.qk_head_dim + config.v_head_dim)
    steps = {"prefill": lambda: generate(config, variables, ids, 1, stop_ids=()),
             "generate": lambda: generate(config, variables, ids, args.new_tokens, stop_ids=())}
    return steps, lambda: {"compile_s": compile_s, "tokens": tokens, "cache_values": int(per_layer),
                           "naive_values": int(naive), "rss_mib": peak_rss_mib()}


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_pair(args, directory: str, batch: int) -> tuple[dict, dict]:
    """Both sides alive, their steps timed in turn (`interleave.py`): (hf, jax) with prefill ms and decode tok/s
    (the whole run less the prefill, over the tokens after the first)."""
    res = run_interleaved({"hf": (hf_setup, (args, directory, batch)), "jax": (jax_setup, (args, directory, batch))},
                          warmup=1, repeats=args.repeats, budget_s=args.budget_s, burst=args.burst)
    out = []
    for name in ("hf", "jax"):
        r = res[name]
        steps = r.pop("steps")
        prefill, total = steps["prefill"]["median_s"], steps["generate"]["median_s"]
        r.update(prefill_ms=1e3 * prefill, generate_ms=1e3 * total,
                 decode_tok_s=batch * (args.new_tokens - 1) / max(total - prefill, 1e-9))
        out.append(r)
    return out[0], out[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of timed steps (median)")
    parser.add_argument("--budget-s", type=float, default=20.0, help="a step leaves the rounds after 3 runs and this")
    parser.add_argument("--cores", type=int, default=None, help="pin each process to this many cores")
    add_burst_argument(parser)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
                        help="writes bench_generate[_coresN][_burstN].json and .png here")
    args = parser.parse_args()
    results: dict[int, dict] = {}
    with tempfile.TemporaryDirectory() as directory:
        build_checkpoint(args.preset, directory)
        print(f"preset {args.preset}, prompt {args.prompt_len}, new tokens {args.new_tokens}, float32, greedy; "
              f"cores {args.cores or os.cpu_count()}" + (f"; {args.burst} calls back to back per sample"
                                                         if args.burst > 1 else ""))
        print(f"{'batch':>5} | {'HF prefill ms':>13} {'HF tok/s':>9} | {'dsv3 prefill ms':>15} {'dsv3 tok/s':>10} "
              f"{'compile s':>9} | {'decode ratio':>12} {'prefill ratio':>13} | tokens equal | RSS MiB HF/dsv3")
        for batch in [int(b) for b in args.batches.split(",")]:
            hf, jx = run_pair(args, directory, batch)
            print(f"{batch:>5} | {hf['prefill_ms']:>13.1f} {hf['decode_tok_s']:>9.1f} | {jx['prefill_ms']:>15.1f} "
                  f"{jx['decode_tok_s']:>10.1f} {jx['compile_s']:>9.1f} | "
                  f"{jx['decode_tok_s'] / hf['decode_tok_s']:>11.2f}x {hf['prefill_ms'] / jx['prefill_ms']:>12.2f}x"
                  f" | {np.array_equal(hf['tokens'], jx['tokens'])} | {hf['rss_mib']:.0f}/{jx['rss_mib']:.0f}",
                  flush=True)
            results[batch] = {"hf": hf, "jax": jx, "load1": os.getloadavg()[0],
                              "tokens_equal": bool(np.array_equal(hf["tokens"], jx["tokens"]))}
        c, n = jx["cache_values"], jx["naive_values"]
        print(f"cache per token per layer: latent {c} values vs naive per-head {n} ({n / c:.1f}x smaller); "
              f"671B: 576 vs 40,960 (71.1x)")
    load = os.getloadavg()
    print(f"load average {load[0]:.1f}/{load[1]:.1f} (1/5 min) on {os.cpu_count()} cores")
    write_results(args, results, load)


def write_results(args, results: dict[int, dict], load) -> None:
    """bench_generate[_coresN][_burstN].json (every figure but the tokens) and .png (prefill ms, decode tok/s)."""
    import plots  # matplotlib: only in the process that writes

    os.makedirs(args.out, exist_ok=True)
    tag = output_tag(args.cores, args.burst)
    groups = {}
    for batch, r in results.items():
        groups[f"prefill ms bs{batch}"] = {"HF": r["hf"]["prefill_ms"], "dsv3-jax": r["jax"]["prefill_ms"]}
        groups[f"decode tok/s bs{batch}"] = {"HF": r["hf"]["decode_tok_s"], "dsv3-jax": r["jax"]["decode_tok_s"]}
    png = plots.bars(groups, os.path.join(args.out, f"bench_generate{tag}.png"), ylabel="ms | tokens/s",
                     title=f"Generation, float32, CPU ({args.cores or os.cpu_count()} cores), load {load[0]:.1f}")
    clean = {b: {side: {k: v for k, v in r[side].items() if k != "tokens"} for side in ("hf", "jax")}
             | {"load1": r["load1"], "tokens_equal": r["tokens_equal"]} for b, r in results.items()}
    with open(os.path.join(args.out, f"bench_generate{tag}.json"), "w", encoding="utf-8") as f:
        json.dump({"args": vars(args), "load_avg": load, "cores": os.cpu_count(), "results": clean}, f, indent=1)
    print(f"wrote {png} and bench_generate{tag}.json")


if __name__ == "__main__":
    main()
