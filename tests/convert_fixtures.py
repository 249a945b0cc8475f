"""Tiny checkpoints in the exact released layouts, built from a random HF DeepseekV3ForCausalLM.

- `write_fp8_checkpoint`: the released FP8 layout. Every linear weight of attention, dense MLP, shared and routed
  experts is float8_e4m3fn with a float32 `weight_scale_inv` [ceil(out/128), ceil(in/128)]; embeddings, norms, the
  gate and eh_proj are bf16; the correction bias fp32. The MTP layer sits at index num_hidden_layers with its own
  embed_tokens / shared_head.head copies. Three shards plus an index, some scales in another shard than their
  weight, config.json with quantization_config. Dimensions leave partial 128-blocks at every edge. The HF model
  (and the HF MtpLayer) get the DEQUANTISED weights, so their outputs are the reference.
- `write_bf16_checkpoint`: the same weights as a plain bf16 HF checkpoint (bias fp32), MTP layer included.
- `write_official_mp`: the official repository's model-parallel format, written the way its `convert.py` does.

The block quantisation here is plain numpy, independent of `dsv3_jax.quant.fp8`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil

import ml_dtypes
import numpy as np
import torch
from conftest import build_hf_model
from hf_reference import hf_block_state, random_mtp_layer

from dsv3_jax import ModelConfig, RopeScaling
from dsv3_jax.ckpt.safetensors import CheckpointReader, save_file

BF16, FP8 = ml_dtypes.bfloat16, ml_dtypes.float8_e4m3fn
QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                       "weight_block_size": [128, 128]}
FP8_MODULES = ("q_a_proj", "q_b_proj", "q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj",
               "up_proj", "down_proj")

# Partial edge blocks everywhere (160 = 128 + 32, 144, 200, 136, 224 = 4·(16+40), 80), and every dimension the
# official format cuts in two has an even number of 128-blocks, so its scales split with it.
FIXTURE_CONFIG = ModelConfig(
    vocab_size=256, hidden_size=160, intermediate_size=200, moe_intermediate_size=136, num_hidden_layers=3,
    first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=144, kv_lora_rank=80, qk_nope_head_dim=16,
    qk_rope_head_dim=24, v_head_dim=40, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4,
    topk_group=2, max_position_embeddings=128, num_nextn_predict_layers=1,
    rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=32), dtype="float32", param_dtype="float32")

# The official config format for the same model (inference/configs/config_*.json field names).
OFFICIAL_CONFIG = {"vocab_size": 256, "dim": 160, "inter_dim": 200, "moe_inter_dim": 136, "n_layers": 3,
                   "n_dense_layers": 1, "n_heads": 4, "n_routed_experts": 8, "n_shared_experts": 1,
                   "n_activated_experts": 2, "n_expert_groups": 4, "n_limited_groups": 2, "route_scale": 2.5,
                   "score_func": "sigmoid", "q_lora_rank": 144, "kv_lora_rank": 80, "qk_nope_head_dim": 16,
                   "qk_rope_head_dim": 24, "v_head_dim": 40, "original_seq_len": 32, "rope_factor": 4, "dtype": "fp8"}


@dataclasses.dataclass
class Fixture:
    """A written checkpoint and its reference: the HF model and MTP layer hold `tensors` (float32, HF layout)."""

    directory: str
    config: ModelConfig
    model: torch.nn.Module
    mtp: torch.nn.Module
    tensors: dict[str, np.ndarray]  # every weight as float32 [out, in] (dequantised), MTP copies included
    stored: dict[str, np.ndarray]  # exactly what is on disk (FP8 values, scales, bf16, fp32)


def quantize_blocks(w_OI: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[O, I] float32 → (e4m3 values [O, I], float32 scale_inv [ceil(O/128), ceil(I/128)]), scale = amax / 448."""
    o, i = w_OI.shape
    bo, bi = math.ceil(o / 128), math.ceil(i / 128)
    padded = np.zeros((bo * 128, bi * 128), np.float32)
    padded[:o, :i] = w_OI
    blocks = padded.reshape(bo, 128, bi, 128)
    amax = np.abs(blocks).max(axis=(1, 3))
    scale = np.where(amax > 0, amax / 448.0, 1.0).astype(np.float32)
    q = (blocks / scale[:, None, :, None]).reshape(padded.shape)[:o, :i].astype(FP8)
    return q, scale


def dequantize_blocks(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """W = q · s[i // 128, j // 128] in float32."""
    o, i = q.shape
    return q.astype(np.float32) * np.repeat(np.repeat(scale, 128, 0), 128, 1)[:o, :i]


def is_fp8_weight(name: str) -> bool:
    parts = name.split(".")
    return parts[-1] == "weight" and parts[-2] in FP8_MODULES


def _mtp_name(key: str) -> str:
    return key.replace("mtp_block.", "").replace("post_norm.", "shared_head.norm.")


def _set_weights(module, tensors, prefix: str, rename=lambda k: k, *, assign: bool = False) -> None:
    """Load on-disk-named float32 tensors (any mapping) into a HF module (fused expert tensors rebuilt from
    per-expert ones); `assign` for a module built on the meta device."""
    state = {}
    for key, ref in module.state_dict().items():
        disk = prefix + rename(key)
        if disk.endswith("mlp.experts.gate_up_proj"):
            base = disk[: -len("gate_up_proj")]
            value = np.stack([np.concatenate([tensors[f"{base}{j}.gate_proj.weight"],
                                              tensors[f"{base}{j}.up_proj.weight"]]) for j in range(ref.shape[0])])
        elif disk.endswith("mlp.experts.down_proj"):
            base = disk[: -len("down_proj")]
            value = np.stack([tensors[f"{base}{j}.down_proj.weight"] for j in range(ref.shape[0])])
        else:
            value = tensors[disk]
        state[key] = torch.from_numpy(np.ascontiguousarray(value)).to(ref.dtype)
    module.load_state_dict(state, strict=True, assign=assign)


def _reference_tensors(config: ModelConfig, seed: int, rope_interleave: bool):
    model = build_hf_model(config, seed=seed, rope_interleave=rope_interleave)
    mtp = random_mtp_layer(model, config, seed + 100)
    prefix = f"model.layers.{config.num_hidden_layers}."
    tensors = hf_block_state("", model.state_dict(), config.moe_intermediate_size)
    mtp_state = {_mtp_name(k): v for k, v in mtp.state_dict().items()}
    tensors.update(hf_block_state(prefix, mtp_state, config.moe_intermediate_size))
    tensors[prefix + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"]
    tensors[prefix + "shared_head.head.weight"] = tensors["lm_head.weight"]
    return model, mtp, tensors


def _write_shards(directory: str, stored: dict[str, np.ndarray], shard_of) -> None:
    """Shards named model-0000i-of-0000n.safetensors by `shard_of(name)` (0-based), plus the index."""
    groups: dict[int, dict[str, np.ndarray]] = {}
    for name, value in stored.items():
        groups.setdefault(shard_of(name), {})[name] = value
    n = len(groups)
    weight_map = {}
    for i in sorted(groups):
        file = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(groups[i], os.path.join(directory, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(groups[i], file))
    total = sum(v.nbytes for v in stored.values())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)


def _write_config(directory: str, config: ModelConfig, fp8: bool, rope_interleave: bool = True) -> None:
    hf = {**config.to_hf_config(), "torch_dtype": "bfloat16", "rope_interleave": rope_interleave}
    if fp8:
        hf["quantization_config"] = QUANTIZATION_CONFIG
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)


# Scales stored in another shard than their weight (a case the index must resolve).
MOVED_SCALES = {"model.layers.1.self_attn.q_b_proj.weight_scale_inv": 1,
                "model.layers.2.mlp.experts.3.down_proj.weight_scale_inv": 0,
                "model.layers.3.self_attn.kv_b_proj.weight_scale_inv": 0}


def _fp8_shard(config: ModelConfig):
    def shard_of(name: str) -> int:
        if name in MOVED_SCALES:
            return MOVED_SCALES[name]
        parts = name.split(".")
        layer = int(parts[2]) if parts[:2] == ["model", "layers"] else None
        if layer == config.num_hidden_layers:
            return 2
        return 0 if name == "model.embed_tokens.weight" or (layer is not None and layer < 2) else 1

    return shard_of


def write_fp8_checkpoint(directory: str, config: ModelConfig = FIXTURE_CONFIG, seed: int = 0, *,
                         rope_interleave: bool = True) -> Fixture:
    """The released FP8 layout (see the module docstring); returns the reference model and tensors.
    rope_interleave=False: HF's half-split rotary rows (the converter permutes them to pairs)."""
    os.makedirs(directory, exist_ok=True)
    model, mtp, tensors = _reference_tensors(config, seed, rope_interleave)
    stored: dict[str, np.ndarray] = {}
    for name, w in tensors.items():
        if is_fp8_weight(name):
            q, s = quantize_blocks(w)
            stored[name], stored[name + "_scale_inv"] = q, s
            tensors[name] = dequantize_blocks(q, s)
        elif name.endswith("e_score_correction_bias"):
            stored[name] = w.astype(np.float32)
        else:
            stored[name] = w.astype(BF16)
            tensors[name] = stored[name].astype(np.float32)
    _set_weights(model, tensors, "")
    _set_weights(mtp, tensors, f"model.layers.{config.num_hidden_layers}.", _mtp_name)
    _write_shards(directory, stored, _fp8_shard(config))
    _write_config(directory, config, fp8=True, rope_interleave=rope_interleave)
    return Fixture(directory, config, model, mtp, tensors, stored)


def write_bf16_checkpoint(directory: str, fixture: Fixture) -> dict[str, np.ndarray]:
    """The fixture's weights as a plain HF bf16 checkpoint (bias fp32), two shards + index; returns what is stored."""
    os.makedirs(directory, exist_ok=True)
    stored = {n: w.astype(np.float32 if n.endswith("e_score_correction_bias") else BF16)
              for n, w in fixture.tensors.items()}
    mtp_prefix = f"model.layers.{fixture.config.num_hidden_layers}."
    _write_shards(directory, stored, lambda name: int(name.startswith(mtp_prefix)))
    _write_config(directory, fixture.config, fp8=False)
    return stored


# ---------------------------------------------------------------- the official repository's convert.py, re-done

# HF module name → (official name, dim cut across ranks), copied from deepseek-ai/DeepSeek-V3 inference/convert.py
OFFICIAL_MAPPING = {
    "embed_tokens": ("embed", 0), "input_layernorm": ("attn_norm", None),
    "post_attention_layernorm": ("ffn_norm", None), "q_proj": ("wq", 0), "q_a_proj": ("wq_a", None),
    "q_a_layernorm": ("q_norm", None), "q_b_proj": ("wq_b", 0), "kv_a_proj_with_mqa": ("wkv_a", None),
    "kv_a_layernorm": ("kv_norm", None), "kv_b_proj": ("wkv_b", 0), "o_proj": ("wo", 1), "gate": ("gate", None),
    "gate_proj": ("w1", 0), "down_proj": ("w2", 1), "up_proj": ("w3", 0), "norm": ("norm", None),
    "lm_head": ("head", 0), "scale": ("scale", None),
}


def write_official_mp(hf_dir: str, out_dir: str, n: int, config: ModelConfig) -> None:
    """`model{r}-mp{n}.safetensors` for r < n, following the official convert.py line by line; the MTP layer is
    dropped; config.json copied next to the shards."""
    os.makedirs(out_dir, exist_ok=True)
    per_rank = config.n_routed_experts // n
    states: list[dict[str, np.ndarray]] = [{} for _ in range(n)]
    with CheckpointReader(hf_dir) as reader:
        for name in reader:
            if f"model.layers.{config.num_hidden_layers}." in name:
                continue
            param = np.array(reader.get(name))
            if name.startswith("model."):
                name = name[len("model."):]
            name = name.replace("self_attn", "attn").replace("mlp", "ffn")
            name = name.replace("weight_scale_inv", "scale").replace("e_score_correction_bias", "bias")
            key = name.split(".")[-2]
            new_key, dim = OFFICIAL_MAPPING[key]
            name = name.replace(key, new_key)
            for i in range(n):
                new_param = param
                if "experts" in name and "shared_experts" not in name:
                    idx = int(name.split(".")[-3])
                    if idx < i * per_rank or idx >= (i + 1) * per_rank:
                        continue
                elif dim is not None:
                    assert param.shape[dim] % n == 0, f"{name}: dim {dim} of {param.shape} not divisible by {n}"
                    size = param.shape[dim] // n
                    new_param = np.take(param, np.arange(i * size, (i + 1) * size), axis=dim)
                states[i][name] = new_param
    for i in range(n):
        save_file(states[i], os.path.join(out_dir, f"model{i}-mp{n}.safetensors"))
    shutil.copy(os.path.join(hf_dir, "config.json"), os.path.join(out_dir, "config.json"))
