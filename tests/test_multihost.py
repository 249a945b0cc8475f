"""Two processes on localhost form one 8-device mesh (4 simulated CPU devices each, `jax.distributed` with gloo
collectives) and run one sharded train step (`experiments/multihost_step.py`); both report the same loss, equal
to the same step run by this single process on its 8 devices."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, subprocess_env

WORKER = os.path.join(REPO, "experiments", "multihost_step.py")
LAYOUT = "cpu-8"
TIMEOUT_S = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_worker():
    spec = importlib.util.spec_from_file_location("multihost_step", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _launch(num_processes: int, port: int, log_dir) -> list[tuple[subprocess.Popen, str]]:
    procs = []
    for i in range(num_processes):
        env = subprocess_env(8 // num_processes, DSV3_COORDINATOR=f"127.0.0.1:{port}",
                             DSV3_NUM_PROCESSES=str(num_processes), DSV3_PROCESS_ID=str(i))
        log = os.path.join(log_dir, f"process{i}.log")
        with open(log, "w") as f:
            procs.append((subprocess.Popen([sys.executable, WORKER, "--layout", LAYOUT], cwd=REPO, env=env,
                                           stdout=f, stderr=subprocess.STDOUT), log))
    return procs


def _tail(path: str, n: int = 25) -> str:
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


def test_two_processes_one_mesh_equal_one_process(tmp_path):
    procs = _launch(2, _free_port(), str(tmp_path))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        # The reference while the workers run: this process, 8 devices (conftest), no jax.distributed.
        single = _load_worker().run_step(LAYOUT)
        for proc, _ in procs:
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pass
    finally:
        stragglers = [p for p, _ in procs if p.poll() is None]
        for p in stragglers:
            p.kill()
        for p in stragglers:
            p.wait()
    logs = {i: _tail(log) for i, (_, log) in enumerate(procs)}
    report = "\n".join(f"--- process {i} (rc={p.returncode}):\n{logs[i]}" for i, (p, _) in enumerate(procs))
    assert not stragglers, f"processes still running after {TIMEOUT_S}s were killed\n{report}"
    assert all(p.returncode == 0 for p, _ in procs), f"a worker failed\n{report}"

    results = []
    for _, log in procs:
        with open(log, errors="replace") as f:
            lines = [line for line in f if line.startswith("RESULT ")]
        assert len(lines) == 1, report
        results.append(json.loads(lines[0][len("RESULT "):]))
    assert [r["process"] for r in results] == [0, 1]
    for r in results:
        assert r["processes"] == 2 and r["devices"] == 8 and r["local_devices"] == 4
        assert np.isfinite(r["loss"]) and r["step"] == 1
        # Each process holds only its own devices' shards: less than 4 full copies of the model.
        assert r["local_param_bytes"] < 4 * r["full_param_bytes"]
    first, second = results
    assert first["loss"] == second["loss"]
    assert first["expert_load"] == second["expert_load"]
    assert first["param_abs_sum"] == second["param_abs_sum"]

    assert single["processes"] == 1 and single["devices"] == 8
    np.testing.assert_allclose(first["loss"], single["loss"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(first["grad_norm"], single["grad_norm"], atol=1e-5, rtol=1e-5)
    assert first["expert_load"] == single["expert_load"]
    np.testing.assert_allclose(first["param_abs_sum"], single["param_abs_sum"], rtol=1e-6)
    # Every device holds the same bytes, so one process with all 8 holds what each of the two holds, twice.
    assert single["local_param_bytes"] == 2 * first["local_param_bytes"] == 2 * second["local_param_bytes"]


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
