"""The router must be right on its own: its float32 gate matmul asks for HIGHEST precision explicitly, so a lower
backend default (TPU's one bf16 pass, GPU's TF32) cannot change which experts tokens go to. The suite's global
"highest" setting is overridden here to a low default to show it does not hide anything."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.model.moe import MoE
from tests.conftest import TINY


def _dots(jaxpr):
    """Every dot_general equation in a closed jaxpr, nested jaxprs (pjit, scan, custom_vjp) included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for sub in jax.core.jaxprs_in_params(eqn.params):
            yield from _dots(sub)


def test_gate_matmul_is_highest_precision_under_a_low_default():
    moe = MoE(TINY)
    x = jnp.ones((2, 5, TINY.hidden_size), jnp.float32)
    variables = moe.init(jax.random.key(0), x)
    with jax.default_matmul_precision("bfloat16"):
        closed = jax.make_jaxpr(lambda v, x: moe.apply(v, x, mutable=["moe_stats"]))(variables, x)
    gate_shape = (TINY.hidden_size, TINY.n_routed_experts)
    gate_dots = [e for e in _dots(closed.jaxpr) if tuple(e.invars[1].aval.shape) == gate_shape]
    assert len(gate_dots) == 1, [tuple(v.aval.shape) for e in _dots(closed.jaxpr) for v in e.invars]
    (dot,) = gate_dots
    assert dot.params["precision"] == (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    assert dot.params["preferred_element_type"] == jnp.float32
    assert all(v.aval.dtype == jnp.float32 for v in dot.invars)


def test_routing_is_identical_under_low_and_high_defaults():
    moe = MoE(TINY)
    x = jax.random.normal(jax.random.key(1), (2, 16, TINY.hidden_size), jnp.float32)
    variables = moe.init(jax.random.key(2), x)
    loads = {}
    for precision in ("bfloat16", "highest"):
        with jax.default_matmul_precision(precision):
            _, stats = jax.jit(lambda v, x: moe.apply(v, x, mutable=["moe_stats"]))(variables, x)
        loads[precision] = np.asarray(stats["moe_stats"]["expert_load"][0])
    np.testing.assert_array_equal(loads["bfloat16"], loads["highest"])
