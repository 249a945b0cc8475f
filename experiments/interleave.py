"""Time several frameworks' steps in turn, each in its own live process, so that they share the machine's state.

On a shared 2-core machine the speed of the same program moves by up to 2x within minutes; timing one framework,
then the other, puts that drift into their ratio. Here every job is a spawned process (torch and XLA never share
a process or its thread pools; peak RSS stays per job) that sets itself up alone (compile, first calls), then
waits on a pipe. The parent runs each job's steps in turn, round after round, so each round's steps see the same
load; only one process computes at a time.

    setup(*args) -> (steps, finish)   # in the child: {key: step()} (each blocks until done); finish() -> dict
    run_interleaved({"name": (setup, args), ...}, warmup, repeats, budget_s, burst=1) -> {"name": dict}

`burst` > 1 times a step's steady state: each round the child calls it `burst` times back to back and reports the
median of all but the first call. On this machine's VM the difference is large for XLA: its intra-op worker threads
park within ~0.5 ms of finishing (torch's OpenMP threads spin ~10 ms), and after an idle gap the guest kernel
(`sched_vcpu_pack=15`, haltpoll with `guest_halt_poll_ns=0` on its command line) runs the woken worker on the busy
vCPU, so a call after the pause between two frameworks computes on about one core: in one process, the `small`
MoE layer 16.0 ms back to back and 31.0 ms after a 50 ms sleep (torch 16.5 / 19.1 ms); one 1024x256x1024 dot 2.5
vs 5.4 ms, and 2.9 / 3.0 ms with the main thread pinned to CPU 0 and XLA's workers to CPU 1 (scratch checks,
2026-12-08). burst = 1 (the default) keeps the single call after a pause: both regimes are real (a train loop or a
decode runs back to back; a notebook cell starts after idle).

Each result dict is finish()'s plus "steps": {key: {"median_s", "min_s", "times"}} (with burst > 1, "times" holds
each sample's median and "min_s" the least of them).
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
from collections.abc import Callable
from typing import Any

BURST_HELP = ("calls per timed sample, back to back; > 1 reports the median of all but the first (steady state, see "
              "interleave.py); outputs get a _burstN suffix")


def add_burst_argument(parser) -> None:
    """The benchmarks' `--burst N` flag (`run_interleaved`'s `burst`)."""
    parser.add_argument("--burst", type=int, default=1, help=BURST_HELP)


def output_tag(cores: int | None, burst: int) -> str:
    """The suffix of a benchmark's output files: _coresN when pinned, _burstN when timed in bursts."""
    return (f"_cores{cores}" if cores else "") + (f"_burst{burst}" if burst > 1 else "")


PAUSE_S = 0.05  # between two variants' steps: lets the last one's worker threads stop spinning


def _serve(conn, setup: Callable, args: tuple) -> None:
    """Child: set up, reply "ready" with the step keys (or the error), then run the step each key names and
    reply its seconds, until "finish" (reply finish()'s dict)."""
    try:
        steps, finish = setup(*args)
    except BaseException as e:  # reported to the parent, which raises it
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", list(steps)))
    while True:
        try:
            command = conn.recv()
        except EOFError:  # the parent stopped (an error elsewhere): nothing to report
            return
        if command != "finish":
            key, calls = command
            seconds = []
            for _ in range(calls):
                t0 = time.perf_counter()
                steps[key]()
                seconds.append(time.perf_counter() - t0)
            conn.send(statistics.median(seconds[1:]) if calls > 1 else seconds[0])
        else:
            conn.send(finish())
            return


def _recv(conn, name: str):
    message = conn.recv()
    if isinstance(message, tuple) and message[0] == "error":
        raise RuntimeError(f"{name}: setup failed: {message[1]}")
    return message


def run_interleaved(jobs: dict[str, tuple[Callable, tuple]], warmup: int, repeats: int, budget_s: float,
                    min_rounds: int = 3, burst: int = 1) -> dict[str, dict[str, Any]]:
    """Start each job's process and wait for its setup before starting the next; `warmup` untimed calls of each
    step; then up to `repeats` rounds in which every step runs once (the jobs' order rotates). A step leaves the
    rounds once it has `min_rounds` times and `budget_s` of them. `burst`: calls per timed sample (see above)."""
    if burst < 1:
        raise ValueError(f"burst must be >= 1 (calls per timed sample), got {burst}")
    ctx = multiprocessing.get_context("spawn")
    live: dict[str, tuple[Any, Any]] = {}
    keys: dict[str, list[str]] = {}
    try:
        for name, (setup, args) in jobs.items():
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(child, setup, args), daemon=True)
            proc.start()
            live[name] = (proc, parent)
            keys[name] = _recv(parent, name)[1]
            for key in keys[name] * warmup:
                parent.send((key, 1))
                _recv(parent, name)
        times = {(name, key): [] for name in jobs for key in keys[name]}
        names = list(jobs)
        for r in range(repeats):
            due = {k: t for k, t in times.items() if len(t) < min_rounds or sum(t) * burst < budget_s}
            if not due:
                break
            for name in names[r % len(names):] + names[:r % len(names)]:
                for key in keys[name]:
                    if (name, key) in due:
                        time.sleep(PAUSE_S)
                        live[name][1].send((key, burst))
                        times[name, key].append(_recv(live[name][1], name))
        results = {}
        for name, (_, conn) in live.items():
            conn.send("finish")
            steps = {key: {"median_s": statistics.median(times[name, key]), "min_s": min(times[name, key]),
                           "times": times[name, key]} for key in keys[name]}
            results[name] = {**_recv(conn, name), "steps": steps}
        return results
    finally:
        for proc, conn in live.values():
            conn.close()
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
