"""The persistent compilation cache (`dsv3_jax.cli.main.enable_compilation_cache`) serves a program compiled by an
earlier process, and a changed config compiles afresh: never a stale program. Each run is its own process (the
cache is process-wide state)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from dsv3_jax.cli.main import enable_compilation_cache
cache, eps, out = sys.argv[1], float(sys.argv[2]), sys.argv[3]
if cache != "none":
    enable_compilation_cache(cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
counts = {"hits": 0, "misses": 0}
def on_event(event, **_):
    if event == "/jax/compilation_cache/cache_hits":
        counts["hits"] += 1
    elif event == "/jax/compilation_cache/cache_misses":
        counts["misses"] += 1
jax.monitoring.register_event_listener(on_event)
import dsv3_jax as d
from dsv3_jax import Transformer
config = d.ModelConfig.from_preset("tiny", rms_norm_eps=eps)
variables = d.init_variables(d.ModelConfig.from_preset("tiny"), 0)
tokens = jnp.asarray([[1, 2, 3, 4, 5, 6, 7, 8]], jnp.int32)
before = dict(counts)
logits = jax.jit(lambda v, t: Transformer(config).apply(v, t)[0])(variables, tokens)
np.save(out, np.asarray(logits))
print(json.dumps({k: counts[k] - before[k] for k in counts}))
"""


def _run(cache: str, eps: float, out: str) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("DSV3_COMPILATION_CACHE", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, cache, str(eps), out], capture_output=True, text=True,
                          env=env, timeout=300, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_cache_hit_then_fresh_compile_for_a_changed_config(tmp_path):
    cache = str(tmp_path / "xla")
    first = _run(cache, 1e-6, str(tmp_path / "a1.npy"))
    assert first["misses"] >= 1 and first["hits"] == 0
    assert os.listdir(cache)  # programs written
    again = _run(cache, 1e-6, str(tmp_path / "a2.npy"))
    assert again["hits"] >= 1 and again["misses"] == 0  # the same forward, read from disk
    changed = _run(cache, 0.5, str(tmp_path / "b.npy"))
    assert changed["misses"] >= 1 and changed["hits"] == 0  # a changed config compiles afresh
    _run("none", 0.5, str(tmp_path / "b_ref.npy"))
    a1, a2 = np.load(tmp_path / "a1.npy"), np.load(tmp_path / "a2.npy")
    b, b_ref = np.load(tmp_path / "b.npy"), np.load(tmp_path / "b_ref.npy")
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(b, b_ref)  # the changed config's own program, not the cached one
    assert np.max(np.abs(a1 - b)) > 1e-3


def test_cache_can_be_disabled(monkeypatch):
    from dsv3_jax.cli.main import enable_compilation_cache

    monkeypatch.setenv("DSV3_COMPILATION_CACHE", "off")
    assert enable_compilation_cache() is None
