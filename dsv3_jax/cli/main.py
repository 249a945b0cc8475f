"""`dsv3` command line: one module per subcommand (info, demo, train, generate, plan, convert + export), each with
`register(subparsers)`, and the one error boundary: a project error or an OS error becomes one paragraph on stderr
(exit 2 for bad input, 1 for a failure), with the traceback only under `--debug` or DSV3_DEBUG=1."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

COMMANDS = ("info", "demo", "train", "generate", "plan", "convert")  # modules of dsv3_jax.cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsv3", description="DeepSeek-V3 in JAX/Flax")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (also DSV3_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"dsv3_jax.cli.{name}").register(sub)
    return parser


def _report(error: BaseException) -> int:
    """One paragraph on stderr for a user-facing error; its exit code."""
    from dsv3_jax.errors import Dsv3Error

    if isinstance(error, Dsv3Error):
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    what = f"{error.filename}: " if getattr(error, "filename", None) else ""
    print(f"error: {what}{error.strerror or error} ({type(error).__name__})", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dsv3_jax.errors import Dsv3Error

    try:
        return args.func(args)
    except (Dsv3Error, OSError) as e:
        if args.debug or os.environ.get("DSV3_DEBUG") == "1":
            traceback.print_exc()
        return _report(e)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
