"""The released checkpoint's layout loaded directly (no `dsv3 convert`): FP8 shards with `weight_scale_inv` split
across shards, an index, quantization_config and the MTP layer, read straight into sharded FP8 arrays on 8
devices under an inference layout; logits equal the HF reference on the dequantised weights."""

from __future__ import annotations

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from convert_fixtures import FIXTURE_CONFIG, write_fp8_checkpoint

import dsv3_jax as d
from dsv3_jax.errors import CheckpointError
from dsv3_jax.parallel import api as sa
from dsv3_jax.parallel import get_layout, make_mesh
from dsv3_jax.quant.fp8 import QuantArray

TOKENS = np.random.RandomState(0).randint(0, FIXTURE_CONFIG.vocab_size, (8, 24)).astype(np.int32)


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return write_fp8_checkpoint(str(tmp_path_factory.mktemp("release") / "fp8"))


@pytest.fixture(scope="module")
def hf_logits(fx):
    with torch.no_grad():
        return fx.model(torch.from_numpy(TOKENS).long()).logits.numpy()


@pytest.fixture(scope="module")
def mesh_ep():
    layout = get_layout("cpu-8-ep")
    return layout, make_mesh(layout)


def test_fp8_release_loads_sharded_fp8_resident(fx, hf_logits, mesh_ep):
    layout, mesh = mesh_ep
    stored = d.ModelConfig.from_hf_config(fx.directory)
    assert stored.param_dtype == "bfloat16" and stored.dtype == "bfloat16"  # FP8 checkpoints: bf16 by default
    config, variables = d.load_pretrained(fx.directory, shardings=sa.variable_shardings(stored, layout, mesh))
    w_up = variables["params"]["moe_layers"]["layers"]["moe"]["w_up"]
    assert isinstance(w_up, QuantArray) and w_up.values.dtype == ml_dtypes.float8_e4m3fn
    for part in (w_up.values, w_up.scales):  # experts over the 8-way expert axis: each device holds 1/8
        assert len(part.sharding.device_set) == 8
        assert part.addressable_shards[0].data.shape[1] == part.shape[1] // 8
    assert variables["params"]["embed_tokens"].dtype == jax.numpy.bfloat16
    assert variables["params"]["moe_layers"]["layers"]["moe"]["gate"].dtype == jax.numpy.float32
    # weight_only in float32: x · dequantize(w) exactly, as the HF reference on the dequantised weights computes
    exact = config.replace(dtype="float32", fp8_impl="weight_only")
    logits = sa.forward(exact, variables, TOKENS, layout, mesh)
    np.testing.assert_allclose(np.asarray(logits), hf_logits, atol=1e-4, rtol=0)


def test_fp8_release_dequantised_once_to_fp32_equals_hf(fx, hf_logits, mesh_ep):
    layout, mesh = mesh_ep
    stored = d.ModelConfig.from_hf_config(fx.directory, dtype="float32", param_dtype="float32")
    config, variables = d.load_pretrained(fx.directory, weights="fp32",
                                          shardings=sa.variable_shardings(stored, layout, mesh))
    assert config.param_dtype == "float32"
    assert not any(isinstance(v, QuantArray) for v in jax.tree_util.tree_leaves(
        variables, is_leaf=lambda x: isinstance(x, QuantArray)))
    logits = sa.forward(config.replace(dtype="float32"), variables, TOKENS, layout, mesh)
    np.testing.assert_allclose(np.asarray(logits), hf_logits, atol=1e-4, rtol=0)


def test_sharded_load_equals_unsharded_bit_for_bit(fx, mesh_ep):
    layout, mesh = mesh_ep
    stored = d.ModelConfig.from_hf_config(fx.directory)
    _, sharded = d.load_pretrained(fx.directory, shardings=sa.variable_shardings(stored, layout, mesh))
    _, single = d.load_pretrained(fx.directory)
    for a, b in zip(jax.tree_util.tree_leaves(sharded), jax.tree_util.tree_leaves(single), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))


def test_fp8_variables_shard_and_generate_under_a_layout(fx, mesh_ep):
    """`variable_shardings(config, layout, mesh, variables)` gives FP8 weights a sharding for values and one for
    scales, so already-loaded FP8 variables can be placed (this raised a tree mismatch before)."""
    layout, mesh = mesh_ep
    config, variables = d.load_pretrained(fx.directory)
    placed = sa.shard_variables(config, variables, layout, mesh)
    w_up = placed["params"]["moe_layers"]["layers"]["moe"]["w_up"]
    assert len(w_up.values.sharding.device_set) == 8 and len(w_up.scales.sharding.device_set) == 8
    run = config.replace(dtype="float32", fp8_impl="weight_only")
    out = sa.generate(run, variables, [[1, 2, 3, 4]], 6, layout, mesh, stop_ids=())
    assert out.tokens == d.generate(run, variables, [[1, 2, 3, 4]], 6, stop_ids=()).tokens


def test_a_sharding_tree_that_does_not_match_is_named(fx, mesh_ep):
    layout, mesh = mesh_ep
    stored = d.ModelConfig.from_hf_config(fx.directory)
    shardings = sa.variable_shardings(stored, layout, mesh)
    del shardings["params"]["embed_tokens"]
    with pytest.raises(CheckpointError, match=r"shardings tree does not match.*embed_tokens"):
        d.load_pretrained(fx.directory, shardings=shardings)
