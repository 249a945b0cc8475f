"""Helpers that run HF torch modules and dsv3-jax modules on the same inputs for the parity tests."""

from __future__ import annotations

import json
import os

import jax
import ml_dtypes
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


class DequantisedTensors:
    """HF-named float32 tensors of a checkpoint directory, read on access: FP8 weights dequantised with their
    `weight_scale_inv` (W = q · s per 128×128 block, `convert_fixtures.dequantize_blocks`; then rounded to bf16
    and back when `round_bf16`, as a bf16 dequantised load stores them), the rest upcast."""

    def __init__(self, directory: str, round_bf16: bool = False) -> None:
        from dsv3_jax.ckpt.safetensors import CheckpointReader

        self.reader, self.round_bf16 = CheckpointReader(directory), round_bf16

    def __getitem__(self, name: str) -> np.ndarray:
        from convert_fixtures import dequantize_blocks

        value = np.asarray(self.reader.get(name))
        if name + "_scale_inv" in self.reader:
            w = dequantize_blocks(value, np.asarray(self.reader.get(name + "_scale_inv")))
            return w.astype(ml_dtypes.bfloat16).astype(np.float32) if self.round_bf16 else w
        return value.astype(np.float32)


def layerwise_hf_logits(directory: str, tokens: np.ndarray, vocab_chunk: int = 16384, *,
                        round_bf16: bool = False) -> np.ndarray:
    """HF DeepseekV3 float32 logits [B, T, V] of a checkpoint directory on its dequantised weights, one decoder layer
    in memory at a time: the embedding rows are gathered from the file, each `DeepseekV3DecoderLayer` is built on
    the meta device, given its weights, run and dropped, and the head is applied `vocab_chunk` rows at a time. Peak
    memory: about one layer in float32 (~3.8 GB for an MoE layer at 671B widths with 16 experts). `round_bf16`:
    on the dequantised weights rounded to bf16 (the reference for a `weights="bf16"` load)."""
    from convert_fixtures import _set_weights
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
        DeepseekV3DecoderLayer,
        DeepseekV3RMSNorm,
        DeepseekV3RotaryEmbedding,
    )

    with open(os.path.join(directory, "config.json")) as f:
        raw = {k: v for k, v in json.load(f).items() if k not in ("quantization_config", "dsv3_jax")}
    hf_config = DeepseekV3Config(**raw)
    hf_config._attn_implementation = "eager"
    tensors = DequantisedTensors(directory, round_bf16)
    embed = tensors.reader.get("model.embed_tokens.weight")
    x = torch.from_numpy(np.asarray(embed[tokens.reshape(-1)]).astype(np.float32).reshape(*tokens.shape, -1))
    pos_ids = torch.arange(tokens.shape[1])[None].expand(tokens.shape[0], -1)
    pos_emb = DeepseekV3RotaryEmbedding(hf_config)(x, pos_ids)
    mask = causal_additive_mask(*tokens.shape)
    with torch.no_grad():
        for i in range(hf_config.num_hidden_layers):
            with torch.device("meta"):
                layer = DeepseekV3DecoderLayer(hf_config, i).eval()
            _set_weights(layer, tensors, f"model.layers.{i}.", assign=True)
            x = layer(x, attention_mask=mask, position_ids=pos_ids, position_embeddings=pos_emb)
            x = x[0] if isinstance(x, tuple) else x
            del layer
        norm = DeepseekV3RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        _set_weights(norm, tensors, "model.norm.")
        h = norm(x)
        head = tensors.reader.get("lm_head.weight")
        chunks = [h @ torch.from_numpy(np.asarray(head[j:j + vocab_chunk]).astype(np.float32)).T
                  for j in range(0, head.shape[0], vocab_chunk)]
    tensors.reader.close()
    return torch.cat(chunks, dim=-1).numpy()
