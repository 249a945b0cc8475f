"""`dsv3 generate --checkpoint DIR`: generate from a training run directory or a checkpoint directory."""

from __future__ import annotations

import argparse
import os
import sys
import time


def _load_for_generate(path: str):
    """(config, variables, tokenizer or None) from a training run directory or a HF checkpoint directory."""
    from dsv3_jax.ckpt.pretrained import load_pretrained
    from dsv3_jax.errors import CheckpointError

    if not os.path.isdir(path):
        what = "not a directory" if os.path.exists(path) else "no such directory"
        raise CheckpointError(f"{path}: {what} (expected a run directory or a checkpoint directory)")
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


def parse_ids(text: str) -> list[int]:
    """"1,2,3" → [1, 2, 3]; InputError naming the first entry that is not an integer."""
    from dsv3_jax.errors import InputError

    ids = []
    for i, item in enumerate(text.split(",")):
        item = item.strip()
        if not item:
            continue
        try:
            ids.append(int(item))
        except ValueError:
            raise InputError(f"--prompt-ids {text!r}: entry {i} ({item!r}) is not an integer token id") from None
    if not ids:
        raise InputError(f"--prompt-ids {text!r}: no token ids (expected e.g. 1,2,3)")
    return ids


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate from a checkpoint: text in/out with a tokenizer, token ids otherwise."""
    from dsv3_jax.errors import InputError
    from dsv3_jax.infer.generate import generate

    prompt = parse_ids(args.prompt_ids) if args.prompt_ids is not None else None
    config, variables, tokenizer = _load_for_generate(args.checkpoint)
    if prompt is None:
        if tokenizer is None:
            raise InputError(f"{args.checkpoint}: this checkpoint has no tokenizer; pass --prompt-ids 1,2,3")
        prompt = [tokenizer.bos_id, *tokenizer.encode(args.prompt)]
    limit = None if tokenizer is None else min(tokenizer.vocab_size, config.vocab_size)
    start = time.perf_counter()
    kwargs = dict(top_k=args.top_k, top_p=args.top_p, seed=args.seed, speculative=args.speculative, vocab_limit=limit)
    if args.mesh:
        from dsv3_jax.parallel import api as sa
        from dsv3_jax.parallel import get_layout, make_mesh

        layout = get_layout(args.mesh)
        mesh = make_mesh(layout)
        result = sa.generate(config, variables, [prompt], args.max_new_tokens, layout, mesh,
                             temperature=args.temperature, **kwargs)
    else:
        result = generate(config, variables, prompt, args.max_new_tokens, args.temperature, **kwargs)
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
    gen.add_argument("--mesh", default=None, help="a layout name (sharding/layouts.toml): shard the model over the "
                     "devices, e.g. cpu-8-ep")
    gen.set_defaults(func=cmd_generate)
