"""`dsv3 demo`: a random-weight forward pass of a preset on embedded text (no downloads)."""

from __future__ import annotations

import argparse
import time

import numpy as np

DEMO_TEXT = "DeepSeek-V3 routes every token to 8 of 256 experts and caches a 576-value latent per token."


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


def register(sub) -> None:
    demo = sub.add_parser("demo", help="random-weight forward pass of a preset")
    demo.add_argument("--preset", default="small")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
