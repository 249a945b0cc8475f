"""One MoE layer on 8 simulated CPU devices: expert parallelism vs replicated experts.

Layouts (sharding/rules.py):
  data        experts replicated on every device, tokens split 8 ways (each device runs all its tokens' experts)
  cpu-8-ep    experts split 8 ways, tokens split 8 ways, all-to-all dispatch (dsv3_jax.model.moe.expert_parallel)
  cpu-8       data 2 x expert 2 x tensor 2: experts split 2 ways, tokens 4 ways, all-to-all over "expert"

For each: median wall time of the jitted forward and forward+backward (gradient w.r.t. every parameter), the
parameter bytes each device holds (`dsv3_jax.parallel.api.memory_report`) and the compiled program's per-device
temp bytes (`memory_analysis()`). Outputs are checked against the replicated layout.

    python experiments/bench_expert_parallel.py                     # 64 experts top-6, hidden 256
    python experiments/bench_expert_parallel.py --experts 16 --top-k 4 --tokens 1024 --repeats 3

The 8 "devices" share the host's cores, so times show the cost of the extra work and collectives, not a speed-up.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.moe import MoE
from dsv3_jax.parallel import api as sa
from dsv3_jax.parallel import get_layout, make_mesh, param_shardings

LAYOUTS = ("data", "cpu-8-ep", "cpu-8")


def moe_config(args) -> ModelConfig:
    return ModelConfig.from_preset(
        "small", hidden_size=args.hidden, moe_intermediate_size=args.expert_hidden, n_routed_experts=args.experts,
        num_experts_per_tok=args.top_k, n_group=args.groups, topk_group=args.topk_groups, n_shared_experts=1,
        dtype="float32", init_std=0.05)


def _median_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # warm-up (compiled already)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_layout(name: str, config: ModelConfig, variables, x_BTD, repeats: int) -> dict:
    layout = get_layout(name)
    mesh = make_mesh(layout)
    sa.check_divisible(config, layout, mesh, x_BTD.shape[0])
    module = MoE(config)
    logical = nn.get_partition_spec(jax.eval_shape(module.init, jax.random.key(0), x_BTD))
    logical = {k: logical[k] for k in variables}
    placed = jax.device_put(variables, param_shardings(logical, layout, mesh))
    x = jax.device_put(x_BTD, sa.batch_sharding(layout, mesh))

    def forward(v, x):
        return module.apply(v, x)

    def loss(params, router, x):
        return jnp.mean(module.apply({"params": params, "router": router}, x) ** 2)

    grad = jax.value_and_grad(loss)

    def forward_backward(v, x):
        return grad(v["params"], v["router"], x)

    out = {"layout": name, "expert_parallel": sa.expert_parallel_for(layout, mesh) is not None}
    with sa.activate(layout, mesh):
        for label, fn in (("fwd", forward), ("fwd_bwd", forward_backward)):
            start = time.perf_counter()
            compiled = jax.jit(fn).lower(placed, x).compile()
            out[f"{label}_compile_s"] = time.perf_counter() - start
            out[f"{label}_s"] = _median_time(compiled, placed, x, repeats=repeats)
            out[f"{label}_temp_bytes"] = compiled.memory_analysis().temp_size_in_bytes
            out[f"{label}_result"] = jax.device_get(compiled(placed, x))
            if label == "fwd":
                out["all_to_all"] = "all-to-all" in compiled.as_text()
    report = sa.memory_report(placed)
    out["param_bytes_per_device"] = max(report.values())
    out["param_bytes_total"] = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree_util.tree_leaves(placed))
    return out


def _mib(n: int) -> str:
    return f"{n / 2**20:8.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--topk-groups", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--expert-hidden", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=2048, help="global tokens (batch 8 x tokens/8)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    args = parser.parse_args(argv)

    jax.config.update("jax_default_matmul_precision", "highest")
    config = moe_config(args)
    batch, seq = 8, args.tokens // 8
    x_BTD = jax.random.normal(jax.random.key(1), (batch, seq, config.hidden_size), jnp.float32)
    variables = nn.unbox(MoE(config).init(jax.random.key(0), x_BTD))
    variables = {k: variables[k] for k in ("params", "router")}  # not the sown stats
    print(f"# MoE layer: {config.n_routed_experts} experts top-{config.num_experts_per_tok} "
          f"({config.n_group} groups keep {config.topk_group}), hidden {config.hidden_size}, expert hidden "
          f"{config.moe_intermediate_size}, 1 shared; {batch}x{seq} = {batch * seq} tokens; float32; "
          f"{jax.device_count()} CPU devices on {os.cpu_count()} cores; median of {args.repeats}")

    rows = [bench_layout(name, config, variables, x_BTD, args.repeats) for name in args.layouts.split(",")]
    base = rows[0]
    header = (f"{'layout':<11}{'EP':>4}{'a2a':>5}{'fwd ms':>9}{'fwd+bwd ms':>12}{'params MiB/dev':>16}"
              f"{'fwd temp MiB':>14}{'f+b temp MiB':>14}{'max|Δ| vs ' + base['layout']:>16}")
    print(header)
    print("-" * len(header))
    for r in rows:
        diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                   for a, b in zip(jax.tree_util.tree_leaves((r["fwd_result"], r["fwd_bwd_result"])),
                                   jax.tree_util.tree_leaves((base["fwd_result"], base["fwd_bwd_result"])),
                                   strict=True))
        print(f"{r['layout']:<11}{'yes' if r['expert_parallel'] else 'no':>4}{'yes' if r['all_to_all'] else 'no':>5}"
              f"{1e3 * r['fwd_s']:9.1f}{1e3 * r['fwd_bwd_s']:12.1f}{_mib(r['param_bytes_per_device']):>16}"
              f"{_mib(r['fwd_temp_bytes']):>14}{_mib(r['fwd_bwd_temp_bytes']):>14}{diff:16.2e}")
    print(f"# parameters in total: {_mib(base['param_bytes_total']).strip()} MiB; compile s (fwd / fwd+bwd): "
          + ", ".join(f"{r['layout']} {r['fwd_compile_s']:.1f}/{r['fwd_bwd_compile_s']:.1f}" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
