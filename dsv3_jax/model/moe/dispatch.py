"""Dropless dispatch of token-expert pairs to the routed experts, their SwiGLU, and the weighted combine.

Every implementation has the contract `ffn(x [N,D], experts [N,X], weights [N,X], w_gate [E,D,F], w_up [E,D,F],
w_down [E,F,D], policy) -> [N,D]` (and a `*_rows(x [M,D], expert [M], ...) -> [M,D]` form without the combine)
and never drops a token; its cost grows with the number of (token, expert)
pairs, not with the number of experts:
  - "ragged": sort pairs by expert, `jax.lax.ragged_dot` (grouped GEMM) — GPU/TPU.
  - "blocks": sort pairs by expert, pad each expert's rows to a multiple of a tile, run the used tiles with each
    tile's expert weights gathered — CPU, where ragged_dot multiplies every row by every expert. Plain weights go
    through `tiles.tile_swiglu` (a loop over the used tiles with its own backward: plain dots, no stacked
    weight copies, no scatter of weight gradients); FP8 ones through `_tile_ffn` (autodiff over all tiles).
    `blocks_ffn` decoding a few rows gathers each pair's expert weights instead, and for a few rows over few
    experts runs the "dense" form (`blocks_formulation`).
  - "dense": every expert on every token, masked (cost grows with E) — the reference for tests.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.config import MatmulPolicy
from dsv3_jax.model.moe.tiles import tile_swiglu
from dsv3_jax.quant.fp8 import QuantArray
from dsv3_jax.quant.matmul import as_dense, dot_f32, einsum, target_platform


@jax.custom_vjp
def permute_rows(x_RD: jax.Array, index_S: jax.Array, inverse_R: jax.Array) -> jax.Array:
    """out[s] = x[index[s]] (index == R gives a zero row), for an index that uses each row at most once.

    `inverse[r]` is the s with index[s] == r (S when row r is unused). The gradient is then a gather by `inverse`
    instead of the scatter-add autodiff would emit — scatters are slow on CPU.
    """
    return _take_rows(x_RD, index_S)


def _take_rows(x_RD: jax.Array, index_S: jax.Array) -> jax.Array:
    return jnp.take(x_RD, index_S, axis=0, mode="fill", fill_value=0)


def _permute_fwd(x_RD, index_S, inverse_R):
    return _take_rows(x_RD, index_S), (index_S, inverse_R)


def _permute_bwd(residuals, g_SD):
    _, inverse_R = residuals
    return _take_rows(g_SD, inverse_R), None, None


permute_rows.defvjp(_permute_fwd, _permute_bwd)


def _inverse_permutation(perm_M: jax.Array) -> jax.Array:
    return jnp.zeros_like(perm_M).at[perm_M].set(jnp.arange(perm_M.shape[0], dtype=perm_M.dtype))


def _sort_rows(x_MD: jax.Array, expert_M: jax.Array, num_experts: int):
    """Rows sorted by expert: (x_sorted [M,D], order [M], inverse [M], sorted expert ids [M], sizes [E])."""
    order_M = jnp.argsort(expert_M, stable=True).astype(jnp.int32)
    inverse_M = _inverse_permutation(order_M)
    sizes_E = jnp.bincount(expert_M, length=num_experts).astype(jnp.int32)
    return permute_rows(x_MD, order_M, inverse_M), order_M, inverse_M, expert_M[order_M], sizes_E


def _pairs(x_ND: jax.Array, experts_NX: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One row per token-expert pair (pair m = n·X + slot): (x [M,D], expert [M])."""
    return jnp.repeat(x_ND, experts_NX.shape[1], axis=0), experts_NX.reshape(-1)


def combine(y_NXD: jax.Array, weights_NX: jax.Array) -> jax.Array:
    """Σ_x weight[n, x] · y[n, x] in float32 → [N,D] in y's dtype."""
    out = dot_f32("nxd,nx->nd", y_NXD, weights_NX)
    return out.astype(y_NXD.dtype)


def _combine_rows(y_MD: jax.Array, weights_NX: jax.Array) -> jax.Array:
    """Per-pair expert outputs [M,D] (pair order) summed with their routing weights → [N,D]."""
    n, x = weights_NX.shape
    return combine(y_MD.reshape(n, x, -1), weights_NX)


TILE_MAX_ROWS = 144  # rows per tile at most: above it a tile's padding costs more than its larger dots gain (below)


def tile_size(num_pairs: int, num_experts: int) -> int:
    """Rows per tile for the "blocks" dispatch: λ + 2√λ rounded up to a multiple of 8, at least 8 and at most
    TILE_MAX_ROWS (λ = pairs per expert). Below the cap, an expert of a balanced router fits one tile, with a margin
    for the spread of its load: a tile of exactly λ rows sends every expert above λ to a second tile that is mostly
    padding. Above it, an expert's last tile pads it by half a tile on average, so padding is about
    TILE_MAX_ROWS / (2λ) of the pairs instead of up to 2x; the tiles' dots lose little down to ~100 rows on the CPU
    (and much at 64: 4096 rows through 64-row dots took 2x as long as through 128-row ones).

    Measured 2026-12-08 (2 CPU cores, in-process interleaved, medians of 14, the expert FFN of a random-init router
    at init_std 0.02 with a ±0.05 correction bias, whose loads spread far wider than √λ), forward / value and
    gradients, against the uncapped λ + 2√λ:
      - 16 experts, 1024 tokens top-4, D = F = 256 (`small` at 4 × 256, λ = 256, loads 89-439): 288 → 144 rows
        17.8 → 15.7 / 49.4 → 41.4 ms (6336 → 5184 padded rows); 112 rows 16.1 / 40.1, 96 rows 17.2 / 44.2.
      - 16 experts, 2048 tokens, D = F = 128 (tiny_stdlib's train batch, λ = 512, loads 101-1081): 560 → 144 rows
        18.0 → 14.5 / 37.0 → 31.0 ms (12880 → 9648 rows); 112 rows 14.6 / 30.8, 96 rows 14.7 / 28.2.
      - 8 experts, 1024 tokens (λ = 512, loads 265-771): 560 → 144 rows, min of 10 16.1 → 14.3 / 45.9 → 37.1 ms.
    Earlier (2026-12-07, before the CPU dispatch ran inline and 2 tiles per loop step), the uncapped rule against
    powers of two up to 128 rows, forward / forward and gradients:
      - 256 experts, 1024 tokens (λ = 16): 32 → 24 rows 129.5 → 88.6 ms / 428 → 438 ms (level); 16 rows 113.4 / 429.
      - 64 experts (λ = 64): 128 → 80 rows 65.3 → 42.1 / 180 → 137 ms; 64 rows 62.8 / 195 ms.
      - 16 experts, 512 tokens (λ = 128, `small` prefilling 8 rows of 64): 128 → 160 rows 27.6 → 19.0 / 75 → 58 ms.
    The static bound on padded rows is pairs + experts · tile."""
    per_expert = num_pairs / max(num_experts, 1)
    return int(min(TILE_MAX_ROWS, max(8, 8 * math.ceil((per_expert + 2 * math.sqrt(per_expert)) / 8))))


def _tile_layout(expert_M: jax.Array, sizes_E: jax.Array, tile: int, num_tiles: int):
    """Padded row of each sorted pair [M], sorted pair of each padded row (M = padding) [P], expert of each tile
    [Z], and the number of tiles in use (the rest of the static bound is padding)."""
    m = expert_M.shape[0]
    padded_E = (sizes_E + tile - 1) // tile * tile
    pad_end_E = jnp.cumsum(padded_E)
    rank_M = jnp.arange(m) - (jnp.cumsum(sizes_E) - sizes_E)[expert_M]
    dest_M = ((pad_end_E - padded_E)[expert_M] + rank_M).astype(jnp.int32)
    src_P = jnp.full((num_tiles * tile,), m, jnp.int32).at[dest_M].set(jnp.arange(m, dtype=jnp.int32))
    tile_expert_Z = jnp.searchsorted(pad_end_E, jnp.arange(num_tiles) * tile, side="right")
    used = (pad_end_E[-1] // tile).astype(jnp.int32)
    return dest_M, src_P, jnp.minimum(tile_expert_Z, sizes_E.shape[0] - 1).astype(jnp.int32), used


def _row_layout(expert_M: jax.Array, num_experts: int, tile: int, num_tiles: int):
    """The tile layout addressed by the caller's row order: padded row of each row [M], row of each padded row
    (M = padding) [P], expert of each tile [Z], tiles in use. One gather each way instead of a sort then a pad."""
    m = expert_M.shape[0]
    order_M = jnp.argsort(expert_M, stable=True).astype(jnp.int32)
    sizes_E = jnp.bincount(expert_M, length=num_experts).astype(jnp.int32)
    dest_M, src_P, tile_expert_Z, used = _tile_layout(expert_M[order_M], sizes_E, tile, num_tiles)
    row_dest_M = dest_M[_inverse_permutation(order_M)]
    row_src_P = jnp.where(src_P < m, order_M[jnp.minimum(src_P, m - 1)], m)
    return row_dest_M, row_src_P, tile_expert_Z, used


TILES_PER_STEP = 4  # tiles per loop step of `tiles.tile_swiglu` at least. Value and gradients (setting of
# `tile_size`): 144-row tiles at λ = 512, D = F = 128, 2 → 4 per step 32.3 → 26.7 ms (min of 3 rounds); 80-row tiles
# (64 experts, λ = 64), in turn, medians of 9: 2 / 3 / 7 per step 65.6 / 63.8 / 64.5 ms (forward 27.2 / 23.3 / 21.8;
# 4, the value now, not timed on its own).
# Measured 2026-12-07 with 128-row tiles: 1 → 73, 2 → 54, 4 → 60, 8 → 62 ms.
ROWS_PER_STEP = 128  # ... and at least this many padded rows per step: small tiles (many experts, few pairs each)
# went one loop step per 2 tiles of 16 rows; 1024 tokens top-4, D = F = 256, 256 experts: forward 60.1 / 57.6 →
# 41.6 / 45.3 ms (256 rows per step: 57.3 / 65.0), 8 experts unchanged (tiles of 128 rows); measured with the earlier
# `tile_size` (16-row tiles there, 24 now: 5 tiles per step)


def tile_plan(num_pairs: int, num_experts: int, plain: bool = True) -> tuple[int, int, int]:
    """(rows per tile, tiles per loop step, static number of tiles) of the "blocks" dispatch: the tiles bound
    Σ_e ceil(size_e / tile) ≤ pairs // tile + experts, rounded up to whole loop steps. `plain`: the custom-VJP tile
    kernel runs (a chunk of tiles per step); FP8 products run one tile at a time."""
    tile = tile_size(num_pairs, num_experts)
    chunk = max(TILES_PER_STEP, ROWS_PER_STEP // tile) if plain else 1
    return tile, chunk, -(-(num_pairs // tile + min(num_experts, num_pairs)) // chunk) * chunk


def _plain_weights(policy: MatmulPolicy | None, *weights) -> bool:
    """True when the expert matmuls are plain dots (no FP8 product): the custom-VJP tile kernel applies."""
    return (policy is None or not policy.fp8_plain) and not any(isinstance(w, QuantArray) for w in weights)


def blocks_rows(x_MD: jax.Array, expert_M: jax.Array, w_gate_EDF: jax.Array, w_up_EDF: jax.Array,
                w_down_EFD: jax.Array, policy: MatmulPolicy | None = None) -> jax.Array:
    """Each row through its expert's SwiGLU → [M,D] in row order (see `_blocks_pairs`)."""
    return _blocks_pairs(x_MD, expert_M[:, None], w_gate_EDF, w_up_EDF, w_down_EFD, policy)


def _blocks_pairs(x_RD: jax.Array, experts_RX: jax.Array, w_gate_EDF: jax.Array, w_up_EDF: jax.Array,
                  w_down_EFD: jax.Array, policy: MatmulPolicy | None) -> jax.Array:
    """Each (row, expert) pair's SwiGLU → [M,D] in pair order (pair m = r·X + slot), over expert-homogeneous tiles.

    Plain weights go through `tiles.tile_swiglu`, which gathers each padded row straight from x (no [M,D]
    repeat of the rows, none kept for the backward) and runs the used tiles only; FP8 weights through one batched
    matmul over all tiles (see module docstring)."""
    r, x = experts_RX.shape
    e, m = w_gate_EDF.shape[0], r * x
    plain = _plain_weights(policy, w_gate_EDF, w_up_EDF, w_down_EFD)
    tile, chunk, num_tiles = tile_plan(m, e, plain)
    dest_M, src_P, tile_expert_Z, used = _row_layout(experts_RX.reshape(-1), e, tile, num_tiles)
    if plain:
        row_P = jnp.where(src_P < m, src_P // x, r)  # r: padding
        y_ZWD = tile_swiglu(x_RD, row_P, dest_M.reshape(r, x), tile_expert_Z, used, w_gate_EDF, w_up_EDF,
                            w_down_EFD, chunk)
    else:
        x_ZWD = permute_rows(jnp.repeat(x_RD, x, axis=0), src_P, dest_M).reshape(num_tiles, tile, -1)
        y_ZWD = _tile_ffn(x_ZWD, tile_expert_Z, w_gate_EDF, w_up_EDF, w_down_EFD, policy)
    return permute_rows(y_ZWD.reshape(num_tiles * tile, -1), dest_M, src_P)


DENSE_MAX_ROWS = 256  # tokens × experts up to which `blocks_ffn` runs every expert on each token (see below)


def blocks_formulation(num_tokens: int, num_pairs: int, num_experts: int) -> str:
    """How `blocks_ffn` computes a batch (decided at trace time from the shapes):
      - "gathered": no more pairs than experts (decoding a few rows): each pair's expert weights are gathered.
        The `small` preset (16 experts, top-4, D = F = 256; 2 cores, in-process interleaved, medians of 9)
        decoding 1 / 2 / 4 rows: 3.2 / 7.4 / 19.5 ms per step, against 10.2 / 16.5 / 28.0 ms dense.
      - "dense": tokens × experts ≤ DENSE_MAX_ROWS (decoding a batch over a few experts, which the pairs mostly
        all touch): every expert on every token (`dense_ffn`). `small` decoding 8 rows: 43.7 ms per step with
        tiles, 38.1 ms with the expert-batched dense form (medians of 7), 33.0 ms with its 2-D form (medians of
        9, against 43.3 ms expert-batched): a tile of 8 rows per expert gathered a copy of each expert's
        weights, then multiplied them by mostly padding rows.
      - "tiles": expert-homogeneous tiles (`_blocks_pairs`): prefill and training.
    """
    if num_pairs <= num_experts:
        return "gathered"
    return "dense" if num_tokens * num_experts <= DENSE_MAX_ROWS else "tiles"


def blocks_ffn(x_ND: jax.Array, experts_NX: jax.Array, weights_NX: jax.Array, w_gate_EDF: jax.Array,
               w_up_EDF: jax.Array, w_down_EFD: jax.Array, policy: MatmulPolicy | None = None) -> jax.Array:
    """Dropless expert FFN for the CPU: tiles (`_blocks_pairs` of every token-expert pair, then the weighted
    combine), or for a few rows each pair's own expert weights gathered, or every expert on every row
    (`blocks_formulation`)."""
    ffn = BLOCKS_FORMULATIONS[blocks_formulation(x_ND.shape[0], experts_NX.size, w_gate_EDF.shape[0])]
    return ffn(x_ND, experts_NX, weights_NX, w_gate_EDF, w_up_EDF, w_down_EFD, policy)


def _tiles_ffn(x_ND, experts_NX, weights_NX, w_gate_EDF, w_up_EDF, w_down_EFD, policy=None) -> jax.Array:
    """`_blocks_pairs` of every token-expert pair, then the weighted combine."""
    return _combine_rows(_blocks_pairs(x_ND, experts_NX, w_gate_EDF, w_up_EDF, w_down_EFD, policy), weights_NX)


def _gathered_ffn(x_ND, experts_NX, weights_NX, w_gate_EDF, w_up_EDF, w_down_EFD, policy=None) -> jax.Array:
    """`_gathered_rows` of every token-expert pair, then the weighted combine."""
    return _combine_rows(_gathered_rows(*_pairs(x_ND, experts_NX), w_gate_EDF, w_up_EDF, w_down_EFD, policy),
                         weights_NX)


def _gathered_rows(x_MD, expert_M, w_gate_EDF, w_up_EDF, w_down_EFD, policy) -> jax.Array:
    """Each row times its own expert's weights, gathered per row ([M,D,F] copies: only for M ≤ E)."""
    gate_MF = einsum("md,mdf->mf", x_MD, w_gate_EDF[expert_M], policy=policy)
    up_MF = einsum("md,mdf->mf", x_MD, w_up_EDF[expert_M], policy=policy)
    return einsum("mf,mfd->md", jax.nn.silu(gate_MF) * up_MF, w_down_EFD[expert_M], policy=policy)


TILE_CHUNK_BYTES = 2 << 20  # expert weights gathered per chunk of tiles: small enough to stay in cache


def _tile_ffn(x_ZWD, tile_expert_Z, w_gate_EDF, w_up_EDF, w_down_EFD, policy) -> jax.Array:
    """SwiGLU of each tile with its expert's weights through the FP8 products, a chunk of tiles at a time (lax.map):
    the weights a chunk gathers stay small instead of one copy per tile of the whole layer's experts."""
    per_tile = sum(int(np.prod(w.shape[1:])) * 4 for w in (w_gate_EDF, w_up_EDF, w_down_EFD))
    chunk = int(max(1, min(x_ZWD.shape[0], TILE_CHUNK_BYTES // per_tile)))

    def one(args):
        x_WD, e = args
        gate = einsum("td,df->tf", x_WD, w_gate_EDF[e], policy=policy)
        up = einsum("td,df->tf", x_WD, w_up_EDF[e], policy=policy)
        return einsum("tf,fd->td", jax.nn.silu(gate) * up, w_down_EFD[e], policy=policy)

    return jax.lax.map(one, (x_ZWD, tile_expert_Z), batch_size=chunk)


def ragged_rows(x_MD: jax.Array, expert_M: jax.Array, w_gate_EDF: jax.Array, w_up_EDF: jax.Array,
                w_down_EFD: jax.Array, policy: MatmulPolicy | None = None) -> jax.Array:
    """Each row through its expert's SwiGLU → [M,D] in row order, with grouped GEMMs (`jax.lax.ragged_dot`) over
    the rows sorted by expert.

    FP8-resident expert weights are dequantised for ragged_dot (no block-scaled grouped GEMM in XLA yet).
    """
    xs_MD, order_M, inverse_M, _, sizes_E = _sort_rows(x_MD, expert_M, w_gate_EDF.shape[0])
    dtype = x_MD.dtype

    def gdot(lhs, rhs):  # accumulates in float32 on the MXU / in XLA's dot emitters; no float32 [M, N] copy kept
        return jax.lax.ragged_dot(lhs, as_dense(rhs, dtype), sizes_E, preferred_element_type=dtype)

    h_MF = jax.nn.silu(gdot(xs_MD, w_gate_EDF)) * gdot(xs_MD, w_up_EDF)
    return permute_rows(gdot(h_MF, w_down_EFD), inverse_M, order_M)


def ragged_ffn(x_ND: jax.Array, experts_NX: jax.Array, weights_NX: jax.Array, w_gate_EDF: jax.Array,
               w_up_EDF: jax.Array, w_down_EFD: jax.Array, policy: MatmulPolicy | None = None) -> jax.Array:
    """Dropless expert FFN with grouped GEMMs (`ragged_rows` of every token-expert pair, then the combine)."""
    return _combine_rows(ragged_rows(*_pairs(x_ND, experts_NX), w_gate_EDF, w_up_EDF, w_down_EFD, policy),
                         weights_NX)


def dense_ffn(x_ND: jax.Array, experts_NX: jax.Array, weights_NX: jax.Array, w_gate_EDF: jax.Array,
              w_up_EDF: jax.Array, w_down_EFD: jax.Array, policy: MatmulPolicy | None = None) -> jax.Array:
    """Every expert on every token, weighted by a [N,E] combine matrix that is zero off the top-k: the reference for
    tests, and `blocks_ffn`'s choice for a few tokens over few experts (`blocks_formulation`).

    Plain weights: gate / up as [N,D]·[D,E·F] and the down projection as one [N,E·F]·[E·F,D] product over the
    combine-weighted activations — 2-D matmuls, which XLA:CPU runs faster than expert-batched ones at a few rows
    (`small` decoding 8 / 16 rows, in-process interleaved, medians of 9 / 7: step 43.9 → 35.4 / 46.5 → 35.4 ms).
    FP8 weights: expert-batched products ([E,N,D]·[E,D,F]), the FP8 recipe's per-expert form."""
    n, e = x_ND.shape[0], w_gate_EDF.shape[0]
    combine_NE = jnp.zeros((n, e), jnp.float32).at[jnp.arange(n)[:, None], experts_NX].add(weights_NX)
    if not _plain_weights(policy, w_gate_EDF, w_up_EDF, w_down_EFD):
        x_END = jnp.broadcast_to(x_ND[None], (e, *x_ND.shape))
        h_ENF = jax.nn.silu(einsum("end,edf->enf", x_END, w_gate_EDF, policy=policy)) * einsum(
            "end,edf->enf", x_END, w_up_EDF, policy=policy)
        y_END = einsum("enf,efd->end", h_ENF, w_down_EFD, policy=policy)
        return dot_f32("end,ne->nd", y_END, combine_NE).astype(x_ND.dtype)
    h_NEF = jax.nn.silu(einsum("nd,edf->nef", x_ND, w_gate_EDF)) * einsum("nd,edf->nef", x_ND, w_up_EDF)
    weighted_NK = (h_NEF * combine_NE[:, :, None]).astype(x_ND.dtype).reshape(n, -1)
    return einsum("nk,kd->nd", weighted_NK, w_down_EFD.reshape(-1, w_down_EFD.shape[-1]))


def dense_rows(x_MD: jax.Array, expert_M: jax.Array, w_gate_EDF: jax.Array, w_up_EDF: jax.Array,
               w_down_EFD: jax.Array, policy: MatmulPolicy | None = None) -> jax.Array:
    """Reference `*_rows`: every expert on every row, the row's own expert kept."""
    ones_M1 = jnp.ones((expert_M.shape[0], 1), jnp.float32)
    return dense_ffn(x_MD, expert_M[:, None], ones_M1, w_gate_EDF, w_up_EDF, w_down_EFD, policy)


BLOCKS_FORMULATIONS = {"gathered": _gathered_ffn, "dense": dense_ffn, "tiles": _tiles_ffn}  # `blocks_formulation`
EXPERT_FFNS = {"blocks": blocks_ffn, "ragged": ragged_ffn, "dense": dense_ffn}
EXPERT_ROWS = {"blocks": blocks_rows, "ragged": ragged_rows, "dense": dense_rows}  # (x [M,D], expert [M]) → [M,D]


def resolve_impl(impl: str) -> str:
    """"auto" → "blocks" when the compile target is the CPU, "ragged" on GPU/TPU (see `target_platform`)."""
    if impl != "auto":
        return impl
    return "blocks" if target_platform() == "cpu" else "ragged"


def expert_ffn(impl: str):
    """The dispatch + expert FFN + combine function for a config's `moe_impl` (see the module docstring)."""
    return EXPERT_FFNS[resolve_impl(impl)]


def expert_rows(impl: str):
    """The per-row expert SwiGLU (no combine) for a config's `moe_impl`: what expert parallelism runs on the rows
    a device receives."""
    return EXPERT_ROWS[resolve_impl(impl)]
