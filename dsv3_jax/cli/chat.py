"""`dsv3 chat --checkpoint DIR [--mesh NAME] [--speculative]`: a multi-turn chat in the terminal, the reply
streamed as it is decoded; `/reset` forgets the conversation, `/quit` (or end of input) leaves."""

from __future__ import annotations

import argparse
import contextlib
import sys

PROMPT = "> "


def _session(args: argparse.Namespace):
    from dsv3_jax.cli.generate import _load_for_generate
    from dsv3_jax.errors import InputError
    from dsv3_jax.infer.chat import ChatSession

    config, variables, tokenizer = _load_for_generate(args.checkpoint)
    if tokenizer is None:
        raise InputError(f"{args.checkpoint}: chat needs a tokenizer (tokenizer.json, or a training run's "
                         "tokenizer/) next to the weights")
    context = contextlib.nullcontext()
    if args.mesh:
        from dsv3_jax.parallel import api as sa
        from dsv3_jax.parallel import get_layout, make_mesh

        layout = get_layout(args.mesh)
        mesh = make_mesh(layout)
        sa.check_divisible(config, layout, mesh)
        variables = sa.shard_variables(config, variables, layout, mesh)
        context = sa.decoding(layout, mesh)
    session = ChatSession(config, variables, tokenizer, system=args.system, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, seed=args.seed)
    return session, context


def _reply(session, text: str, speculative: bool) -> None:
    if not speculative:
        for piece in session.send(text):
            print(piece, end="", flush=True)
        print(flush=True)
        return
    from dsv3_jax.infer.generate import generate

    session.messages.append({"role": "user", "content": text})
    tok = session.tokenizer
    out = generate(session.config, session.variables, session.prompt_ids(), session.max_new_tokens,
                   stop_ids=session._stop_ids(), speculative=True,
                   vocab_limit=min(tok.vocab_size, session.config.vocab_size))
    ids = [t for t in out.tokens[0] if t not in session._stop_ids()]
    reply = tok.decode(ids)
    session.messages.append({"role": "assistant", "content": reply})
    print(reply, flush=True)
    print(f"[MTP acceptance {out.acceptance_rate:.0%}]", file=sys.stderr, flush=True)


def cmd_chat(args: argparse.Namespace) -> int:
    session, context = _session(args)
    print("chat: /reset forgets the conversation, /quit leaves", file=sys.stderr, flush=True)
    with context:
        while True:
            try:
                line = input(PROMPT)
            except EOFError:
                print(file=sys.stderr)
                return 0
            text = line.strip()
            if text in ("/quit", "/exit"):
                return 0
            if text == "/reset":
                session.reset()
                print("[conversation reset]", flush=True)
                continue
            if text:
                _reply(session, text, args.speculative)


def register(sub) -> None:
    chat = sub.add_parser("chat", help="multi-turn chat with a checkpoint, streamed")
    chat.add_argument("--checkpoint", required=True, help="a training run directory or a checkpoint directory")
    chat.add_argument("--mesh", default=None, help="a layout name (sharding/layouts.toml) to shard the model over")
    chat.add_argument("--speculative", action="store_true", help="MTP drafts, main model verifies (greedy; each "
                      "reply prints when complete)")
    chat.add_argument("--system", default=None, help="a system prompt")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.add_argument("--seed", type=int, default=0)
    chat.set_defaults(func=cmd_chat)
