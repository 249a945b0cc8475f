"""The training step's CPU speed-ups keep the math: the attention core's own backward, the flattened projections,
the scatter-free cross-entropy and the expert tiles' own backward equal plain autodiff of the reference forms."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import subprocess_env

from dsv3_jax.model import attention, layers
from dsv3_jax.model.moe import dispatch
from dsv3_jax.train import losses


def _rand(rs, *shape, scale=1.0):
    return jnp.asarray(rs.randn(*shape).astype(np.float32) * scale)


def _reference_attention(q_BTHK, k_BSHK, v_BSHU, mask_BTS, scale):
    scores = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BSHK, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(jnp.where(mask_BTS[:, None], scores * scale, jnp.finfo(jnp.float32).min), axis=-1)
    return jnp.einsum("bhts,bshu->bthu", probs, v_BSHU, preferred_element_type=jnp.float32)


def _value_and_grads(fn, args, cot):
    return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(fn(*a) * cot), argnums=tuple(range(len(args)))))(*args)


def _assert_close(got, want, atol, rtol=1e-5):
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(g, w, atol=atol, rtol=rtol)


@pytest.mark.parametrize("padded", [False, True])
def test_attention_backward_equals_autodiff(padded):
    rs = np.random.RandomState(0)
    b, t, h, k, u = 2, 24, 3, 10, 6
    q, kk, v = _rand(rs, b, t, h, k), _rand(rs, b, t, h, k), _rand(rs, b, t, h, u)
    pos = np.tile(np.arange(t), (b, 1))
    if padded:
        pos[1, -5:] = np.iinfo(np.int32).max  # right padding: keys no query sees
    pos = jnp.asarray(pos)
    mask = pos[:, None, :] <= jnp.arange(t)[None, :, None]
    cot = _rand(rs, b, t, h, u)
    got = _value_and_grads(lambda q, kk, v: attention.naive_attention(q, kk, v, mask, 0.3), (q, kk, v), cot)
    want = _value_and_grads(lambda q, kk, v: _reference_attention(q, kk, v, mask, 0.3), (q, kk, v), cot)
    _assert_close(got, want, atol=1e-5)


def test_dense_equals_einsum():
    rs = np.random.RandomState(1)
    x, w = _rand(rs, 3, 5, 7), _rand(rs, 7, 4)
    cot = _rand(rs, 3, 5, 4)
    got = _value_and_grads(layers.dense, (x, w), cot)
    want = _value_and_grads(lambda x, w: jnp.einsum("btd,df->btf", x, w), (x, w), cot)
    _assert_close(got, want, atol=1e-5)


def test_cross_entropy_equals_gather_form():
    rs = np.random.RandomState(2)
    logits, targets = _rand(rs, 2, 9, 33, scale=3.0), jnp.asarray(rs.randint(0, 33, (2, 9)))

    def gathered(logits_BTV):
        logp = jax.nn.log_softmax(logits_BTV, axis=-1)
        return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]

    np.testing.assert_array_equal(losses.token_cross_entropy(logits, targets), gathered(logits))
    cot = _rand(rs, 2, 9)
    _assert_close(_value_and_grads(lambda z: losses.token_cross_entropy(z, targets), (logits,), cot),
                  _value_and_grads(gathered, (logits,), cot), atol=1e-6)


def _expert_inputs(dtype):
    rs = np.random.RandomState(3)
    n, d, f, e, x = 80, 16, 24, 8, 2
    xs = _rand(rs, n, d).astype(dtype)
    ws = [_rand(rs, *s, scale=0.2) for s in ((e, d, f), (e, d, f), (e, f, d))]
    experts = jnp.asarray(np.argsort(-rs.randn(n, e), axis=1)[:, :x].astype(np.int32))
    weights = jnp.asarray(rs.rand(n, x).astype(np.float32))
    return xs, ws, experts, weights, _rand(rs, n, d)


def _expert_value_and_grads(ffn, xs, ws, experts, weights, cot):
    return _value_and_grads(lambda xs, *w: ffn(xs, experts, weights, *w).astype(jnp.float32), (xs, *ws), cot)


def test_expert_tiles_bfloat16_match_float32():
    """bf16 activations through the tiles' own backward (plain dots in float32 accumulation) stay within bf16
    rounding of the float32 result (the dense reference has no bf16 dot on XLA:CPU)."""
    xs, ws, experts, weights, cot = _expert_inputs(jnp.bfloat16)
    got = _expert_value_and_grads(dispatch.blocks_ffn, xs, ws, experts, weights, cot)
    want = _expert_value_and_grads(dispatch.blocks_ffn, xs.astype(jnp.float32), ws, experts, weights, cot)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        assert g.dtype == w.dtype or g.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(g, np.float32), w, atol=0.05 * float(jnp.max(jnp.abs(w))), rtol=0)


def test_rms_norm_backward_equals_autodiff():
    rs = np.random.RandomState(4)
    x, scale, cot = _rand(rs, 3, 5, 16, scale=2.0), _rand(rs, 16), _rand(rs, 3, 5, 16)

    def reference(x, scale):
        x32 = x.astype(jnp.float32)
        return scale * (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6))

    got = _value_and_grads(lambda x, s: layers.rms_norm(x, s, 1e-6), (x, scale), cot)
    _assert_close(got, _value_and_grads(reference, (x, scale), cot), atol=1e-5)


def test_cpu_compiler_options_are_cpu_only_and_overridable(monkeypatch):
    """The package's XLA:CPU options (LLVM O1: a faster cold compile; O0 for a small model's initialisation) apply
    to CPU programs only; XLA_FLAGS and DSV3_XLA_CPU_OPTIONS=0 override them, and a program compiled with them
    computes the same values to float32 rounding (O3 vectorises the row sums, so their order differs: 1 ulp)."""
    from dsv3_jax import host

    monkeypatch.delenv("DSV3_XLA_CPU_OPTIONS", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")
    assert host.compiler_options("cpu") == host.CPU_COMPILER_OPTIONS
    assert host.compiler_options("tpu") is None and host.compiler_options("gpu") is None
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=3")
    assert host.compiler_options("cpu") is None
    monkeypatch.setenv("XLA_FLAGS", "")
    assert host.init_compiler_options("cpu", host.INIT_O0_MAX_PARAMS) == host.INIT_CPU_COMPILER_OPTIONS
    assert host.init_compiler_options("cpu", host.INIT_O0_MAX_PARAMS + 1) is None
    assert host.init_compiler_options("tpu", 1) is None
    monkeypatch.setenv("DSV3_XLA_CPU_OPTIONS", "0")
    assert host.compiler_options("cpu") is None and host.init_compiler_options("cpu", 1) is None
    x = _rand(np.random.RandomState(5), 64, 48)
    fn = lambda a: jnp.sum(jax.nn.silu(a) * jnp.tanh(a), axis=-1)  # noqa: E731
    with_options = jax.jit(fn, compiler_options=host.CPU_COMPILER_OPTIONS)(x)
    np.testing.assert_allclose(with_options, jax.jit(fn)(x), rtol=1e-6, atol=0)


def _after_import(code_before: str, code_after: str, inline: str = "1") -> str:
    """What `code_after` prints in a fresh one-device process that runs `code_before`, then imports dsv3_jax."""
    code = f"{code_before}; import dsv3_jax, jax; from dsv3_jax import host; {code_after}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=subprocess_env(DSV3_INLINE_CPU_DISPATCH=inline))
    return out.stdout.strip()


def test_cpu_dispatch_is_inline_unless_turned_off_or_too_late():
    """Importing dsv3_jax turns JAX's asynchronous CPU dispatch off (host.py: programs then allocate their temp
    buffers on the main thread's glibc arena); DSV3_INLINE_CPU_DISPATCH=0 keeps it, and so does a CPU client that
    already exists (the setting would not reach it)."""
    show = "print(jax.config.read('jax_cpu_enable_async_dispatch'))"
    assert _after_import("import jax", show) == "False"
    assert _after_import("import jax", show, inline="0") == "True"
    assert _after_import("import jax; jax.devices()", show) == "True"


def test_several_cpu_devices_reads_the_forced_count(monkeypatch):
    """A process with a simulated mesh keeps glibc's one arena (host.py: its programs run on worker threads): the
    forced device count in XLA_FLAGS, or jax_num_cpu_devices set before dsv3_jax is imported."""
    from dsv3_jax import host

    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=8")
    assert host.several_cpu_devices()
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    assert not host.several_cpu_devices()
    monkeypatch.setenv("XLA_FLAGS", "")
    assert not host.several_cpu_devices()
    several = "print(host.several_cpu_devices())"
    assert _after_import("import jax; jax.config.update('jax_num_cpu_devices', 4)", several) == "True"
    assert _after_import("import jax", several) == "False"
