"""Helpers that run HF torch modules and dsv3-jax modules on the same inputs for the parity tests."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import torch

from dsv3_jax import ModelConfig
from dsv3_jax.ckpt.safetensors import SafetensorsFile, save_file


def causal_additive_mask(batch: int, seq: int) -> torch.Tensor:
    """[B,1,T,T] float mask for HF eager attention: 0 where allowed, -inf above the diagonal."""
    mask = torch.full((seq, seq), float("-inf")).triu(1)
    return mask[None, None].expand(batch, 1, seq, seq)


def hf_position_embeddings(hf_model, x: torch.Tensor):
    positions = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
    return hf_model.model.rotary_emb(x, positions), positions


def layer_variables(config: ModelConfig, variables: dict, i: int) -> tuple[dict, bool]:
    """Variables of decoder layer i (sliced out of its stack) and whether it is an MoE layer."""
    dense = i < config.first_k_dense_replace
    stack, j = ("dense_layers", i) if dense else ("moe_layers", i - config.first_k_dense_replace)
    out = {}
    for collection, tree in variables.items():
        if stack in tree:
            out[collection] = jax.tree_util.tree_map(lambda a: a[j], tree[stack]["layers"])
    return out, not dense


def to_torch(x) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x).copy())


def hf_block_state(prefix: str, state: dict[str, torch.Tensor], moe_intermediate: int) -> dict[str, np.ndarray]:
    """In-memory HF block weights → on-disk names (fused 3-D experts split into per-expert tensors)."""
    out = {}
    for name, value in state.items():
        value = value.detach().float().numpy()
        if name.endswith("mlp.experts.gate_up_proj"):
            base = name[: -len("gate_up_proj")]
            for j, fused in enumerate(value):
                out[f"{prefix}{base}{j}.gate_proj.weight"] = fused[:moe_intermediate]
                out[f"{prefix}{base}{j}.up_proj.weight"] = fused[moe_intermediate:]
        elif name.endswith("mlp.experts.down_proj"):
            base = name[: -len("down_proj")]
            for j, w in enumerate(value):
                out[f"{prefix}{base}{j}.down_proj.weight"] = w
        else:
            out[prefix + name] = value
    return out


def add_shard_with_index(directory: str, tensors: dict[str, np.ndarray], shard: str) -> None:
    """Add a shard to a single-file HF checkpoint and write the index that names both files."""
    weight_map = {}
    single = os.path.join(directory, "model.safetensors")
    with SafetensorsFile(single) as f:
        weight_map.update({k: "model.safetensors" for k in f})
    save_file(tensors, os.path.join(directory, shard))
    weight_map.update({k: shard for k in tensors})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def random_mtp_layer(hf_model, config: ModelConfig, seed: int):
    """HF's MtpLayer around a DeepseekV3 decoder layer (index num_hidden_layers) with random non-trivial weights."""
    from transformers.modeling_layers import MtpLayer
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm

    torch.manual_seed(seed)
    layer = MtpLayer(hf_model.config, DeepseekV3DecoderLayer, DeepseekV3RMSNorm, config.num_hidden_layers).eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(1.0 + 0.2 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
        bias = layer.mtp_block.mlp.gate.e_score_correction_bias
        bias.copy_(0.5 * (2 * torch.rand_like(bias) - 1))
    return layer
