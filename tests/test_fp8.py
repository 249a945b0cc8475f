"""FP8 recipe (DESIGN.md §4): block quantisation bounds, the official act_quant / weight_dequant conventions (numpy
re-implementations), the block-scaled matmul, the FP8 training GEMM's custom VJP, the einsum wrapper's routing,
`quantize_params` on a whole model, FP8-resident inference / generation and the FP8 train step on a tiny model
trained on byte-tokenised stdlib sources, and `check_quant` errors.

Measured on CPU (jax 0.10.2), printed with `pytest -s`:
  - fp8_matmul vs exact fp32 on random data: relative Frobenius error y 3.7%, dx 3.7%, dw 3.5% (asserted < 5%),
    and equal (< 1e-5) to the hand-built GEMMs on quantised operands.
  - weights of the tiny test model: fp8 tree / bf16 tree = 0.63 (embedding + head are a large share here).
  - trained tiny model (100 FP8 train steps, byte CE 5.4 → 2.4), FP8-resident vs bf16 weights: logits rel. L2
    ~0.7%, top-1 agreement ~99%, held-out CE equal to ~0.02%.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import dsv3_jax as d
from dsv3_jax.config import FP8_IMPLS, MatmulPolicy
from dsv3_jax.errors import QuantError
from dsv3_jax.quant import fp8, matmul
from dsv3_jax.quant.fp8 import BLOCK, E4M3_MAX, QuantArray
from dsv3_jax.text import ByteTokenizer
from dsv3_jax.train import data as data_lib
from dsv3_jax.train.run_config import run_config_from_dict
from dsv3_jax.train.step import TrainConfig, init_state, make_loss_fn, make_optimizer, make_train_step

F8 = ml_dtypes.float8_e4m3fn
REL_STEP = 2.0 ** -4  # e4m3: 3 mantissa bits → round-to-nearest relative error ≤ 2^-4
SUBNORMAL_STEP = 2.0 ** -9  # e4m3 subnormal spacing (in units of the block scale)


def _rng(seed=0):
    return np.random.default_rng(seed)


def _cdiv(a, b):
    return -(-a // b)


def _heavy_tailed(shape, seed=0):
    """Normal values with per-128-block magnitudes spread over many octaves (so every block has its own scale)."""
    rng = _rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    k, n = shape[-2:]
    mags = np.exp(rng.uniform(-8, 4, (*shape[:-2], _cdiv(k, BLOCK), _cdiv(n, BLOCK)))).astype(np.float32)
    return x * np.repeat(np.repeat(mags, BLOCK, -2), BLOCK, -1)[..., :k, :n]


def _block_amax(w: np.ndarray) -> np.ndarray:
    """Per-element amax of the element's 128×128 block (edge blocks partial)."""
    k, n = w.shape[-2:]
    kb, nb = _cdiv(k, BLOCK), _cdiv(n, BLOCK)
    pad = np.zeros((*w.shape[:-2], kb * BLOCK, nb * BLOCK), np.float32)
    pad[..., :k, :n] = np.abs(w)
    amax = pad.reshape(*w.shape[:-2], kb, BLOCK, nb, BLOCK).max(axis=(-3, -1))
    return np.repeat(np.repeat(amax, BLOCK, -2), BLOCK, -1)[..., :k, :n]


# ---------------------------------------------------------------- numpy re-implementations of the official kernels

def act_quant_np(x: np.ndarray, block: int = BLOCK):
    """Official `act_quant`: per 1×128 tile s = max(amax, 1e-4) / 448, y = x / s cast to e4m3 (saturating)."""
    x = np.asarray(x, np.float32)
    tiles = x.reshape(*x.shape[:-1], x.shape[-1] // block, block)
    s = np.maximum(np.abs(tiles).max(-1), np.float32(1e-4)) / np.float32(448.0)
    y = np.clip(tiles / s[..., None], -448, 448).astype(F8)
    return y.reshape(x.shape), s.astype(np.float32)


def weight_quant_hf_np(w_oi: np.ndarray, block: int = BLOCK):
    """A checkpoint-layout quantiser: w [out, in] → (q [out, in] e4m3, weight_scale_inv [ceil(out/128), ceil(in/128)])
    with W ≈ q · s (s = block amax / 448, 1 for all-zero blocks)."""
    o, i = w_oi.shape
    ob, ib = _cdiv(o, block), _cdiv(i, block)
    pad = np.zeros((ob * block, ib * block), np.float32)
    pad[:o, :i] = w_oi
    blocks = pad.reshape(ob, block, ib, block)
    amax = np.abs(blocks).max(axis=(1, 3))
    s = np.where(amax > 0, amax / np.float32(448.0), np.float32(1.0)).astype(np.float32)
    q = np.clip(blocks / s[:, None, :, None], -448, 448).astype(F8).reshape(pad.shape)[:o, :i]
    return q, s


def weight_dequant_np(q_oi: np.ndarray, s: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """Official `weight_dequant`: W[i, j] = q[i, j] · s[i // 128, j // 128] (float32 here)."""
    o, i = q_oi.shape
    return q_oi.astype(np.float32) * np.repeat(np.repeat(s, block, 0), block, 1)[:o, :i]


def _deq_rows(q, s):
    """Dequantise 1×128 row tiles: q [..., K] · s [..., ceil(K/128)]."""
    k = q.shape[-1]
    return np.asarray(q, np.float32) * np.repeat(np.asarray(s), BLOCK, -1)[..., :k]


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---------------------------------------------------------------- weight quantisation

@pytest.mark.parametrize("shape", [(300, 200), (128, 128), (3, 2, 300, 200), (1, 129)])
def test_weight_quant_error_bound(shape):
    w = _heavy_tailed(shape, seed=len(shape))
    q = fp8.quantize_weight(jnp.asarray(w))
    assert q.values.dtype == jnp.float8_e4m3fn and q.values.shape == shape
    assert q.scales.dtype == jnp.float32
    assert q.scales.shape == (*shape[:-2], _cdiv(shape[-2], BLOCK), _cdiv(shape[-1], BLOCK))
    deq = np.asarray(fp8.dequantize(q))
    amax = _block_amax(w)
    err = np.abs(deq - w)
    assert np.all(err <= amax * REL_STEP), float((err / amax).max())
    # Tighter, elementwise: relative rounding for normals, half a subnormal step below them (+ fp32 slack).
    s = np.asarray(fp8.expand_scales(q.scales, *shape[-2:]))
    assert np.all(err <= np.maximum(np.abs(w) * REL_STEP, s * SUBNORMAL_STEP / 2) + 1e-6 * amax)
    np.testing.assert_allclose(np.asarray(q.scales).max(), amax.max() / 448, rtol=1e-6)


def test_weight_quant_stacked_equals_per_slice():
    w = _heavy_tailed((2, 3, 300, 200), seed=5)
    q = fp8.quantize_weight(jnp.asarray(w))
    for i in range(2):
        for j in range(3):
            qi = fp8.quantize_weight(jnp.asarray(w[i, j]))
            np.testing.assert_array_equal(np.asarray(q.values[i, j]).view(np.uint8),
                                          np.asarray(qi.values).view(np.uint8))
            np.testing.assert_array_equal(np.asarray(q.scales[i, j]), np.asarray(qi.scales))
    sub = q[1, 2]  # QuantArray.__getitem__ indexes the leading axes of both
    assert isinstance(sub, QuantArray) and sub.shape == (300, 200) and sub.scales.shape == (3, 2)


def test_weight_quant_all_zero_blocks():
    w = _heavy_tailed((300, 200), seed=3)
    w[:128, :128] = 0.0  # a full block
    w[256:, 128:] = 0.0  # the partial corner block
    q = fp8.quantize_weight(jnp.asarray(w))
    s = np.asarray(q.scales)
    assert s[0, 0] == 1.0 and s[2, 1] == 1.0
    assert np.all(np.isfinite(s)) and np.all(s > 0)
    deq = np.asarray(fp8.dequantize(q))
    assert np.all(deq[:128, :128] == 0) and np.all(deq[256:, 128:] == 0)
    fp8.check_quant(q)


def test_weight_quant_saturates_at_448():
    """Each block's amax element maps to exactly ±448 and back to ±amax; huge magnitudes stay finite."""
    w = _heavy_tailed((256, 384), seed=7)
    w[5, 7] = 3e37  # near the float32 limit
    w[200, 300] = -1e-30
    q = fp8.quantize_weight(jnp.asarray(w))
    vals = np.asarray(q.values).astype(np.float32)
    assert np.all(np.isfinite(vals)) and np.abs(vals).max() == E4M3_MAX
    blocks = np.abs(vals).reshape(2, BLOCK, 3, BLOCK).max(axis=(1, 3))
    np.testing.assert_array_equal(blocks, np.full((2, 3), E4M3_MAX))
    assert vals[5, 7] == E4M3_MAX
    deq = np.asarray(fp8.dequantize(q))
    np.testing.assert_allclose(deq[5, 7], 3e37, rtol=1e-6)
    assert np.all(np.isfinite(deq))


def test_pow2_scales_are_powers_of_two_and_within_bound():
    w = _heavy_tailed((3, 300, 200), seed=11)
    q = fp8.quantize_weight(jnp.asarray(w), pow2_scales=True)
    s = np.asarray(q.scales)
    exact = fp8.quantize_weight(jnp.asarray(w))
    assert np.all(s >= np.asarray(exact.scales) * (1 - 1e-6))  # rounded up: no value exceeds 448
    err = np.abs(np.asarray(fp8.dequantize(q)) - w)
    assert np.all(err <= _block_amax(w) * REL_STEP)
    mantissa, _ = np.frexp(s)
    bad = mantissa != 0.5
    assert not bad.any(), f"{bad.sum()} non-power-of-two scales, e.g. {s[bad][:4]} (mantissas {mantissa[bad][:4]})"


def test_pow2_activation_scales_are_powers_of_two():
    x = _heavy_tailed((8, 512), seed=12)
    _, s = fp8.quantize_rows(jnp.asarray(x), pow2_scales=True)
    mantissa, _ = np.frexp(np.asarray(s))
    assert np.all(mantissa == 0.5), f"non-power-of-two scales: {np.asarray(s)[mantissa != 0.5][:4]}"


# ---------------------------------------------------------------- activation quantisation (official act_quant)

def _act_input(dtype, seed=1):
    rng = _rng(seed)
    x = (rng.standard_normal((4, 33, 512)) * np.exp(3 * rng.standard_normal((4, 33, 1)))).astype(np.float32)
    x[0, 0, :128] = 0.0  # all-zero tile: the 1e-4 floor
    x[0, 1, :128] *= 1e-7  # tile below the floor
    return np.asarray(jnp.asarray(x).astype(dtype).astype(jnp.float32))


def test_act_quant_matches_official_float32():
    x = _act_input(jnp.float32)
    q, s = fp8.quantize_rows(jnp.asarray(x))
    qn, sn = act_quant_np(x)
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), qn.view(np.uint8))  # bitwise on the fp8 values
    # Scales: within 1 ulp (XLA computes amax · (1/448), not amax / 448).
    np.testing.assert_array_less(np.abs(np.asarray(s).view(np.int32) - sn.view(np.int32)), 2)
    assert np.asarray(s)[0, 0, 0] == pytest.approx(1e-4 / 448, rel=1e-6)
    assert np.all(np.asarray(q)[0, 0, :128].astype(np.float32) == 0)


@pytest.mark.xfail(strict=True, reason="XLA CPU rewrites x / broadcast(s) as x * (1/s): for bf16-valued inputs a few "
                                       "ties round to the other e4m3 neighbour than IEEE x / s (~0.07% of values)")
def test_act_quant_matches_official_bf16_inputs():
    x = _act_input(jnp.bfloat16)
    q, _ = fp8.quantize_rows(jnp.asarray(x, jnp.bfloat16))
    qn, _ = act_quant_np(x)
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), qn.view(np.uint8))


def test_act_quant_partial_tile_and_bound():
    """K not a multiple of 128: the last tile is partial (its own amax); |x - deq| ≤ tile amax · 2^-4."""
    x = _act_input(jnp.float32)[..., :300]
    q, s = fp8.quantize_rows(jnp.asarray(x))
    assert q.shape == x.shape and s.shape == (4, 33, 3)
    padded = np.concatenate([x, np.zeros((4, 33, 84), np.float32)], -1)
    qn, _ = act_quant_np(padded)
    np.testing.assert_array_equal(np.asarray(q).view(np.uint8), qn[..., :300].view(np.uint8))
    amax = np.repeat(np.abs(padded).reshape(4, 33, 3, BLOCK).max(-1), BLOCK, -1)[..., :300]
    assert np.all(np.abs(_deq_rows(q, s) - x) <= amax * REL_STEP)


# ---------------------------------------------------------------- checkpoint convention

def test_checkpoint_convention_round_trip():
    """HF layout [out, in] + weight_scale_inv [ceil(out/128), ceil(in/128)] ↔ QuantArray(q.T, s.T), bit-exact."""
    w_oi = _heavy_tailed((300, 200), seed=21)
    q_oi, s = weight_quant_hf_np(w_oi)
    assert s.shape == (3, 2)
    w_hf = weight_dequant_np(q_oi, s)
    ours = QuantArray(values=jnp.asarray(q_oi.T), scales=jnp.asarray(s.T))
    fp8.check_quant(ours)
    np.testing.assert_array_equal(np.asarray(fp8.dequantize(ours)), w_hf.T)
    # quantize_weight of the [in, out] weight gives the checkpoint's fp8 values (scales within 1 ulp).
    mine = fp8.quantize_weight(jnp.asarray(w_oi.T))
    np.testing.assert_array_equal(np.asarray(mine.values).view(np.uint8), q_oi.T.view(np.uint8))
    np.testing.assert_allclose(np.asarray(mine.scales), s.T, rtol=2e-7)


# ---------------------------------------------------------------- scaled matmul

@pytest.fixture(scope="module")
def operands():
    rng = _rng(31)
    a = (rng.standard_normal((48, 300)) * np.exp(rng.standard_normal((48, 1)))).astype(np.float32)
    b = _heavy_tailed((300, 200), seed=32)
    aq, a_s = fp8.quantize_rows(jnp.asarray(a))
    bq = fp8.quantize_weight(jnp.asarray(b))
    a_deq = _deq_rows(aq, a_s)
    b_deq = np.asarray(fp8.dequantize(bq))
    return aq, a_s, bq, a_deq, b_deq


@pytest.mark.parametrize("impl", FP8_IMPLS)
def test_scaled_matmul_equals_dequantised_product(operands, impl):
    aq, a_s, bq, a_deq, b_deq = operands
    out = np.asarray(fp8.scaled_matmul(aq, a_s, bq.values, bq.scales, impl))
    assert out.dtype == np.float32 and out.shape == (48, 200)
    ref = a_deq.astype(np.float64) @ b_deq.astype(np.float64)
    assert _rel(out, ref) < 1e-5
    assert fp8.quantized_matmul(jnp.asarray(a_deq), bq, impl).shape == (48, 200)


def test_scaled_matmul_blockwise_vs_dequant_rounding_only(operands):
    aq, a_s, bq, *_ = operands
    bw = np.asarray(fp8.scaled_matmul(aq, a_s, bq.values, bq.scales, "blockwise"))
    dq = np.asarray(fp8.scaled_matmul(aq, a_s, bq.values, bq.scales, "dequant"))
    np.testing.assert_allclose(bw, dq, rtol=0, atol=1e-5 * np.abs(dq).max())


@pytest.mark.parametrize("impl", FP8_IMPLS)
def test_scaled_matmul_per_column_b_scales(operands, impl):
    """b_s [KB, N]: one scale per column and K block (the weight-gradient GEMM's gradient operand)."""
    aq, a_s, _, a_deq, _ = operands
    g = _rng(33).standard_normal((200, 300)).astype(np.float32)  # [N, K] rows → tiles along K
    gq, gs = fp8.quantize_rows(jnp.asarray(g))
    out = np.asarray(fp8.scaled_matmul(aq, a_s, gq.T, gs.T, impl))
    ref = a_deq.astype(np.float64) @ _deq_rows(gq, gs).T.astype(np.float64)
    assert _rel(out, ref) < 1e-5


# ---------------------------------------------------------------- the FP8 training GEMM (custom VJP)

@pytest.mark.parametrize("impl", FP8_IMPLS)
def test_fp8_matmul_forward_and_gradients(impl):
    rng = _rng(41)
    x = rng.standard_normal((64, 256)).astype(np.float32)
    w = (0.05 * rng.standard_normal((256, 192))).astype(np.float32)
    g = rng.standard_normal((64, 192)).astype(np.float32)
    @jax.jit
    def run(x_, w_, g_):
        y_, vjp = jax.vjp(lambda a, b: fp8.fp8_matmul(a, b, impl), x_, w_)
        return (y_, *vjp(g_), fp8.quantized_matmul(x_, fp8.quantize_weight(w_), impl))

    y, dx, dw, y_ref = (np.asarray(t) for t in run(jnp.asarray(x), jnp.asarray(w), jnp.asarray(g)))
    # Forward: x quantised 1×128, w quantised 128×128.
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-6 * np.abs(y).max())
    # Close to the exact fp32 gradients ...
    x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
    rel_y, rel_dx, rel_dw = _rel(y, x64 @ w64), _rel(dx, g64 @ w64.T), _rel(dw, x64.T @ g64)
    print(f"\n[{impl}] fp8_matmul relative error vs fp32: y {rel_y:.4f}  dx {rel_dx:.4f}  dw {rel_dw:.4f}")
    assert rel_y < 0.05 and rel_dx < 0.05 and rel_dw < 0.05
    # ... but not equal to them: the backward GEMMs run on quantised operands (error of e4m3 magnitude) ...
    assert rel_dx > 1e-3 and rel_dw > 1e-3
    # ... exactly the hand-built quantised computation:
    gq, gs, w_deq, xtq, xts, gtq, gts = jax.jit(lambda x_, w_, g_: (
        *fp8.quantize_rows(g_),  # g tiled along N (the contraction of dx = g·wᵀ)
        fp8.dequantize(fp8.quantize_weight(w_)),  # w in 128×128 blocks
        *fp8.quantize_rows(x_.T),  # xᵀ tiled along M (the contraction of dw = xᵀ·g)
        *fp8.quantize_rows(g_.T)))(jnp.asarray(x), jnp.asarray(w), jnp.asarray(g))
    w_deq = np.asarray(w_deq, np.float64)
    dx_ref = _deq_rows(gq, gs).astype(np.float64) @ w_deq.T
    dw_ref = _deq_rows(xtq, xts).astype(np.float64) @ _deq_rows(gtq, gts).T.astype(np.float64)
    assert _rel(dx, dx_ref) < 1e-5 and _rel(dw, dw_ref) < 1e-5


def test_fp8_matmul_gradient_dtypes():
    x = jnp.asarray(_rng(42).standard_normal((16, 130)), jnp.bfloat16)
    w = jnp.asarray(0.1 * _rng(43).standard_normal((130, 40)), jnp.float32)
    dx, dw = jax.jit(jax.grad(lambda a, b: jnp.sum(fp8.fp8_matmul(a, b, "dequant") ** 2), argnums=(0, 1)))(x, w)
    assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(dx.astype(jnp.float32)))) and bool(jnp.all(jnp.isfinite(dw)))


# ---------------------------------------------------------------- the einsum wrapper

@pytest.fixture
def spies(monkeypatch):
    calls = {"quantized": 0, "fp8": 0}

    def wrap(name, fn):
        def spy(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return spy

    monkeypatch.setattr(matmul, "quantized_matmul", wrap("quantized", fp8.quantized_matmul))
    monkeypatch.setattr(matmul, "fp8_matmul", wrap("fp8", fp8.fp8_matmul))
    return calls


def test_einsum_2d_quant_weight_takes_fp8_path(spies):
    x = jnp.asarray(_rng(51).standard_normal((2, 5, 200)), jnp.float32)
    w = fp8.quantize_weight(jnp.asarray(_heavy_tailed((200, 136), seed=52)))
    pol = MatmulPolicy(impl="blockwise")

    @jax.jit
    def run(x_, w_):
        return (matmul.einsum("btd,dk->btk", x_, w_, policy=pol),
                matmul.einsum("...d,df->...f", x_, w_, policy=pol),  # the "..." spelling of layers.swiglu
                fp8.quantized_matmul(x_.reshape(10, 200), w_, "blockwise").reshape(2, 5, 136),
                jnp.einsum("btd,dk->btk", x_, fp8.dequantize(w_)))

    y, y_dots, ref, dense = run(x, w)
    assert spies["quantized"] == 2 and y.shape == (2, 5, 136) and y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_dots))
    assert 1e-4 < _rel(y, dense) < 0.05  # the activations were quantised too


def test_einsum_batched_quant_weight_takes_fp8_path(spies):
    x = jnp.asarray(_rng(53).standard_normal((3, 8, 200)), jnp.bfloat16)
    w = fp8.quantize_weight(jnp.asarray(_heavy_tailed((3, 200, 72), seed=54)))
    y, ref = jax.jit(lambda x_, w_: (
        matmul.einsum("ztd,zdf->ztf", x_, w_, policy=MatmulPolicy(impl="dequant")),
        jnp.stack([fp8.quantized_matmul(x_[z], w_[z], "dequant") for z in range(3)])))(x, w)
    assert spies["quantized"] >= 1 and y.shape == (3, 8, 72) and y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref.astype(jnp.bfloat16), np.float32),
                               rtol=1e-2, atol=1e-3)


def test_einsum_other_shapes_dequantise(spies):
    """A shape the FP8 path does not cover (the absorbed-attention einsum) dequantises the weight."""
    x = jnp.asarray(_rng(55).standard_normal((2, 3, 4, 16)), jnp.float32)
    w = fp8.quantize_weight(jnp.asarray(_heavy_tailed((24, 4, 16), seed=56)))
    y = matmul.einsum("bthn,chn->bthc", x, w, policy=MatmulPolicy())
    assert spies["quantized"] == 0 and spies["fp8"] == 0
    np.testing.assert_allclose(np.asarray(y), np.asarray(jnp.einsum("bthn,chn->bthc", x, fp8.dequantize(w))),
                               rtol=1e-6, atol=1e-6)


def test_einsum_fp8_plain_quantises_on_the_fly(spies):
    x = jnp.asarray(_rng(57).standard_normal((2, 5, 200)), jnp.float32)
    w = jnp.asarray(_heavy_tailed((200, 136), seed=58))
    wz = jnp.asarray(_heavy_tailed((2, 200, 40), seed=59))

    @jax.jit
    def run(x_, w_, wz_):
        y_ = matmul.einsum("btd,dk->btk", x_, w_, policy=MatmulPolicy(fp8_plain=True))
        n_2d = spies["fp8"]
        yz = matmul.einsum("ztd,zdf->ztf", x_, wz_, policy=MatmulPolicy(fp8_plain=True))  # batched plain weights
        n_batched = spies["fp8"] - n_2d
        y_plain = matmul.einsum("btd,dk->btk", x_, w_, policy=MatmulPolicy(fp8_plain=False))
        assert spies["fp8"] == n_2d + n_batched and spies["quantized"] == 0  # fp8_plain=False: the plain path
        assert n_2d == 1 and n_batched >= 1
        return (y_, fp8.fp8_matmul(x_.reshape(10, 200), w_, "blockwise").reshape(2, 5, 136), y_plain,
                jnp.einsum("btd,dk->btk", x_, w_), yz)

    y, ref, y_plain, dense, yz = run(x, w, wz)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(y_plain), np.asarray(dense), rtol=1e-6, atol=1e-5)
    assert 1e-4 < _rel(y, dense) < 0.05 and yz.shape == (2, 5, 40)


def test_einsum_without_policy_dequantises(spies):
    x = jnp.asarray(_rng(60).standard_normal((2, 5, 200)), jnp.float32)
    w = fp8.quantize_weight(jnp.asarray(_heavy_tailed((200, 136), seed=61)))
    y, ref = jax.jit(lambda x_, w_: (matmul.einsum("btd,dk->btk", x_, w_),
                                     jnp.einsum("btd,dk->btk", x_, fp8.dequantize(w_))))(x, w)
    assert spies["quantized"] == 0 and spies["fp8"] == 0
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-6, atol=1e-5)


# ---------------------------------------------------------------- whole model: which weights are quantised

FP8_KEYS = {"wq", "wq_a", "wq_b", "wkv_a", "wkv_b", "wo", "w_gate", "w_up", "w_down"}


def _keys(path) -> list[str]:
    return [str(getattr(p, "key", getattr(p, "name", p))) for p in path]


def _flat(tree):
    return {"/".join(_keys(p)): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, QuantArray))[0]}


@pytest.mark.parametrize("q_lora", [None, 32])
def test_quantize_params_covers_exactly_the_recipe(q_lora):
    cfg = d.ModelConfig.from_preset("tiny", num_hidden_layers=4, first_k_dense_replace=2, q_lora_rank=q_lora)
    params = d.abstract_variables(cfg)["params"]
    quant = jax.eval_shape(fp8.quantize_params, params)  # shapes only: nothing is allocated
    before, after = _flat(params), _flat(quant)
    assert before.keys() == after.keys()
    converted = {k for k, v in after.items() if isinstance(v, QuantArray)}
    expected = {k for k in before if k.split("/")[-1] in FP8_KEYS}
    assert converted == expected
    attn = {"wq"} if q_lora is None else {"wq_a", "wq_b"}
    groups = {  # every group of the recipe is present
        "attention": [k for k in converted if k.split("/")[-1] in attn | {"wkv_a", "wkv_b", "wo"}],
        "dense MLP": [k for k in converted if k.startswith("dense_layers") and "/mlp/" in k],
        "shared experts": [k for k in converted if "/moe/shared/" in k and not k.startswith("mtp_")],
        "routed experts": [k for k in converted if "/moe/w_" in k and not k.startswith("mtp_")],
        "MTP block": [k for k in converted if k.startswith("mtp_0/block/")],
    }
    assert all(groups.values()), {g: len(v) for g, v in groups.items()}
    attn_all = attn | {"wkv_a", "wkv_b", "wo"}
    assert len([k for k in groups["attention"] if not k.startswith("mtp_")]) == 2 * len(attn_all)  # dense + MoE stack
    assert {k.split("/")[-1] for k in groups["MTP block"]} == attn_all | {"w_gate", "w_up", "w_down"}
    for k, v in after.items():
        if k in converted:
            assert v.values.dtype == jnp.float8_e4m3fn and v.values.shape == before[k].shape
            *lead, kk, nn_ = before[k].shape
            assert v.scales.shape == (*lead, _cdiv(kk, BLOCK), _cdiv(nn_, BLOCK)) and v.scales.dtype == jnp.float32
        else:
            assert v.shape == before[k].shape and v.dtype == before[k].dtype
    kept = {k.split("/")[-1] for k in after if k not in converted}
    assert {"embed_tokens", "lm_head", "gate", "eh_proj", "scale", "q_norm" if q_lora else "kv_norm"} <= kept
    assert after["moe_layers/layers/moe/gate"].dtype == jnp.float32  # router gate stays fp32


# ---------------------------------------------------------------- a tiny model trained with the FP8 train step

MODEL_TABLE = dict(
    preset="tiny", hidden_size=64, intermediate_size=160, moe_intermediate_size=32, num_hidden_layers=2,
    first_k_dense_replace=1, num_attention_heads=2, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
    qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
    max_position_embeddings=128, num_nextn_predict_layers=0)  # no MTP here: it doubles the train-step compile
TRAIN_STEPS, B, T = 100, 8, 32
# This module's own compiles (train step, inference) skip XLA's expensive CPU passes: compile time dominates here.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _bf16_tree(params):
    """Every float leaf in bf16 except the router gate (fp32 in the recipe); QuantArrays kept."""
    def cast(path, leaf):
        if isinstance(leaf, QuantArray) or _keys(path)[-1] == "gate":
            return leaf
        return leaf.astype(jnp.bfloat16)
    return jax.tree_util.tree_map_with_path(cast, params, is_leaf=lambda x: isinstance(x, QuantArray))


def _init_like_flax(config, seed=0):
    """init_variables' distributions (normal(init_std) matrices, unit norms, zero router bias) drawn with numpy from
    the abstract shapes: skips compiling the init function."""
    rng = _rng(seed)

    def make(path, leaf):
        key = _keys(path)[-1]
        if key in ("scale", "q_norm", "kv_norm"):
            return jnp.ones(leaf.shape, leaf.dtype)
        if key == "bias":
            return jnp.zeros(leaf.shape, leaf.dtype)
        return jnp.asarray(rng.normal(0.0, config.init_std, leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(make, d.abstract_variables(config))


@pytest.fixture(scope="module")
def trained():
    """100 steps of the library's train step (make_train_step) with matmul_precision="fp8" on byte-tokenised
    stdlib text, then bf16-weight and FP8-weight logits of the trained model on a held-out batch."""
    mc = run_config_from_dict({"model": MODEL_TABLE}).model.replace(
        vocab_size=259, dtype="bfloat16", matmul_precision="fp8", fp8_impl="dequant")
    tokens = data_lib.tokenize_corpus(data_lib.stdlib_corpus(150_000), ByteTokenizer())
    batches = data_lib.PackedBatches(tokens, B, T, seed=0)
    tc = TrainConfig(steps=TRAIN_STEPS, batch_size=B, seq_len=T, lr=3e-3, warmup_steps=5, seed=0)
    opt = make_optimizer(tc)
    state = init_state(_init_like_flax(mc), opt)
    batch = next(batches)
    step = jax.jit(make_train_step(mc, tc, opt), donate_argnums=0).lower(state, batch).compile(FAST_COMPILE)
    history = []
    for _ in range(TRAIN_STEPS):
        state, metrics = step(state, batch)
        history.append({k: np.asarray(metrics[k]) for k in ("loss", "ce", "grad_norm", "finite")})
        batch = next(batches)
    params, router = jax.device_get(state.params), jax.device_get(state.router)

    # Inference: QuantArray weights alone select the FP8 path (matmul_precision "default").
    infer = mc.replace(matmul_precision="default")
    model = d.Transformer(infer)

    def both(params_, router_, tokens_):
        p16, p8 = _bf16_tree(params_), _bf16_tree(fp8.quantize_params(params_))
        return (model.apply({"params": p16, "router": router_}, tokens_)[0],
                model.apply({"params": p8, "router": router_}, tokens_)[0], p16, p8)

    logits_bf16, logits_fp8, p16, p8 = jax.jit(both).lower(params, router, batch["inputs"]).compile(FAST_COMPILE)(
        params, router, batch["inputs"])
    return {"config": mc, "infer_config": infer, "train_config": tc, "history": history, "params": params,
            "router": router, "tokens": batch["inputs"], "targets": batch["targets"], "params_bf16": p16,
            "params_fp8": p8, "logits_bf16": np.asarray(logits_bf16), "logits_fp8": np.asarray(logits_fp8)}


def test_fp8_train_step_finite_and_learning(trained):
    h = trained["history"]
    assert all(bool(m["finite"]) for m in h)
    assert all(np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]) and m["grad_norm"] > 0 for m in h)
    first, last = float(np.mean([m["ce"] for m in h[:5]])), float(np.mean([m["ce"] for m in h[-5:]]))
    print(f"\nfp8 training CE: first 5 steps {first:.3f} → last 5 steps {last:.3f}")
    assert last < first - 1.5  # byte CE starts at ln(259) ≈ 5.56


def test_fp8_loss_graph_uses_fp8(trained):
    """The fp8 config's loss traces FP8 tensors and the custom VJP; the default config's does not."""
    mc, tc = trained["config"], trained["train_config"]
    batch = {"inputs": trained["tokens"], "targets": trained["targets"]}
    args = (trained["params"], trained["router"], batch, jnp.float32(0.3))
    text_fp8 = str(jax.make_jaxpr(lambda *a: make_loss_fn(mc, tc)(*a)[0])(*args))
    text_def = str(jax.make_jaxpr(lambda *a: make_loss_fn(mc.replace(matmul_precision="default"), tc)(*a)[0])(*args))
    assert "f8_e4m3fn" in text_fp8 and "custom_vjp" in text_fp8
    assert "f8_e4m3fn" not in text_def


def test_fp8_weight_memory(trained):
    params_bf16, params_fp8 = trained["params_bf16"], trained["params_fp8"]
    fp8.check_quant(params_fp8["moe_layers"]["layers"]["moe"]["w_down"], "w_down")  # [L, E, F, D]
    mem_bf16, mem_fp8 = fp8.tree_nbytes(params_bf16), fp8.tree_nbytes(params_fp8)
    quant = [v for v in _flat(params_fp8).values() if isinstance(v, QuantArray)]
    q_vals, q_scales = sum(v.values.nbytes for v in quant), sum(v.scales.nbytes for v in quant)
    ratio = mem_fp8 / mem_bf16
    print(f"\nweights: fp32 {fp8.tree_nbytes(trained['params']):,} B, bf16 {mem_bf16:,} B, fp8 {mem_fp8:,} B "
          f"(fp8/bf16 {ratio:.3f}); quantised leaves {q_vals:,} B values + {q_scales:,} B scales")
    assert mem_fp8 == mem_bf16 - q_vals + q_scales  # every quantised byte halves, plus its scales
    assert 0.5 < ratio < 0.8


def test_fp8_inference_logits(trained):
    """FP8-resident weights (activations quantised on the fly) vs bf16 weights, same trained model."""
    lb, lf = trained["logits_bf16"], trained["logits_fp8"]
    rel = _rel(lf, lb)
    agree = float(np.mean(lf.argmax(-1) == lb.argmax(-1)))

    def ce(lg):
        lp = jax.nn.log_softmax(jnp.asarray(lg), -1)
        return float(-jnp.mean(jnp.take_along_axis(lp, jnp.asarray(trained["targets"])[..., None], -1)))

    ce_bf16, ce_fp8 = ce(lb), ce(lf)
    print(f"\nFP8-weight vs bf16 logits (trained tiny model, batch {lb.shape[:2]}): rel L2 {rel:.4f}, max |diff| "
          f"{np.abs(lf - lb).max():.3f}, top-1 agreement {agree:.3f}, held-out CE bf16 {ce_bf16:.4f} fp8 {ce_fp8:.4f}")
    assert np.all(np.isfinite(lf))
    assert 1e-4 < rel < 0.05 and agree > 0.9 and abs(ce_fp8 - ce_bf16) / ce_bf16 < 0.01


def test_generation_with_fp8_resident_weights(trained):
    mc = trained["infer_config"]
    prompt = trained["tokens"][0, :16].tolist()
    out = d.generate(mc, {"params": trained["params_fp8"], "router": trained["router"]}, prompt, 12, stop_ids=())
    toks = out.tokens[0]
    assert len(toks) == 12 and all(0 <= t < mc.vocab_size for t in toks)
    # The greedy first token is among the FP8 forward's top 3 at the prompt's last position (decoding runs the
    # absorbed attention, which dequantises wkv_b, so exact argmax equality is not guaranteed).
    assert toks[0] in np.argsort(trained["logits_fp8"][0, 15])[-3:]
    print(f"\nfp8 greedy continuation of {bytes(t - 3 for t in prompt if t >= 3)!r}: "
          f"{bytes(t - 3 for t in toks if t >= 3)!r}")


# ---------------------------------------------------------------- bad input

def _good_quant():
    return fp8.quantize_weight(jnp.asarray(_heavy_tailed((300, 200), seed=71)))


@pytest.mark.parametrize("scales_shape", [(2, 3), (3, 3), (1, 3, 2), (3,), (300, 200)])
def test_check_quant_rejects_wrong_scale_shape(scales_shape):
    q = _good_quant()
    with pytest.raises(QuantError, match="scale shape"):
        fp8.check_quant(QuantArray(q.values, jnp.ones(scales_shape, jnp.float32)), "layer.w")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 0.0, -1e-3])
def test_check_quant_rejects_bad_scales(bad):
    q = _good_quant()
    with pytest.raises(QuantError, match="finite and > 0"):
        fp8.check_quant(QuantArray(q.values, q.scales.at[1, 1].set(bad)), "layer.w")


def test_check_quant_rejects_nan_values():
    q = _good_quant()
    raw = np.asarray(q.values).view(np.uint8).copy()
    raw[17, 42] = 0x7F  # e4m3fn NaN
    with pytest.raises(QuantError, match="NaN"):
        fp8.check_quant(QuantArray(jnp.asarray(raw.view(F8)), q.scales), "layer.w")
    fp8.check_quant(q)  # the untouched one is fine
    stacked = fp8.quantize_weight(jnp.asarray(_heavy_tailed((2, 300, 200), seed=72)))
    fp8.check_quant(stacked)
    with pytest.raises(QuantError, match="scale shape"):
        fp8.check_quant(QuantArray(stacked.values, stacked.scales[0]))
