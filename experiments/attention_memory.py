"""Memory of blockwise (flash) attention against sequence length, next to the dense [B,H,T,S] path.

Run (about 3 minutes on 2 idle cores, most of it the T = 131072 forward):

    python experiments/attention_memory.py
    python experiments/attention_memory.py --lengths 8192,32768 --block 1024

For each length T (causal self-attention, B=1, H=4, K=24, U=16, float32: a tiny MLA-shaped head) a fresh
subprocess compiles `blockwise_attention`'s forward, reads XLA's memory_analysis() temp bytes, runs it and
reports its peak RSS (resource.getrusage, so one process per measurement) and wall time. The dense reference
(`attention.attend`'s formula) is compiled for its temp bytes at every length and run only where its
temporaries fit in a quarter of this machine's memory. Prints the load average before and after (timings on a
shared machine are noisy) and writes experiments/results/attention_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

B, H, K, U = 1, 4, 24, 16
SCALE = K**-0.5
MiB = 1024 * 1024
RESULTS = Path(__file__).parent / "results" / "attention_memory.json"


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def dense_attention(q_BTHK, k_BSHK, v_BSHU, qpos_BT, kpos_BS, scale):
    """The dense formula of `attention.attend`: float32 scores [B,H,T,S], mask from positions."""
    import jax
    import jax.numpy as jnp

    mask_BTS = kpos_BS[:, None, :] <= qpos_BT[:, :, None]
    scores_BHTS = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BSHK, preferred_element_type=jnp.float32)
    scores_BHTS = jnp.where(mask_BTS[:, None], scores_BHTS * scale, jnp.finfo(jnp.float32).min)
    probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1).astype(v_BSHU.dtype)
    return jnp.einsum("bhts,bshu->bthu", probs_BHTS, v_BSHU, preferred_element_type=jnp.float32)


def measure(impl: str, length: int, block: int, run: bool) -> dict:
    """In this (fresh) process: compile impl's forward at `length`, optionally run it; temp bytes, RSS, ms."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from dsv3_jax.model.flash import blockwise_attention

    rss_start = peak_rss_mib()
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((B, length, H, d)), jnp.float32) for d in (K, K, U))
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (B, length))
    fn = (functools.partial(blockwise_attention, block_q=block, block_k=block) if impl == "blockwise"
          else dense_attention)
    t0 = time.perf_counter()
    compiled = jax.jit(fn, static_argnums=5).lower(q, k, v, pos, pos, SCALE).compile()
    result = {"impl": impl, "T": length, "block": block, "compile_s": round(time.perf_counter() - t0, 2),
              "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
              "input_bytes": int(q.nbytes + k.nbytes + v.nbytes + 2 * pos.nbytes), "rss_start_mib": rss_start}
    if run:
        times = []
        for _ in range(1 if length >= 32768 else 3):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(q, k, v, pos, pos))
            times.append((time.perf_counter() - t0) * 1e3)
        result["ms"] = round(statistics.median(times), 1)
    result["peak_rss_mib"] = round(peak_rss_mib(), 1)
    return result


def in_subprocess(impl: str, length: int, block: int, run: bool) -> dict:
    """`measure` in a fresh Python process (its own peak RSS); the child prints one JSON line."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, __file__, "--child", impl, str(length), str(block), str(int(run))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"impl": impl, "T": length, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def dense_fits(length: int) -> bool:
    """The dense forward holds about three [B,H,T,T] float32 arrays; run it only within a quarter of RAM."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return 3 * 4 * B * H * length * length < total / 4


def print_table(rows: list[dict]) -> None:
    print(f"{'impl':>9} {'T':>7} {'peak RSS MiB':>12} {'ms':>9} {'XLA temp MiB':>13} {'inputs MiB':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['impl']:>9} {r['T']:>7} failed: {r['error']}")
            continue
        rss = f"{r['peak_rss_mib']:.0f}" if "ms" in r else "(not run)"
        ms = f"{r['ms']:.0f}" if "ms" in r else "-"
        print(f"{r['impl']:>9} {r['T']:>7} {rss:>12} {ms:>9} {r['temp_bytes'] / MiB:>13.1f} "
              f"{r['input_bytes'] / MiB:>10.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="8192,32768,131072")
    parser.add_argument("--block", type=int, default=512)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        impl, length, block, run = args.child
        print(json.dumps(measure(impl, int(length), int(block), bool(int(run)))))
        return
    load_before = os.getloadavg()
    print(f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f} "
          f"({os.cpu_count()} cores)")
    lengths = [int(x) for x in args.lengths.split(",")]
    rows = []
    for length in lengths:
        rows.append(in_subprocess("blockwise", length, args.block, run=True))
        rows.append(in_subprocess("dense", length, args.block, run=dense_fits(length)))
        print_table(rows[-2:])
    load_after = os.getloadavg()
    print(f"\nB={B} H={H} K={K} U={U} float32, causal, block {args.block}; peak RSS includes the inputs and jax "
          f"itself (a child's RSS at start: {rows[0].get('rss_start_mib', 0):.0f} MiB)")
    print_table(rows)
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"shape": {"B": B, "H": H, "K": K, "U": U, "dtype": "float32"},
                                   "load_before": load_before, "load_after": load_after, "rows": rows}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
