"""ModelConfig: presets, parameter counts, the HF config.json round trip and validation errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import PARITY_CONFIGS, TINY

import dsv3_jax as d
from dsv3_jax import ConfigError, ModelConfig, RopeScaling

# Run-time settings: not part of the HF config, so a round trip through config.json does not keep them.
RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "scan_unroll", "remat_policy", "moe_impl", "init_std")


def _arch(config: ModelConfig) -> dict:
    """The architecture fields of a config (everything but the run-time settings)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in RUNTIME_FIELDS}


def _hf_tiny(**changes) -> dict:
    return {**TINY.to_hf_config(), **changes}


# ---------------------------------------------------------------- presets and parameter counts


def test_671b_param_counts_exact():
    counts = d.param_counts(ModelConfig.from_preset("deepseek-v3-671b"))
    assert counts == {"total": 671_026_419_200, "active": 37_552_297_472, "mtp": 11_610_068_224}
    assert all(type(v) is int for v in counts.values())


def test_671b_preset_fields_match_design():
    c = ModelConfig.from_preset("deepseek-v3-671b")
    expected = dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, first_k_dense_replace=3, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256, n_shared_experts=1,
        num_experts_per_tok=8, n_group=8, topk_group=4, norm_topk_prob=True, routed_scaling_factor=2.5,
        rope_theta=10000.0, max_position_embeddings=163840, num_nextn_predict_layers=1,
    )
    assert {k: getattr(c, k) for k in expected} == expected
    r = c.rope_scaling
    assert r is not None
    assert (r.factor, r.original_max_position_embeddings, r.beta_fast, r.beta_slow, r.mscale, r.mscale_all_dim) == (
        40.0, 4096, 32.0, 1.0, 1.0, 1.0)
    assert c.qk_head_dim == 192 and c.num_moe_layers == 58 and c.experts_per_group == 32


def test_presets_listed_and_v2_lite_has_no_q_lora():
    for name in ("deepseek-v3-671b", "deepseek-v2-lite-style", "small", "tiny"):
        assert name in d.PRESETS
        assert ModelConfig.from_preset(name) == d.PRESETS[name]
    lite = ModelConfig.from_preset("deepseek-v2-lite-style")
    assert lite.q_lora_rank is None
    assert ModelConfig.from_preset("tiny", hidden_size=128).hidden_size == 128


def test_unknown_preset_names_known_presets():
    with pytest.raises(ConfigError) as info:
        ModelConfig.from_preset("deepseek-v4")
    message = str(info.value)
    assert "deepseek-v4" in message
    for name in d.PRESETS:
        assert name in message


def test_preset_override_is_validated():
    with pytest.raises(ConfigError, match="n_routed_experts"):
        ModelConfig.from_preset("tiny", n_routed_experts=9)


# ---------------------------------------------------------------- HF config.json


def test_from_hf_config_dict_file_and_directory(tmp_path):
    hf = TINY.to_hf_config()
    (tmp_path / "config.json").write_text(json.dumps(hf))
    from_dict = ModelConfig.from_hf_config(hf)
    from_file = ModelConfig.from_hf_config(tmp_path / "config.json")
    from_str = ModelConfig.from_hf_config(str(tmp_path / "config.json"))
    from_dir = ModelConfig.from_hf_config(tmp_path)
    assert from_dict == from_file == from_str == from_dir
    assert _arch(from_dict) == _arch(TINY)
    assert from_dict.dtype == "float32" and from_dict.param_dtype == "float32"
    assert ModelConfig.from_hf_config(hf, dtype="bfloat16").dtype == "bfloat16"
    assert hf == TINY.to_hf_config()  # the caller's dict is not mutated


def test_old_rope_scaling_equals_hf5_rope_parameters():
    base = {k: v for k, v in TINY.to_hf_config().items() if k not in ("rope_scaling", "rope_theta")}
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32,
            "beta_slow": 1, "mscale": 0.9, "mscale_all_dim": 0.5}
    old = ModelConfig.from_hf_config({**base, "rope_theta": 50000.0, "rope_scaling": {
        "type": "yarn", **{k: v for k, v in yarn.items() if k != "rope_type"}}})
    new = ModelConfig.from_hf_config({**base, "rope_parameters": {**yarn, "rope_theta": 50000.0}})
    assert old == new
    assert new.rope_theta == 50000.0
    assert new.rope_scaling == RopeScaling(factor=4.0, original_max_position_embeddings=32, beta_fast=32.0,
                                           beta_slow=1.0, mscale=0.9, mscale_all_dim=0.5)
    # No scaling: old style (rope_scaling null) and HF-5 style (rope_type default) agree too.
    old_plain = ModelConfig.from_hf_config({**base, "rope_theta": 20000.0, "rope_scaling": None})
    new_plain = ModelConfig.from_hf_config({**base, "rope_parameters": {"rope_type": "default",
                                                                       "rope_theta": 20000.0}})
    assert old_plain == new_plain
    assert new_plain.rope_scaling is None and new_plain.rope_theta == 20000.0


ROUND_TRIP = {**{name: ModelConfig.from_preset(name) for name in d.PRESETS},
              **{f"parity_{k}": v for k, v in PARITY_CONFIGS.items()},
              "no_q_lora_no_mtp": TINY.replace(q_lora_rank=None, num_nextn_predict_layers=0)}


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_hf_round_trip(name, tmp_path):
    config = ROUND_TRIP[name]
    hf = config.to_hf_config()
    (tmp_path / "config.json").write_text(json.dumps(hf))  # JSON-serialisable
    back = ModelConfig.from_hf_config(tmp_path)
    assert _arch(back) == _arch(config)
    normalised = back.replace(**{k: getattr(config, k) for k in RUNTIME_FIELDS})
    assert normalised == config


def test_q_lora_null_round_trips(tmp_path):
    config = TINY.replace(q_lora_rank=None)
    hf = config.to_hf_config()
    assert "q_lora_rank" in hf and hf["q_lora_rank"] is None
    (tmp_path / "config.json").write_text(json.dumps(hf))
    text = (tmp_path / "config.json").read_text()
    assert '"q_lora_rank": null' in text
    assert ModelConfig.from_hf_config(tmp_path).q_lora_rank is None
    assert ModelConfig.from_hf_config(hf).q_lora_rank is None


KEY_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
              "first_k_dense_replace", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim",
              "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "n_shared_experts", "num_experts_per_tok",
              "n_group", "topk_group", "norm_topk_prob", "routed_scaling_factor", "rms_norm_eps",
              "max_position_embeddings")


@pytest.mark.parametrize("name", ["deepseek-v3-671b", "deepseek-v2-lite-style", "tiny"])
def test_transformers_config_reproduces_fields(name):
    from transformers import DeepseekV3Config

    config = ModelConfig.from_preset(name)
    hf = DeepseekV3Config(**config.to_hf_config())
    for key in KEY_FIELDS:
        assert getattr(hf, key) == getattr(config, key), key
    assert hf.num_key_value_heads == config.num_attention_heads
    assert hf.qk_head_dim == config.qk_head_dim
    assert hf.tie_word_embeddings is False
    rope = getattr(hf, "rope_parameters", None) or hf.rope_scaling
    assert rope.get("rope_theta", getattr(hf, "rope_theta", None)) == config.rope_theta
    r = config.rope_scaling
    assert rope["rope_type"] == "yarn"
    assert rope["factor"] == r.factor
    assert rope["original_max_position_embeddings"] == r.original_max_position_embeddings
    assert (rope["beta_fast"], rope["beta_slow"], rope["mscale"], rope["mscale_all_dim"]) == (
        r.beta_fast, r.beta_slow, r.mscale, r.mscale_all_dim)
    # ... and HF's own serialisation reads back to the same architecture.
    assert _arch(ModelConfig.from_hf_config(hf.to_dict())) == _arch(config)


# ---------------------------------------------------------------- validation


BAD_FIELDS = [
    ("n_routed_experts", dict(n_routed_experts=10)),  # 10 experts in 4 groups
    ("topk_group", dict(topk_group=5)),  # 5 of 4 groups
    ("num_experts_per_tok", dict(num_experts_per_tok=5)),  # 2 kept groups x 2 experts = 4 < 5
    ("num_experts_per_tok", dict(n_routed_experts=16, n_group=8, topk_group=1, num_experts_per_tok=3)),
    ("qk_rope_head_dim", dict(qk_rope_head_dim=7)),
    ("first_k_dense_replace", dict(first_k_dense_replace=4)),
    ("first_k_dense_replace", dict(first_k_dense_replace=-1)),
    ("vocab_size", dict(vocab_size=0)),
    ("hidden_size", dict(hidden_size=-64)),
    ("intermediate_size", dict(intermediate_size=0)),
    ("moe_intermediate_size", dict(moe_intermediate_size=0)),
    ("num_hidden_layers", dict(num_hidden_layers=0, first_k_dense_replace=0)),
    ("num_attention_heads", dict(num_attention_heads=-4)),
    ("q_lora_rank", dict(q_lora_rank=0)),
    ("kv_lora_rank", dict(kv_lora_rank=-16)),
    ("qk_nope_head_dim", dict(qk_nope_head_dim=-16)),
    ("qk_rope_head_dim", dict(qk_rope_head_dim=0)),
    ("v_head_dim", dict(v_head_dim=0)),
    ("n_routed_experts", dict(n_routed_experts=0)),
    ("num_experts_per_tok", dict(num_experts_per_tok=0)),
    ("n_group", dict(n_group=0)),
    ("topk_group", dict(topk_group=0)),
    ("n_shared_experts", dict(n_shared_experts=-1)),
    ("max_position_embeddings", dict(max_position_embeddings=0)),
    ("num_nextn_predict_layers", dict(num_nextn_predict_layers=-1)),
    ("routed_scaling_factor", dict(routed_scaling_factor=0.0)),
    ("rms_norm_eps", dict(rms_norm_eps=0.0)),
    ("dtype", dict(dtype="float33")),
    ("dtype", dict(dtype="bf16")),
    ("param_dtype", dict(param_dtype="int8")),
    ("remat_policy", dict(remat_policy="everything")),
    ("scan_unroll", dict(scan_unroll=-1)),
    ("scan_unroll", dict(scan_unroll=True)),
    ("moe_impl", dict(moe_impl="megablocks")),
    ("rope_scaling.factor", dict(rope_scaling=RopeScaling(factor=0.5, original_max_position_embeddings=32))),
    ("bos_token_id", dict(bos_token_id=256)),
]


@pytest.mark.parametrize("field,changes", BAD_FIELDS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_FIELDS)])
def test_invalid_field_raises_config_error(field, changes):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        TINY.replace(**changes)


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


BAD_HF = [
    ("hidden_act", dict(hidden_act="gelu")),
    ("scoring_func", dict(scoring_func="softmax")),
    ("topk_method", dict(topk_method="greedy")),
    ("num_key_value_heads", dict(num_key_value_heads=1)),
    ("rope", dict(rope_scaling={"type": "linear", "factor": 2.0})),
    ("rope", dict(rope_scaling=None, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})),
    ("original_max_position_embeddings", dict(rope_scaling={"type": "yarn", "factor": 4.0})),
    ("n_routed_experts", dict(n_routed_experts=10)),
    ("hidden_size", dict(hidden_size="64")),
]


@pytest.mark.parametrize("field,changes", BAD_HF, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_HF)])
def test_unsupported_hf_dict_raises_config_error(field, changes):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_hf_config(_hf_tiny(**changes))


def test_malformed_json_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"vocab_size": 256,')
    with pytest.raises(ConfigError, match=r"config\.json") as info:
        ModelConfig.from_hf_config(path)
    assert "JSON" in str(info.value)
    path.write_text("[1, 2, 3]")
    with pytest.raises(ConfigError, match=r"config\.json"):
        ModelConfig.from_hf_config(tmp_path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match=r"nonexistent\.json"):
        ModelConfig.from_hf_config(tmp_path / "nonexistent.json")
    with pytest.raises(ConfigError, match=r"config\.json"):
        ModelConfig.from_hf_config(tmp_path)  # a directory without config.json
