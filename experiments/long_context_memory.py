"""Whole-model memory at long context on CPU: the tiny preset (4 heads, 3 layers, MoE, MTP) with blockwise
attention runs a forward pass over 8K / 32K / 131,072 tokens and a training step (loss + gradients + AdamW) at
16K, each in a fresh process; peak RSS (VmHWM) should grow linearly in T. The naive path's compiled temporaries
are shown beside it (it would need [B,H,T,T] float32 scores).

    python experiments/long_context_memory.py                 # the table (several minutes on 2 cores)
    python experiments/long_context_memory.py --lengths 8192 --train 4096
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "long_context_memory.json")


def _peak_gb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024 / 1e9


def _config(impl: str):
    import dsv3_jax as d

    return d.ModelConfig.from_preset("tiny", max_position_embeddings=163840, attention_impl=impl,
                                     attention_block=1024)


def child(mode: str, length: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import dsv3_jax as d

    config = _config("blockwise")
    variables = d.init_variables(config, 0)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, (1, length)).astype(np.int32)
    baseline = _peak_gb()
    start = time.perf_counter()
    if mode == "forward":
        jax.block_until_ready(d.forward(config, variables, tokens))
    else:
        from dsv3_jax.train.step import TrainConfig, init_state, make_optimizer, make_train_step

        tc = TrainConfig(batch_size=1, seq_len=length - 1, lr=1e-3, warmup_steps=0)
        optimizer = make_optimizer(tc)
        step = jax.jit(make_train_step(config, tc, optimizer))
        batch = {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:])}
        _, metrics = step(init_state(variables, optimizer), batch)
        jax.block_until_ready(metrics)
    naive = jax.jit(lambda v, t: d.Transformer(_config("naive")).apply(v, t)[0]).lower(
        variables, jax.ShapeDtypeStruct(tokens.shape, jnp.int32)).compile().memory_analysis()
    return {"mode": mode, "tokens": length, "peak_GB": round(_peak_gb(), 3), "baseline_GB": round(baseline, 3),
            "seconds": round(time.perf_counter() - start, 1),
            "naive_forward_temp_GB": round(naive.temp_size_in_bytes / 1e9, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="*", default=[8192, 32768, 131072])
    p.add_argument("--train", type=int, nargs="*", default=[16384])
    p.add_argument("--child", nargs=2, metavar=("MODE", "T"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return 0
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    rows = []
    for mode, length in [("forward", t) for t in args.lengths] + [("train", t) for t in args.train]:
        out = subprocess.run([sys.executable, __file__, "--child", mode, str(length)], env=env,
                             capture_output=True, text=True, check=False)
        if out.returncode:
            print(out.stderr[-2000:], file=sys.stderr)
            return out.returncode
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{r['mode']:>8} T={r['tokens']:>7}: peak RSS {r['peak_GB']:.2f} GB (start {r['baseline_GB']:.2f}), "
              f"{r['seconds']:.1f} s; naive forward would need {r['naive_forward_temp_GB']:.1f} GB of temporaries",
              flush=True)
    print(f"load average {os.getloadavg()[0]:.1f}")
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
