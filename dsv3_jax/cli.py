"""`dsv3` command line: one subcommand per job; each lives in a small function below."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import time

import numpy as np

SUBCOMMAND_MODULES = ("dsv3_jax.planner_cli", "dsv3_jax.convert.cli")  # modules exposing register(subparsers)
DEMO_TEXT = "DeepSeek-V3 routes every token to 8 of 256 experts and caches a 576-value latent per token."


def _config_from(spec: str):
    import os

    from dsv3_jax.config import PRESETS, ModelConfig

    if spec in PRESETS:
        return ModelConfig.from_preset(spec)
    if os.path.exists(spec):
        return ModelConfig.from_hf_config(spec)
    raise SystemExit(f"error: {spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a config path")


def cmd_info(args: argparse.Namespace) -> int:
    """Print a config's key fields and its parameter counts (from abstract shapes; nothing is allocated)."""
    from dsv3_jax.api import param_counts

    config = _config_from(args.config)
    counts = param_counts(config)
    if args.json:
        print(json.dumps({"config": config.to_hf_config(), "params": counts}, indent=2))
        return 0
    print(f"layers {config.num_hidden_layers} ({config.num_dense_layers} dense + {config.num_moe_layers} MoE), "
          f"hidden {config.hidden_size}, heads {config.num_attention_heads}, experts {config.n_routed_experts} "
          f"top-{config.num_experts_per_tok} ({config.n_group} groups keep {config.topk_group}), "
          f"MTP depth {config.num_nextn_predict_layers}")
    for key, value in counts.items():
        print(f"  {key:>6} parameters: {value:>18,}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Build a preset with random weights, run a forward pass on embedded text, report time and predictions."""
    import jax

    import dsv3_jax as d

    config = d.ModelConfig.from_preset(args.preset)
    print(f"preset {args.preset!r}: {d.param_counts(config)['total']:,} parameters; "
          f"671B preset: {d.param_counts(d.ModelConfig.from_preset('deepseek-v3-671b'))['total']:,}")
    variables = d.init_variables(config, args.seed)
    tokens = np.frombuffer(DEMO_TEXT.encode(), np.uint8).astype(np.int32)[None] % config.vocab_size
    start = time.perf_counter()
    logits, mtp_logits = d.forward_with_mtp(config, variables, tokens)
    jax.block_until_ready(logits)
    compile_s = time.perf_counter() - start
    jax.block_until_ready(d.forward(config, variables, tokens))
    start = time.perf_counter()
    jax.block_until_ready(d.forward(config, variables, tokens))
    print(f"forward [1, {tokens.shape[1]}] on {jax.default_backend()}: first call {compile_s:.2f}s "
          f"(compile), compiled {1e3 * (time.perf_counter() - start):.1f} ms; MTP logits {tuple(mtp_logits.shape)}")
    print(f"greedy next-token ids (random weights): {np.asarray(logits[0, -5:].argmax(-1)).tolist()}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train (or resume) from a TOML run file, then sample from the trained model."""
    from dsv3_jax.distributed import initialize
    from dsv3_jax.run_config import load_run_config
    from dsv3_jax.sampling import sample_tokens
    from dsv3_jax.trainer import train

    initialize()  # multi-host when DSV3_COORDINATOR / DSV3_NUM_PROCESSES / DSV3_PROCESS_ID are set
    rc = load_run_config(args.config, steps=args.steps)
    if args.mesh:
        rc = dataclasses.replace(rc, run=dataclasses.replace(rc.run, mesh=args.mesh))
    out_dir = args.out or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])
    result = train(rc, out_dir)
    rc, tokenizer = result["config"], result["tokenizer"]
    print(f"trained to step {rc.train.steps}: final loss {result['final_loss']:.4f}; run directory {out_dir}")
    if rc.run.sample_tokens > 0:
        variables = {"params": result["state"].params, "router": result["state"].router}
        prompt = [tokenizer.bos_id, *tokenizer.encode(rc.run.sample_prompt)]
        ids = sample_tokens(rc.model, variables, prompt, rc.run.sample_tokens, rc.run.sample_temperature,
                            seed=rc.train.seed, stop_id=tokenizer.eos_id)
        print(f"--- sample (temperature {rc.run.sample_temperature}) ---")
        print(rc.run.sample_prompt + tokenizer.decode(ids))
    return 0


def _load_for_generate(path: str):
    """(config, variables, tokenizer or None) from a training run directory or a HF checkpoint directory."""
    from dsv3_jax.pretrained import load_pretrained

    if os.path.isdir(os.path.join(path, "checkpoints")):
        from dsv3_jax.trainer import load_run

        rc, variables, tokenizer = load_run(path)
        return rc.model, variables, tokenizer
    config, variables = load_pretrained(path)
    tokenizer = None
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        from dsv3_jax.data import load_tokenizer

        tokenizer = load_tokenizer(path)
    return config, variables, tokenizer


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate from a checkpoint: text in/out with a tokenizer, token ids otherwise."""
    from dsv3_jax.generate import generate

    config, variables, tokenizer = _load_for_generate(args.checkpoint)
    if args.prompt_ids is not None:
        prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
    elif tokenizer is None:
        raise SystemExit("error: this checkpoint has no tokenizer; pass --prompt-ids 1,2,3")
    else:
        prompt = [tokenizer.bos_id, *tokenizer.encode(args.prompt)]
    start = time.perf_counter()
    result = generate(config, variables, prompt, args.max_new_tokens, args.temperature, top_k=args.top_k,
                      top_p=args.top_p, seed=args.seed, speculative=args.speculative)
    elapsed = time.perf_counter() - start
    ids = result.tokens[0]
    print(tokenizer.decode(ids) if tokenizer is not None and args.prompt_ids is None else ",".join(map(str, ids)))
    note = f"; MTP acceptance {result.acceptance_rate:.1%}" if args.speculative else ""
    print(f"[{len(ids)} tokens in {elapsed:.2f}s including compilation{note}]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3 in JAX/Flax")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="config summary and parameter counts")
    info.add_argument("config", help="preset name, HF config.json, or HF checkpoint directory")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=cmd_info)
    demo = sub.add_parser("demo", help="random-weight forward pass of a preset")
    demo.add_argument("--preset", default="small")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    train = sub.add_parser("train", help="train on a run config (TOML), resuming from --out if it has checkpoints")
    train.add_argument("--config", required=True, help="run file, e.g. experiments/configs/tiny_stdlib.toml")
    train.add_argument("--steps", type=int, default=None, help="override [train] steps")
    train.add_argument("--out", default=None, help="run directory (default runs/<config name>)")
    train.add_argument("--mesh", default=None, help="sharding layout name (sharding/rules.py), e.g. cpu-8")
    train.set_defaults(func=cmd_train)
    gen = sub.add_parser("generate", help="generate from a run directory or HF checkpoint")
    gen.add_argument("--checkpoint", required=True)
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="text (needs a tokenizer in the checkpoint directory)")
    source.add_argument("--prompt-ids", help="comma-separated token ids")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--speculative", action="store_true", help="MTP drafts, main model verifies (greedy)")
    gen.set_defaults(func=cmd_generate)
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
