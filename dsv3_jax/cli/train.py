"""`dsv3 train --config RUN.toml`: train (or resume) from a run file, then sample from the trained model."""

from __future__ import annotations

import argparse
import dataclasses
import os


def cmd_train(args: argparse.Namespace) -> int:
    """Train (or resume) from a TOML run file, then sample from the trained model."""
    from dsv3_jax.infer.generate import generate
    from dsv3_jax.parallel.api import mesh_train_step
    from dsv3_jax.parallel.distributed import initialize
    from dsv3_jax.train.loop import train
    from dsv3_jax.train.run_config import load_run_config

    initialize()  # multi-host when DSV3_COORDINATOR / DSV3_NUM_PROCESSES / DSV3_PROCESS_ID are set
    rc = load_run_config(args.config, steps=args.steps)
    if args.mesh:
        rc = dataclasses.replace(rc, run=dataclasses.replace(rc.run, mesh=args.mesh))
    out_dir = args.out or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    result = train(rc, out_dir, sharded_step=mesh_train_step)
    rc, tokenizer = result["config"], result["tokenizer"]
    print(f"trained to step {rc.train.steps}: final loss {result['final_loss']:.4f}; run directory {out_dir}")
    if rc.run.sample_tokens > 0:
        variables = {"params": result["state"].params, "router": result["state"].router}
        prompt = [tokenizer.bos_id, *tokenizer.encode(rc.run.sample_prompt)]
        ids = generate(rc.model, variables, prompt, rc.run.sample_tokens, rc.run.sample_temperature,
                       seed=rc.train.seed, stop_ids=(tokenizer.eos_id,)).tokens[0]
        print(f"--- sample (temperature {rc.run.sample_temperature}) ---")
        print(rc.run.sample_prompt + tokenizer.decode(ids))
    return 0


def register(sub) -> None:
    train = sub.add_parser("train", help="train on a run config (TOML), resuming from --out if it has checkpoints")
    train.add_argument("--config", required=True, help="run file, e.g. experiments/configs/tiny_stdlib.toml")
    train.add_argument("--steps", type=int, default=None, help="override [train] steps")
    train.add_argument("--out", default=None, help="run directory (default runs/<config name>)")
    train.add_argument("--mesh", default=None, help="sharding layout name (sharding/rules.py), e.g. cpu-8")
    train.set_defaults(func=cmd_train)
