"""Time several frameworks' steps in turn, each in its own live process, so that they share the machine's state.

On a shared 2-core machine the speed of the same program moves by up to 2x within minutes; timing one framework,
then the other, puts that drift into their ratio. Here every variant is a spawned process (torch and XLA never
share a process or its thread pools; peak RSS stays per variant) that sets itself up alone (compile, first step),
then waits on a pipe. The parent runs one step of each variant in turn, round after round, so each round's
steps see the same load; only one process computes at a time.

    setup(*args) -> (step, finish)    # in the child: step() runs one blocking step; finish() -> dict of results
    run_interleaved({"name": (setup, args), ...}, warmup, repeats, budget_s) -> {"name": dict}

Each result dict is finish()'s, plus "median_s", "min_s" and "times" (one entry per round).
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
from collections.abc import Callable
from typing import Any

PAUSE_S = 0.05  # between two variants' steps: lets the last one's worker threads stop spinning


def _serve(conn, setup: Callable, args: tuple) -> None:
    """Child: set up, say "ready" (or the error), then run a step per "step" and reply its seconds."""
    try:
        step, finish = setup(*args)
    except BaseException as e:  # reported to the parent, which raises it
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        try:
            command = conn.recv()
        except EOFError:  # the parent stopped (an error elsewhere): nothing to report
            return
        if command == "step":
            t0 = time.perf_counter()
            step()
            conn.send(time.perf_counter() - t0)
        else:
            conn.send(finish())
            return


def _recv(conn, name: str):
    message = conn.recv()
    if isinstance(message, tuple) and message[0] == "error":
        raise RuntimeError(f"{name}: setup failed: {message[1]}")
    return message


def run_interleaved(jobs: dict[str, tuple[Callable, tuple]], warmup: int, repeats: int,
                    budget_s: float) -> dict[str, dict[str, Any]]:
    """Start each job's process and wait for its setup before starting the next; `warmup` untimed steps each;
    then up to `repeats` rounds of one timed step per job (the order rotates), stopping after `budget_s` per
    job once 3 rounds are done."""
    ctx = multiprocessing.get_context("spawn")
    live: dict[str, tuple[Any, Any]] = {}
    try:
        for name, (setup, args) in jobs.items():
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(child, setup, args), daemon=True)
            proc.start()
            live[name] = (proc, parent)
            _recv(parent, name)
            for _ in range(warmup):
                parent.send("step")
                _recv(parent, name)
        times: dict[str, list[float]] = {name: [] for name in jobs}
        names, start = list(jobs), time.perf_counter()
        for r in range(repeats):
            if r >= 3 and time.perf_counter() - start > budget_s * len(names):
                break
            for name in names[r % len(names):] + names[:r % len(names)]:
                time.sleep(PAUSE_S)
                live[name][1].send("step")
                times[name].append(_recv(live[name][1], name))
        results = {}
        for name, (_, conn) in live.items():
            conn.send("finish")
            results[name] = {**_recv(conn, name), "median_s": statistics.median(times[name]),
                             "min_s": min(times[name]), "times": times[name]}
        return results
    finally:
        for proc, conn in live.values():
            conn.close()
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
