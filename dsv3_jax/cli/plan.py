"""`dsv3 plan`: memory, FLOPs and chip count for a config on a layout (also `python -m dsv3_jax.cli.plan`, which
can regenerate the README's 671B tables with `--readme-table`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from dsv3_jax.config import FP8_IMPLS, PRESETS, ModelConfig
from dsv3_jax.errors import ConfigError, PlanError
from dsv3_jax.plan.aot import DEFAULT_PREFILL_CHUNK, PROGRAMS, Program, compile_program, require_fit
from dsv3_jax.plan.chips import CHIPS
from dsv3_jax.plan.counts import WEIGHT_MODES
from dsv3_jax.plan.planner import MODES, MOE_IMPLS, MOMENT_DTYPES, REMATS, plan
from dsv3_jax.plan.report import README_TABLE_PATH, readme_table, save_png


def load_config(spec: str) -> tuple[ModelConfig, str]:
    """(config, name) from a preset name, a HF config.json, or a checkpoint directory holding one."""
    if spec in PRESETS:
        return ModelConfig.from_preset(spec), spec
    if os.path.exists(spec):
        try:
            return ModelConfig.from_hf_config(spec), os.path.basename(os.path.normpath(spec))
        except ConfigError as e:
            raise PlanError(f"config: {e}") from None
    raise PlanError(f"config: {spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a config path")


def add_arguments(parser: argparse.ArgumentParser, *, config_required: bool = True) -> None:
    """The `plan` options (shared by `dsv3 plan` and `python -m dsv3_jax.cli.plan`)."""
    parser.add_argument("config", nargs=None if config_required else "?", default="deepseek-v3-671b",
                        help="preset name, HF config.json, or checkpoint directory")
    parser.add_argument("--weights", choices=WEIGHT_MODES, default="fp8")
    parser.add_argument("--mode", choices=MODES, default="infer")
    parser.add_argument("--batch", type=int, default=1, help="sequences")
    parser.add_argument("--seq", type=int, default=4096, help="tokens per sequence (inference: context length)")
    parser.add_argument("--mesh", default=None, metavar="LAYOUT", help="a layout name (sharding/layouts.toml)")
    parser.add_argument("--chips", type=int, default=None, help="mesh size (default: the minimum that fits)")
    parser.add_argument("--chip", choices=tuple(CHIPS), default="h100-80g")
    parser.add_argument("--headroom", type=float, default=0.1, help="fraction of HBM kept free")
    parser.add_argument("--remat", choices=REMATS, default="full", help="training: activation checkpointing")
    parser.add_argument("--moment-dtype", choices=MOMENT_DTYPES, default="bfloat16", help="AdamW first moment")
    parser.add_argument("--moe-impl", choices=MOE_IMPLS, default=None, help="dispatch buffers to plan for")
    parser.add_argument("--no-mtp", action="store_true", help="leave the MTP module out")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("--png", default=None, metavar="PATH", help="stacked bar of the per-device memory")
    parser.add_argument("--compile", default=None, metavar="TOPOLOGY",
                        help="compile the real program for this TPU slice (e.g. v5p:4x4x4; needs libtpu) and print "
                             "XLA's per-device memory beside the planner's")
    parser.add_argument("--program", choices=PROGRAMS, default="prefill", help="with --compile: what to compile")
    parser.add_argument("--layers", type=int, default=None, help="with --compile: this many layers, same widths")
    parser.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                        help="with --compile --program prefill: prompt tokens per step")
    parser.add_argument("--fp8-impl", choices=FP8_IMPLS, default=None,
                        help="with --compile --weights fp8: the FP8 matmul (default: the config's)")


def cmd_plan(args: argparse.Namespace) -> int:
    """Run the planner from parsed arguments; prints a table (or JSON), optionally writes a PNG."""
    if args.compile:
        try:
            return cmd_compile(args)
        except PlanError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        config, name = load_config(args.config)
        p = plan(config, weights=args.weights, mode=args.mode, batch=args.batch, seq=args.seq, layout=args.mesh,
                 chips=args.chips, chip=args.chip, headroom=args.headroom, moment_dtype=args.moment_dtype,
                 remat=args.remat, moe_impl=args.moe_impl, mtp=not args.no_mtp, config_name=name)
    except PlanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(p.to_dict(), indent=2) if args.json else p.table())
    if args.png:
        save_png(p, args.png)
        print(f"wrote {args.png}", file=sys.stderr)
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    """`--compile TOPOLOGY`: compile the program for the slice (plan.aot); exit 2 with the shortfall if it does not
    fit."""
    config, name = load_config(args.config)
    if args.fp8_impl:
        config = config.replace(fp8_impl=args.fp8_impl)
    if args.mesh is None:
        raise PlanError("mesh: --compile needs --mesh LAYOUT (a layout of sharding/layouts.toml)")
    program = Program(args.program, args.batch, args.seq, "bf16" if args.program == "train" else args.weights,
                      args.prefill_chunk)
    result = compile_program(config, program, args.compile, args.mesh, layers=args.layers, config_name=name)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.table())
    require_fit(result)
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `plan` subcommand to a `dsv3` subparsers object."""
    parser = subparsers.add_parser("plan", help="memory, FLOPs and chip count for a config on a layout")
    add_arguments(parser)
    parser.set_defaults(func=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m dsv3_jax.cli.plan CONFIG [options]`, or `--readme-table [PATH]` to write the 671B tables."""
    parser = argparse.ArgumentParser(prog="python -m dsv3_jax.cli.plan", description=__doc__.split("\n")[0])
    add_arguments(parser, config_required=False)
    parser.add_argument("--readme-table", nargs="?", const=README_TABLE_PATH, default=None, metavar="PATH",
                        help=f"write the 671B markdown tables (default {README_TABLE_PATH})")
    args = parser.parse_args(argv)
    if args.readme_table:
        text = readme_table()
        os.makedirs(os.path.dirname(os.path.abspath(args.readme_table)), exist_ok=True)
        with open(args.readme_table, "w", encoding="utf-8") as f:
            f.write(text)
        print(text)
        return 0
    return cmd_plan(args)


if __name__ == "__main__":
    sys.exit(main())
