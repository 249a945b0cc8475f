"""The one table between HF checkpoint names and dsv3-jax variable paths (DESIGN.md §5).

HF linear weights are torch layout [out, in]; ours are [in, out]. Routed experts are one HF tensor per expert
(`mlp.experts.{j}.*`) and one stacked [E, in, out] array here. Layers live in two scanned stacks, so a HF layer
tensor lands at index `i` (dense) or `i - first_k_dense_replace` (MoE) of a stacked array.
"""

from __future__ import annotations

import dataclasses

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.moe import ROUTER_COLLECTION


@dataclasses.dataclass(frozen=True)
class Entry:
    """One HF tensor: where it goes (collection, path, leading index into a stacked array) and how."""

    hf_name: str
    collection: str
    path: tuple[str, ...]
    index: tuple[int, ...] = ()
    transpose: bool = False
    rope: str | None = None  # "q" or "kv": rows holding rotary dims (permuted when rope_interleave is false)


_ATTN = (  # HF suffix under self_attn., our name under attn/, rope rows
    ("q_a_proj.weight", "wq_a", None), ("q_a_layernorm.weight", "q_norm", None), ("q_b_proj.weight", "wq_b", "q"),
    ("q_proj.weight", "wq", "q"), ("kv_a_proj_with_mqa.weight", "wkv_a", "kv"),
    ("kv_a_layernorm.weight", "kv_norm", None), ("kv_b_proj.weight", "wkv_b", None), ("o_proj.weight", "wo", None),
)
_Q_NAMES = ("wq", "wq_a", "q_norm", "wq_b")
_FFN = (("gate_proj.weight", "w_gate"), ("up_proj.weight", "w_up"), ("down_proj.weight", "w_down"))


def _block(config: ModelConfig, hf: str, ours: tuple[str, ...], index: tuple[int, ...], use_moe: bool):
    """Entries of one decoder block: HF prefix `hf` (ending in '.'), our path prefix `ours`."""
    out = [Entry(f"{hf}input_layernorm.weight", "params", (*ours, "attn_norm", "scale"), index),
           Entry(f"{hf}post_attention_layernorm.weight", "params", (*ours, "ffn_norm", "scale"), index)]
    q_names = ("wq",) if config.q_lora_rank is None else ("wq_a", "q_norm", "wq_b")
    for suffix, name, rope in _ATTN:
        if name in _Q_NAMES and name not in q_names:
            continue
        out.append(Entry(f"{hf}self_attn.{suffix}", "params", (*ours, "attn", name), index,
                         transpose="layernorm" not in suffix, rope=rope))
    if not use_moe:
        return out + [Entry(f"{hf}mlp.{s}", "params", (*ours, "mlp", n), index, True) for s, n in _FFN]
    moe = (*ours, "moe")
    out.append(Entry(f"{hf}mlp.gate.weight", "params", (*moe, "gate"), index, transpose=True))
    out.append(Entry(f"{hf}mlp.gate.e_score_correction_bias", ROUTER_COLLECTION, (*moe, "bias"), index))
    if config.n_shared_experts:
        out += [Entry(f"{hf}mlp.shared_experts.{s}", "params", (*moe, "shared", n), index, True) for s, n in _FFN]
    for j in range(config.n_routed_experts):
        out += [Entry(f"{hf}mlp.experts.{j}.{s}", "params", (*moe, n), (*index, j), True) for s, n in _FFN]
    return out


def main_entries(config: ModelConfig) -> list[Entry]:
    """Every HF tensor of the main model (embedding, layers, final norm, head)."""
    out = [Entry("model.embed_tokens.weight", "params", ("embed_tokens",)),
           Entry("model.norm.weight", "params", ("final_norm", "scale")),
           Entry("lm_head.weight", "params", ("lm_head",), transpose=True)]
    for i in range(config.num_hidden_layers):
        dense = i < config.first_k_dense_replace
        stack, j = ("dense_layers", i) if dense else ("moe_layers", i - config.first_k_dense_replace)
        out += _block(config, f"model.layers.{i}.", (stack, "layers"), (j,), not dense)
    return out


def mtp_entries(config: ModelConfig, depth: int) -> list[Entry]:
    """HF tensors of MTP depth `depth` (stored as layer num_hidden_layers + depth), its shared copies excluded."""
    hf = f"model.layers.{config.num_hidden_layers + depth}."
    ours = (f"mtp_{depth}",)
    use_moe = config.n_routed_experts > 0 and config.num_hidden_layers >= config.first_k_dense_replace
    return [Entry(f"{hf}enorm.weight", "params", (*ours, "enorm", "scale")),
            Entry(f"{hf}hnorm.weight", "params", (*ours, "hnorm", "scale")),
            Entry(f"{hf}eh_proj.weight", "params", (*ours, "eh_proj"), transpose=True),
            Entry(f"{hf}shared_head.norm.weight", "params", (*ours, "head_norm", "scale")),
            *_block(config, hf, (*ours, "block"), (), use_moe)]


def mtp_shared_copies(config: ModelConfig, depth: int) -> dict[str, str]:
    """The MTP layer's own copies of the embedding and head: HF name → the main-model HF name it duplicates."""
    hf = f"model.layers.{config.num_hidden_layers + depth}."
    return {f"{hf}embed_tokens.weight": "model.embed_tokens.weight", f"{hf}shared_head.head.weight": "lm_head.weight"}


def is_mtp_name(config: ModelConfig, name: str) -> bool:
    parts = name.split(".")
    return len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and int(
        parts[2]) >= config.num_hidden_layers


def expected_entries(config: ModelConfig, names: set[str]) -> tuple[list[Entry], dict[str, str]]:
    """(entries to load, {MTP copy of embedding/head: the main tensor it duplicates}) for a checkpoint's names.

    MTP tensors are expected when the checkpoint has any of them (HF's save_pretrained drops layer 61).
    """
    entries = main_entries(config)
    copies: dict[str, str] = {}
    if any(is_mtp_name(config, n) for n in names):
        for depth in range(config.num_nextn_predict_layers):
            entries += mtp_entries(config, depth)
            copies.update({k: v for k, v in mtp_shared_copies(config, depth).items() if k in names})
    return entries, copies
