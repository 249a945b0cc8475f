"""The CPU "blocks" dispatch's formulations (each pair's expert weights gathered when pairs <= experts, every expert
on every token for a few tokens over few experts, tiles otherwise) equal the formula computed per pair, values and
gradients, balanced and skewed."""

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


def _per_pair_reference(x_ND, experts_NX, weights_NX, w_gate_EDF, w_up_EDF, w_down_EFD):
    """Σ_x weight[n,x] · SwiGLU of token n with expert experts[n,x]'s weights, gathered per pair: the formula,
    written apart from every dispatch under test (dense_ffn included)."""
    hp = jax.lax.Precision.HIGHEST
    gate = jnp.einsum("nd,nxdf->nxf", x_ND, w_gate_EDF[experts_NX], precision=hp)
    up = jnp.einsum("nd,nxdf->nxf", x_ND, w_up_EDF[experts_NX], precision=hp)
    y = jnp.einsum("nxf,nxfd->nxd", jax.nn.silu(gate) * up, w_down_EFD[experts_NX], precision=hp)
    return jnp.einsum("nxd,nx->nd", y, weights_NX, precision=hp)


@pytest.mark.parametrize("n,e,skew,kind", [(2, 8, False, "gathered"), (6, 8, False, "dense"), (12, 16, True, "dense"),
                                           (40, 8, False, "tiles"), (64, 8, False, "tiles"), (64, 8, True, "tiles"),
                                           (96, 32, False, "tiles"), (96, 32, True, "tiles"),
                                           (400, 4, False, "tiles"),  # λ = 200: TILE_MAX_ROWS, 2 tiles an expert
                                           (400, 4, True, "tiles")])  # two experts of 400 pairs (3 tiles), two empty
def test_blocks_equals_the_per_pair_formula(n, e, skew, kind):
    assert dispatch.blocks_formulation(n, n * X, e) == kind  # every formulation is covered by a case
    x, experts, weights, w = _inputs(n, e, skew)
    ref_value, ref_grads = _value_and_grads(_per_pair_reference, x, experts, weights, w)
    value, grads = _value_and_grads(dispatch.blocks_ffn, x, experts, weights, w)
    np.testing.assert_allclose(value, ref_value, atol=1e-4, rtol=1e-5)
    for g, ref in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, ref, atol=1e-5, rtol=1e-5)


def test_formulations_agree_with_fp8_resident_weights():
    """The dense choice sends FP8-resident experts through the expert-batched FP8 product: same values as the
    tiles and the per-pair gather, which take the per-expert FP8 product."""
    from dsv3_jax.config import MatmulPolicy
    from dsv3_jax.quant.fp8 import quantize_weight

    n, e = 6, 8
    assert dispatch.blocks_formulation(n, n * X, e) == "dense"
    x, experts, weights, w = _inputs(n, e, skew=False)
    quantized, policy = [quantize_weight(a) for a in w], MatmulPolicy()
    got = dispatch.blocks_ffn(x, experts, weights, *quantized, policy=policy)
    for kind in ("tiles", "gathered"):
        other = dispatch.BLOCKS_FORMULATIONS[kind](x, experts, weights, *quantized, policy)
        np.testing.assert_allclose(got, other, atol=1e-5, rtol=0)
    assert float(jnp.abs(got).max()) > 0.1
