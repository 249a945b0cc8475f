"""`dsv3 generate --checkpoint DIR`: generate from a training run directory or a checkpoint directory."""

from __future__ import annotations

import argparse
import os
import sys
import time


def _load_for_generate(path: str):
    """(config, variables, tokenizer or None) from a training run directory or a HF checkpoint directory."""
    from dsv3_jax.ckpt.pretrained import load_pretrained

    if os.path.isdir(os.path.join(path, "checkpoints")):
        from dsv3_jax.train.loop import load_run

        rc, variables, tokenizer = load_run(path)
        return rc.model, variables, tokenizer
    config, variables = load_pretrained(path)
    tokenizer = None
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        from dsv3_jax.text.tokenizers import load_tokenizer

        tokenizer = load_tokenizer(path)
    return config, variables, tokenizer


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate from a checkpoint: text in/out with a tokenizer, token ids otherwise."""
    from dsv3_jax.infer.generate import generate

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


def register(sub) -> None:
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
