"""The one matmul wrapper: every projection of the model goes through `einsum`.

Weights are plain arrays or `fp8.QuantArray` (FP8 values + 128×128 block scales). Model code passes the config's
`MatmulPolicy` at the projections the FP8 recipe covers (attention, dense MLP, shared and routed experts) and never
branches on the weight type; embedding, output head, router gate, eh_proj and the attention core stay in
bf16/fp32 (DESIGN.md §4).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv3_jax.config import MatmulPolicy
from dsv3_jax.quant.fp8 import QuantArray, dequantize, fp8_matmul, quantized_matmul


def target_platform() -> str:
    """The platform the program being traced will run on: the devices of the active mesh ("tpu" while compiling
    for an abstract TPU topology on a CPU host), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def dot_f32(eq: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """`jnp.einsum(eq, a, b)` accumulated and returned in float32 (the attention core, flash blocks, MoE combines,
    the CPU expert tiles). A batched product (an axis, or `...`, in both operands and the output; or no explicit
    output) on the CPU widens narrower operands to float32 first, which gives the same result (a product of two
    bf16 values is exact in float32): XLA:CPU's plain dot has no bf16 x bf16 -> f32 kernel, and a batched dot no
    library took failed at run time ("Unsupported element type for DotThunk::Execute: BF16 x BF16 = F32": a
    bfloat16 model's decode at batch >= 2, `tests/test_generate.py`). Float32 operands and 2-D products are
    unchanged; the model's projections go through `einsum`, whose bf16 weight products XLA:CPU runs (not widened:
    that would copy every weight per call)."""
    if target_platform() == "cpu" and _batched(eq):
        a, b = (o.astype(jnp.promote_types(o.dtype, jnp.float32)) for o in (a, b))
    return jnp.einsum(eq, a, b, preferred_element_type=jnp.float32)


def _batched(eq: str) -> bool:
    inputs, arrow, out = eq.replace(" ", "").partition("->")
    a, b = inputs.split(",")
    if not arrow:
        return True
    if "..." in a and "..." in b and "..." in out:
        return True
    return any(c in b and c in out for c in a.replace(".", ""))


def as_dense(w, dtype) -> jax.Array:
    """A weight as a plain array of `dtype` (dequantised when FP8-resident)."""
    return dequantize(w, dtype) if isinstance(w, QuantArray) else w.astype(dtype)


def _canonical(eq: str, w_ndim: int) -> str | None:
    """"2d" for x[..., K]·w[K, N] → [..., N]; "batched" for x[Z, ..., K]·w[Z, K, N]; None otherwise."""
    inputs, out = eq.replace(" ", "").split("->")
    xs, ws = inputs.split(",")
    if w_ndim == 2 and xs[-1] == ws[0] and out == xs[:-1] + ws[1]:
        return "2d"
    if w_ndim == 3 and xs[0] == ws[0] and xs[-1] == ws[1] and out == xs[:-1] + ws[2]:
        return "batched"
    return None


def _fp8_2d(x: jax.Array, w, policy: MatmulPolicy) -> jax.Array:
    x_MK = x.reshape(-1, x.shape[-1])
    y = quantized_matmul(x_MK, w, policy.impl) if isinstance(w, QuantArray) else fp8_matmul(x_MK, w, policy.impl)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def einsum(eq: str, x: jax.Array, w, *, dtype: jnp.dtype | None = None,
           policy: MatmulPolicy | None = None) -> jax.Array:
    """`jnp.einsum(eq, x, w)` with fp32 accumulation, result in `dtype` (default x.dtype).

    With a policy, FP8-resident weights (and plain ones when policy.fp8_plain) take the block-scaled FP8 product
    for the shapes the model uses ([..., K]·[K, N] and expert-batched [Z, ..., K]·[Z, K, N]); any other shape, or
    no policy, dequantises the weight first.
    """
    dtype = jnp.dtype(dtype or x.dtype)
    fp8 = policy is not None and (isinstance(w, QuantArray) or policy.fp8_plain)
    kind = _canonical(eq, w.ndim) if fp8 else None
    if kind == "2d":
        return _fp8_2d(x, w, policy).astype(dtype)
    if kind == "batched":
        return jax.vmap(lambda xz, wz: _fp8_2d(xz, wz, policy))(x, w).astype(dtype)
    out = jnp.einsum(eq, x.astype(dtype), as_dense(w, dtype), preferred_element_type=jnp.float32)
    return out.astype(dtype)  # weights are not widened: XLA:CPU runs these bf16 products (see dot_f32)
