"""Resource planner: exact 671B counts, bytes that match real allocations, the activation formula against JAX's
saved residuals and XLA's compiled memory analysis, the README table, and clear errors."""

from __future__ import annotations

import functools
import importlib
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, TINY

import dsv3_jax as d
from dsv3_jax import ModelConfig
from dsv3_jax.cli import plan as planner_cli
from dsv3_jax.errors import PlanError
from dsv3_jax.plan import planner as pl
from dsv3_jax.plan.chips import CHIPS
from dsv3_jax.plan.planner import plan

V3 = ModelConfig.from_preset("deepseek-v3-671b")
SMALL = ModelConfig.from_preset("small")


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(tree))


# ---------------------------------------------------------------- 671B counts


def test_671b_parameter_and_checkpoint_counts():
    p = plan(V3, weights="fp8", batch=1, seq=4096, chips=16)
    assert (p.params_total, p.params_active, p.params_mtp) == (671_026_419_200, 37_552_297_472, 11_610_068_224)
    assert pl.checkpoint_element_counts(V3) == {"weights": 684_489_845_504, "scales": 41_540_496}
    assert (p.checkpoint_weight_elements, p.checkpoint_scale_elements) == (684_489_845_504, 41_540_496)
    assert p.scale_elements == 41_540_496  # every scale is in memory too (MTP block included)
    # In memory the MTP shares embedding and head: checkpoint minus one copy of each.
    vd = V3.vocab_size * V3.hidden_size
    assert p.weight_elements == 684_489_845_504 - 2 * vd


def test_671b_fp8_bytes_by_dtype():
    by = pl.weight_bytes_by_dtype(V3, "fp8")
    leaves = pl.model_leaves(V3)
    linear = sum(leaf.size for leaf in leaves if leaf.kind == "linear")
    router = sum(leaf.size for leaf in leaves if leaf.kind in ("router_gate", "router_bias"))
    assert by["fp8"] == linear and by["fp32"] == 4 * router and by["fp8_scales"] == 4 * 41_540_496
    assert by["fp8"] + by["bf16"] // 2 + by["fp32"] // 4 == 684_489_845_504 - 2 * V3.vocab_size * V3.hidden_size
    kinds = {leaf.path.split("/")[-1]: leaf.kind for leaf in leaves}
    assert kinds["embed_tokens"] == "embedding" and kinds["lm_head"] == "head" and kinds["eh_proj"] == "mtp_proj"
    assert kinds["gate"] == "router_gate" and kinds["bias"] == "router_bias" and kinds["wkv_b"] == "linear"


def test_671b_kv_cache_and_flops():
    p = plan(V3, batch=32, seq=4096, chips=16)
    assert p.kv_bytes_per_token == 576 * 61 * 2  # bf16 latent cache
    assert p.kv_naive_bytes_per_token == 128 * (128 + 64 + 128) * 61 * 2
    assert p.kv_cache_bytes == 32 * 4096 * 576 * 61 * 2
    f1 = pl.flops_per_token(V3, 1)
    active = 37_552_297_472 - V3.vocab_size * V3.hidden_size
    assert f1["forward"] == 2 * active + 61 * 2 * 128 * (192 + 128)
    f = pl.flops_per_token(V3, 4096)
    assert f["forward"] - 2 * active == 61 * 2 * 128 * 4096 * 320
    assert f["train"] > 3 * f["forward"]  # plus the MTP depth


# ---------------------------------------------------------------- bytes against real allocations


@pytest.mark.parametrize(("name", "param_dtype"), [("tiny", "float32"), ("tiny_no_q_lora", "bfloat16")])
def test_weight_bytes_equal_init_variables(name, param_dtype):
    config = TINY if name == "tiny" else TINY.replace(q_lora_rank=None, n_shared_experts=2)
    config = config.replace(param_dtype=param_dtype)
    weights = {"float32": "fp32", "bfloat16": "bf16"}[param_dtype]
    variables = d.init_variables(config)
    p = plan(config, weights=weights, seq=32, chips=1)
    print(f"{name} {param_dtype}: planner {p.weight_bytes} B, init_variables {_nbytes(variables)} B")
    assert p.weight_bytes == _nbytes(variables)
    assert p.breakdown_per_device["weights"] == _nbytes(variables)
    assert p.weight_elements == sum(x.size for x in jax.tree_util.tree_leaves(variables))


def test_kv_cache_bytes_equal_cache_collection():
    """bf16: a real (jitted) init of the decoding model; fp32: the same init evaluated abstractly."""
    batch, slots = 3, 40
    for dtype in ("bfloat16", "float32"):
        config = TINY.replace(dtype=dtype)
        model = d.Transformer(config, cache_len=slots)
        init = jax.jit(model.init) if dtype == "bfloat16" else functools.partial(jax.eval_shape, model.init)
        actual = _nbytes(init(jax.random.key(0), jnp.zeros((batch, 1), jnp.int32))["cache"])
        p = plan(config, batch=batch, seq=slots, chips=1)
        print(f"{dtype}: planner cache {p.kv_cache_bytes} B, Transformer cache collection {actual} B")
        assert p.kv_cache_bytes == actual == batch * slots * p.kv_bytes_per_token
        assert p.breakdown_per_device["kv_cache"] == actual


@pytest.mark.parametrize("layout", ["cpu-8", None])
def test_per_device_weights_equal_shard_shapes(layout):
    """Per-device bytes equal what NamedSharding would place on one device (8 simulated CPU devices)."""
    from dsv3_jax.parallel import get_layout, make_mesh, param_shardings

    chips = 8 if layout else 4
    lay = get_layout(layout) if layout else pl.default_layout(TINY, chips)
    mesh = make_mesh(lay, jax.devices()[:chips])
    shardings = param_shardings(d.logical_axes(TINY), lay, mesh)
    shapes = d.abstract_variables(TINY)
    expected = sum(math.prod(s.shard_shape(x.shape)) * 4 for x, s in zip(
        jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(shardings), strict=True))
    p = plan(TINY, weights="fp32", seq=32, layout=layout, chips=chips)
    assert p.breakdown_per_device["weights"] == expected < _nbytes(shapes)


def test_default_placement_spreads_experts_only():
    p = plan(V3, weights="fp8", batch=32, seq=4096, chips=16)
    assert p.layout == "auto-ep16" and p.mesh == {"data": 1, "expert": 16}
    leaves = pl.model_leaves(V3)
    routed = sum(leaf.size for leaf in leaves if leaf.routed)
    other = sum(leaf.size * pl.value_bytes(leaf, "fp8") for leaf in leaves if not leaf.routed)
    scales = sum(leaf.scale_count for leaf in leaves if not leaf.routed) * 4
    b = p.breakdown_per_device
    assert b["weights"] == other + routed // 16
    assert b["fp8_scales"] == scales + sum(math.ceil(leaf.scale_count / 16) for leaf in leaves if leaf.routed) * 4
    assert b["kv_cache"] == 2 * 4096 * p.kv_bytes_per_token  # 32 sequences over 16 chips


# ---------------------------------------------------------------- chips and throughput


def test_min_chips_is_the_smallest_that_fits():
    p = plan(V3, weights="fp8", batch=32, seq=4096, chip="h100-80g")
    assert p.min_chips == p.chips and p.fits
    for fewer in range(1, p.min_chips):
        assert not plan(V3, weights="fp8", batch=32, seq=4096, chip="h100-80g", chips=fewer).fits
    assert plan(V3, weights="bf16", batch=32, seq=4096, chip="h100-80g").min_chips > p.min_chips
    assert plan(V3, weights="fp8", batch=32, seq=4096, chip="h200-141g").min_chips < p.min_chips


def test_decode_bound_reads_weights_and_cache():
    config = TINY
    p = plan(config, weights="bf16", batch=1, seq=64, chips=1, chip="h100-80g")
    leaves = [leaf for leaf in pl.model_leaves(config) if not leaf.mtp and leaf.kind != "embedding"]
    frac = config.num_experts_per_tok / config.n_routed_experts
    read = sum(leaf.size * pl.value_bytes(leaf, "bf16") * (frac if leaf.routed else 1) for leaf in leaves)
    read += 64 * p.kv_bytes_per_token
    assert p.decode_tokens_per_s_bound == pytest.approx(CHIPS["h100-80g"].bandwidth / read)


# ---------------------------------------------------------------- training activations


def _saved_residual_bytes(config: ModelConfig, batch: int, seq: int) -> int:
    """Bytes of the residuals JAX's autodiff keeps for the backward pass of the training loss (no compile)."""
    ad_checkpoint = importlib.import_module("jax._src.ad_checkpoint")
    from dsv3_jax.train.step import TrainConfig, make_loss_fn

    loss = make_loss_fn(config, TrainConfig(batch_size=batch, seq_len=seq))
    v = d.abstract_variables(config)
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    residuals = ad_checkpoint.saved_residuals(lambda p, r, b: loss(p, r, b, 0.3)[0], v["params"], v["router"],
                                              {"inputs": tokens, "targets": tokens})
    return sum(math.prod(a.shape) * a.dtype.itemsize for a, src in residuals if "from the argument" not in src)


RESIDUAL_CASES = {
    "small_fp32_blocks": (SMALL, 4, 256, "blocks"),
    "small_bf16_ragged": (SMALL.replace(dtype="bfloat16", moe_impl="ragged"), 4, 256, "ragged"),
    "tiny_no_q_lora_two_dense_no_mtp": (TINY.replace(q_lora_rank=None, first_k_dense_replace=2,
                                                     num_nextn_predict_layers=0, dtype="bfloat16"), 4, 64, "blocks"),
}


@pytest.mark.parametrize("case", sorted(RESIDUAL_CASES))
def test_activation_inventory_matches_saved_residuals(case):
    """remat none: the formula's per-layer inventory equals what autodiff saves (heads' cotangent excluded)."""
    config, batch, seq, impl = RESIDUAL_CASES[case]
    p = plan(config, mode="train", batch=batch, seq=seq, chips=1, remat="none", moe_impl=impl)
    cotangent = batch * seq * config.vocab_size * 4 * (1 + config.num_nextn_predict_layers)
    saved = _saved_residual_bytes(config.replace(remat_policy="none"), batch, seq)
    ratio = (p.activation_bytes_none - cotangent) / saved
    print(f"{case}: formula {p.activation_bytes_none - cotangent} B, saved residuals {saved} B, ratio {ratio:.3f}")
    assert 0.95 < ratio < 1.05


def _xla_total(config: ModelConfig, batch: int, seq: int) -> tuple[int, dict[str, int]]:
    """argument + output + temp − alias of the compiled, donated train step (XLA's memory analysis)."""
    from dsv3_jax.train.step import TrainConfig, init_state, make_optimizer, make_train_step

    tc = TrainConfig(batch_size=batch, seq_len=seq)  # AdamW moments in float32 (TrainConfig default)
    optimizer = make_optimizer(tc)
    state = jax.eval_shape(lambda v: init_state(v, optimizer), d.abstract_variables(config))
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    lowered = jax.jit(make_train_step(config, tc, optimizer), donate_argnums=0).lower(
        state, {"inputs": tokens, "targets": tokens})
    # LLVM optimisation off: halves CPU compile time; buffer assignment (what memory_analysis reports) is
    # decided on the optimised HLO before code generation and comes out identical.
    m = lowered.compile(compiler_options={"xla_backend_optimization_level": 0,
                                          "xla_llvm_disable_expensive_passes": True}).memory_analysis()
    parts = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes,
             "temp": m.temp_size_in_bytes, "alias": m.alias_size_in_bytes,
             "peak": getattr(m, "peak_memory_in_bytes", -1)}
    return parts["argument"] + parts["output"] + parts["temp"] - parts["alias"], parts


@pytest.mark.slow
@pytest.mark.parametrize("remat", ["none", "full"])
@pytest.mark.parametrize("shape", [(4, 256), (1, 1024)])
def test_training_estimate_within_15pct_of_xla(remat, shape):
    """Small preset (float32, CPU "blocks" dispatch): estimate vs XLA's compiled memory of the real train step.

    peak_memory_in_bytes on CPU equals the argument size only, so argument + output + temp − alias is compared.
    """
    batch, seq = shape
    config = SMALL.replace(remat_policy=remat)
    xla, parts = _xla_total(config, batch, seq)
    p = plan(config, mode="train", batch=batch, seq=seq, chips=1, remat=remat, moe_impl="blocks",
             moment_dtype="float32")
    ratio = p.total_per_device / xla
    print(f"remat {remat} B{batch}×T{seq}: estimate {p.total_per_device:,} B ({p.breakdown_per_device}), "
          f"XLA {xla:,} B ({parts}), ratio {ratio:.3f}")
    assert 0.85 < ratio < 1.15


def test_remat_full_is_smaller_and_training_parts_add_up():
    p = plan(SMALL, mode="train", batch=4, seq=256, chips=1, remat="full", moment_dtype="bfloat16")
    b = p.breakdown_per_device
    master = sum(leaf.size for leaf in pl.model_leaves(SMALL) if leaf.collection == "params")
    assert b["grads_fp32"] == 4 * master and b["adam_m"] == 2 * master and b["adam_v"] == 4 * master
    assert b["activations"] == p.activation_bytes_full < p.activation_bytes_none
    assert p.total_per_device == sum(b.values())


def test_train_ep64_layout_for_671b():
    p = plan(V3, mode="train", batch=2048, seq=4096, layout="train-ep64", chips=2048, chip="h800-80g")
    assert p.mesh == {"data": 32, "expert": 64} and p.chips == 2048
    assert any("fp32 master" in n for n in p.notes)
    assert p.breakdown_per_device["params_fp32"] < 4 * 684_489_845_504 / 64 * 1.4  # experts + FSDP over 64


# ---------------------------------------------------------------- outputs


def test_cli_json_table_png_and_register(tmp_path, capsys):
    import argparse

    png = tmp_path / "mem.png"
    assert planner_cli.main(["tiny", "--chips", "2", "--batch", "2", "--seq", "32", "--json", "--png", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["chips"] == 2 and out["layout"] == "auto-ep2" and png.stat().st_size > 1000
    parser = argparse.ArgumentParser()
    planner_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", "tiny", "--mode", "train", "--batch", "2", "--seq", "16", "--chips", "1"])
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert "activations remat none / full" in table and "minimum chips" in table


def test_readme_table_is_current():
    path = os.path.join(REPO, planner_cli.README_TABLE_PATH)
    with open(path, encoding="utf-8") as f:
        assert f.read() == planner_cli.readme_table(), "regenerate with: python -m dsv3_jax.cli.plan --readme-table"


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"chip": "tpu-v9"}, "chip"),
    ({"layout": "no-such-layout"}, "layout"),
    ({"chips": 0}, "chips"),
    ({"chips": -4}, "chips"),
    ({"layout": "cpu-8", "chips": 6}, "chips"),
    ({"batch": 0}, "batch"),
    ({"seq": 10_000}, "seq"),
    ({"weights": "int4"}, "weights"),
    ({"mode": "serve"}, "mode"),
    ({"remat": "dots"}, "remat"),
    ({"headroom": 1.5}, "headroom"),
    ({"layout": "train-ep64", "chips": 64}, "n_routed_experts=8"),
])
def test_bad_inputs_name_the_field(kwargs, field):
    with pytest.raises(PlanError, match=field):
        plan(TINY, **{"seq": 32, **kwargs})


def test_heads_not_divisible_by_tensor_axis():
    config = TINY.replace(num_attention_heads=3)  # 3·24 = 72 is even, but 3 heads cannot split 2 ways
    with pytest.raises(PlanError, match="num_attention_heads=3"):
        plan(config, seq=32, layout="cpu-8", chips=8)


def test_plan_error_is_value_error_and_cli_reports_it(capsys):
    assert issubclass(PlanError, ValueError)
    with pytest.raises(PlanError, match="config"):
        planner_cli.load_config("no-such-preset-or-file")
    assert planner_cli.main(["tiny", "--seq", "32", "--mesh", "no-such-layout"]) == 2
    assert "layout" in capsys.readouterr().err
