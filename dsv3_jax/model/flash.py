"""Attention whose memory is linear in sequence length (FlashAttention-2 in plain JAX), plus vendor-kernel wrappers.

Shape legend: B batch, T queries, S keys (cache slots while decoding), H heads, K the q·k width (192 naive MLA,
576 = C + R absorbed), U the value width (128 naive, 512 = C absorbed); nq / nk count query / key blocks,
bq / bk are the block lengths.

Keys and values come per head ([B,S,H,K], [B,S,H,U]) or without a head axis ([B,S,K], [B,S,U]): one latent
key/value shared by every query head (MLA's absorbed path). The mask is given by positions: query t may attend
key s iff kpos[b,s] <= qpos[b,t]. That one rule covers causal training (qpos = kpos = arange), right-padded rows
(padded keys carry a position larger than any query's) and decoding against a cache (kpos = slot index).

`blockwise_attention` never holds a [.., T, S] array, forward or backward: scores live one [B,H,bq,bk] block at a
time; the backward saves only the output and one logsumexp per query and recomputes the block scores.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.quant.matmul import dot_f32

_NO_KEY_POS = np.iinfo(np.int32).max  # position of a padded key: masked for every query
_NO_QUERY_POS = np.iinfo(np.int32).min  # position of a padded query: sees no key


def _einsum_specs(shared_kv: bool) -> tuple[str, str]:
    """Einsum operands for keys and values: without a head axis when one latent is shared by all heads."""
    return ("bsk", "bsu") if shared_kv else ("bshk", "bshu")


def _check_inputs(q_BTHK, k_BSHK, v_BSHU, qpos_BT, kpos_BS, block_q, block_k) -> None:
    for name, block in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(block, (int, np.integer)) or isinstance(block, bool) or block <= 0:
            raise ValueError(f"{name} must be a positive int, got {block!r}")
    if q_BTHK.ndim != 4:
        raise ValueError(f"q must be [B,T,H,K], got shape {q_BTHK.shape}")
    if k_BSHK.ndim not in (3, 4) or v_BSHU.ndim != k_BSHK.ndim:
        raise ValueError(f"k and v must both be [B,S,K]/[B,S,U] or [B,S,H,K]/[B,S,H,U], got shapes "
                         f"{k_BSHK.shape} and {v_BSHU.shape}")
    b, t, h, kdim = q_BTHK.shape
    s = k_BSHK.shape[1]
    head_axes = () if k_BSHK.ndim == 3 else (h,)
    if k_BSHK.shape != (b, s, *head_axes, kdim):
        raise ValueError(f"k shape {k_BSHK.shape} does not match q shape {q_BTHK.shape} (expected "
                         f"{(b, s, *head_axes, kdim)})")
    if v_BSHU.shape[:-1] != k_BSHK.shape[:-1]:
        raise ValueError(f"v shape {v_BSHU.shape} does not match k shape {k_BSHK.shape} except in the last axis")
    if qpos_BT.shape != (b, t) or kpos_BS.shape != (b, s):
        raise ValueError(f"qpos must be [B,T]={(b, t)} and kpos [B,S]={(b, s)}, got {qpos_BT.shape} and "
                         f"{kpos_BS.shape}")


def _to_blocks(x, block: int, fill):
    """[B, N, ...] → [n, B, block, ...], padding N up to n·block with `fill`."""
    n = -(-x.shape[1] // block)
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, n * block - x.shape[1])
    x = jnp.pad(x, pad, constant_values=fill)
    x = x.reshape(x.shape[0], n, block, *x.shape[2:])
    return jnp.moveaxis(x, 1, 0)


def _from_blocks(x, length: int):
    """[n, B, block, ...] → [B, length, ...] (drops the padding)."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def _visible_BTS(qpos_BT, kpos_BS):
    return kpos_BS[:, None, :] <= qpos_BT[:, :, None]


def _tied_to(x, pos):
    """`pos`, made data-dependent on `x` at no cost (+ an int 0 computed from one element of x).

    Inside a differentiated scan over layers the positions are loop-invariant, and JAX hoists loop-invariant
    work out of the loop: the block masks of every (query block, key block) pair, a [nk, nq, B, H, bq, bk]
    boolean array — T² memory. Tying the positions to this layer's queries keeps the masks inside the loops."""
    zero = (jax.lax.stop_gradient(x.reshape(-1)[0]).astype(jnp.float32) * 0).astype(pos.dtype)
    return pos + zero


def _any_visible(qpos_BT, kpos_BS):
    """Scalar bool: some query of this block may see some key of this block (cheap: min/max positions per row)."""
    return jnp.any(jnp.min(kpos_BS, axis=1) <= jnp.max(qpos_BT, axis=1))


def _maybe_skip(skip: bool, qpos_BT, kpos_BS, compute, carry):
    """compute(carry), or carry unchanged when `skip` and the block pair is entirely masked."""
    if not skip:
        return compute(carry)
    return jax.lax.cond(_any_visible(qpos_BT, kpos_BS), compute, lambda c: c, carry)


def _scores_BHTS(q_BTHK, k_BSHK, qpos_BT, kpos_BS, scale: float, k_eq: str):
    """Masked float32 scores of one block pair: scale·q·k where visible, -inf elsewhere."""
    s_BHTS = dot_f32(f"bthk,{k_eq}->bhts", q_BTHK, k_BSHK) * scale
    return jnp.where(_visible_BTS(qpos_BT, kpos_BS)[:, None], s_BHTS, -jnp.inf)


def _online_softmax_step(carry, k_BSHK, v_BSHU, kpos_BS, q_BTHK, qpos_BT, scale: float, shared_kv: bool):
    """Fold one key block into the running max m [B,H,T], sum l [B,H,T] and accumulator acc [B,H,T,U] (f32)."""
    k_eq, v_eq = _einsum_specs(shared_kv)
    m_BHT, l_BHT, acc_BHTU = carry
    s_BHTS = _scores_BHTS(q_BTHK, k_BSHK, qpos_BT, kpos_BS, scale, k_eq)
    m_new_BHT = jnp.maximum(m_BHT, jnp.max(s_BHTS, axis=-1))
    m_safe_BHT = jnp.where(jnp.isfinite(m_new_BHT), m_new_BHT, 0.0)  # nothing visible yet: exp(-inf - 0) = 0
    p_BHTS = jnp.exp(s_BHTS - m_safe_BHT[..., None])
    alpha_BHT = jnp.exp(m_BHT - m_safe_BHT)
    pv_BHTU = dot_f32(f"bhts,{v_eq}->bhtu", p_BHTS.astype(v_BSHU.dtype), v_BSHU)
    return m_new_BHT, alpha_BHT * l_BHT + jnp.sum(p_BHTS, axis=-1), alpha_BHT[..., None] * acc_BHTU + pv_BHTU


def _forward_q_block(q_BTHK, qpos_BT, k_nBSHK, v_nBSHU, kpos_nBS, scale: float, skip: bool):
    """One query block against every key block → out [B,T,H,U] (v dtype) and logsumexp [B,H,T] (f32).

    A row that sees no key gets out = 0 and logsumexp = +inf (so the backward gives it no gradient).
    """
    b, t, h, _ = q_BTHK.shape
    shared_kv = k_nBSHK.ndim == 4
    init = (jnp.full((b, h, t), -jnp.inf, jnp.float32), jnp.zeros((b, h, t), jnp.float32),
            jnp.zeros((b, h, t, v_nBSHU.shape[-1]), jnp.float32))

    def step(carry, xs):
        k_BSHK, v_BSHU, kpos_BS = xs
        compute = functools.partial(_online_softmax_step, k_BSHK=k_BSHK, v_BSHU=v_BSHU, kpos_BS=kpos_BS,
                                    q_BTHK=q_BTHK, qpos_BT=qpos_BT, scale=scale, shared_kv=shared_kv)
        return _maybe_skip(skip, qpos_BT, kpos_BS, compute, carry), None

    (m_BHT, l_BHT, acc_BHTU), _ = jax.lax.scan(step, init, (k_nBSHK, v_nBSHU, kpos_nBS))
    seen_BHT = l_BHT > 0
    out_BHTU = jnp.where(seen_BHT[..., None], acc_BHTU / jnp.where(seen_BHT, l_BHT, 1.0)[..., None], 0.0)
    lse_BHT = jnp.where(seen_BHT, m_BHT + jnp.log(jnp.where(seen_BHT, l_BHT, 1.0)), jnp.inf)
    return jnp.swapaxes(out_BHTU, 1, 2).astype(v_nBSHU.dtype), lse_BHT


def _forward_blocks(q_nBTHK, k_nBSHK, v_nBSHU, qpos_nBT, kpos_nBS, scale: float, skip: bool):
    """Blocked forward: out [nq,B,bq,H,U], logsumexp [nq,B,H,bq]; query blocks one after another."""
    with jax.named_scope("flash_forward"):
        per_block = functools.partial(_forward_q_block, k_nBSHK=k_nBSHK, v_nBSHU=v_nBSHU, kpos_nBS=kpos_nBS,
                                      scale=scale, skip=skip)
        return jax.lax.map(lambda xs: per_block(*xs), (q_nBTHK, qpos_nBT))


def _backward_step(carry, q_BTHK, do_BTHU, lse_BHT, delta_BHT, qpos_BT, k_BSHK, v_BSHU, kpos_BS, scale: float,
                   shared_kv: bool):
    """FlashAttention-2 backward of one block pair: recompute p, add to (dk, dv, this query block's dq) in f32."""
    k_eq, v_eq = _einsum_specs(shared_kv)
    dk_BSHK, dv_BSHU, dq_BTHK = carry
    s_BHTS = _scores_BHTS(q_BTHK, k_BSHK, qpos_BT, kpos_BS, scale, k_eq)
    p_BHTS = jnp.exp(s_BHTS - lse_BHT[..., None])  # -inf - lse or s - inf (empty row) → 0
    dv_BSHU = dv_BSHU + dot_f32(f"bhts,bthu->{v_eq}", p_BHTS.astype(do_BTHU.dtype), do_BTHU)
    dp_BHTS = dot_f32(f"bthu,{v_eq}->bhts", do_BTHU, v_BSHU)
    ds_BHTS = (p_BHTS * (dp_BHTS - delta_BHT[..., None]) * scale).astype(q_BTHK.dtype)
    # [B,H,T,K] then a transpose: XLA:CPU's bf16 dot rejected the layout it picked for a direct "->bthk" here
    # (before dot_f32 widened bf16 operands on the CPU; kept: the same numbers, and other backends are unmeasured).
    dq_BHTK = dot_f32(f"bhts,{k_eq}->bhtk", ds_BHTS, k_BSHK)
    dq_BTHK = dq_BTHK + jnp.swapaxes(dq_BHTK, 1, 2)
    dk_BSHK = dk_BSHK + dot_f32(f"bhts,bthk->{k_eq}", ds_BHTS, q_BTHK)
    return dk_BSHK, dv_BSHU, dq_BTHK


def _backward_k_block(dq_nBTHK, k_BSHK, v_BSHU, kpos_BS, q_blocks, scale: float, skip: bool):
    """One key block against every query block → (dq blocks updated, dk [B,bk,(H),K], dv [B,bk,(H),U]) in f32."""
    shared_kv = k_BSHK.ndim == 3

    def step(carry, xs):
        q_BTHK, do_BTHU, lse_BHT, delta_BHT, qpos_BT, dq_BTHK = xs
        compute = functools.partial(_backward_step, q_BTHK=q_BTHK, do_BTHU=do_BTHU, lse_BHT=lse_BHT,
                                    delta_BHT=delta_BHT, qpos_BT=qpos_BT, k_BSHK=k_BSHK, v_BSHU=v_BSHU,
                                    kpos_BS=kpos_BS, scale=scale, shared_kv=shared_kv)
        dk_BSHK, dv_BSHU, dq_BTHK = _maybe_skip(skip, qpos_BT, kpos_BS, compute, (*carry, dq_BTHK))
        return (dk_BSHK, dv_BSHU), dq_BTHK

    init = (jnp.zeros(k_BSHK.shape, jnp.float32), jnp.zeros(v_BSHU.shape, jnp.float32))
    (dk_BSHK, dv_BSHU), dq_nBTHK = jax.lax.scan(step, init, (*q_blocks, dq_nBTHK))
    return dq_nBTHK, dk_BSHK, dv_BSHU


def _backward_blocks(scale: float, skip: bool, residuals, do_nBTHU):
    """Blocked backward: key blocks in an outer scan (dk, dv finished per block), query blocks inside (dq summed)."""
    q_nBTHK, k_nBSHK, v_nBSHU, qpos_nBT, kpos_nBS, out_nBTHU, lse_nBHT = residuals
    with jax.named_scope("flash_backward"):
        delta_nBHT = jnp.einsum("nbthu,nbthu->nbht", do_nBTHU.astype(jnp.float32), out_nBTHU.astype(jnp.float32))
        q_blocks = (q_nBTHK, do_nBTHU, lse_nBHT, delta_nBHT, qpos_nBT)

        def outer(dq_nBTHK, xs):
            dq_nBTHK, dk_BSHK, dv_BSHU = _backward_k_block(dq_nBTHK, *xs, q_blocks=q_blocks, scale=scale, skip=skip)
            return dq_nBTHK, (dk_BSHK, dv_BSHU)

        dq_nBTHK, (dk_nBSHK, dv_nBSHU) = jax.lax.scan(outer, jnp.zeros(q_nBTHK.shape, jnp.float32),
                                                      (k_nBSHK, v_nBSHU, kpos_nBS))
    return (dq_nBTHK.astype(q_nBTHK.dtype), dk_nBSHK.astype(k_nBSHK.dtype), dv_nBSHU.astype(v_nBSHU.dtype),
            None, None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash_blocks(q_nBTHK, k_nBSHK, v_nBSHU, qpos_nBT, kpos_nBS, scale: float, skip: bool):
    return _forward_blocks(q_nBTHK, k_nBSHK, v_nBSHU, qpos_nBT, kpos_nBS, scale, skip)[0]


def _flash_blocks_fwd(q_nBTHK, k_nBSHK, v_nBSHU, qpos_nBT, kpos_nBS, scale: float, skip: bool):
    out_nBTHU, lse_nBHT = _forward_blocks(q_nBTHK, k_nBSHK, v_nBSHU, qpos_nBT, kpos_nBS, scale, skip)
    return out_nBTHU, (q_nBTHK, k_nBSHK, v_nBSHU, qpos_nBT, kpos_nBS, out_nBTHU, lse_nBHT)


_flash_blocks.defvjp(_flash_blocks_fwd, _backward_blocks)


def blockwise_attention(q_BTHK: jax.Array, k_BSHK: jax.Array, v_BSHU: jax.Array, qpos_BT: jax.Array,
                        kpos_BS: jax.Array, scale: float, *, block_q: int = 512, block_k: int = 512,
                        skip_masked_blocks: bool = True) -> jax.Array:
    """softmax(where(kpos <= qpos, scale·q·k, -inf)) · v in memory linear in T and S → out [B,T,H,U] (v dtype).

    q [B,T,H,K]; k [B,S,H,K] and v [B,S,H,U] per head, or k [B,S,K] and v [B,S,U] shared by all heads; qpos [B,T]
    and kpos [B,S] integer positions (query t sees key s iff kpos[b,s] <= qpos[b,t]); scale a Python float.
    Scores and softmax are float32 (online softmax over key blocks); the probabilities meet v in v's dtype with
    float32 accumulation, as in `attention.attend`. Differentiable in q, k, v through a custom VJP that saves
    only the output and a float32 logsumexp per query and head, and recomputes block scores.

    A query row that sees no key returns 0 and gets zero gradient (the dense reference returns the mean of v
    there instead). T and S are padded internally to multiples of block_q = min(block_q, T) and
    block_k = min(block_k, S): padded keys get position int32 max, padded queries int32 min, so positions
    should stay inside (int32 min, int32 max). With skip_masked_blocks a block pair in which no query can see
    any key (judged from min/max positions per row) is skipped by `lax.cond` in forward and backward — about
    half the work for causal training; under `vmap` the cond becomes a select and computes both branches.
    """
    _check_inputs(q_BTHK, k_BSHK, v_BSHU, qpos_BT, kpos_BS, block_q, block_k)
    t, s = q_BTHK.shape[1], k_BSHK.shape[1]
    bq, bk = min(int(block_q), t), min(int(block_k), s)
    qpos_BT, kpos_BS = _tied_to(q_BTHK, qpos_BT), _tied_to(q_BTHK, kpos_BS)
    with jax.named_scope("flash_attention"):
        with jax.named_scope("flash_pad"):
            q_nBTHK = _to_blocks(q_BTHK, bq, 0)
            k_nBSHK, v_nBSHU = _to_blocks(k_BSHK, bk, 0), _to_blocks(v_BSHU, bk, 0)
            qpos_nBT = _to_blocks(qpos_BT.astype(jnp.int32), bq, _NO_QUERY_POS)
            kpos_nBS = _to_blocks(kpos_BS.astype(jnp.int32), bk, _NO_KEY_POS)
        out_nBTHU = _flash_blocks(q_nBTHK, k_nBSHK, v_nBSHU, qpos_nBT, kpos_nBS, float(scale),
                                  bool(skip_masked_blocks))
        return _from_blocks(out_nBTHU, t)


def _with_head_axis(k_BSHK, v_BSHU):
    """Shared latent k [B,S,K] / v [B,S,U] → one key/value head [B,S,1,·] (multi-query attention)."""
    if k_BSHK.ndim == 3:
        return k_BSHK[:, :, None], v_BSHU[:, :, None]
    return k_BSHK, v_BSHU


def _pad_last(x, width: int):
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])])


def dot_product_attention_gpu(q_BTHK: jax.Array, k_BSHK: jax.Array, v_BSHU: jax.Array, qpos_BT: jax.Array,
                              kpos_BS: jax.Array, scale: float, *, block_q: int = 512, block_k: int = 512,
                              implementation: str | None = "cudnn", causal: bool = False) -> jax.Array:
    """`blockwise_attention` through `jax.nn.dot_product_attention` (cuDNN flash attention on GPU) → [B,T,H,U].

    Same arguments and result as `blockwise_attention`; block_q / block_k are accepted and ignored (the kernel
    picks its own tiles). `implementation` is passed through: "cudnn" needs an NVIDIA GPU, bf16/fp16 inputs, and
    a q·k head width ≤ 256 on Hopper (≤ 128 before) that is a multiple of 8 — the naive MLA width 192 fits on
    Hopper, the absorbed width 576 does not (use `blockwise_attention` there); None / "xla" run anywhere.

    Mask: with causal=True the caller promises the training layout — T == S, qpos[b,t] = t, kpos[b,s] = s for
    the real keys of a row and kpos ≥ S for its right padding — and the mask becomes cuDNN's causal flag plus
    per-row key lengths (count of kpos < S): no [T,S] array anywhere. Otherwise a [B,1,T,S] boolean mask is
    built from the positions (cuDNN turns it into an additive bias of q's dtype): fine for decoding (small T),
    quadratic for long prefill. Rows that see no key are implementation-defined (finite, not necessarily 0).

    Head widths: the public API requires value width = q·k width, so v is zero-padded from U to K (or q and k
    from K to U when U > K) and the output sliced back. At MLA's 192/128 that costs 50% more value-side work
    (the p·v product and the output/gradient buffers are 1.5× wider): 384 instead of 320 multiply-adds per
    query-key pair per head, +20% attention FLOPs. (jax's private cuDNN entry point accepts unequal widths on
    Hopper with cuDNN ≥ 9.10; this wrapper keeps to the public API.)
    """
    _check_inputs(q_BTHK, k_BSHK, v_BSHU, qpos_BT, kpos_BS, block_q, block_k)
    t, s = q_BTHK.shape[1], k_BSHK.shape[1]
    u = v_BSHU.shape[-1]
    width = max(q_BTHK.shape[-1], u)
    with jax.named_scope("cudnn_attention"):
        k_BSGK, v_BSGU = _with_head_axis(k_BSHK, v_BSHU)
        q_BTHW, k_BSGW, v_BSGW = (_pad_last(x, width) for x in (q_BTHK, k_BSGK, v_BSGU))
        if causal:
            if t != s:
                raise ValueError(f"causal=True needs as many queries as keys (training layout), got T={t}, S={s}")
            lengths_B = jnp.sum(kpos_BS < s, axis=1).astype(jnp.int32)
            out_BTHW = jax.nn.dot_product_attention(q_BTHW, k_BSGW, v_BSGW, scale=scale, is_causal=True,
                                                    key_value_seq_lengths=lengths_B, implementation=implementation)
        else:
            mask_B1TS = _visible_BTS(qpos_BT, kpos_BS)[:, None]
            out_BTHW = jax.nn.dot_product_attention(q_BTHW, k_BSGW, v_BSGW, mask=mask_B1TS, scale=scale,
                                                    implementation=implementation)
        return out_BTHW[..., :u]


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def splash_attention_tpu(q_BTHK: jax.Array, k_BSHK: jax.Array, v_BSHU: jax.Array, qpos_BT: jax.Array,
                         kpos_BS: jax.Array, scale: float, *, block_q: int = 512, block_k: int = 512,
                         interpret: bool = False) -> jax.Array:
    """Causal training attention through the Pallas TPU splash-attention kernel → out [B,T,H,U] (v dtype).

    Same arguments as `blockwise_attention`, but only the training layout is expressible (splash masks are
    static per shape): T == S, qpos[b,t] = t, kpos[b,s] = s for the real keys of a row and kpos ≥ S for its
    right padding. The mask is splash's static causal mask and-ed with segment ids (a key with kpos ≥ S gets
    segment 0, everything else segment 1). Keys/values without a head axis use the multi-query kernel.

    The kernel has no scale argument, so q is multiplied by `scale` in its own dtype first (one extra rounding
    in bf16). T is padded to a multiple of the blocks, which are rounded up to multiples of 128 (the TPU lane
    width); q·k widths are zero-padded to a multiple of 128 (192 → 256, 576 → 640: the score matmul does
    33% / 11% more work; zero columns leave the scores unchanged). interpret=True runs the kernel in the
    Pallas interpreter (any backend, slow: for correctness checks).
    """
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    _check_inputs(q_BTHK, k_BSHK, v_BSHU, qpos_BT, kpos_BS, block_q, block_k)
    b, t, h, kdim = q_BTHK.shape
    s = k_BSHK.shape[1]
    if t != s:
        raise ValueError(f"splash_attention_tpu needs the training layout T == S, got T={t}, S={s}")
    shared_kv = k_BSHK.ndim == 3
    bq = _round_up(min(block_q, t), 128)
    bk = _round_up(min(block_k, s), 128)
    length = _round_up(t, bq * bk // np.gcd(bq, bk))
    width = _round_up(kdim, 128)
    with jax.named_scope("splash_attention"):
        pad_seq = [(0, 0), (0, length - t)]
        q_BTHW = _pad_last(jnp.pad(q_BTHK * jnp.asarray(scale, q_BTHK.dtype), pad_seq + [(0, 0)] * 2), width)
        k_BSHW = _pad_last(jnp.pad(k_BSHK, pad_seq + [(0, 0)] * (k_BSHK.ndim - 2)), width)
        v_BSHU = jnp.pad(v_BSHU, pad_seq + [(0, 0)] * (v_BSHU.ndim - 2))
        kv_segment_BS = jnp.pad((kpos_BS < s).astype(jnp.int32), pad_seq)
        q_segment_BT = jnp.ones((b, length), jnp.int32)
        mask = splash.MultiHeadMask([splash.CausalMask((length, length)) for _ in range(h)])
        blocks = splash.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq, block_kv_dkv=bk,
                                   block_kv_dkv_compute=bk, block_q_dq=bq, block_kv_dq=bk)
        make = splash.make_splash_mqa_single_device if shared_kv else splash.make_splash_mha_single_device
        kernel = make(mask, block_sizes=blocks, interpret=interpret)
        heads_first = (lambda x: x) if shared_kv else (lambda x: jnp.swapaxes(x, 0, 1))

        def one_row(q_THW, k_SHW, v_SHU, q_segment_T, kv_segment_S):
            out_HTU = kernel(jnp.swapaxes(q_THW, 0, 1), heads_first(k_SHW), heads_first(v_SHU),
                             splash.SegmentIds(q=q_segment_T, kv=kv_segment_S))
            return jnp.swapaxes(out_HTU, 0, 1)

        out_BTHU = jax.vmap(one_row)(q_BTHW, k_BSHW, v_BSHU, q_segment_BT, kv_segment_BS)
        return out_BTHU[:, :t].astype(v_BSHU.dtype)
