"""`dsv3 convert` and `dsv3 export`: `register(subparsers)` adds both to the `dsv3` command line."""

from __future__ import annotations

import argparse

from dsv3_jax.ckpt.blocks import WEIGHTS
from dsv3_jax.ckpt.export import DEFAULT_SHARD_BYTES, EXPORT_WEIGHTS

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str) -> int:
    """"5000000", "500M", "5G", "2GiB" → bytes."""
    lowered = text.strip().lower().removesuffix("b") if not text.lower().endswith("ib") else text.strip().lower()
    digits = lowered.rstrip("kmgib")
    unit = lowered[len(digits):]
    if unit not in _UNITS or not digits:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5000000, 500M, 5G, 2GiB)")
    try:
        value = int(float(digits) * _UNITS[unit])
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5000000, 500M, 5G, 2GiB)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be > 0, got {text!r}")
    return value


def cmd_convert(args: argparse.Namespace) -> int:
    """Convert a HF / official mp / .pt checkpoint into a dsv3-jax block checkpoint (errors: `dsv3_jax.cli.main`)."""
    from dsv3_jax.ckpt import convert

    convert(args.src, args.out, args.weights, config=args.config, progress=not args.quiet,
            allow_nonfinite=args.allow_nonfinite, threads=args.threads)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a dsv3-jax block checkpoint back as HF safetensors shards (errors: `dsv3_jax.cli.main`)."""
    from dsv3_jax.ckpt import export

    export(args.src, args.out, args.weights, max_shard_bytes=args.max_shard_bytes, progress=not args.quiet,
           allow_nonfinite=args.allow_nonfinite)
    return 0


_NONFINITE_HELP = "accept weights holding NaN or Inf (refused by default, naming the tensor)"


def register(subparsers) -> None:
    """Add the `convert` and `export` subcommands to an argparse subparsers object."""
    conv = subparsers.add_parser("convert", help="HF / official mp / .pt checkpoint → dsv3-jax block checkpoint")
    conv.add_argument("src", help="HF directory, directory of model{r}-mp{n}.safetensors, or .pt/.bin state dict")
    conv.add_argument("out", help="output directory (must not exist)")
    conv.add_argument("--weights", choices=WEIGHTS, default="bf16",
                      help="fp8 keeps FP8 weights with their 128x128 scales; bf16/fp32 dequantise (default bf16)")
    conv.add_argument("--config", default=None, help="config.json (HF or official format); default: next to SRC")
    conv.add_argument("--quiet", action="store_true", help="no progress line or summary")
    conv.add_argument("--allow-nonfinite", action="store_true", help=_NONFINITE_HELP)
    conv.add_argument("--threads", type=int, default=None,
                      help="tensors read and converted in parallel (default: 2 per core, at most 8)")
    conv.set_defaults(func=cmd_convert)
    exp = subparsers.add_parser("export", help="dsv3-jax block checkpoint → HF safetensors directory")
    exp.add_argument("src", help="a directory written by `dsv3 convert`")
    exp.add_argument("out", help="HF output directory (must not exist)")
    exp.add_argument("--weights", choices=EXPORT_WEIGHTS, default="bf16",
                     help="linear weights as bf16, or fp8 e4m3 with weight_scale_inv (default bf16)")
    exp.add_argument("--max-shard-bytes", type=parse_bytes, default=DEFAULT_SHARD_BYTES,
                     help="largest shard, e.g. 5G (default 5e9 bytes)")
    exp.add_argument("--quiet", action="store_true", help="no progress line or summary")
    exp.add_argument("--allow-nonfinite", action="store_true", help=_NONFINITE_HELP)
    exp.set_defaults(func=cmd_export)
