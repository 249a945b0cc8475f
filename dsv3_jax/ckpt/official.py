"""The official DeepSeek-V3 repository's model-parallel format (`inference/convert.py`, DESIGN.md §5), merged back.

Rank r of n holds `model{r}-mp{n}.safetensors` with renamed keys (no `model.` prefix, self_attn → attn, mlp → ffn,
q_b_proj → wq_b, weight_scale_inv → scale, ...). A routed expert lives whole on one rank; every other tensor is
either replicated (split dim None) or cut into n equal slices along dim 0 or 1, its FP8 scale cut alike. The MTP
layer is dropped by that converter. `MPSource` presents the merged tensors under HF names.
"""

from __future__ import annotations

import os
import re

import numpy as np

from dsv3_jax.ckpt.sources import SafetensorsSource, Source, header_of
from dsv3_jax.errors import ConvertError

MP_FILE = re.compile(r"^model(\d+)-mp(\d+)\.safetensors$")

# HF module name → (official module name, split dim), as in the official convert.py.
MAPPING: dict[str, tuple[str, int | None]] = {
    "embed_tokens": ("embed", 0), "input_layernorm": ("attn_norm", None),
    "post_attention_layernorm": ("ffn_norm", None), "q_proj": ("wq", 0), "q_a_proj": ("wq_a", None),
    "q_a_layernorm": ("q_norm", None), "q_b_proj": ("wq_b", 0), "kv_a_proj_with_mqa": ("wkv_a", None),
    "kv_a_layernorm": ("kv_norm", None), "kv_b_proj": ("wkv_b", 0), "o_proj": ("wo", 1), "gate": ("gate", None),
    "gate_proj": ("w1", 0), "down_proj": ("w2", 1), "up_proj": ("w3", 0), "norm": ("norm", None),
    "lm_head": ("head", 0),
}
_MODULE_FROM_OFFICIAL = {official: hf for hf, (official, _) in MAPPING.items()}
_PART_FROM_OFFICIAL = {"attn": "self_attn", "ffn": "mlp"}
_LEAF_FROM_OFFICIAL = {"scale": "weight_scale_inv", "bias": "e_score_correction_bias"}


def mp_files(directory: str) -> dict[int, str]:
    """rank → path of the `model{r}-mp{n}.safetensors` files in `directory` ({} when there are none)."""
    found = {}
    sizes = set()
    for name in sorted(os.listdir(directory)):
        match = MP_FILE.match(name)
        if match:
            found[int(match[1])] = os.path.join(directory, name)
            sizes.add(int(match[2]))
    if not found:
        return {}
    if len(sizes) != 1:
        raise ConvertError(f"{directory}: model-parallel shards of different sizes mp{sorted(sizes)}")
    n = sizes.pop()
    missing = [f"model{r}-mp{n}.safetensors" for r in range(n) if r not in found]
    if missing or len(found) != n:
        raise ConvertError(f"{directory}: model-parallel checkpoint with n={n} ranks lacks {missing or 'ranks'}")
    return found


def official_to_hf(name: str) -> str | None:
    """HF name of an official tensor name (`layers.3.ffn.experts.5.w1.scale` → `model.layers.3.mlp.experts.5.
    gate_proj.weight_scale_inv`); None when the name does not follow the official scheme."""
    parts = name.split(".")
    if len(parts) < 2 or parts[-2] not in _MODULE_FROM_OFFICIAL:
        return None
    parts[-2] = _MODULE_FROM_OFFICIAL[parts[-2]]
    parts[-1] = _LEAF_FROM_OFFICIAL.get(parts[-1], parts[-1])
    if len(parts) > 3 and parts[0] == "layers":
        parts[2] = _PART_FROM_OFFICIAL.get(parts[2], parts[2])
    return ".".join(parts) if parts[0] == "lm_head" else "model." + ".".join(parts)


def split_dim(hf_name: str) -> int | None:
    """The dim along which the official format cuts this tensor across ranks (None: replicated or one expert)."""
    parts = hf_name.split(".")
    if "experts" in parts and "shared_experts" not in parts:
        return None
    return MAPPING.get(parts[-2], ("", None))[1]


class MPSource(Source):
    """A directory of `model{r}-mp{n}.safetensors` files, merged on read (one tensor's slices at a time)."""

    def __init__(self, directory: str) -> None:
        super().__init__()
        self.description = directory
        ranks = mp_files(directory)
        self._ranks = [_rank_source(ranks[r]) for r in range(len(ranks))]
        self._parts: dict[str, list[tuple[int, str]]] = {}  # HF name → [(rank, official name)]
        for r, rank_source in enumerate(self._ranks):
            for official in sorted(rank_source.names()):
                hf = official_to_hf(official) or official  # an unknown name stays as is: reported as unexpected
                self._parts.setdefault(hf, []).append((r, official))
        for hf, parts in self._parts.items():
            self._info[hf] = self._merged_info(hf, parts)

    def _merged_info(self, hf: str, parts: list[tuple[int, str]]) -> tuple[str, tuple[int, ...]]:
        infos = [self._ranks[r].info(o) for r, o in parts]
        dim = split_dim(hf)
        if len(parts) == 1 and (dim is None or len(self._ranks) == 1):
            return infos[0]
        if len(parts) != len(self._ranks):
            raise ConvertError(f"{self.where(hf)}: tensor {parts[0][1]} is on ranks {[r for r, _ in parts]} only; "
                               f"expected one rank (routed expert) or all {len(self._ranks)}")
        dtype, shape = infos[0]
        for (r, official), (other_dtype, other_shape) in zip(parts, infos, strict=True):
            same = other_shape if dim is None else other_shape[:dim] + other_shape[dim + 1:]
            want = shape if dim is None else shape[:dim] + shape[dim + 1:]
            if other_dtype != dtype or same != want:
                raise ConvertError(f"{self._ranks[r].where(official)}: tensor {official} is {other_dtype}"
                                   f"{list(other_shape)} but rank {parts[0][0]} has {dtype}{list(shape)}")
        if dim is None:
            return dtype, shape
        return dtype, (*shape[:dim], sum(s[dim] for _, s in infos), *shape[dim + 1:])

    def where(self, name: str) -> str:
        parts = self._parts.get(name)
        if not parts:
            return self.description
        return ", ".join(self._ranks[r].where(o) for r, o in parts)

    def _read(self, name: str) -> np.ndarray:
        parts = self._parts[name]
        dim = split_dim(name)
        if dim is None or len(parts) == 1:
            r, official = parts[0]
            return self._ranks[r].read(official)
        return np.concatenate([self._ranks[r].read(o) for r, o in parts], axis=dim)

    def close(self) -> None:
        for rank in self._ranks:
            rank.close()


def _rank_source(path: str) -> SafetensorsSource:
    header, _ = header_of(path)
    return SafetensorsSource(dict.fromkeys(header, path), path)


def official_config_to_hf(c: dict) -> dict:
    """The official `ModelArgs` JSON (`dim`, `n_layers`, ...; its defaults where a field is absent) → HF fields."""
    factor, original = float(c.get("rope_factor", 40)), int(c.get("original_seq_len", 4096))
    mscale = c.get("mscale", 1.0)
    return {
        "vocab_size": c.get("vocab_size", 102400), "hidden_size": c["dim"],
        "intermediate_size": c.get("inter_dim", 10944),
        "moe_intermediate_size": c.get("moe_inter_dim", 1408), "num_hidden_layers": c["n_layers"],
        "first_k_dense_replace": c.get("n_dense_layers", 1), "num_attention_heads": c.get("n_heads", 16),
        "q_lora_rank": c.get("q_lora_rank") or None, "kv_lora_rank": c.get("kv_lora_rank", 512),
        "qk_nope_head_dim": c.get("qk_nope_head_dim", 128), "qk_rope_head_dim": c.get("qk_rope_head_dim", 64),
        "v_head_dim": c.get("v_head_dim", 128), "n_routed_experts": c.get("n_routed_experts", 64),
        "n_shared_experts": c.get("n_shared_experts", 2), "num_experts_per_tok": c.get("n_activated_experts", 6),
        "n_group": c.get("n_expert_groups", 1), "topk_group": c.get("n_limited_groups", 1),
        "routed_scaling_factor": c.get("route_scale", 1.0), "scoring_func": c.get("score_func", "softmax"),
        "norm_topk_prob": True, "rope_theta": c.get("rope_theta", 10000.0),
        "max_position_embeddings": int(original * factor), "num_nextn_predict_layers": 0,
        "rope_scaling": {"type": "yarn", "factor": factor, "original_max_position_embeddings": original,
                         "beta_fast": c.get("beta_fast", 32), "beta_slow": c.get("beta_slow", 1),
                         "mscale": mscale, "mscale_all_dim": mscale},
    }
