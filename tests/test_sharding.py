"""Sharded execution on 8 simulated CPU devices (conftest sets the XLA flag) against the 1-device model.

For the layouts "data", "cpu-8" (data2 x expert2 x tensor2, expert-parallel), "cpu-8-ep" (experts 8 ways) and
"cpu-8-fsdp": forward logits, router choices, train steps (loss, parameters, expert loads, router biases) and greedy
generation match the unsharded model; every variable is placed as its layout says and per-device bytes follow;
bad meshes fail with a ShardingError naming the field; `dsv3 train --mesh cpu-8` matches the 1-device run.

Compiles dominate the runtime, so the model is the tiny preset cut to one dense + one MoE layer (+ MTP), and each
reference result is computed once per module.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import dsv3_jax as d
from dsv3_jax.errors import ShardingError
from dsv3_jax.model.api import _init_fn
from dsv3_jax.model.moe import STATS_COLLECTION
from dsv3_jax.model.transformer import Transformer
from dsv3_jax.parallel import LAYOUTS, Layout, get_layout, make_mesh, to_mesh_spec
from dsv3_jax.parallel import api as sa
from dsv3_jax.train.step import TrainConfig, init_state, jit_train_step, make_optimizer, make_train_step

# the module, not the function `dsv3_jax.infer.generate` that the package attribute names
generate_module = importlib.import_module("dsv3_jax.infer.generate")

# init_std 0.05 (tiny's 0.02 routes almost by bias alone): the router sees real logits. No MTP block here (compile
# time); the `dsv3 train --mesh` test runs the tiny preset's MTP under the mesh.
CONFIG = d.ModelConfig.from_preset("tiny", init_std=0.05, num_hidden_layers=2, first_k_dense_replace=1,
                                   num_nextn_predict_layers=0)
LAYOUT_NAMES = ("data", "cpu-8", "cpu-8-ep", "cpu-8-fsdp")
SEQUENCE_PARALLEL = "cpu-8-seq"  # each sequence's tokens over 8 devices: forward and training
EXPERT_PARALLEL = {"data": False, "cpu-8": True, "cpu-8-ep": True, "cpu-8-fsdp": False, SEQUENCE_PARALLEL: True}
B, T = 8, 16
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [3], [40, 41, 42, 43]]
NEW_TOKENS = 6
# Adam eps 1e-3: the first update is a smooth function of the gradient (with 1e-8 it is ~lr*sign(g), which float
# noise on a near-zero gradient component could flip between two equivalent reductions). warmup 0: lr > 0 at step 0.
TC = TrainConfig(steps=10, batch_size=B, seq_len=T, lr=1e-3, warmup_steps=0, final_lr_ratio=1.0, eps=1e-3,
                 balance_alpha=1e-2, bias_gamma=0.01)
STEPS = 2


def _copy(tree):
    """A fresh on-device copy (steps donate their state; device_put may alias the source's buffers)."""
    return jax.tree_util.tree_map(lambda a: jnp.array(a, copy=True), tree)


def _max_diff(a, b) -> float:
    diffs = jax.tree_util.tree_map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)), initial=0.0)),
                                   a, b)
    return max(jax.tree_util.tree_leaves(diffs), default=0.0)


def _tokens(batch=B, seq=T, seed=0):
    return np.random.RandomState(seed).randint(0, CONFIG.vocab_size, (batch, seq)).astype(np.int32)


def _batch():
    tokens = _tokens(B, T + 1, seed=1)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


def _layout_mesh(name):
    layout = get_layout(name)
    return layout, make_mesh(layout)


def _stats_fn(config):
    model = Transformer(config)
    return jax.jit(lambda variables, tokens: model.apply(variables, tokens, mutable=[STATS_COLLECTION]))


def _run_steps(step, state, batch, n=STEPS):
    """(final state, per-step metrics, per-step router biases) on the host."""
    metrics, routers = [], []
    for _ in range(n):
        state, m = step(state, batch)
        metrics.append(jax.device_get(m))
        routers.append(jax.device_get(state.router))
    return jax.device_get(state), metrics, routers


@pytest.fixture(scope="module")
def variables():
    return d.init_variables(CONFIG, 0)


@pytest.fixture(scope="module")
def reference(variables):
    """1-device results: logits, sown MoE stats, STEPS train steps, greedy generation."""
    tokens = _tokens()
    (logits, _), stats = _stats_fn(CONFIG)(variables, tokens)
    optimizer = make_optimizer(TC)
    step = jit_train_step(make_train_step(CONFIG, TC, optimizer))
    state, metrics, routers = _run_steps(step, init_state(_copy(variables), optimizer), _batch())
    gen = d.generate(CONFIG, variables, PROMPTS, NEW_TOKENS)
    return {"forward": np.asarray(d.forward(CONFIG, variables, tokens)), "logits": np.asarray(logits),
            "stats": jax.device_get(stats), "state": state, "metrics": metrics, "routers": routers,
            "generate": gen.tokens}


# ---------------------------------------------------------------------------------------------------------------
# equivalence with the 1-device model
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", (*LAYOUT_NAMES, SEQUENCE_PARALLEL))
def test_forward_and_routing_match_one_device(name, variables, reference):
    layout, mesh = _layout_mesh(name)
    placed = sa.shard_variables(CONFIG, _copy(variables), layout, mesh)
    logits = sa.forward(CONFIG, placed, _tokens(), layout, mesh)
    assert logits.shape == (B, T, CONFIG.vocab_size)
    np.testing.assert_allclose(np.asarray(logits), reference["forward"], atol=1e-5, rtol=0)
    assert len(logits.sharding.device_set) == 8

    # Router choices: the expert loads sown inside the sharded apply (inside shard_map for expert-parallel
    # layouts) are the unsharded ones, count for count, and the balance terms agree.
    assert (sa.expert_parallel_for(layout, mesh) is not None) == EXPERT_PARALLEL[name]
    tokens = jax.device_put(_tokens(), sa.batch_sharding(layout, mesh))
    with sa.activate(layout, mesh):
        compiled = _stats_fn(CONFIG).lower(placed, tokens).compile()
        (logits2, _), stats = compiled(placed, tokens)
    hlo = compiled.as_text()
    if EXPERT_PARALLEL[name]:
        assert "all-to-all" in hlo, "expert-parallel layouts dispatch tokens with all-to-all"
    np.testing.assert_allclose(np.asarray(logits2), reference["logits"], atol=1e-5, rtol=0)
    ref_stats, stats = reference["stats"][STATS_COLLECTION], jax.device_get(stats)[STATS_COLLECTION]
    assert jax.tree_util.tree_structure(stats) == jax.tree_util.tree_structure(ref_stats)
    loads = [(jax.tree_util.keystr(p), leaf) for p, leaf in jax.tree_util.tree_leaves_with_path(stats)]
    ref_leaves = jax.tree_util.tree_leaves(ref_stats)
    for (path, got), want in zip(loads, ref_leaves, strict=True):
        if "expert_load" in path:
            np.testing.assert_array_equal(got, want, err_msg=path)
            assert int(np.sum(got)) == B * T * CONFIG.num_experts_per_tok
            assert np.count_nonzero(got) > 1, "routing must be non-trivial"
        else:
            np.testing.assert_allclose(got, want, atol=1e-6, err_msg=path)


@pytest.mark.parametrize("name", (*LAYOUT_NAMES, SEQUENCE_PARALLEL))
def test_train_steps_match_one_device(name, variables, reference):
    layout, mesh = _layout_mesh(name)
    optimizer = make_optimizer(TC)
    abstract = jax.eval_shape(lambda v: init_state(v, optimizer), variables)
    step, shardings = sa.make_sharded_train_step(CONFIG, TC, optimizer, abstract, layout, mesh)
    state0 = jax.device_put(init_state(_copy(variables), optimizer), shardings)
    state, metrics, routers = _run_steps(step, state0, _batch())
    ref_state, ref_metrics = reference["state"], reference["metrics"]

    for got, want in zip(metrics, ref_metrics, strict=True):
        assert np.isfinite(got["loss"]) and got["finite"]
        assert got["lr"] > 0
        np.testing.assert_allclose(got["loss"], want["loss"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(got["expert_load"], want["expert_load"])
    assert _max_diff(state.params, ref_state.params) <= 1e-5
    assert _max_diff(state.opt_state, ref_state.opt_state) <= 1e-5
    np.testing.assert_array_equal(int(state.step), STEPS)
    # Router biases after every step (sign updates from global loads: equal to float rounding).
    for got, want in zip(routers, reference["routers"], strict=True):
        assert _max_diff(got, want) <= 1e-7
    # The steps did something: parameters moved and the biases reacted to the loads.
    assert _max_diff(state.params, jax.device_get(variables["params"])) > 1e-4
    assert _max_diff(routers[0], jax.device_get(variables["router"])) > 0


def test_sharded_generate_on_a_fresh_config(variables):
    """A config whose abstract variables were never computed outside a mesh (init_std is a run-time field: same
    shapes, new cache key) still generates under a mesh."""
    fresh = CONFIG.replace(init_std=0.0497)
    layout, mesh = _layout_mesh("cpu-8")
    gen = sa.generate(fresh, _copy(variables), PROMPTS, NEW_TOKENS, layout, mesh)
    assert all(len(row) == NEW_TOKENS for row in gen.tokens)


@pytest.mark.parametrize("name", LAYOUT_NAMES)
def test_greedy_generation_matches_one_device(name, variables, reference):
    layout, mesh = _layout_mesh(name)
    gen = sa.generate(CONFIG, _copy(variables), PROMPTS, NEW_TOKENS, layout, mesh)
    assert gen.tokens == reference["generate"]
    assert all(len(row) == NEW_TOKENS for row in gen.tokens)


# ---------------------------------------------------------------------------------------------------------------
# placement and memory
# ---------------------------------------------------------------------------------------------------------------


def _mesh_ways(spec: PartitionSpec, mesh) -> int:
    ways = 1
    for entry in spec:
        for axis in (entry,) if isinstance(entry, str) else (entry or ()):
            ways *= mesh.shape[axis]
    return ways


def _expected_per_device_bytes(leaves, logical, layout, mesh) -> int:
    total = 0
    for (path, leaf), spec in zip(leaves, logical, strict=True):
        ways = _mesh_ways(to_mesh_spec(spec, layout, jax.tree_util.keystr(path)), mesh)
        assert leaf.nbytes % ways == 0
        total += leaf.nbytes // ways
    return total


def _is_routed_expert(path) -> bool:
    keys = [getattr(k, "key", "") for k in path]
    return keys[-1] in ("w_gate", "w_up", "w_down") and "moe" in keys and "shared" not in keys


@pytest.mark.parametrize("name", LAYOUT_NAMES)
def test_placement_memory_and_sharded_init(name, variables):
    layout, mesh = _layout_mesh(name)
    logical = jax.tree_util.tree_leaves(d.logical_axes(CONFIG), is_leaf=lambda x: isinstance(x, PartitionSpec))
    full_bytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(variables))
    initialised = sa.init_sharded(CONFIG, layout, mesh, rng=0)
    for placed in (initialised, sa.shard_variables(CONFIG, _copy(variables), layout, mesh)):
        leaves = jax.tree_util.tree_leaves_with_path(placed)
        assert len(leaves) == len(logical)
        for (path, leaf), spec in zip(leaves, logical, strict=True):
            want = to_mesh_spec(spec, layout, jax.tree_util.keystr(path))
            assert isinstance(leaf.sharding, NamedSharding), jax.tree_util.keystr(path)
            assert leaf.sharding.mesh == mesh
            assert leaf.sharding.spec == want, (jax.tree_util.keystr(path), leaf.sharding.spec, want)
            shard = leaf.addressable_shards[0].data
            ways = _mesh_ways(want, mesh)
            assert shard.nbytes == leaf.nbytes // ways, jax.tree_util.keystr(path)
            if name == "cpu-8-ep":
                assert ways == (8 if _is_routed_expert(path) else 1), jax.tree_util.keystr(path)
        report = sa.memory_report(placed)
        expected = _expected_per_device_bytes(leaves, logical, layout, mesh)
        assert report == {str(dev.id): expected for dev in mesh.devices.flat}
        if name == "data":
            assert expected == full_bytes
        else:
            assert expected < full_bytes

    # init_sharded draws the same numbers as init_variables, leaf for leaf.
    assert jax.tree_util.tree_structure(initialised) == jax.tree_util.tree_structure(variables)
    assert _max_diff(initialised, variables) == 0.0


def test_init_sharded_never_materialises_the_full_model(variables):
    """The compiled init writes each device's shards only: its per-device output is the sharded size."""
    layout, mesh = _layout_mesh("cpu-8-ep")
    full_bytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(variables))
    routed = sum(leaf.nbytes for path, leaf in jax.tree_util.tree_leaves_with_path(variables)
                 if _is_routed_expert(path))
    per_device = full_bytes - routed + routed // 8
    shardings = sa.variable_shardings(CONFIG, layout, mesh)
    compiled = jax.jit(_init_fn(CONFIG), out_shardings=shardings).lower(jax.random.key(0)).compile()
    memory = compiled.memory_analysis()
    # Output = the shards this device holds (+ an 8-byte pointer per output buffer in the result tuple).
    n_leaves = len(jax.tree_util.tree_leaves(variables))
    assert per_device <= memory.output_size_in_bytes <= per_device + 8 * n_leaves
    assert per_device < full_bytes
    # Peak per device stays at the shards (+ a few KiB): the full routed experts never exist on one device.
    assert memory.peak_memory_in_bytes < per_device + 4096
    assert sum(sa.memory_report(sa.init_sharded(CONFIG, layout, mesh)).values()) == 8 * per_device


def test_every_layout_maps_every_parameter():
    """Each named layout (production ones too) places each variable without putting two of its axes on one mesh
    axis; the full DeepSeek-V3 has the same variable names and logical axes as the tiny model."""
    logical = jax.tree_util.tree_leaves_with_path(d.logical_axes(CONFIG),
                                                  is_leaf=lambda x: isinstance(x, PartitionSpec))
    for layout in LAYOUTS.values():
        for path, spec in logical:
            to_mesh_spec(spec, layout, jax.tree_util.keystr(path))


# ---------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------


def test_mesh_that_does_not_divide_experts_heads_or_batch():
    ep8 = Layout("custom-ep8", (("expert", 8),), LAYOUTS["cpu-8-ep"].rules)
    mesh = make_mesh(ep8)
    twelve = CONFIG.replace(n_routed_experts=12, n_group=4, topk_group=2)
    with pytest.raises(ShardingError, match=r"'custom-ep8'.*n_routed_experts=12"):
        sa.init_sharded(twelve, ep8, mesh)
    with pytest.raises(ShardingError, match="n_routed_experts=12"):
        sa.check_divisible(twelve, ep8, mesh)

    layout, mesh = _layout_mesh("cpu-8")  # heads over tensor (2)
    three_heads = CONFIG.replace(num_attention_heads=3)
    with pytest.raises(ShardingError, match="num_attention_heads=3"):
        sa.init_sharded(three_heads, layout, mesh)

    data2 = get_layout("data")
    mesh2 = make_mesh(data2, jax.devices()[:2])
    assert dict(mesh2.shape) == {"data": 2}
    variables = sa.init_sharded(CONFIG, data2, mesh2)
    with pytest.raises(ShardingError, match="batch=3"):
        sa.forward(CONFIG, variables, _tokens(3, 4), data2, mesh2)
    optimizer = make_optimizer(TC)
    abstract = jax.eval_shape(lambda v: init_state(v, optimizer), variables)
    with pytest.raises(ShardingError, match="batch=3"):
        sa.make_sharded_train_step(CONFIG, dataclasses.replace(TC, batch_size=3), optimizer, abstract, data2, mesh2)


def test_unknown_layout_lists_the_known_ones():
    with pytest.raises(ShardingError) as err:
        get_layout("cpu-9")
    assert "cpu-9" in str(err.value)
    for known in LAYOUTS:
        assert known in str(err.value)


def test_layout_that_needs_other_device_counts():
    sixteen = Layout("needs-16", (("data", 2), ("expert", 8)), LAYOUTS["cpu-8"].rules)
    with pytest.raises(ShardingError, match=r"needs-16.*(16|8 devices)"):
        make_mesh(sixteen)
    with pytest.raises(ShardingError, match="train-ep64"):
        make_mesh(get_layout("train-ep64"))  # 64-way experts on 8 devices
    with pytest.raises(ShardingError, match="cpu-8"):
        make_mesh(get_layout("cpu-8"), jax.devices()[:4])


def test_two_logical_axes_on_one_mesh_axis():
    rules = dict(LAYOUTS["cpu-8-ep"].rules)
    rules["expert_embed"] = "expert"  # w_gate [layers, expert, expert_embed, expert_mlp]: both on "expert"
    clash = Layout("clash", LAYOUTS["cpu-8-ep"].mesh_axes, tuple(rules.items()))
    with pytest.raises(ShardingError) as err:
        sa.variable_shardings(CONFIG, clash, make_mesh(clash))
    message = str(err.value)
    for part in ("'clash'", "'expert'", "'expert_embed'", "moe", "w_"):
        assert part in message, message
    with pytest.raises(ShardingError, match=r"'expert'.*'expert_embed'.*my_param"):
        to_mesh_spec(("layers", "expert", "expert_embed"), clash, "my_param")
    with pytest.raises(ShardingError, match="no rule for logical axis 'bogus'"):
        to_mesh_spec(("bogus",), clash, "my_param")


# ---------------------------------------------------------------------------------------------------------------
# dsv3 train --mesh cpu-8
# ---------------------------------------------------------------------------------------------------------------


def _run_config(mesh, tokenizer="bpe:264"):
    from dsv3_jax.train.run_config import run_config_from_dict

    return run_config_from_dict({
        "model": {"preset": "tiny", "num_hidden_layers": 2, "init_std": 0.05},
        "data": {"max_bytes": 60_000, "tokenizer": tokenizer},
        "train": {"steps": 3, "batch_size": 8, "seq_len": 16, "lr": 1e-3, "warmup_steps": 0, "eps": 1e-3},
        "run": {"mesh": mesh, "log_every": 100, "ckpt_every": 100}})


def _losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_train_with_mesh_matches_single_device(tmp_path):
    from dsv3_jax.parallel.api import mesh_train_step
    from dsv3_jax.train.loop import train

    sharded = train(_run_config("cpu-8"), str(tmp_path / "mesh"), log=lambda *_: None, sharded_step=mesh_train_step)
    single = train(_run_config(None), str(tmp_path / "single"), log=lambda *_: None)
    assert sharded["config"].model.vocab_size % 2 == 0, "vocab is sharded over the 2-way tensor axis"
    got, want = _losses(tmp_path / "mesh"), _losses(tmp_path / "single")
    assert [r["step"] for r in got] == [1, 2, 3]
    for g, w in zip(got, want, strict=True):
        assert np.isfinite(g["loss"])
        np.testing.assert_allclose(g["loss"], w["loss"], atol=1e-5, rtol=0)
        assert g["expert_load"] == w["expert_load"]
    leaf = jax.tree_util.tree_leaves(sharded["state"].params)[0]
    assert len(leaf.sharding.device_set) == 8
    assert _max_diff(sharded["state"].params, single["state"].params) <= 1e-5


def test_train_with_mesh_byte_tokenizer(tmp_path):
    """The byte tokenizer's 259 ids are padded to a vocabulary of 320, which the 2-way vocab axis divides."""
    from dsv3_jax.parallel.api import mesh_train_step
    from dsv3_jax.train.loop import train

    result = train(_run_config("cpu-8", tokenizer="byte"), str(tmp_path / "byte"), log=lambda *_: None,
                   sharded_step=mesh_train_step)
    assert result["config"].model.vocab_size == 320 and np.isfinite(result["final_loss"])
