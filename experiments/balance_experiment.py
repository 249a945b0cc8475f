"""Load balancing on a small MoE DeepSeek-V3: auxiliary-loss-free bias vs classic auxiliary loss vs nothing.

Three arms train the same model from the same initialisation on the same byte-tokenised Python-stdlib batches
(same seed, same order), each with the library's own jitted train step (`make_train_step` + `jit_train_step`):

    aux-free  bias_gamma = GAMMA (default 1e-2, see below), balance_alpha = 1e-4   (DeepSeek-V3 recipe, DESIGN §3)
    aux-loss  bias_gamma = 0,                            balance_alpha = 1e-2   (classic auxiliary loss only)
    none      bias_gamma = 0,                            balance_alpha = 0

Run (defaults: the "mini" model -- the tiny_stdlib.toml model shrunk to D=64 with 2 MoE layers of 16 experts top-4
-- 200 steps of 16 x 128 tokens, about 3-5 minutes on 2 cores):

    python experiments/balance_experiment.py
    python experiments/balance_experiment.py --model tiny_stdlib --steps 600         # larger: 3 MoE layers, D=128
    python experiments/balance_experiment.py --gamma 1e-3                            # the report's gamma

Writes to --out (default experiments/results):
    balance_loss.png      next-token CE per arm (raw + moving average; full run and zoomed tail)
    balance_maxvio.png    MaxVio (mean over MoE layers) per arm
    balance_heatmap.png   expert load / mean load: step x expert for one layer, and layer x expert over the last
                          20 steps, for each arm
    balance_summary.json, balance_table.md   the results table (+ per-step curves in balance_curves.json)

Why gamma = 1e-2 by default: gamma is the per-step bias move, in units of the sigmoid affinity score. The report's
1e-3 is tuned for ~10^5 steps; in a 200-step CPU run the bias can move at most 0.2 in total, and the first ~50 steps
are spent just catching up with the router's initial imbalance. 1e-2 lets the bias act within the short run; pass
--gamma 1e-3 to see the report's value (it reduces MaxVio too, more slowly).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import plots

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.api import init_variables, param_counts
from dsv3_jax.text import ByteTokenizer
from dsv3_jax.train import data as data_lib
from dsv3_jax.train.run_config import RunConfig, load_run_config
from dsv3_jax.train.step import TrainConfig, init_state, jit_train_step, make_optimizer, make_train_step

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_STDLIB = os.path.join(HERE, "configs", "tiny_stdlib.toml")
DEFAULT_OUT = os.path.join(HERE, "results")
TAIL = 20  # "final" = mean over the last TAIL steps


# ---------------------------------------------------------------- shared with mtp_experiment.py

def base_run_config() -> RunConfig:
    return load_run_config(TINY_STDLIB)


def model_config(name: str, vocab_size: int, mtp_layers: int) -> ModelConfig:
    """"tiny_stdlib": the model of experiments/configs/tiny_stdlib.toml (D=128, 1 dense + 3 MoE layers, 16 experts
    top-4, 4 groups keep 2); "mini": the same with D=64, F=256/64, 2 heads, 1 dense + 2 MoE layers."""
    model = base_run_config().model.replace(vocab_size=vocab_size, num_nextn_predict_layers=mtp_layers)
    if name == "mini":
        model = model.replace(hidden_size=64, intermediate_size=256, moe_intermediate_size=64, num_hidden_layers=3,
                              num_attention_heads=2)
    elif name != "tiny_stdlib":
        raise SystemExit(f"--model must be 'mini' or 'tiny_stdlib', got {name!r}")
    return model


def train_config(args: argparse.Namespace, **overrides) -> TrainConfig:
    """tiny_stdlib.toml's [train] (lr 3e-3, AdamW, wd 0.1) resized to --steps/--batch/--seq, plus `overrides`."""
    warmup = max(1, min(30, args.steps // 10))
    return dataclasses.replace(base_run_config().train, steps=args.steps, batch_size=args.batch, seq_len=args.seq,
                               warmup_steps=warmup, decay_start=max(warmup, args.steps // 2), decay_end=args.steps,
                               seed=args.seed, **overrides)


def load_tokens(max_bytes: int | None) -> tuple[np.ndarray, int]:
    """The byte-tokenised stdlib stream (as the trainer builds it for tiny_stdlib.toml) and the vocabulary size."""
    tokenizer = ByteTokenizer()
    docs = data_lib.stdlib_corpus(max_bytes)
    return data_lib.tokenize_corpus(docs, tokenizer), tokenizer.vocab_size


def train_arm(name: str, model: ModelConfig, tc: TrainConfig, tokens: np.ndarray, log_every: int = 25) -> dict:
    """Train one arm from seed tc.seed on PackedBatches(tokens, seed tc.seed) with the library's jitted step.

    Returns per-step numpy metrics ("loss", "ce", "balance", "grad_norm", "max_vio" [S, L], "expert_load" [S, L, E]
    when the model has MoE layers), the compile time and the median step time."""
    optimizer = make_optimizer(tc)
    state = init_state(init_variables(model, tc.seed), optimizer)
    step_fn = jit_train_step(make_train_step(model, tc, optimizer))
    batches = data_lib.PackedBatches(tokens, tc.batch_size, tc.seq_len, tc.seed)
    records: list[dict] = []
    times: list[float] = []
    t_start = time.perf_counter()
    compile_s = 0.0
    for step in range(1, tc.steps + 1):
        batch = next(batches)
        t0 = time.perf_counter()
        state, metrics = step_fn(state, batch)
        metrics = jax.device_get(metrics)  # one sync per step: the step time below is the real one
        dt = time.perf_counter() - t0
        if step == 1:
            compile_s = dt
        else:
            times.append(dt)
        if not bool(metrics["finite"]):
            raise SystemExit(f"[{name}] non-finite loss/gradient at step {step}: {metrics['loss']}")
        records.append(metrics)
        if step % log_every == 0 or step == tc.steps:
            vio = float(np.mean(metrics["max_vio"])) if "max_vio" in metrics else float("nan")
            print(f"  [{name}] step {step:4d}  loss {float(metrics['loss']):.4f}  ce {float(metrics['ce']):.4f}  "
                  f"maxvio {vio:.3f}  {statistics.median(times[-log_every:]) if times else dt:.3f} s/step",
                  flush=True)
    out = {key: np.stack([np.asarray(r[key]) for r in records]) for key in records[0]
           if key in ("loss", "ce", "mtp", "balance", "grad_norm", "max_vio", "expert_load")}
    out.update(compile_s=compile_s, step_s=statistics.median(times) if times else float("nan"),
               wall_s=time.perf_counter() - t_start)
    return out


def tail_mean(values: np.ndarray, n: int = TAIL) -> float:
    return float(np.mean(np.asarray(values)[-n:]))


def describe(model: ModelConfig) -> str:
    counts = param_counts(model)
    return (f"D={model.hidden_size}, {model.num_dense_layers} dense + {model.num_moe_layers} MoE layers, "
            f"{model.n_routed_experts} experts top-{model.num_experts_per_tok} ({model.n_group} groups keep "
            f"{model.topk_group}) + {model.n_shared_experts} shared, MTP layers {model.num_nextn_predict_layers}, "
            f"vocab {model.vocab_size}, {counts['total'] / 1e6:.2f}M params "
            f"({counts['active'] / 1e6:.2f}M active, MTP {counts['mtp'] / 1e6:.2f}M)")


def add_common_args(p: argparse.ArgumentParser, steps: int, batch: int, seq: int) -> None:
    p.add_argument("--model", default="mini", choices=("mini", "tiny_stdlib"),
                   help="mini (default, fast) or the tiny_stdlib.toml model (larger)")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--seq", type=int, default=seq)
    p.add_argument("--max-bytes", type=int, default=3_000_000, help="stdlib bytes to tokenise (as tiny_stdlib)")
    p.add_argument("--seed", type=int, default=0, help="init + data-order seed, shared by all arms")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--out", default=DEFAULT_OUT)


def write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)


def rounded(values, digits: int = 5) -> list:
    return np.round(np.asarray(values, np.float64), digits).tolist()


# ---------------------------------------------------------------- the balance experiment

def arms(args: argparse.Namespace) -> dict[str, dict]:
    return {
        "aux-free": {"bias_gamma": args.gamma, "balance_alpha": 1e-4},
        "aux-loss": {"bias_gamma": 0.0, "balance_alpha": args.aux_alpha},
        "none": {"bias_gamma": 0.0, "balance_alpha": 0.0},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, steps=200, batch=16, seq=128)
    p.add_argument("--gamma", type=float, default=1e-2, help="bias update speed of the aux-free arm")
    p.add_argument("--aux-alpha", type=float, default=1e-2, help="balance-loss weight of the aux-loss arm")
    p.add_argument("--mtp-layers", type=int, default=0, help="MTP modules (0: MoE stack only, cleaner MaxVio)")
    p.add_argument("--arms", default="aux-free,aux-loss,none", help="comma subset of aux-free, aux-loss, none")
    p.add_argument("--heatmap-layer", type=int, default=-1, help="MoE layer for the step x expert heatmap")
    args = p.parse_args()

    tokens, vocab = load_tokens(args.max_bytes)
    model = model_config(args.model, vocab, args.mtp_layers)
    print(f"model {args.model}: {describe(model)}")
    print(f"data: {tokens.size:,} byte tokens; {args.steps} steps x {args.batch} x {args.seq}; seed {args.seed}; "
          f"jax {jax.__version__} on {jax.default_backend()}")
    results: dict[str, dict] = {}
    settings = {k: v for k, v in arms(args).items() if k in args.arms.split(",")}
    if not settings:
        raise SystemExit(f"--arms {args.arms!r}: pick from aux-free, aux-loss, none")
    for name, overrides in settings.items():
        tc = train_config(args, **overrides)
        print(f"arm {name}: bias_gamma={tc.bias_gamma:g} balance_alpha={tc.balance_alpha:g} lr={tc.lr:g} "
              f"(warmup {tc.warmup_steps}, cosine {tc.decay_start}->{tc.decay_end})", flush=True)
        results[name] = train_arm(name, model, tc, tokens, args.log_every)

    # ---- table
    headers = ["arm", "bias_gamma", "balance_alpha", f"loss (last {TAIL})", f"CE (last {TAIL})",
               f"MaxVio (last {TAIL})", "MaxVio (last step)", "MaxVio (step 1)", "s/step", "compile s"]
    rows, summary = [], {}
    for name, r in results.items():
        vio = r["max_vio"].mean(axis=1)  # mean over MoE layers, per step
        row = {"bias_gamma": settings[name]["bias_gamma"], "balance_alpha": settings[name]["balance_alpha"],
               "final_loss": tail_mean(r["loss"]), "final_ce": tail_mean(r["ce"]), "final_maxvio": tail_mean(vio),
               "last_maxvio": float(vio[-1]), "first_maxvio": float(vio[0]),
               "final_maxvio_per_layer": rounded(r["max_vio"][-TAIL:].mean(axis=0), 4),
               "step_s": r["step_s"], "compile_s": r["compile_s"], "wall_s": r["wall_s"]}
        summary[name] = row
        rows.append([name, f"{row['bias_gamma']:g}", f"{row['balance_alpha']:g}", row["final_loss"], row["final_ce"],
                     row["final_maxvio"], row["last_maxvio"], row["first_maxvio"], f"{row['step_s']:.3f}",
                     f"{row['compile_s']:.1f}"])
    table = plots.markdown_table(headers, rows)
    setup = (f"model {args.model}: {describe(model)}; {args.steps} steps x {args.batch} x {args.seq} tokens; "
             f"seed {args.seed}. MaxVio = mean over MoE layers of (max load - mean)/mean per step; loss includes "
             f"alpha x balance term, CE does not.")
    print("\n" + setup + "\n" + table)

    # ---- plots
    os.makedirs(args.out, exist_ok=True)
    window = max(1, args.steps // 20)
    paths = [
        plots.curves_with_zoom({k: r["ce"] for k, r in results.items()}, os.path.join(args.out, "balance_loss.png"),
                               title="Next-token CE by balancing method", ylabel="CE (nats/byte)", window=window),
        plots.curves({k: r["max_vio"].mean(axis=1) for k, r in results.items()},
                     os.path.join(args.out, "balance_maxvio.png"), title="MaxVio (mean over MoE layers)",
                     ylabel="MaxVio", window=window),
    ]
    layer = args.heatmap_layer % model.num_moe_layers
    panels, ylabels, xlabels = {}, {}, {}
    for name, r in results.items():
        rel = r["expert_load"] / np.maximum(r["expert_load"].mean(axis=-1, keepdims=True), 1e-9)  # [S, L, E]
        panels[f"{name}: MoE layer {layer}, per step"] = rel[:, layer, :].T
        ylabels[f"{name}: MoE layer {layer}, per step"] = "expert"
        xlabels[f"{name}: MoE layer {layer}, per step"] = "step"
    for name, r in results.items():
        rel = r["expert_load"] / np.maximum(r["expert_load"].mean(axis=-1, keepdims=True), 1e-9)
        panels[f"{name}: last {TAIL} steps"] = rel[-TAIL:, : model.num_moe_layers].mean(axis=0)
        ylabels[f"{name}: last {TAIL} steps"] = "MoE layer"
        xlabels[f"{name}: last {TAIL} steps"] = "expert"
    # rows 1: expert x step for one layer; row 2: layer x expert. Colour = load / mean load (1 = balanced).
    step_panels = {k: v for k, v in panels.items() if "per step" in k}
    layer_panels = {k: v for k, v in panels.items() if "per step" not in k}
    vmax = float(min(4.0, max(np.max(v) for v in panels.values())))
    paths.append(plots.heatmaps({**step_panels, **layer_panels}, os.path.join(args.out, "balance_heatmap.png"),
                                suptitle="Expert load / mean load (1 = balanced); top: expert x step, bottom: layer "
                                         "x expert", xlabel="expert", ylabel="expert", ncols=len(results),
                                cbar_label=f"load / mean (clipped at {vmax:.1f})", vmax=vmax, ylabels=ylabels,
                                xlabels=xlabels, xstarts={k: 1 for k in step_panels}))
    write_json(os.path.join(args.out, "balance_summary.json"),
               {"setup": setup, "args": vars(args), "model": dataclasses.asdict(model), "arms": summary})
    write_json(os.path.join(args.out, "balance_curves.json"),
               {k: {"loss": rounded(r["loss"]), "ce": rounded(r["ce"]), "max_vio_mean": rounded(r["max_vio"].mean(1))}
                for k, r in results.items()})
    with open(os.path.join(args.out, "balance_table.md"), "w", encoding="utf-8") as f:
        f.write(setup + "\n\n" + table + "\n")
    print("\nwrote " + ", ".join(paths) + " and balance_{summary,curves}.json, balance_table.md")


if __name__ == "__main__":
    main()
