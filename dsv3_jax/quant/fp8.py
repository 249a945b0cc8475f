"""FP8 (float8_e4m3fn) block quantisation and the block-scaled matmul of DeepSeek-V3 (DESIGN.md §4).

- Weights: 128×128 blocks, one float32 scale per block (`QuantArray`). Our weights are [in, out] (K, N), so the
  released checkpoints' `weight_scale_inv` [ceil(out/128), ceil(in/128)] is the transpose of `scales`.
- Activations: 1×128 tiles along the contraction axis, scale = max(amax, 1e-4) / 448 (the official `act_quant`).
- Products: per 128-wide K block the FP8 partial sums are computed with float32 accumulation, scaled by the two
  scales and added in float32 ("blockwise": promotion every N_C = 128 elements of K). "dequant" computes the same
  sum as one dot over dequantised operands (same math, different rounding order; fast where FP8 units are absent).
- Training: `fp8_matmul` is a custom_vjp whose forward and both backward GEMMs run on freshly quantised operands.
"""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp

from dsv3_jax.config import FP8_BLOCK as BLOCK
from dsv3_jax.errors import QuantError
from dsv3_jax.quant.blockwise import scaled_matmul_scan, weight_only_matmul

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0
ACT_EPS = 1e-4



@flax.struct.dataclass
class QuantArray:
    """A weight [..., K, N] held as FP8 values and float32 128×128 block scales [..., ceil(K/128), ceil(N/128)]."""

    values: jax.Array
    scales: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def ndim(self) -> int:
        return self.values.ndim

    @property
    def nbytes(self) -> int:
        return int(self.values.nbytes + self.scales.nbytes)

    def __getitem__(self, index) -> QuantArray:
        """Index leading (stacked layer / expert) axes of both values and scales."""
        return QuantArray(self.values[index], self.scales[index])

    def astype(self, dtype) -> jax.Array:
        return dequantize(self, dtype)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pad_last2(x: jax.Array, block: int) -> jax.Array:
    k, n = x.shape[-2:]
    pad = [(0, 0)] * (x.ndim - 2) + [(0, _cdiv(k, block) * block - k), (0, _cdiv(n, block) * block - n)]
    return jnp.pad(x, pad)


def _round_pow2(scale: jax.Array) -> jax.Array:
    """Smallest power of two >= scale, built exactly from the exponent (exp2(ceil(log2)) is off by ulps on CPU)."""
    mantissa, exponent = jnp.frexp(scale)  # scale = mantissa · 2^exponent, mantissa in [0.5, 1)
    return jnp.ldexp(jnp.ones_like(scale), jnp.where(mantissa == 0.5, exponent - 1, exponent))


def quantize_weight(w: jax.Array, *, pow2_scales: bool = False, block: int = BLOCK) -> QuantArray:
    """w [..., K, N] → QuantArray with scale = amax/448 per block (1 for all-zero blocks); edge blocks partial."""
    k, n = w.shape[-2:]
    padded = _pad_last2(w.astype(jnp.float32), block)
    kb, nb = padded.shape[-2] // block, padded.shape[-1] // block
    blocks = padded.reshape(*w.shape[:-2], kb, block, nb, block)
    amax = jnp.max(jnp.abs(blocks), axis=(-3, -1))
    scales = jnp.where(amax > 0, amax / E4M3_MAX, 1.0)
    if pow2_scales:
        scales = _round_pow2(scales)
    q = jnp.clip(blocks / scales[..., :, None, :, None], -E4M3_MAX, E4M3_MAX).astype(E4M3)
    return QuantArray(q.reshape(padded.shape)[..., :k, :n], scales.astype(jnp.float32))


def expand_scales(scales: jax.Array, k: int, n: int, block: int = BLOCK) -> jax.Array:
    """Block scales [..., KB, NB] → per-element [..., K, N]."""
    full = jnp.repeat(jnp.repeat(scales, block, axis=-2), block, axis=-1)
    return full[..., :k, :n]


def dequantize(q: QuantArray, dtype=jnp.float32) -> jax.Array:
    """W = values · scales[i // 128, j // 128] (the checkpoint `weight_scale_inv` convention), the product in
    float32, rounded once to `dtype`.

    When the blocks tile the matrix exactly, the values are viewed as [..., KB, 128, NB, 128] and the scales
    broadcast over each block (no per-element [..., K, N] copy of the scales); other shapes repeat the scales."""
    k, n = q.values.shape[-2:]
    kb, nb = q.scales.shape[-2:]
    if k != kb * BLOCK or n != nb * BLOCK:
        return (q.values.astype(jnp.float32) * expand_scales(q.scales, k, n)).astype(dtype)
    lead = q.values.shape[:-2]
    blocks = q.values.reshape(*lead, kb, BLOCK, nb, BLOCK).astype(jnp.float32)
    w = blocks * q.scales.astype(jnp.float32)[..., :, None, :, None]
    return w.astype(dtype).reshape(*lead, k, n)


def quantize_rows(x: jax.Array, *, pow2_scales: bool = False, block: int = BLOCK) -> tuple[jax.Array, jax.Array]:
    """1×128 tiles along the last axis: (FP8 values [..., K], float32 scales [..., ceil(K/128)])."""
    k = x.shape[-1]
    kb = _cdiv(k, block)
    tiles = jnp.pad(x.astype(jnp.float32), [(0, 0)] * (x.ndim - 1) + [(0, kb * block - k)])
    tiles = tiles.reshape(*x.shape[:-1], kb, block)
    scales = jnp.maximum(jnp.max(jnp.abs(tiles), axis=-1), ACT_EPS) / E4M3_MAX
    if pow2_scales:
        scales = _round_pow2(scales)
    q = jnp.clip(tiles / scales[..., None], -E4M3_MAX, E4M3_MAX).astype(E4M3)
    return q.reshape(*x.shape[:-1], kb * block)[..., :k], scales


def scaled_matmul(aq: jax.Array, a_s: jax.Array, bq: jax.Array, b_s: jax.Array, impl: str = "blockwise",
                  block: int = BLOCK) -> jax.Array:
    """[M,K]·[K,N] of FP8 operands → float32 [M,N].

    a_s [M, KB] scales a's 1×128 row tiles; b_s is [KB, NB] (128×128 blocks) or [KB, N] (one scale per column
    and K block, as for the gradient operand of the weight-gradient GEMM). "blockwise": the recipe's product,
    promoted to float32 every 128 of K, accumulated over K blocks in a loop (`blockwise.scaled_matmul_scan`:
    temporaries O(M·N), never [M, K/128, N]); "dequant": the same sum as one dot over dequantised operands.
    """
    if impl != "dequant":
        return scaled_matmul_scan(aq, a_s, bq, b_s, block=block)
    k, n = bq.shape
    b_full = b_s if b_s.shape[-1] == n else jnp.repeat(b_s, block, axis=-1)[:, :n]  # [KB, N]
    a = aq.astype(jnp.float32) * jnp.repeat(a_s, block, axis=-1)[:, :k]
    b = bq.astype(jnp.float32) * jnp.repeat(b_full, block, axis=0)[:k]
    return jnp.dot(a, b, preferred_element_type=jnp.float32)


def quantized_matmul(x_MK: jax.Array, w: QuantArray, impl: str) -> jax.Array:
    """Activations quantised on the fly (1×128) against an FP8-resident weight → float32 [M, N]; or, for
    "weight_only", the weight's 128×128 blocks dequantised and multiplied in x's dtype (as the official inference
    code does by default: FP8 storage, bf16 compute)."""
    if impl == "weight_only":
        return weight_only_matmul(x_MK, w.values, w.scales, out_dtype=jnp.float32, dtype=x_MK.dtype)
    xq, xs = quantize_rows(x_MK)
    return scaled_matmul(xq, xs, w.values, w.scales, impl)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def fp8_matmul(x_MK: jax.Array, w_KN: jax.Array, impl: str = "blockwise") -> jax.Array:
    """Training GEMM: x and w freshly quantised (1×128 / 128×128); float32 [M, N]. Gradients also run in FP8."""
    return quantized_matmul(x_MK, quantize_weight(w_KN), impl)


def _fp8_fwd(x_MK, w_KN, impl):
    wq = quantize_weight(w_KN)
    return quantized_matmul(x_MK, wq, impl), (x_MK, wq, jnp.zeros((), w_KN.dtype))


def _fp8_bwd(impl, residuals, g_MN):
    x_MK, wq, w_like = residuals
    gq, gs = quantize_rows(g_MN)  # tiles along N: the contraction of dx = g · wᵀ
    dx = scaled_matmul(gq, gs, jnp.swapaxes(wq.values, 0, 1), jnp.swapaxes(wq.scales, 0, 1), impl)
    xtq, xts = quantize_rows(jnp.swapaxes(x_MK, 0, 1))  # tiles along M: the contraction of dw = xᵀ · g
    gtq, gts = quantize_rows(jnp.swapaxes(g_MN, 0, 1))
    dw = scaled_matmul(xtq, xts, jnp.swapaxes(gtq, 0, 1), jnp.swapaxes(gts, 0, 1), impl)
    return dx.astype(x_MK.dtype), dw.astype(w_like.dtype)


fp8_matmul.defvjp(_fp8_fwd, _fp8_bwd)


def check_quant(q: QuantArray, name: str = "weight") -> None:
    """Scales must match the values' block grid and be finite and positive; values finite."""
    k, n = q.values.shape[-2:]
    want = (*q.values.shape[:-2], _cdiv(k, BLOCK), _cdiv(n, BLOCK))
    if tuple(q.scales.shape) != want:
        raise QuantError(f"{name}: scale shape {tuple(q.scales.shape)} does not match values {q.shape} "
                         f"(expected {want} for {BLOCK}x{BLOCK} blocks)")
    if not bool(jnp.all(jnp.isfinite(q.scales) & (q.scales > 0))):
        raise QuantError(f"{name}: scales must be finite and > 0")
    if not bool(jnp.all(jnp.isfinite(q.values.astype(jnp.float32)))):
        raise QuantError(f"{name}: FP8 values contain NaN")


FP8_WEIGHT_NAMES = frozenset({"wq", "wq_a", "wq_b", "wkv_a", "wkv_b", "wo", "w_gate", "w_up", "w_down"})


def quantize_params(params, *, pow2_scales: bool = False):
    """Transform a parameter tree: every linear weight the FP8 recipe covers (attention, dense MLP, shared and
    routed experts, the MTP block's too) becomes a QuantArray; embedding, head, norms, router gate, eh_proj stay."""

    def visit(path, leaf):
        name = getattr(path[-1], "key", None)
        if name in FP8_WEIGHT_NAMES and leaf.ndim >= 2:
            return quantize_weight(leaf, pow2_scales=pow2_scales)
        return leaf

    return jax.tree_util.tree_map_with_path(visit, params)


def tree_nbytes(tree) -> int:
    """Bytes held by a (possibly quantised) parameter tree."""
    return int(sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(tree)))
