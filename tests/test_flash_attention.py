"""Blockwise (flash) attention ≡ the dense reference, forward and gradients, in memory linear in T and S."""

from __future__ import annotations

import functools

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.model.attention import naive_attention
from dsv3_jax.model.flash import blockwise_attention, dot_product_attention_gpu, splash_attention_tpu

SCALE = 0.3
PAD_POS = 2**30  # position of a padded key: later than every query
FWD_TOL = 1e-5  # float32, max |difference|
GRAD_TOL = 1e-4  # float32, max |difference| / max |reference gradient|
BF16_TOL = 2e-2


def reference_attention(q_BTHK, k_BSHK, v_BSHU, qpos_BT, kpos_BS, scale):
    """The naive path the model runs (`attention.naive_attention`: float32 [B,H,T,S] scores), with the causal mask
    built from positions."""
    mask_BTS = kpos_BS[:, None, :] <= qpos_BT[:, :, None]
    return naive_attention(q_BTHK, k_BSHK, v_BSHU, mask_BTS, scale)


def random_inputs(seed, b, t, s, h, k, u, *, shared_kv=False, dtype=jnp.float32):
    """q [B,T,H,K], k [B,S,(H),K], v [B,S,(H),U] and an output cotangent [B,T,H,U], standard normal."""
    rng = np.random.default_rng(seed)
    heads = () if shared_kv else (h,)
    shapes = [(b, t, h, k), (b, s, *heads, k), (b, s, *heads, u), (b, t, h, u)]
    return [jnp.asarray(rng.standard_normal(shape), dtype) for shape in shapes]


def causal_positions(b, t):
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def forward_and_grads(attn, q, k, v, cotangent):
    """attn(q, k, v) and the gradients of sum(attn · cotangent) w.r.t. q, k, v (one jitted vjp)."""

    @jax.jit
    def run(q, k, v, cotangent):
        out, vjp = jax.vjp(attn, q, k, v)
        return out, vjp(cotangent.astype(out.dtype))

    return run(q, k, v, cotangent)


def _assert_matches_reference(fn, q, k, v, cot, qpos, kpos):
    """fn(q, k, v) equals the naive path: forward ≤ FWD_TOL, gradients ≤ GRAD_TOL relative."""
    dense = functools.partial(reference_attention, qpos_BT=qpos, kpos_BS=kpos, scale=SCALE)
    out, grads = forward_and_grads(fn, q, k, v, cot)
    ref_out, ref_grads = forward_and_grads(dense, q, k, v, cot)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), atol=FWD_TOL, rtol=0)
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert float(jnp.max(jnp.abs(grad - ref)) / jnp.max(jnp.abs(ref))) <= GRAD_TOL


def assert_matches_reference(qpos, kpos, q, k, v, cotangent, rows_BT=None, **blocks):
    """Forward ≤ FWD_TOL and q/k/v gradients ≤ GRAD_TOL (relative) against the dense path, on rows_BT only."""
    flash = functools.partial(blockwise_attention, qpos_BT=qpos, kpos_BS=kpos, scale=SCALE, **blocks)
    dense = functools.partial(reference_attention, qpos_BT=qpos, kpos_BS=kpos, scale=SCALE)
    if rows_BT is not None:
        cotangent = cotangent * rows_BT[:, :, None, None]
    out, grads = forward_and_grads(flash, q, k, v, cotangent)
    ref_out, ref_grads = forward_and_grads(dense, q, k, v, cotangent)
    keep_BT = np.ones(out.shape[:2], bool) if rows_BT is None else np.asarray(rows_BT, bool)
    np.testing.assert_allclose(np.asarray(out)[keep_BT], np.asarray(ref_out)[keep_BT], atol=FWD_TOL, rtol=0)
    for name, grad, ref in zip("qkv", grads, ref_grads, strict=True):
        err = float(jnp.max(jnp.abs(grad - ref)) / jnp.max(jnp.abs(ref)))
        assert err <= GRAD_TOL, f"d{name}: relative error {err:.2e} > {GRAD_TOL}"
    return out


@pytest.mark.parametrize("skip", [True, False], ids=["skip_masked_blocks", "every_block"])
def test_per_head_non_divisible_blocks(skip):
    q, k, v, cot = random_inputs(0, b=2, t=100, s=100, h=3, k=24, u=16)
    pos = causal_positions(2, 100)
    assert_matches_reference(pos, pos, q, k, v, cot, block_q=32, block_k=32, skip_masked_blocks=skip)


def test_shared_latent_kv():
    q, k, v, cot = random_inputs(1, b=2, t=100, s=100, h=4, k=24, u=16, shared_kv=True)
    pos = causal_positions(2, 100)
    assert_matches_reference(pos, pos, q, k, v, cot, block_q=32, block_k=48)


def test_decode_against_cache_slots():
    q, k, v, cot = random_inputs(2, b=2, t=3, s=64, h=4, k=24, u=16, shared_kv=True)
    qpos = jnp.broadcast_to(jnp.arange(40, 43, dtype=jnp.int32), (2, 3))
    kpos = causal_positions(2, 64)
    assert_matches_reference(qpos, kpos, q, k, v, cot, block_q=16, block_k=16)


def test_right_padded_rows_are_masked_and_finite():
    """Row 1 holds 60 of 100 tokens: its padded keys sit at PAD_POS, its padded queries at -1 (see nothing)."""
    q, k, v, cot = random_inputs(3, b=2, t=100, s=100, h=3, k=24, u=16)
    valid_BT = jnp.arange(100)[None, :] < jnp.array([[100], [60]])
    qpos = jnp.where(valid_BT, causal_positions(2, 100), -1)
    kpos = jnp.where(valid_BT, causal_positions(2, 100), PAD_POS)
    out = assert_matches_reference(qpos, kpos, q, k, v, cot, rows_BT=valid_BT.astype(jnp.float32), block_q=32,
                                   block_k=32)
    assert np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_array_equal(np.asarray(out[1, 60:]), 0.0)  # a row that sees no key returns 0


@pytest.mark.parametrize("shared_kv", [False, True], ids=["per_head", "shared_latent"])
def test_bfloat16_finite_and_close(shared_kv):
    q, k, v, cot = random_inputs(4, b=2, t=100, s=100, h=2, k=24, u=16, shared_kv=shared_kv, dtype=jnp.bfloat16)
    pos = causal_positions(2, 100)
    flash = functools.partial(blockwise_attention, qpos_BT=pos, kpos_BS=pos, scale=SCALE, block_q=32, block_k=32)
    dense = functools.partial(reference_attention, qpos_BT=pos, kpos_BS=pos, scale=SCALE)
    out, grads = forward_and_grads(flash, q, k, v, cot)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, cot)]
    ref_out, ref_grads = forward_and_grads(dense, *f32)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    assert all(np.all(np.isfinite(np.asarray(x, np.float32))) for x in (out, *grads))
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref_out), atol=BF16_TOL, rtol=0)
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert float(jnp.max(jnp.abs(grad.astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref))) <= BF16_TOL


@pytest.mark.parametrize("bad", [0, -4, 1.5, None])
def test_block_sizes_are_validated(bad):
    q, k, v, _ = random_inputs(5, b=1, t=8, s=8, h=1, k=4, u=4)
    pos = causal_positions(1, 8)
    with pytest.raises(ValueError, match="block_q must be a positive int"):
        blockwise_attention(q, k, v, pos, pos, SCALE, block_q=bad)
    with pytest.raises(ValueError, match="block_k must be a positive int"):
        blockwise_attention(q, k, v, pos, pos, SCALE, block_k=bad)


def _largest_intermediate(jaxpr: jex.Jaxpr) -> int:
    """Element count of the largest value any equation (sub-jaxprs included) produces."""
    largest = 0
    for eqn in jaxpr.eqns:
        largest = max([largest, *(int(np.prod(var.aval.shape)) for var in eqn.outvars if hasattr(var.aval, "shape"))])
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(sub, jex.ClosedJaxpr):
                    largest = max(largest, _largest_intermediate(sub.jaxpr))
                elif isinstance(sub, jex.Jaxpr):
                    largest = max(largest, _largest_intermediate(sub))
    return largest


def test_memory_linear_in_sequence_forward_and_backward():
    """T = S = 4096, H = 2: one [B,H,T,S] float32 score tensor is 128 MiB; the blockwise fwd+bwd stays far below."""
    b, t, h, k = 1, 4096, 2, 8
    q, kk, v = (jax.ShapeDtypeStruct((b, t, h, k), jnp.float32) for _ in range(3))
    pos = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def loss(q, k, v, qpos, kpos):
        return jnp.sum(blockwise_attention(q, k, v, qpos, kpos, SCALE))

    grad = jax.grad(loss, argnums=(0, 1, 2))
    assert _largest_intermediate(jax.make_jaxpr(grad)(q, kk, v, pos, pos).jaxpr) < t * t
    temp_bytes = jax.jit(grad).lower(q, kk, v, pos, pos).compile().memory_analysis().temp_size_in_bytes
    scores_bytes = 4 * t * t * h
    assert temp_bytes < scores_bytes / 8, f"temp {temp_bytes / 2**20:.1f} MiB vs scores {scores_bytes / 2**20} MiB"


@pytest.mark.parametrize(("implementation", "causal", "shared_kv"),
                         [(None, False, False), ("xla", True, False), ("xla", False, True), (None, True, True)])
def test_dot_product_attention_wrapper(implementation, causal, shared_kv):
    """The cuDNN wrapper's own logic (MQA heads, v padded to the q·k width, mask) checked through XLA on CPU."""
    q, k, v, cot = random_inputs(6, b=2, t=40, s=40, h=3, k=24, u=16, shared_kv=shared_kv)
    valid_BT = jnp.arange(40)[None, :] < jnp.array([[40], [30]])
    qpos = causal_positions(2, 40)
    kpos = jnp.where(valid_BT, qpos, PAD_POS)
    wrapped = functools.partial(dot_product_attention_gpu, qpos_BT=qpos, kpos_BS=kpos, scale=SCALE,
                                implementation=implementation, causal=causal)
    _assert_matches_reference(wrapped, q, k, v, cot, qpos, kpos)


@pytest.mark.parametrize("shared_kv", [False, True], ids=["per_head", "shared_latent"])
def test_splash_kernel_in_interpret_mode(shared_kv):
    """The Pallas TPU splash kernel, run by the Pallas interpreter on CPU, on a right-padded causal batch."""
    q, k, v, cot = random_inputs(7, b=2, t=200, s=200, h=2, k=24, u=16, shared_kv=shared_kv)
    valid_BT = jnp.arange(200)[None, :] < jnp.array([[200], [150]])
    qpos = causal_positions(2, 200)
    kpos = jnp.where(valid_BT, qpos, PAD_POS)
    splash = functools.partial(splash_attention_tpu, qpos_BT=qpos, kpos_BS=kpos, scale=SCALE, block_q=128,
                               block_k=128, interpret=True)
    _assert_matches_reference(splash, q, k, v, cot, qpos, kpos)
