"""The CPU "blocks" dispatch's formulations (each pair's expert weights gathered when pairs < experts, tiles
otherwise) equal the dense reference, values and gradients, balanced and skewed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.model.moe import dispatch

D, F, X = 16, 24, 2


def _inputs(n: int, e: int, skew: bool, seed: int = 0):
    rs = np.random.RandomState(seed)
    x = jnp.asarray(rs.randn(n, D).astype(np.float32))
    w = [jnp.asarray(rs.randn(*s).astype(np.float32) * 0.2) for s in ((e, D, F), (e, D, F), (e, F, D))]
    logits = rs.randn(n, e).astype(np.float32)
    if skew:
        logits[:, :2] += 10.0  # nearly every token picks experts 0 and 1: their loads exceed the capacity
    experts = jnp.asarray(np.argsort(-logits, axis=1)[:, :X].astype(np.int32))
    weights = jnp.asarray(rs.rand(n, X).astype(np.float32))
    return x, experts, weights, w


def _value_and_grads(ffn, x, experts, weights, w):
    cot = jnp.asarray(np.random.RandomState(7).randn(x.shape[0], D).astype(np.float32))
    loss = lambda x, *w: jnp.sum(ffn(x, experts, weights, *w) * cot)  # noqa: E731
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(x, *w)


@pytest.mark.parametrize("n,e,skew", [(2, 8, False), (6, 8, False), (64, 8, False), (64, 8, True), (96, 32, False),
                                      (96, 32, True)])
def test_blocks_equals_dense(n, e, skew):
    x, experts, weights, w = _inputs(n, e, skew)
    ref_value, ref_grads = _value_and_grads(dispatch.dense_ffn, x, experts, weights, w)
    value, grads = _value_and_grads(dispatch.blocks_ffn, x, experts, weights, w)
    np.testing.assert_allclose(value, ref_value, atol=1e-4, rtol=1e-5)
    for g, ref in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, ref, atol=1e-5, rtol=1e-5)
