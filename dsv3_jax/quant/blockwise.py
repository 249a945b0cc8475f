"""The DeepSeek-V3 block-scaled FP8 GEMM (`fp8_gemm`, DESIGN.md §4) with O(M·N) temporaries.

Operands, as in `dsv3_jax.quant.fp8` (block size `block`, default 128, KB = ceil(K/block), NB = ceil(N/block)):
    aq_MK     float8_e4m3fn activations [*B, M, K], quantised in 1×block tiles along K
    a_s_MKb   float32 tile scales [*B, M, KB]
    bq_KN     float8_e4m3fn weight [*B, K, N] (or [K, N], shared by every batch entry)
    b_s_KbNb  float32 scales [*B, KB, NB] (block×block blocks) or [*B, KB, N] (one per column and K block)

    out[m, n] = Σ_kb (Σ_{k in kb} aq[m, k]·bq[k, n]) · a_s[m, kb] · b_s[kb, n // block]

Each K block's partial product is computed by one dot with float32 accumulation over the FP8 values (upcast to
`compute_dtype`, bf16 by default: exact, e4m3 fits in bf16), scaled, and added to a float32 [*B, M, N] carry in
a `lax.fori_loop` over K blocks. Nothing of size K/block × M × N is ever live: the temporaries are the carry and
one step's partials, however large K is. (`dsv3_jax.quant.fp8.scaled_matmul(impl="blockwise")` writes all KB
partials [M, KB, N] as one einsum: XLA:CPU materialises them, 33.8 GB at 4096 × 7168 × 18432, while the TPU
compiler fuses that einsum into its reduction, 0.30 GB.)

`group` > 1 takes that many K blocks per step as one batched dot + reduction. Measured by compiling for one TPU
chip at 4096 × 7168 × 18432 (experiments/fp8_matmul_memory.py): group 1 has 4 MB of temporaries (the carry is
the output buffer) and the compiler's cycle estimate of the old einsum on v5p (6.9× a bf16 matmul, vs 7.6×);
group 28 is faster on v5p (5.2×) but holds 0.40 GB, and groups 4-8 are slower on both v5p and tpu7x. Hence the
default 1. Every exact per-block form costs 5-9× a bf16 matmul on TPU (the f32 rescale of [M, N] per 128 of K);
the TPU MXU accumulates in f32 anyway, so `weight_only_matmul` (1.6×) or dequantisation is the fast path there.

Edge blocks: a K that is not a multiple of `block` ends in a partial block, handled by one static dot after the
loop (no padded copy of the weight); an N that is not a multiple of `block` only trims the expanded scales.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def column_scales(b_s: jax.Array, n: int, block: int = 128) -> jax.Array:
    """Weight scales [*B, KB, NB] → one per column [*B, KB, N]; [*B, KB, N] is returned as is."""
    if b_s.shape[-1] == n:
        return b_s.astype(jnp.float32)
    return jnp.repeat(b_s.astype(jnp.float32), block, axis=-1)[..., :n]


def _check(aq, a_s, bq, b_s, block):
    *batch, m, k = aq.shape
    kb = _cdiv(k, block)
    if bq.shape[-2] != k:
        raise ValueError(f"contraction mismatch: activations [..., {m}, {k}] vs weight {tuple(bq.shape)}")
    if bq.ndim != 2 and tuple(bq.shape[:-2]) != tuple(batch):
        raise ValueError(f"batch axes differ: activations {tuple(aq.shape)} vs weight {tuple(bq.shape)}")
    n = bq.shape[-1]
    if tuple(a_s.shape) != (*batch, m, kb):
        raise ValueError(f"activation scales {tuple(a_s.shape)}: expected {(*batch, m, kb)} for {block}-wide tiles")
    if tuple(b_s.shape[-2:]) not in ((kb, _cdiv(n, block)), (kb, n)) or b_s.shape[:-2] != bq.shape[:-2]:
        raise ValueError(f"weight scales {tuple(b_s.shape)} do not match weight {tuple(bq.shape)} "
                         f"(expected [..., {kb}, {_cdiv(n, block)}] or [..., {kb}, {n}])")


def _partial_sum(a_MGb, a_s_MG, b_GbN, b_s_GN, compute_dtype, n_batch):
    """Σ_g (a[:, g]·b[g]) · a_s[:, g, None] · b_s[g, None, :] for one step's `G` K blocks → float32 [*B, M, N].

    a_MGb [*B, M, G, b] and b_GbN [*B, G, b, N] (or [G, b, N] unbatched); the G products are one batched dot.
    """
    if compute_dtype is not None:
        a_MGb, b_GbN = a_MGb.astype(compute_dtype), b_GbN.astype(compute_dtype)
    bat = tuple(range(n_batch))
    if b_GbN.ndim == 3:  # one weight for every batch entry: fold the batch axes into M
        dims = (((a_MGb.ndim - 1,), (1,)), ((a_MGb.ndim - 2,), (0,)))
    else:
        dims = (((a_MGb.ndim - 1,), (n_batch + 1,)), ((*bat, n_batch + 1), (*bat, n_batch)))
    # → [*B, G, M, N] (batched) or [G, *B, M, N] (shared weight); move G next to M either way
    p = jax.lax.dot_general(a_MGb, b_GbN, dims, preferred_element_type=jnp.float32)
    if b_GbN.ndim == 3:
        p = jnp.moveaxis(p, 0, n_batch)
    scale = jnp.moveaxis(a_s_MG, -1, -2)[..., :, :, None] * b_s_GN[..., :, None, :]  # [*B, G, M, N]
    return jnp.sum(p * scale, axis=-3)


def _step(aq, a_s, bq, b_s, start, size, width, block, compute_dtype, n_batch):
    """The partial sums of `size` K blocks starting at block `start`; `width` ≤ size·block columns of K in all."""
    k0 = start * block
    a = jax.lax.dynamic_slice_in_dim(aq, k0, width, axis=-1)
    b = jax.lax.dynamic_slice_in_dim(bq, k0, width, axis=-2)
    a_sl = jax.lax.dynamic_slice_in_dim(a_s, start, size, axis=-1)
    b_sl = jax.lax.dynamic_slice_in_dim(b_s, start, size, axis=-2)
    if width < size * block:  # the trailing partial block: zero-pad this slice only
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, size * block - width)])
        b = jnp.pad(b, [(0, 0)] * (b.ndim - 2) + [(0, size * block - width), (0, 0)])
    a = a.reshape(*a.shape[:-1], size, block)
    b = b.reshape(*b.shape[:-2], size, block, b.shape[-1])
    return _partial_sum(a, a_sl, b, b_sl, compute_dtype, n_batch)


@functools.partial(jax.jit, static_argnames=("block", "group", "out_dtype", "compute_dtype", "unroll"))
def scaled_matmul_scan(aq_MK: jax.Array, a_s_MKb: jax.Array, bq_KN: jax.Array, b_s_KbNb: jax.Array, *,
                       block: int = 128, group: int = 1, out_dtype=jnp.float32, compute_dtype=jnp.bfloat16,
                       unroll: int | bool = 1) -> jax.Array:
    """Block-scaled FP8 GEMM [*B, M, K]·[*B, K, N] (or [K, N]) → `out_dtype` [*B, M, N], float32 accumulation.

    `group` K blocks per loop step; `compute_dtype` the dtype the FP8 values are upcast to for the dots (None:
    pass float8_e4m3fn straight to `dot_general`, for hardware with FP8 units); `unroll` is fori_loop's.
    Temporaries are O(group · M · N) (the carry and one step's partials), independent of K.
    """
    _check(aq_MK, a_s_MKb, bq_KN, b_s_KbNb, block)
    n_batch = aq_MK.ndim - 2
    k, n = aq_MK.shape[-1], bq_KN.shape[-1]
    b_s = column_scales(b_s_KbNb, n, block)
    a_s = a_s_MKb.astype(jnp.float32)
    full = k // block  # whole K blocks; a remainder of k % block columns forms one partial block
    steps, rest = divmod(full, group)
    step = functools.partial(_step, aq_MK, a_s, bq_KN, b_s, block=block, compute_dtype=compute_dtype,
                             n_batch=n_batch)

    def body(i, acc):
        return acc + step(i * group, group, group * block)

    acc = jnp.zeros((*aq_MK.shape[:-1], n), jnp.float32)
    if steps:
        acc = jax.lax.fori_loop(0, steps, body, acc, unroll=unroll)
    if rest:  # whole blocks left over when group does not divide them
        acc = acc + step(steps * group, rest, rest * block)
    if k % block:
        acc = acc + step(full, 1, k % block)
    return acc.astype(out_dtype)


def dequant_weight(bq_KN: jax.Array, b_s_KbNb: jax.Array, *, block: int = 128, dtype=jnp.bfloat16) -> jax.Array:
    """W = bq · b_s[k // block, n // block] in `dtype` ([*B, K, N]); the checkpoint `weight_dequant`."""
    k, n = bq_KN.shape[-2:]
    s = jnp.repeat(column_scales(b_s_KbNb, n, block), block, axis=-2)[..., :k, :]
    return (bq_KN.astype(jnp.float32) * s).astype(dtype)


@functools.partial(jax.jit, static_argnames=("block", "out_dtype", "dtype"))
def weight_only_matmul(x_MK: jax.Array, bq_KN: jax.Array, b_s_KbNb: jax.Array, *, block: int = 128,
                       out_dtype=jnp.bfloat16, dtype=jnp.bfloat16) -> jax.Array:
    """Weight-only FP8: x [*B, M, K] (bf16, not quantised) · dequant(bq, b_s) in `dtype` → `out_dtype` [*B, M, N].

    One dot with float32 accumulation over the whole K; the weight's block scales are folded into its values
    (rounded to `dtype`), so this is the bf16 matmul of an FP8-stored weight, not the FP8 recipe's product.
    """
    w = dequant_weight(bq_KN, b_s_KbNb, block=block, dtype=dtype)
    eq = "...mk,kn->...mn" if w.ndim == 2 else "...mk,...kn->...mn"
    return jnp.einsum(eq, x_MK.astype(dtype), w, preferred_element_type=jnp.float32).astype(out_dtype)


def reference_blockwise(aq, a_s, bq, b_s, block: int = 128) -> np.ndarray:
    """float64 numpy of the same sum (per-block partials scaled and added), for tests: [*B, M, K]·[*B, K, N]."""
    aq = np.asarray(jnp.asarray(aq).astype(jnp.float32), np.float64)
    bq = np.asarray(jnp.asarray(bq).astype(jnp.float32), np.float64)
    k, n = aq.shape[-1], bq.shape[-1]
    b_full = np.asarray(column_scales(jnp.asarray(b_s), n, block), np.float64)
    a_s = np.asarray(a_s, np.float64)
    out = 0.0
    for kb in range(_cdiv(k, block)):
        sl = slice(kb * block, min(k, (kb + 1) * block))
        out = out + (aq[..., sl] @ bq[..., sl, :]) * a_s[..., kb, None] * b_full[..., kb, None, :]
    return np.asarray(out)
