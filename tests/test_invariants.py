"""Model invariants on the tiny preset (float32): causality, layout/remat/jit equivalences, finiteness, MoE dispatch
agreement, logical axes, the router and the balance statistics against small numpy references."""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY, random_tokens
from jax.sharding import PartitionSpec

import dsv3_jax as d
from dsv3_jax.model import moe
from dsv3_jax.model.transformer import Transformer

CONFIG = TINY  # float32, scan layout, 1 dense + 2 MoE layers, 8 experts in 4 groups keeping 2, top-2, MTP depth 1
MANY_EXPERTS = TINY.replace(n_routed_experts=64, n_group=8, topk_group=4, num_experts_per_tok=6)
SEQ = 24


def _path_keys(path) -> list[str]:
    return [str(getattr(p, "key", p)) for p in path]


def random_variables(config, seed: int = 0, *, std: float = 0.08, gate_std: float = 0.3,
                     bias_scale: float = 0.5, abstract=None):
    """Random variables (numpy) for the abstract tree: weights ~ N(0, std), the router gate ~ N(0, gate_std) so
    that routing depends on the token, norm scales ~ 1 + 0.2·N(0, 1), router biases ~ U(-bias_scale, bias_scale)."""
    rng = np.random.RandomState(seed)
    abstract = d.abstract_variables(config) if abstract is None else abstract

    def fill(path, leaf):
        keys = _path_keys(path)
        if keys[-1] == "scale":
            value = 1.0 + 0.2 * rng.randn(*leaf.shape)
        elif keys[-1] == "bias":
            value = bias_scale * rng.uniform(-1, 1, leaf.shape)
        elif keys[-1] == "gate":
            value = gate_std * rng.randn(*leaf.shape)
        else:
            value = std * rng.randn(*leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


@pytest.fixture(scope="module")
def variables():
    return random_variables(CONFIG, seed=0)


# ---------------------------------------------------------------- causality


@pytest.mark.parametrize("t", [1, 9, SEQ - 1])
def test_causality_main_and_mtp(variables, t):
    tokens = random_tokens(CONFIG, 2, SEQ, seed=1)
    changed = tokens.copy()
    changed[:, t:] = (tokens[:, t:] + 1 + np.arange(SEQ - t)) % CONFIG.vocab_size
    assert np.all(changed[:, t:] != tokens[:, t:])
    logits_a, mtp_a = d.forward_with_mtp(CONFIG, variables, tokens)
    logits_b, mtp_b = d.forward_with_mtp(CONFIG, variables, changed)
    chex.assert_shape([logits_a, logits_b], (2, SEQ, CONFIG.vocab_size))
    chex.assert_shape([mtp_a, mtp_b], (1, 2, SEQ, CONFIG.vocab_size))
    logits_a, logits_b, mtp_a, mtp_b = map(np.asarray, (logits_a, logits_b, mtp_a, mtp_b))
    # Main logits at i depend on tokens <= i.
    np.testing.assert_allclose(logits_a[:, :t], logits_b[:, :t], atol=1e-6, rtol=0)
    assert np.all(np.abs(logits_a[:, t:] - logits_b[:, t:]).max(axis=-1) > 1e-4)
    # MTP depth k at i reads t_{i+k} as well: it depends on tokens <= i + k.
    k = 1
    np.testing.assert_allclose(mtp_a[0, :, :t - k], mtp_b[0, :, :t - k], atol=1e-6, rtol=0)
    assert np.all(np.abs(mtp_a[0, :, t - k:] - mtp_b[0, :, t - k:]).max(axis=-1) > 1e-4)


# ---------------------------------------------------------------- scan ≡ loop, remat ≡ none, jit ≡ eager


def test_scan_equals_loop(variables):
    tokens = random_tokens(CONFIG, 2, SEQ, seed=1)
    loop_config = CONFIG.replace(scan_layers=False)
    loop_variables = d.stacked_to_loop(CONFIG, variables)
    # The loop layout is exactly what a scan_layers=False model declares.
    chex.assert_trees_all_equal_shapes_and_dtypes(loop_variables, d.abstract_variables(loop_config))
    logits, mtp = d.forward_with_mtp(CONFIG, variables, tokens)
    loop_logits, loop_mtp = d.forward_with_mtp(loop_config, loop_variables, tokens)
    chex.assert_trees_all_close((loop_logits, loop_mtp), (logits, mtp), atol=1e-5, rtol=0)


# Remat is checked on 1 dense + 1 MoE layer: the grad compile of the 3-layer model costs twice as much on CPU.
REMAT_CONFIG = CONFIG.replace(num_hidden_layers=2)


def test_remat_policies_match():
    config = REMAT_CONFIG
    variables = random_variables(config, seed=1)
    tokens = jnp.asarray(random_tokens(config, 2, 16, seed=2))
    target = jnp.asarray(np.random.RandomState(3).randn(2, 16, config.vocab_size).astype(np.float32))

    def run(policy):
        model = Transformer(config.replace(remat_policy=policy))

        def loss(v):
            logits = model.apply(v, tokens)[0]
            return jnp.mean(logits * target), logits

        (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables)
        return value, logits, grads["params"]

    ref_value, ref_logits, ref_grads = run("none")
    chex.assert_tree_all_finite(ref_grads)
    for stack in ("dense_layers", "moe_layers"):
        assert float(jnp.abs(ref_grads[stack]["layers"]["attn"]["wo"]).max()) > 1e-5
    assert float(jnp.abs(ref_grads["moe_layers"]["layers"]["moe"]["w_down"]).max()) > 1e-5
    for policy in ("full", "dots"):
        value, logits, grads = run(policy)
        chex.assert_trees_all_close(logits, ref_logits, atol=1e-5, rtol=0)
        chex.assert_trees_all_close(value, ref_value, atol=1e-6, rtol=0)
        chex.assert_trees_all_close(grads, ref_grads, atol=1e-5, rtol=0)


def test_unrolled_stacks_equal_the_scan(variables):
    """scan_unroll = 0 (each stack as straight-line code, the same stacked parameters), here with full remat:
    the same logits, MTP logits and gradients as the rolled scan (1 dense + 2 MoE layers, MTP depth 1)."""
    tokens = jnp.asarray(random_tokens(CONFIG, 2, 16, seed=5))
    target = jnp.asarray(np.random.RandomState(6).randn(2, 16, CONFIG.vocab_size).astype(np.float32))

    def run(config):
        def loss(v):
            logits, mtp = Transformer(config).apply(v, tokens, method="forward_with_mtp")
            return jnp.mean(logits * target) + jnp.mean(mtp[0] * target), (logits, mtp)

        (_, outputs), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables)
        return outputs, grads["params"]

    ref_outputs, ref_grads = run(CONFIG)
    outputs, grads = run(CONFIG.replace(scan_unroll=0, remat_policy="full"))
    assert float(jnp.abs(ref_grads["moe_layers"]["layers"]["moe"]["w_down"][1]).max()) > 1e-5
    chex.assert_trees_all_close(outputs, ref_outputs, atol=1e-5, rtol=0)
    chex.assert_trees_all_close(grads, ref_grads, atol=1e-5, rtol=0)


def test_init_draws_the_same_numbers_whatever_the_unroll():
    """init_variables compiles the initialisation with rolled stacks; a config with unrolled stacks gets exactly the
    numbers its own unrolled init would draw; inside a trace init_variables is part of that program (no compile)."""
    config = CONFIG.replace(scan_unroll=0)
    own = nn.unbox(jax.jit(lambda key: Transformer(config).init(key, jnp.zeros((1, 2), jnp.int32),
                                                                method="forward_with_mtp"))(jax.random.key(3)))
    got = d.init_variables(config, 3)
    chex.assert_trees_all_equal(got, {k: own[k] for k in got})
    chex.assert_trees_all_equal_shapes_and_dtypes(jax.eval_shape(lambda: d.init_variables(config, 3)), got)


def test_jit_equals_eager(variables):
    tokens = jnp.asarray(random_tokens(CONFIG, 1, 8, seed=4))
    model = Transformer(CONFIG)
    jitted, _ = jax.jit(model.apply)(variables, tokens)
    with jax.disable_jit():
        eager, _ = model.apply(variables, tokens)
    chex.assert_trees_all_close(eager, jitted, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- finiteness, bfloat16

# bfloat16 vs float32 logits for init-scale weights (std 0.02, |logits| mean ~0.13, max ~0.7). Measured over 3 seeds:
# max 5e-3 .. 7.6e-2 (the large ones come from a near-tied router choice flipping under bf16 rounding), mean 1e-3.
BF16_MAX_TOL = 0.15
BF16_MEAN_TOL = 3e-3


def test_finite_random_weights_and_bfloat16():
    variables = random_variables(CONFIG, seed=5, std=CONFIG.init_std, gate_std=CONFIG.init_std, bias_scale=0.0)
    tokens = random_tokens(CONFIG, 2, 64, seed=5)
    logits, mtp = d.forward_with_mtp(CONFIG, variables, tokens)
    chex.assert_shape(logits, (2, 64, CONFIG.vocab_size))
    chex.assert_shape(mtp, (1, 2, 64, CONFIG.vocab_size))
    chex.assert_tree_all_finite((logits, mtp))
    assert float(jnp.std(logits)) > 1e-3  # not degenerate
    bf16 = CONFIG.replace(dtype="bfloat16")
    logits16, mtp16 = d.forward_with_mtp(bf16, variables, tokens)
    assert logits16.dtype == jnp.float32 and mtp16.dtype == jnp.float32  # logits are always float32
    chex.assert_tree_all_finite((logits16, mtp16))
    for low, high in ((logits16, logits), (mtp16, mtp)):
        assert float(jnp.abs(low - high).max()) < BF16_MAX_TOL
        assert float(jnp.abs(low - high).mean()) < BF16_MEAN_TOL


def test_finite_larger_random_weights(variables):
    tokens = random_tokens(CONFIG, 2, 64, seed=6)
    logits, mtp = d.forward_with_mtp(CONFIG, variables, tokens)
    chex.assert_tree_all_finite((logits, mtp))
    assert float(jnp.abs(logits).max()) > 0.1


# ---------------------------------------------------------------- MoE dispatch implementations


def _moe_setup(config, seed, skew_experts=()):
    x = jnp.asarray(np.random.RandomState(seed).randn(2, 32, config.hidden_size).astype(np.float32))
    abstract = jax.eval_shape(lambda: nn.unbox(moe.MoE(config).init(jax.random.key(0), x)))
    abstract = {k: abstract[k] for k in ("params", "router")}
    v = random_variables(config, seed, std=0.1, gate_std=0.1, bias_scale=0.05, abstract=abstract)
    if skew_experts:
        bias = np.asarray(v["router"]["bias"]).copy()
        bias[list(skew_experts)] += 0.9  # scores lie in (0, 1): nearly every token picks these experts
        v["router"]["bias"] = jnp.asarray(bias)
    return x, v


@functools.cache
def _moe_value_and_grad(config, impl):
    """Jitted (params, router, x, cotangent) → (out, (d params, d x)) of Σ out·cotangent; one compile per config."""
    model = moe.MoE(config.replace(moe_impl=impl))

    def loss(params, x, router, cotangent):
        out = model.apply({"params": params, "router": router}, x)
        return jnp.sum(out * cotangent), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def _moe_run(config, impl, variables, x):
    cotangent = jnp.asarray(np.random.RandomState(99).randn(*x.shape).astype(np.float32))
    (_, out), grads = _moe_value_and_grad(config, impl)(variables["params"], x, variables["router"], cotangent)
    return out, grads


MOE_CASES = {
    "tiny_random": (CONFIG, ()),
    "tiny_skewed": (CONFIG, (2, 3)),  # one whole group
    "many_experts_random": (MANY_EXPERTS, ()),
    "many_experts_skewed": (MANY_EXPERTS, (8, 9, 10, 17, 40, 63)),  # spread over 4 groups
}


@pytest.mark.parametrize("case", list(MOE_CASES))
def test_moe_impls_agree(case):
    config, skew = MOE_CASES[case]
    x, variables = _moe_setup(config, seed=len(skew), skew_experts=skew)
    _, experts, _ = moe.route(x.reshape(-1, config.hidden_size) @ variables["params"]["gate"],
                              variables["router"]["bias"], config)
    load = np.bincount(np.asarray(experts).ravel(), minlength=config.n_routed_experts)
    if skew:
        assert load[list(skew)].sum() >= 0.8 * load.sum(), load  # the skew really concentrates the pairs
    ref_out, (ref_gp, ref_gx) = _moe_run(config, "dense", variables, x)
    chex.assert_tree_all_finite((ref_out, ref_gp, ref_gx))
    assert float(jnp.abs(ref_gp["w_up"]).max()) > 0 and float(jnp.abs(ref_gp["gate"]).max()) > 0
    for impl in ("blocks", "ragged"):
        out, (gp, gx) = _moe_run(config, impl, variables, x)
        chex.assert_trees_all_close(out, ref_out, atol=1e-5, rtol=0)
        chex.assert_trees_all_close(gx, ref_gx, atol=1e-5, rtol=0)
        chex.assert_trees_all_close(gp, ref_gp, atol=1e-5, rtol=0)


# ---------------------------------------------------------------- logical axes and variable collections


@pytest.mark.parametrize("config", [CONFIG, CONFIG.replace(q_lora_rank=None), CONFIG.replace(scan_layers=False)],
                         ids=["tiny", "no_q_lora", "loop"])
def test_logical_axes_match_variables(config):
    axes = d.logical_axes(config)
    abstract = d.abstract_variables(config)
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    axes_leaves = jax.tree_util.tree_flatten_with_path(axes, is_leaf=is_spec)[0]
    shape_leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
    assert [p for p, _ in axes_leaves] == [p for p, _ in shape_leaves]
    stacked = 0
    for (path, spec), (shape_path, leaf) in zip(axes_leaves, shape_leaves, strict=False):
        name = "/".join(_path_keys(path))
        assert path == shape_path, name
        assert isinstance(spec, PartitionSpec), f"{name}: {spec!r}"
        assert len(spec) == leaf.ndim, f"{name}: {spec} vs shape {leaf.shape}"
        assert all(isinstance(a, str) for a in spec), f"{name}: {spec}"
        if "layers" in _path_keys(path):
            stacked += 1
            assert spec[0] == "layers", f"{name}: {spec}"
            assert "layers" not in spec[1:], f"{name}: {spec}"
        else:
            assert "layers" not in spec, f"{name}: {spec}"
    assert (stacked > 0) == config.scan_layers
    # The correction bias is a non-trainable "router" variable, never a parameter.
    assert set(abstract) == {"params", "router"}
    param_names = {_path_keys(p)[-1] for p, _ in jax.tree_util.tree_flatten_with_path(abstract["params"])[0]}
    assert "bias" not in param_names
    router = jax.tree_util.tree_flatten_with_path(abstract["router"])[0]
    assert router and all(_path_keys(p)[-1] == "bias" for p, _ in router)
    expected_biases = (config.num_moe_layers if not config.scan_layers else 1) + config.num_nextn_predict_layers
    assert len(router) == expected_biases
    for _, leaf in router:
        assert leaf.shape[-1] == config.n_routed_experts and leaf.dtype == jnp.float32


# ---------------------------------------------------------------- router (DESIGN.md §2)


def numpy_route(logits, bias, config):
    """Reference router: sigmoid scores; choice = score + bias; group score = sum of the group's top-2 choices;
    keep topk_group groups; other groups' experts get -inf; top-k of the masked choice; weights are the unbiased
    scores of the chosen experts, normalised (norm_topk_prob) and scaled by routed_scaling_factor."""
    logits = np.asarray(logits, np.float64)
    n, e = logits.shape
    scores = 1.0 / (1.0 + np.exp(-logits))
    choice = scores + np.asarray(bias, np.float64)
    groups = choice.reshape(n, config.n_group, -1)
    group_score = np.sort(groups, axis=-1)[..., -2:].sum(-1)
    kept = np.argsort(-group_score, axis=-1, kind="stable")[:, :config.topk_group]
    keep = np.zeros((n, config.n_group), bool)
    keep[np.arange(n)[:, None], kept] = True
    masked = np.where(np.repeat(keep, e // config.n_group, axis=1), choice, -np.inf)
    experts = np.argsort(-masked, axis=-1, kind="stable")[:, :config.num_experts_per_tok]
    weights = np.take_along_axis(scores, experts, axis=1)
    if config.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdims=True)
    return weights * config.routed_scaling_factor, experts, scores


def test_route_masked_group_never_chosen():
    """All choice values are negative; a masked group must still never win (masked with -inf, not 0)."""
    config = CONFIG  # 8 experts, 4 groups of 2, keep 2, top-2, normalised, x2.5
    assert (config.n_routed_experts, config.n_group, config.topk_group, config.num_experts_per_tok) == (8, 4, 2, 2)
    bias = np.array([-5.0, -5.2, -5.5, -5.6, -9.0, -9.0, -9.5, -9.5], np.float32)
    logits = np.array([[0.0, 1.0, 2.0, -1.0, 3.0, 3.0, 3.0, 3.0],
                       [2.0, -4.0, 4.0, 0.5, -3.0, 4.0, 0.0, 0.0],
                       [-4.0, -4.0, 6.0, 6.0, 4.0, 4.0, 4.0, 4.0]], np.float32)
    weights, experts, scores = moe.route(jnp.asarray(logits), jnp.asarray(bias), config)
    experts = np.asarray(experts)
    assert np.all(np.asarray(scores) + bias < 0)
    # Groups 0 and 1 always win (their top-2 sums are the largest), so experts 0..3 only.
    assert np.all(experts < 4), experts
    np.testing.assert_array_equal(np.sort(experts, 1), [[0, 1], [0, 2], [2, 3]])
    sig = 1 / (1 + np.exp(-logits.astype(np.float64)))
    chosen = np.take_along_axis(sig, experts, 1)
    np.testing.assert_allclose(weights, 2.5 * chosen / chosen.sum(1, keepdims=True), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(weights).sum(1), 2.5, atol=1e-6)


def test_route_group_score_is_top2_sum():
    """A group with one high expert loses to a group with two medium ones (sum of top-2, not the max)."""
    config = CONFIG.replace(topk_group=1, num_experts_per_tok=1)
    scores = np.array([[0.95, 0.05, 0.6, 0.6, 0.1, 0.1, 0.1, 0.1]])
    logits = np.log(scores / (1 - scores)).astype(np.float32)
    _, experts, _ = moe.route(jnp.asarray(logits), jnp.zeros(8, jnp.float32), config)
    assert int(experts[0, 0]) in (2, 3)


ROUTE_CONFIGS = {
    "tiny": CONFIG,
    "many_experts": MANY_EXPERTS,
    "unnormalised": CONFIG.replace(norm_topk_prob=False, routed_scaling_factor=1.0, n_group=2, topk_group=1),
    "671b_routing": d.ModelConfig.from_preset("deepseek-v3-671b"),
}


@pytest.mark.parametrize("name", list(ROUTE_CONFIGS))
def test_route_matches_numpy(name):
    config = ROUTE_CONFIGS[name]
    rng = np.random.RandomState(7)
    logits = (2.0 * rng.randn(128, config.n_routed_experts)).astype(np.float32)
    bias = (0.3 * rng.randn(config.n_routed_experts)).astype(np.float32)
    weights, experts, scores = jax.jit(moe.route, static_argnums=2)(logits, bias, config)
    ref_weights, ref_experts, ref_scores = numpy_route(logits, bias, config)
    chex.assert_shape([weights, experts], (128, config.num_experts_per_tok))
    assert experts.dtype == jnp.int32 and weights.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(experts), ref_experts)
    np.testing.assert_allclose(weights, ref_weights, atol=1e-6, rtol=0)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-6, rtol=0)
    # The bias changes some choices (so the bias-aware path is exercised) but never the weights' source.
    _, unbiased, _ = numpy_route(logits, np.zeros_like(bias), config)
    assert not np.array_equal(unbiased, ref_experts)


# ---------------------------------------------------------------- balance term (DESIGN.md §3)


def numpy_balance(scores, experts, num_experts):
    """mean over sequences of Σ_i f_i P_i, f_i = E/(kT) Σ_t 1[i ∈ TopK_t], P_i = (1/T) Σ_t s_it / Σ_j s_jt."""
    scores = np.asarray(scores, np.float64)
    experts = np.asarray(experts)
    b, t, k = experts.shape
    total = 0.0
    for seq in range(b):
        hits = np.zeros(num_experts)
        for tok in range(t):
            for i in set(experts[seq, tok].tolist()):
                hits[i] += 1
        f = num_experts / (k * t) * hits
        p = (scores[seq] / scores[seq].sum(-1, keepdims=True)).mean(0)
        total += (f * p).sum()
    return total / b


@pytest.mark.parametrize("config", [CONFIG, MANY_EXPERTS], ids=["tiny", "many_experts"])
def test_balance_term_matches_numpy(config):
    b, t = 3, 20
    rng = np.random.RandomState(8)
    logits = (2.0 * rng.randn(b * t, config.n_routed_experts)).astype(np.float32)
    bias = (0.3 * rng.randn(config.n_routed_experts)).astype(np.float32)
    _, experts, scores = numpy_route(logits, bias, config)
    e = config.n_routed_experts
    scores, experts = scores.reshape(b, t, e).astype(np.float32), experts.reshape(b, t, -1).astype(np.int32)
    got = moe.balance_term(scores, experts, e)
    expected = numpy_balance(scores, experts, e)
    assert got.shape == ()
    np.testing.assert_allclose(float(got), expected, rtol=1e-6, atol=0)


def test_balance_term_is_one_when_uniform():
    e, _k, t = 8, 2, 4
    experts = np.array([[[0, 1], [2, 3], [4, 5], [6, 7]]], np.int32)  # every expert hit once
    scores = np.full((1, t, e), 0.3, np.float32)
    np.testing.assert_allclose(float(moe.balance_term(scores, experts, e)), 1.0, rtol=1e-6)
    skewed = np.array([[[0, 1]] * t], np.int32)  # all load on experts 0, 1 with uniform scores: still E/k·(2/E)=1
    np.testing.assert_allclose(float(moe.balance_term(scores, skewed, e)), 1.0, rtol=1e-6)
    peaked = scores.copy()
    peaked[..., :2] = 3.0  # scores follow the skew: the term grows
    assert float(moe.balance_term(peaked, skewed, e)) > 3.0


# ---------------------------------------------------------------- moe_stats


def test_moe_stats_expert_load(variables):
    b, t = 2, 16
    tokens = jnp.asarray(random_tokens(CONFIG, b, t, seed=10))
    model = Transformer(CONFIG)

    @jax.jit
    def run(v, tokens):
        return model.apply(v, tokens, mutable=["moe_stats"], method=Transformer.forward_with_mtp)

    _, state = run(variables, tokens)
    stats = state["moe_stats"]
    (load,) = jax.tree_util.tree_leaves(stats["moe_layers"]["layers"]["moe"]["expert_load"])
    chex.assert_shape(load, (CONFIG.num_moe_layers, CONFIG.n_routed_experts))
    np.testing.assert_array_equal(np.asarray(load).sum(-1), [b * t * CONFIG.num_experts_per_tok] *
                                  CONFIG.num_moe_layers)
    assert np.all(np.asarray(load) >= 0)
    (balance,) = jax.tree_util.tree_leaves(stats["moe_layers"]["layers"]["moe"]["balance"])
    chex.assert_shape(balance, (CONFIG.num_moe_layers,))
    chex.assert_tree_all_finite(balance)
    (mtp_load,) = jax.tree_util.tree_leaves(stats["mtp_0"]["block"]["moe"]["expert_load"])
    assert int(np.asarray(mtp_load).sum()) == b * t * CONFIG.num_experts_per_tok
