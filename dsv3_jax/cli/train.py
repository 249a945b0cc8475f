"""`dsv3 train --config RUN.toml`: train (or resume) from a run file, then sample from the trained model."""

from __future__ import annotations

import argparse
import dataclasses
import os


def _check_mesh(name: str) -> None:
    """The layout exists and fits the devices (its divisibility by the model is checked with the step)."""
    from dsv3_jax.parallel import get_layout, make_mesh

    make_mesh(get_layout(name))


def sample(rc, variables, tokenizer) -> str:
    """A sample of rc.run.sample_tokens after rc.run.sample_prompt, below the tokenizer's vocabulary (the model's
    is padded), shortened to fit max_position_embeddings."""
    from dsv3_jax.infer.generate import generate

    prompt = [tokenizer.bos_id, *tokenizer.encode(rc.run.sample_prompt)]
    room = rc.model.max_position_embeddings - len(prompt)
    if room <= 0:
        return f"(no sample: the prompt takes {len(prompt)} of {rc.model.max_position_embeddings} positions)"
    ids = generate(rc.model, variables, prompt, min(rc.run.sample_tokens, room), rc.run.sample_temperature,
                   seed=rc.train.seed, stop_ids=(tokenizer.eos_id,), vocab_limit=tokenizer.vocab_size).tokens[0]
    return rc.run.sample_prompt + tokenizer.decode(ids)


def cmd_train(args: argparse.Namespace) -> int:
    """Train (or resume) from a TOML run file, then sample from the trained model."""
    from dsv3_jax.errors import ConfigError
    from dsv3_jax.parallel.api import mesh_train_step
    from dsv3_jax.parallel.distributed import initialize
    from dsv3_jax.train.loop import train
    from dsv3_jax.train.run_config import check_run_config, load_run_config

    rc = load_run_config(args.config, steps=args.steps)
    if args.mesh:
        rc = dataclasses.replace(rc, run=dataclasses.replace(rc.run, mesh=args.mesh))
        check_run_config(rc)
    try:
        initialize()  # multi-host when DSV3_COORDINATOR / DSV3_NUM_PROCESSES / DSV3_PROCESS_ID are set
    except ValueError as e:
        raise ConfigError(f"multi-host set-up (DSV3_COORDINATOR, DSV3_NUM_PROCESSES, DSV3_PROCESS_ID): {e}") from None
    if rc.run.mesh:
        _check_mesh(rc.run.mesh)
    out_dir = args.out or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    result = train(rc, out_dir, sharded_step=mesh_train_step)
    rc, tokenizer = result["config"], result["tokenizer"]
    print(f"trained to step {rc.train.steps}: final loss {result['final_loss']:.4f}; run directory {out_dir}")
    if rc.run.sample_tokens > 0:
        variables = {"params": result["state"].params, "router": result["state"].router}
        text = sample(rc, variables, tokenizer)
        print(f"--- sample (temperature {rc.run.sample_temperature}) ---")
        print(text)
    return 0


def _steps(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def register(sub) -> None:
    train = sub.add_parser("train", help="train on a run config (TOML), resuming from --out if it has checkpoints")
    train.add_argument("--config", required=True, help="run file, e.g. experiments/configs/tiny_stdlib.toml")
    train.add_argument("--steps", type=_steps, default=None, help="override [train] steps")
    train.add_argument("--out", default=None, help="run directory (default runs/<config name>)")
    train.add_argument("--mesh", default=None, help="sharding layout name (sharding/layouts.toml), e.g. cpu-8")
    train.set_defaults(func=cmd_train)
