"""DeepSeekMoE: sigmoid group-limited router with a correction bias, dropless routed experts, shared experts.

Split into route → dispatch/expert matmuls → combine. Dispatch never drops a token and its cost grows with the
number of (token, expert) pairs, not with the number of experts:
  - "ragged": sort pairs by expert, `jax.lax.ragged_dot` (grouped GEMM) — GPU/TPU.
  - "blocks": sort pairs by expert, pad each expert's rows to a multiple of a tile, one batched matmul over tiles
    with each tile's expert weights gathered — CPU, where ragged_dot multiplies every row by every expert.
  - "dense": every expert on every token, masked (cost grows with E) — a reference for tests only.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax import parallel
from dsv3_jax.config import ModelConfig
from dsv3_jax.layers import MLP, weight
from dsv3_jax.matmul import MatmulPolicy, as_dense, einsum

ROUTER_COLLECTION = "router"  # non-trainable: the per-expert correction bias lives here, not in "params"
STATS_COLLECTION = "moe_stats"  # sown per layer: expert load counts and the sequence-wise balance term


def route(logits_NE: jax.Array, bias_E: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sigmoid group-limited top-k (DESIGN.md §2). Returns (weights [N,X] f32, experts [N,X] int32, scores [N,E]).

    The bias only chooses experts; the weights are the unbiased scores, normalised and scaled.
    """
    c = config
    n = logits_NE.shape[0]
    scores_NE = jax.nn.sigmoid(logits_NE.astype(jnp.float32))
    choice_NE = scores_NE + bias_E.astype(jnp.float32)
    group_NGe = choice_NE.reshape(n, c.n_group, c.experts_per_group)
    group_score_NG = jax.lax.top_k(group_NGe, 2)[0].sum(axis=-1)
    _, kept_groups = jax.lax.top_k(group_score_NG, c.topk_group)
    keep_NG = jnp.zeros((n, c.n_group), bool).at[jnp.arange(n)[:, None], kept_groups].set(True)
    choice_NE = jnp.where(jnp.repeat(keep_NG, c.experts_per_group, axis=1), choice_NE, -jnp.inf)
    _, experts_NX = jax.lax.top_k(choice_NE, c.num_experts_per_tok)
    weights_NX = jnp.take_along_axis(scores_NE, experts_NX, axis=1)
    if c.norm_topk_prob:
        weights_NX = weights_NX / (weights_NX.sum(axis=-1, keepdims=True) + 1e-20)
    return weights_NX * c.routed_scaling_factor, experts_NX.astype(jnp.int32), scores_NE


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


def _sort_pairs(x_ND: jax.Array, experts_NX: jax.Array, num_experts: int):
    """Token copies sorted by expert: (x_sorted [M,D], order [M], inverse [M], sorted expert ids [M], sizes [E])."""
    flat_M = experts_NX.reshape(-1)
    order_M = jnp.argsort(flat_M, stable=True).astype(jnp.int32)
    inverse_M = _inverse_permutation(order_M)
    sizes_E = jnp.bincount(flat_M, length=num_experts).astype(jnp.int32)
    x_MD = jnp.repeat(x_ND, experts_NX.shape[1], axis=0)  # pair m = n·X + slot
    return permute_rows(x_MD, order_M, inverse_M), order_M, inverse_M, flat_M[order_M], sizes_E


def _unsort_combine(y_MD: jax.Array, order_M: jax.Array, inverse_M: jax.Array, weights_NX: jax.Array) -> jax.Array:
    """Put sorted expert outputs back in (token, slot) order and sum them with their routing weights → [N,D]."""
    n, x = weights_NX.shape
    y_NXD = permute_rows(y_MD, inverse_M, order_M).reshape(n, x, -1)
    out = jnp.einsum("nxd,nx->nd", y_NXD, weights_NX, preferred_element_type=jnp.float32)
    return out.astype(y_MD.dtype)


def tile_size(num_pairs: int, num_experts: int) -> int:
    """Rows per tile for the "blocks" dispatch: about pairs/expert, a power of two in [8, 128]."""
    per_expert = max(num_pairs // num_experts, 1)
    return int(min(128, max(8, 1 << (per_expert.bit_length() - 1))))


def _tile_layout(expert_M: jax.Array, sizes_E: jax.Array, tile: int, num_tiles: int):
    """Padded row of each sorted pair [M], sorted pair of each padded row (M = padding) [P], expert of each tile."""
    m = expert_M.shape[0]
    padded_E = (sizes_E + tile - 1) // tile * tile
    pad_end_E = jnp.cumsum(padded_E)
    rank_M = jnp.arange(m) - (jnp.cumsum(sizes_E) - sizes_E)[expert_M]
    dest_M = ((pad_end_E - padded_E)[expert_M] + rank_M).astype(jnp.int32)
    src_P = jnp.full((num_tiles * tile,), m, jnp.int32).at[dest_M].set(jnp.arange(m, dtype=jnp.int32))
    tile_expert_Z = jnp.searchsorted(pad_end_E, jnp.arange(num_tiles) * tile, side="right")
    return dest_M, src_P, jnp.minimum(tile_expert_Z, sizes_E.shape[0] - 1)


def blocks_ffn(x_ND: jax.Array, experts_NX: jax.Array, weights_NX: jax.Array, w_gate_EDF: jax.Array,
               w_up_EDF: jax.Array, w_down_EFD: jax.Array, policy: MatmulPolicy | None = None) -> jax.Array:
    """Dropless expert FFN as one batched matmul over expert-homogeneous tiles (see module docstring)."""
    e, m = w_gate_EDF.shape[0], experts_NX.size
    tile = tile_size(m, e)
    num_tiles = m // tile + min(e, m)  # static bound on Σ_e ceil(size_e / tile)
    xs_MD, order_M, inverse_M, expert_M, sizes_E = _sort_pairs(x_ND, experts_NX, e)
    dest_M, src_P, tile_expert_Z = _tile_layout(expert_M, sizes_E, tile, num_tiles)
    x_ZtD = permute_rows(xs_MD, src_P, dest_M).reshape(num_tiles, tile, -1)
    y_PD = _tile_ffn(x_ZtD, tile_expert_Z, w_gate_EDF, w_up_EDF, w_down_EFD, policy).reshape(num_tiles * tile, -1)
    return _unsort_combine(permute_rows(y_PD, dest_M, src_P), order_M, inverse_M, weights_NX)


TILE_CHUNK_BYTES = 2 << 20  # expert weights gathered per chunk of tiles: small enough to stay in cache


def _tile_ffn(x_ZtD, tile_expert_Z, w_gate_EDF, w_up_EDF, w_down_EFD, policy) -> jax.Array:
    """SwiGLU of each tile with its expert's weights, a chunk of tiles at a time (lax.map): the weights a chunk
    gathers stay small instead of one copy per tile of the whole layer's experts."""
    per_tile = sum(int(np.prod(w.shape[1:])) * 4 for w in (w_gate_EDF, w_up_EDF, w_down_EFD))
    chunk = int(max(1, min(x_ZtD.shape[0], TILE_CHUNK_BYTES // per_tile)))

    def one(args):
        x_tD, e = args
        gate = einsum("td,df->tf", x_tD, w_gate_EDF[e], policy=policy)
        up = einsum("td,df->tf", x_tD, w_up_EDF[e], policy=policy)
        return einsum("tf,fd->td", jax.nn.silu(gate) * up, w_down_EFD[e], policy=policy)

    return jax.lax.map(one, (x_ZtD, tile_expert_Z), batch_size=chunk)


def ragged_ffn(x_ND: jax.Array, experts_NX: jax.Array, weights_NX: jax.Array, w_gate_EDF: jax.Array,
               w_up_EDF: jax.Array, w_down_EFD: jax.Array, policy: MatmulPolicy | None = None) -> jax.Array:
    """Dropless expert FFN with grouped GEMMs (`jax.lax.ragged_dot`) over pairs sorted by expert.

    FP8-resident expert weights are dequantised for ragged_dot (no block-scaled grouped GEMM in XLA yet).
    """
    xs_MD, order_M, inverse_M, _, sizes_E = _sort_pairs(x_ND, experts_NX, w_gate_EDF.shape[0])
    dtype = x_ND.dtype

    def gdot(lhs, rhs):
        return jax.lax.ragged_dot(lhs, as_dense(rhs, dtype), sizes_E, preferred_element_type=jnp.float32).astype(dtype)

    h_MF = jax.nn.silu(gdot(xs_MD, w_gate_EDF)) * gdot(xs_MD, w_up_EDF)
    return _unsort_combine(gdot(h_MF, w_down_EFD), order_M, inverse_M, weights_NX)


def dense_ffn(x_ND: jax.Array, experts_NX: jax.Array, weights_NX: jax.Array, w_gate_EDF: jax.Array,
              w_up_EDF: jax.Array, w_down_EFD: jax.Array, policy: MatmulPolicy | None = None) -> jax.Array:
    """Reference: every expert on every token, weighted by a [N,E] combine matrix that is zero off the top-k."""
    n = x_ND.shape[0]
    combine_NE = jnp.zeros((n, w_gate_EDF.shape[0]), jnp.float32).at[jnp.arange(n)[:, None], experts_NX].add(
        weights_NX)
    h_NEF = jax.nn.silu(einsum("nd,edf->nef", x_ND, w_gate_EDF, policy=policy)) * einsum(
        "nd,edf->nef", x_ND, w_up_EDF, policy=policy)
    y_NED = einsum("nef,efd->ned", h_NEF, w_down_EFD, policy=policy)
    return jnp.einsum("ned,ne->nd", y_NED, combine_NE, preferred_element_type=jnp.float32).astype(x_ND.dtype)


EXPERT_FFNS = {"blocks": blocks_ffn, "ragged": ragged_ffn, "dense": dense_ffn}


def resolve_impl(impl: str) -> str:
    """"auto" → "blocks" on CPU, "ragged" elsewhere."""
    if impl != "auto":
        return impl
    return "blocks" if jax.default_backend() == "cpu" else "ragged"


def balance_term(scores_BTE: jax.Array, experts_BTX: jax.Array, num_experts: int) -> jax.Array:
    """Sequence-wise balance Σ_i f_i·P_i, mean over sequences (DESIGN.md §3, without α), from the dispatched top-k."""
    _, t, x = experts_BTX.shape
    hits_BE = jax.nn.one_hot(experts_BTX, num_experts, dtype=jnp.float32).sum(axis=(1, 2))
    f_BE = hits_BE * num_experts / (x * t)
    p_BE = jnp.mean(scores_BTE / scores_BTE.sum(axis=-1, keepdims=True), axis=1)
    return jnp.mean(jnp.sum(f_BE * p_BE, axis=-1))


def routed_experts(x_BTD: jax.Array, gate_DE: jax.Array, bias_E: jax.Array, w_gate: jax.Array, w_up: jax.Array,
                   w_down: jax.Array, config: ModelConfig) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Route and run the routed experts, all on this device → (out [B,T,D], expert load [E], balance term)."""
    b, t, d = x_BTD.shape
    e = config.n_routed_experts
    x_ND = x_BTD.reshape(b * t, d)
    with jax.named_scope("moe_route"):
        logits_NE = jnp.einsum("nd,de->ne", x_ND.astype(jnp.float32), gate_DE)
        weights_NX, experts_NX, scores_NE = route(logits_NE, bias_E, config)
    with jax.named_scope("moe_experts"):
        routed_ND = EXPERT_FFNS[resolve_impl(config.moe_impl)](x_ND, experts_NX, weights_NX, w_gate, w_up, w_down,
                                                               config.matmul_policy)
    load_E = jnp.bincount(experts_NX.reshape(-1), length=e)
    balance = balance_term(scores_NE.reshape(b, t, e), experts_NX.reshape(b, t, -1), e)
    return routed_ND.reshape(b, t, d), load_E, balance


class MoE(nn.Module):
    """Routed experts (dropless) + shared experts. Sows expert loads and the balance term into "moe_stats".

    Inside `parallel.use_expert_parallel(...)` the routed experts run expert-parallel (shard_map + all-to-all).
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        c = self.config
        d, e, f = c.hidden_size, c.n_routed_experts, c.moe_intermediate_size
        gate_DE = weight(self, "gate", (d, e), ("embed", "router_expert"), c, dtype=jnp.float32)
        bias_E = self.variable(ROUTER_COLLECTION, "bias", nn.with_logical_partitioning(
            jnp.zeros, ("router_expert",)), (e,), jnp.float32).value
        w_gate = weight(self, "w_gate", (e, d, f), ("expert", "expert_embed", "expert_mlp"), c)
        w_up = weight(self, "w_up", (e, d, f), ("expert", "expert_embed", "expert_mlp"), c)
        w_down = weight(self, "w_down", (e, f, d), ("expert", "expert_mlp", "expert_embed"), c)
        ep = parallel.current_expert_parallel()
        run = routed_experts if ep is None else ep.routed_experts
        out_BTD, load_E, balance = run(x_BTD, gate_DE, nn.unbox(bias_E), w_gate, w_up, w_down, c)
        self.sow(STATS_COLLECTION, "expert_load", load_E)
        self.sow(STATS_COLLECTION, "balance", balance)
        if c.n_shared_experts > 0:
            out_BTD = out_BTD + MLP(c, f * c.n_shared_experts, "expert_mlp", name="shared")(x_BTD)
        return out_BTD
