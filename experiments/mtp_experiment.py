"""Multi-token prediction on a small DeepSeek-V3: does the MTP module (D = 1, lambda 0.3) change next-token CE?

Two arms train the same main model from the same initialisation (flax derives each module's init from its path,
so the main-model parameters are identical with or without the MTP module) on the same byte-tokenised stdlib
batches in the same order, with the library's jitted train step:

    mtp-on   num_nextn_predict_layers = 1, mtp_lambda = 0.3    loss = CE + 0.3 * MTP-CE + alpha * balance
    mtp-off  num_nextn_predict_layers = 0                      loss = CE + alpha * balance

and compares the main next-token CE (metric "ce"), not the total loss. Balancing is tiny_stdlib.toml's
(bias_gamma 1e-3, balance_alpha 1e-4) in both arms. Within the first epoch every batch is unseen data, so the
training CE here is also a held-out CE.

Run (defaults: "mini" model, 250 steps of 16 x 128 tokens, about 3-4 minutes on 2 cores):

    python experiments/mtp_experiment.py
    python experiments/mtp_experiment.py --model tiny_stdlib --steps 600      # larger

Writes to --out (default experiments/results): mtp_ce.png (main CE of both arms, full + zoomed tail),
mtp_losses.png (mtp-on arm: main CE vs the depth-1 MTP CE), mtp_summary.json, mtp_table.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import plots
from balance_experiment import (
    TAIL,
    add_common_args,
    describe,
    load_tokens,
    model_config,
    rounded,
    tail_mean,
    train_arm,
    train_config,
    write_json,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, steps=250, batch=16, seq=128)
    p.add_argument("--mtp-lambda", type=float, default=0.3)
    args = p.parse_args()

    tokens, vocab = load_tokens(args.max_bytes)
    arms = {"mtp-on": (1, args.mtp_lambda), "mtp-off": (0, 0.0)}
    print(f"data: {tokens.size:,} byte tokens; {args.steps} steps x {args.batch} x {args.seq}; seed {args.seed}; "
          f"jax {jax.__version__} on {jax.default_backend()}")
    results, models = {}, {}
    for name, (layers, lam) in arms.items():
        model = model_config(args.model, vocab, layers)
        tc = train_config(args, mtp_lambda=lam)
        models[name] = model
        print(f"arm {name}: {describe(model)}; mtp_lambda={lam:g} bias_gamma={tc.bias_gamma:g} "
              f"balance_alpha={tc.balance_alpha:g} lr={tc.lr:g}", flush=True)
        results[name] = train_arm(name, model, tc, tokens, args.log_every)

    headers = ["arm", "MTP layers", "lambda", f"main CE (last {TAIL})", f"MTP-1 CE (last {TAIL})",
               f"total loss (last {TAIL})", "CE min (MA-20)", "s/step", "compile s"]
    rows, summary = [], {}
    for name, r in results.items():
        layers, lam = arms[name]
        mtp = tail_mean(r["mtp"][:, 0]) if r["mtp"].shape[-1] else float("nan")
        row = {"mtp_layers": layers, "mtp_lambda": lam, "final_ce": tail_mean(r["ce"]), "final_mtp_ce": mtp,
               "final_loss": tail_mean(r["loss"]), "min_ce_ma": float(np.min(plots.smooth(r["ce"], TAIL)[TAIL:])),
               "step_s": r["step_s"], "compile_s": r["compile_s"], "wall_s": r["wall_s"]}
        summary[name] = row
        rows.append([name, layers, f"{lam:g}", row["final_ce"], "-" if np.isnan(mtp) else mtp, row["final_loss"],
                     row["min_ce_ma"], f"{row['step_s']:.3f}", f"{row['compile_s']:.1f}"])
    on, off = summary["mtp-on"]["final_ce"], summary["mtp-off"]["final_ce"]
    # Noise scale: std of the per-step CE difference over the tail (same batches in both arms).
    diff = results["mtp-on"]["ce"][-TAIL:] - results["mtp-off"]["ce"][-TAIL:]
    table = plots.markdown_table(headers, rows)
    setup = (f"model {args.model} ({describe(models['mtp-off'])}); {args.steps} steps x {args.batch} x {args.seq} "
             f"tokens, same batches/init in both arms; seed {args.seed}.")
    verdict = (f"main CE on - off = {on - off:+.4f} nats/byte (per-step paired diff over last {TAIL}: mean "
               f"{diff.mean():+.4f}, std {diff.std():.4f})")
    print("\n" + setup + "\n" + table + "\n" + verdict)

    os.makedirs(args.out, exist_ok=True)
    window = max(1, args.steps // 20)
    paths = [
        plots.curves_with_zoom({k: r["ce"] for k, r in results.items()}, os.path.join(args.out, "mtp_ce.png"),
                               title="Main next-token CE, MTP on vs off", ylabel="CE (nats/byte)", window=window),
        plots.curves({"main CE (next token)": results["mtp-on"]["ce"],
                      "MTP depth-1 CE (token after next)": results["mtp-on"]["mtp"][:, 0]},
                     os.path.join(args.out, "mtp_losses.png"), title="mtp-on arm: main vs MTP loss",
                     ylabel="CE (nats/byte)", window=window),
    ]
    write_json(os.path.join(args.out, "mtp_summary.json"),
               {"setup": setup, "verdict": verdict, "args": vars(args),
                "model": dataclasses.asdict(models["mtp-on"]), "arms": summary,
                "curves": {k: {"ce": rounded(r["ce"])} for k, r in results.items()}})
    with open(os.path.join(args.out, "mtp_table.md"), "w", encoding="utf-8") as f:
        f.write(setup + "\n\n" + table + "\n\n" + verdict + "\n")
    print("\nwrote " + ", ".join(paths) + " and mtp_summary.json, mtp_table.md")


if __name__ == "__main__":
    main()
