"""Loader and input errors: a broken checkpoint or bad tokens raise a clear error that names the culprit."""

from __future__ import annotations

import os
import shutil

import ml_dtypes
import numpy as np
import pytest
from conftest import TINY, build_hf_model, random_tokens

import dsv3_jax as d
from dsv3_jax.ckpt.hf import load_hf_directory
from dsv3_jax.ckpt.safetensors import SafetensorsFile, save_file
from dsv3_jax.errors import CheckpointError, SafetensorsError

FILE = "model.safetensors"
ATTN = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
EXPERT = "model.layers.1.mlp.experts.3.up_proj.weight"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A tiny HF DeepseekV3 checkpoint (single model.safetensors), written once; tests mutate copies."""
    path = tmp_path_factory.mktemp("hf_tiny")
    build_hf_model(TINY, seed=3).save_pretrained(path)
    assert os.path.isfile(path / FILE) and not os.path.exists(path / "model.safetensors.index.json")
    return path


@pytest.fixture
def ckpt(pristine, tmp_path):
    return shutil.copytree(pristine, tmp_path / "ckpt")


def _read(directory) -> dict[str, np.ndarray]:
    with SafetensorsFile(os.path.join(directory, FILE)) as f:
        return {k: np.array(f.get(k)) for k in f}


def _rewrite(directory, tensors: dict[str, np.ndarray]) -> None:
    save_file(tensors, os.path.join(directory, FILE))


def test_pristine_copy_loads(ckpt):
    config, variables = load_hf_directory(ckpt)
    assert config.replace(init_std=TINY.init_std) == TINY
    assert variables["params"]["moe_layers"]["layers"]["moe"]["w_up"].shape == (2, 8, 64, 32)


def test_missing_tensor(ckpt):
    tensors = _read(ckpt)
    del tensors[EXPERT]
    _rewrite(ckpt, tensors)
    with pytest.raises(CheckpointError, match="missing") as info:
        load_hf_directory(ckpt)
    assert EXPERT in str(info.value)


def test_missing_router_bias(ckpt):
    name = "model.layers.2.mlp.gate.e_score_correction_bias"
    tensors = _read(ckpt)
    del tensors[name]
    _rewrite(ckpt, tensors)
    with pytest.raises(CheckpointError, match="missing") as info:
        load_hf_directory(ckpt)
    assert name in str(info.value)


@pytest.mark.parametrize("extra", ["model.layers.1.mlp.experts.8.up_proj.weight", "model.extra_head.weight"])
def test_unexpected_tensor(ckpt, extra):
    tensors = _read(ckpt)
    tensors[extra] = np.zeros((32, 64), np.float32)
    _rewrite(ckpt, tensors)
    with pytest.raises(CheckpointError, match="unexpected") as info:
        load_hf_directory(ckpt)
    assert extra in str(info.value)


@pytest.mark.parametrize("name,shape", [(ATTN, (25, 64)), (EXPERT, (64, 32)), ("model.norm.weight", (63,)),
                                        ("model.embed_tokens.weight", (255, 64))])
def test_misshaped_tensor(ckpt, name, shape):
    tensors = _read(ckpt)
    expected = tensors[name].shape
    tensors[name] = np.zeros(shape, np.float32)
    _rewrite(ckpt, tensors)
    with pytest.raises(CheckpointError) as info:
        load_hf_directory(ckpt)
    message = str(info.value)
    assert name in message and FILE in message
    assert str(tuple(shape)) in message and str(tuple(expected)) in message


def test_integer_tensor(ckpt):
    tensors = _read(ckpt)
    tensors[ATTN] = tensors[ATTN].astype(np.int32)
    _rewrite(ckpt, tensors)
    with pytest.raises(CheckpointError, match="dtype") as info:
        load_hf_directory(ckpt)
    assert ATTN in str(info.value) and "I32" in str(info.value)


def test_fp8_tensor_without_its_scale_is_named(ckpt):
    """An F8_E4M3 weight needs its `weight_scale_inv`: the error names both, and the file."""
    tensors = _read(ckpt)
    tensors[EXPERT] = tensors[EXPERT].astype(ml_dtypes.float8_e4m3fn)
    _rewrite(ckpt, tensors)
    with pytest.raises(CheckpointError, match="no block scale") as info:
        load_hf_directory(ckpt)
    assert EXPERT in str(info.value) and EXPERT + "_scale_inv" in str(info.value) and FILE in str(info.value)


def test_fp8_weights_with_scales_load_fp8_resident_or_dequantised(ckpt):
    """A released-style FP8 tensor (+ `weight_scale_inv`) loads without conversion: FP8-resident by default (its
    values kept bit for bit, transposed to [in, out]), or dequantised exactly with weights="fp32"."""
    tensors = _read(ckpt)
    q_oi = tensors[EXPERT].astype(ml_dtypes.float8_e4m3fn)
    tensors[EXPERT], tensors[EXPERT + "_scale_inv"] = q_oi, np.full((1, 1), 0.5, np.float32)
    _rewrite(ckpt, tensors)
    config, variables = load_hf_directory(ckpt)
    w_up = variables["params"]["moe_layers"]["layers"]["moe"]["w_up"]
    assert config.param_dtype == "bfloat16" and w_up.values.dtype == ml_dtypes.float8_e4m3fn
    np.testing.assert_array_equal(np.asarray(w_up.values[0, 3]).view(np.uint8), q_oi.T.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(w_up.scales[0, 3]), np.full((1, 1), 0.5, np.float32))
    config, variables = load_hf_directory(ckpt, weights="fp32")
    w = np.asarray(variables["params"]["moe_layers"]["layers"]["moe"]["w_up"][0, 3])
    np.testing.assert_array_equal(w, q_oi.T.astype(np.float32) * 0.5)


def test_truncated_safetensors_file(ckpt):
    path = os.path.join(ckpt, FILE)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    with pytest.raises((CheckpointError, SafetensorsError)) as info:
        load_hf_directory(ckpt)
    assert FILE in str(info.value)
    assert "truncated" in str(info.value)


def test_corrupt_safetensors_header(ckpt):
    path = os.path.join(ckpt, FILE)
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage{{")
    with pytest.raises((CheckpointError, SafetensorsError)) as info:
        load_hf_directory(ckpt)
    assert FILE in str(info.value)


# ---------------------------------------------------------------- forward input errors


@pytest.fixture(scope="module")
def variables(pristine):
    return load_hf_directory(pristine)[1]  # cheaper than d.init_variables (no init compile)


BAD_TOKENS = {
    "id_equals_vocab": (np.array([[1, 2, TINY.vocab_size, 3]], np.int32), rf"token id {TINY.vocab_size}\b.*vocab"),
    "negative_id": (np.array([[1, -1, 2, 3]], np.int32), r"token id -1\b"),
    "too_long": (np.zeros((1, TINY.max_position_embeddings + 1), np.int32),
                 rf"{TINY.max_position_embeddings + 1}.*max_position_embeddings"),
    "one_dimensional": (np.array([1, 2, 3], np.int32), r"shape"),
    "float": (np.array([[1.0, 2.0]], np.float32), r"integer"),
    "empty_seq": (np.zeros((1, 0), np.int32), r"empty"),
    "empty_batch": (np.zeros((0, 4), np.int32), r"empty"),
}


@pytest.mark.parametrize("case", list(BAD_TOKENS))
@pytest.mark.parametrize("fn", ["forward", "forward_with_mtp"])
def test_bad_tokens_raise_input_error(variables, case, fn):
    tokens, pattern = BAD_TOKENS[case]
    with pytest.raises(d.InputError, match=pattern):
        getattr(d, fn)(TINY, variables, tokens)


def test_input_error_is_value_error_and_good_tokens_pass(variables):
    assert issubclass(d.InputError, ValueError)
    tokens = random_tokens(TINY, 1, TINY.max_position_embeddings, seed=1)
    tokens[0, 0], tokens[0, 1] = 0, TINY.vocab_size - 1
    logits = d.forward(TINY, variables, tokens)
    assert logits.shape == (1, TINY.max_position_embeddings, TINY.vocab_size)
