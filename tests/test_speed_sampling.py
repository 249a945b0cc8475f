"""Sampling values are traced, not part of the compile key: a new temperature / top-k / top-p reuses the program."""

from __future__ import annotations

import importlib

import jax
import numpy as np

import dsv3_jax as d
from dsv3_jax.config import ModelConfig

gen = importlib.import_module("dsv3_jax.infer.generate")  # the package re-exports the function under this name
stream_mod = importlib.import_module("dsv3_jax.infer.stream")


def _model():
    config = ModelConfig.from_preset("tiny")
    return config, d.init_variables(config, 0)


_COMPILES: list[str] = []
_LISTENING: list[bool] = []


def _on_event(event: str, duration: float, **_: object) -> None:
    if _LISTENING and event == "/jax/core/compile/backend_compile_duration":
        _COMPILES.append(event)


jax.monitoring.register_event_duration_secs_listener(_on_event)


def _backend_compiles(fn) -> int:
    """XLA backend compiles while `fn()` runs."""
    _COMPILES.clear()
    _LISTENING.append(True)
    try:
        fn()
    finally:
        _LISTENING.clear()
    return len(_COMPILES)


def test_two_temperatures_compile_once():
    config, variables = _model()
    gen._compiled.cache_clear()

    def run(t, k, p):
        return d.generate(config, variables, [[1, 2, 3]], 6, temperature=t, top_k=k, top_p=p, seed=0, stop_ids=())

    assert _backend_compiles(lambda: run(0.7, 5, 0.9)) >= 1
    assert _backend_compiles(lambda: run(1.3, 7, 0.8)) == 0  # a new temperature, top-k, top-p: no compile
    assert gen._compiled.cache_info().currsize == 1
    assert _backend_compiles(lambda: run(0.0, 0, 1.0)) >= 1  # greedy is another program (argmax, no sort)


def _sampler(mode):
    return lambda logits, rng, knobs: gen.sample_with(logits, rng, mode, *knobs)


def test_traced_sampling_equals_static_sampling():
    """The same draw as the eager sampler with Python values, for every combination of stages."""
    logits = jax.random.normal(jax.random.key(0), (8, 50)) * 3
    for sampling in (d.infer.Sampling(), d.infer.Sampling(0.7), d.infer.Sampling(1.0, top_k=5),
                     d.infer.Sampling(0.5, top_p=0.8), d.infer.Sampling(1.2, top_k=9, top_p=0.7)):
        eager = d.infer.sample_logits(logits, jax.random.key(1), sampling)
        jitted = jax.jit(_sampler(sampling.mode()))(logits, jax.random.key(1), sampling.knobs())
        np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))


def test_stream_two_temperatures_compile_once():
    config, variables = _model()
    stream_mod._programs.cache_clear()

    def run(t):
        return list(stream_mod.stream(config, variables, [1, 2, 3], 4, temperature=t, seed=0, stop_ids=()))

    assert _backend_compiles(lambda: run(0.6)) >= 1
    assert _backend_compiles(lambda: run(1.1)) == 0
    assert stream_mod._programs.cache_info().currsize == 1
