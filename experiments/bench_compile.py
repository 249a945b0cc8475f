"""Compile time of the tiny_stdlib model's train step and generate program, and the random initialisation's compile
+ run (what a user waits for before the first step / token), cold and with the persistent compilation cache warm (a
second process reading what the first one wrote). Each measurement is its own process.

    python experiments/bench_compile.py            # ~2-3 min on 2 cores; writes results/bench_compile.json

Also times the trainer's one-step run (`train.loop.train`) with the step compiled while the state is initialised
(the default) and after it, two of each in turn.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def child(cache_dir: str | None, batch: int, seq: int) -> dict:
    import sys

    sys.path.insert(0, HERE)
    import jax
    import numpy as np
    from bench_train import make_batch, model_for, train_config

    import dsv3_jax as d
    from dsv3_jax.cli.main import enable_compilation_cache
    from dsv3_jax.train.step import init_state, jit_train_step, make_optimizer, make_train_step

    if cache_dir:
        enable_compilation_cache(cache_dir)
    model = model_for("tiny_stdlib", 1)
    tc = train_config({"batch": batch, "seq": seq})
    optimizer = make_optimizer(tc)  # as `dsv3 train`: Adam moments per parameter
    t0 = time.perf_counter()
    variables = jax.block_until_ready(d.init_variables(model, 0))  # compile + run: what `dsv3 train` waits for
    init_s = time.perf_counter() - t0
    state = init_state(variables, optimizer)
    batch_arrays = jax.device_put(make_batch(model.vocab_size, batch, seq))
    step = jit_train_step(make_train_step(model, tc, optimizer))
    t0 = time.perf_counter()
    compiled = step.lower(state, batch_arrays).compile()
    train_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(state, batch_arrays))
    variables = d.init_variables(model, 0)  # afresh: the step donated the state's buffers
    prompt = np.random.RandomState(0).randint(3, model.vocab_size, (1, 32)).tolist()
    t0 = time.perf_counter()
    d.generate(model, variables, prompt, 2, stop_ids=())  # compile + a 2-token run
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    d.generate(model, variables, prompt, 2, stop_ids=())
    run_s = time.perf_counter() - t0
    return {"init_s": init_s, "train_step_compile_s": train_s, "generate_compile_s": first_s - run_s}


def trainer_child(ahead: bool, batch: int, seq: int) -> float:
    """Seconds of `train.loop.train` for one step of tiny_stdlib.toml (corpus, tokenizer, init, step compile, the
    step, a checkpoint; no persistent cache), with the step compiled while the state is initialised (the trainer's
    way, `loop._compile_ahead`) or after it."""
    import dataclasses

    from dsv3_jax.train import loop
    from dsv3_jax.train.run_config import load_run_config

    if not ahead:
        loop._compile_ahead = lambda p: None
    rc = load_run_config(os.path.join(HERE, "configs", "tiny_stdlib.toml"))
    rc = dataclasses.replace(rc, train=dataclasses.replace(rc.train, steps=1, batch_size=batch, seq_len=seq),
                             run=dataclasses.replace(rc.run, sample_tokens=0))
    with tempfile.TemporaryDirectory(prefix="dsv3_bench_run_") as out:
        t0 = time.perf_counter()
        loop.train(rc, out, log=lambda *_: None)
        return time.perf_counter() - t0


def run_isolated(*args, fn=child):
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="dsv3_xla_cache_") as cache:
        rows = {"no cache": run_isolated(None, args.batch, args.seq),
                "cache cold": run_isolated(cache, args.batch, args.seq),
                "cache warm": run_isolated(cache, args.batch, args.seq)}
    trainer = {"ahead": [], "after": []}
    for _ in range(2):  # in turn: this machine's speed drifts
        for how in trainer:
            trainer[how].append(run_isolated(how == "ahead", args.batch, args.seq, fn=trainer_child))
    load = os.getloadavg()
    for name, r in rows.items():
        print(f"{name:12s} init {r['init_s']:5.1f} s   train step {r['train_step_compile_s']:5.1f} s   generate "
              f"{r['generate_compile_s']:5.1f} s")
    print("trainer, one step (`train.loop.train`): step compiled while the state is initialised "
          + " / ".join(f"{t:.1f}" for t in trainer["ahead"]) + " s, after it "
          + " / ".join(f"{t:.1f}" for t in trainer["after"]) + " s")
    print(f"tiny_stdlib, batch {args.batch} x {args.seq}; load average {load[0]:.1f}/{load[1]:.1f} on "
          f"{os.cpu_count()} cores")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_compile.json"), "w", encoding="utf-8") as f:
        json.dump({"args": vars(args), "load_avg": load, "results": rows, "trainer_one_step_s": trainer}, f,
                  indent=1)


if __name__ == "__main__":
    main()
