"""Model configuration: one frozen dataclass, named presets, HF `config.json` round trip, validation.

Architecture fields use the HF `DeepseekV3Config` names (DESIGN.md §1). The last block of fields are run-time
settings (dtypes, scan/remat, MoE dispatch) that do not change the math and are not written to HF configs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax.numpy as jnp

from dsv3_jax.errors import ConfigError, is_int


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN rotary scaling (HF `rope_scaling` / `rope_parameters` with rope_type "yarn")."""

    factor: float = 40.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = 1.0
    mscale_all_dim: float | None = 1.0
    truncate: bool = True
    attention_factor: float | None = None


REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")  # names; the jax policies are in model/transformer.py
MOE_IMPLS = ("auto", "blocks", "ragged", "dense")
MATMUL_PRECISIONS = ("default", "fp8")
FP8_IMPLS = ("blockwise", "dequant", "weight_only")  # weight_only: FP8-resident weights, bf16 compute
# naive: float32 scores [B,H,T,S] (the reference); blockwise: online softmax, memory linear in T (plain JAX, every
# backend); cudnn: jax.nn.dot_product_attention on GPU; splash: the Pallas splash kernel on TPU (training layout).
ATTENTION_IMPLS = ("auto", "naive", "blockwise", "cudnn", "splash")
DTYPES = ("float32", "bfloat16", "float16")
FP8_BLOCK = 128  # weight blocks are FP8_BLOCK x FP8_BLOCK, activation tiles 1 x FP8_BLOCK (DESIGN.md §4)


@dataclasses.dataclass(frozen=True)
class MatmulPolicy:
    """How `quant.matmul.einsum` computes the projections the FP8 recipe covers.

    fp8_plain: quantise plain weights and activations on the fly (FP8 training / inference from bf16 weights).
    impl: one of FP8_IMPLS — "blockwise" (per-K-block fp32 promotion) or "dequant" (one dot over dequantised
    operands).
    """

    fp8_plain: bool = False
    impl: str = "blockwise"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """DeepSeek-V3 architecture (HF field names) plus run-time settings. Hashable: used as a jit cache key."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    first_k_dense_replace: int = 3
    num_attention_heads: int = 128
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 8
    topk_group: int = 4
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = RopeScaling()
    max_position_embeddings: int = 163840
    num_nextn_predict_layers: int = 1
    bos_token_id: int = 0
    eos_token_id: int = 1
    # ---- run-time settings (not part of the HF config) ----
    dtype: str = "bfloat16"  # activations / matmul inputs; norms, softmax and router always run in float32
    param_dtype: str = "float32"  # master weights; the router gate and its bias are always float32
    scan_layers: bool = True  # one nn.scan per stack (dense, MoE) instead of a Python loop
    scan_unroll: int = 1  # layers per loop step of a scanned stack (lax.scan's unroll); 0 = the whole stack as
    # straight-line code, parameters still stacked (same checkpoints); decoding (a cache) always loops. README "Speed"
    remat_policy: str = "none"  # one of REMAT_POLICIES
    moe_impl: str = "auto"  # one of MOE_IMPLS; "auto" = ragged_dot on GPU/TPU, "blocks" (tiles) on CPU
    init_std: float = 0.006  # report §3: init std 0.006
    matmul_precision: str = "default"  # "fp8": FP8 block-scaled GEMMs for attention/MLP/expert projections
    fp8_impl: str = "blockwise"  # "blockwise" (fp32 promotion per 128 of K), "dequant" (one dot, same math), or
    # "weight_only" (FP8-resident weights dequantised per 128×128 block, activations not quantised, bf16 compute)
    attention_impl: str = "auto"  # one of ATTENTION_IMPLS; "auto" = naive while scores are small, else blockwise
    attention_block: int = 512  # query/key block of the blockwise and kernel paths (splash: a multiple of 128)

    def __post_init__(self):
        validate(self)

    # ---- derived sizes ----
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_dense_layers(self) -> int:
        return self.first_k_dense_replace

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_group

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    @property
    def matmul_policy(self) -> MatmulPolicy:
        """The policy handed to `quant.matmul.einsum` at the projections the FP8 recipe covers."""
        return MatmulPolicy(fp8_plain=self.matmul_precision == "fp8", impl=self.fp8_impl)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    # ---- construction ----
    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return dataclasses.replace(PRESETS[name], **overrides)

    @classmethod
    def from_hf_config(cls, path_or_dict: str | os.PathLike | dict, **overrides: Any) -> ModelConfig:
        """Build from a HF `config.json` (a dict, the file, or the directory that holds it). dtype and param_dtype
        follow the stored weights (`torch_dtype` / `dtype`, bf16 for FP8 checkpoints, float32 when unstated);
        pass them as overrides to change that."""
        hf = _read_hf_json(path_or_dict)
        return dataclasses.replace(_from_hf_dict(hf), **overrides)

    def to_hf_config(self) -> dict:
        """HF `config.json` dict (`DeepseekV3ForCausalLM`, released field layout)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name in _HF_FIELDS}
        out["rope_scaling"] = None if self.rope_scaling is None else {"type": "yarn", "rope_type": "yarn", **{
            k: v for k, v in dataclasses.asdict(self.rope_scaling).items() if v is not None}}
        out.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", hidden_act="silu",
                   num_key_value_heads=self.num_attention_heads, scoring_func="sigmoid", topk_method="noaux_tc",
                   tie_word_embeddings=False, attention_bias=False, rope_interleave=True,
                   torch_dtype="bfloat16" if self.param_dtype == "bfloat16" else "float32")
        return out


RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "scan_unroll", "remat_policy", "moe_impl", "init_std",
                  "matmul_precision", "fp8_impl", "attention_impl", "attention_block")
_HF_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)} - {*RUNTIME_FIELDS, "rope_scaling"}


def _read_hf_json(path_or_dict: str | os.PathLike | dict) -> dict:
    if isinstance(path_or_dict, dict):
        return dict(path_or_dict)
    path = os.fspath(path_or_dict)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _from_hf_dict(hf: dict) -> ModelConfig:
    _check_supported(hf)
    kwargs = {k: hf[k] for k in _HF_FIELDS if (k in hf and hf[k] is not None) or (k == "q_lora_rank" and k in hf)}
    if "num_mtp_layers" in hf and "num_nextn_predict_layers" not in hf:
        kwargs["num_nextn_predict_layers"] = hf["num_mtp_layers"]
    for key in ("eos_token_id", "bos_token_id"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = kwargs[key][0]
    rope = hf.get("rope_parameters") or hf.get("rope_scaling")
    if rope and "rope_theta" in rope and "rope_theta" not in hf:
        kwargs["rope_theta"] = rope["rope_theta"]
    kwargs["rope_scaling"] = _rope_from_hf(rope, hf)
    # Missing fields take HF DeepseekV3Config's defaults, as HF itself does.
    kwargs.setdefault("max_position_embeddings", 4096)
    dtype = _stored_dtype(hf)
    return ModelConfig(**kwargs, dtype=dtype, param_dtype=dtype)


def _stored_dtype(hf: dict) -> str:
    """The precision the checkpoint's dense weights are stored in: bf16 for bf16 and FP8 checkpoints (an FP8
    checkpoint keeps its embedding, head and norms in bf16), float16 / float32 when the config says so, float32
    when it says nothing."""
    if (hf.get("quantization_config") or {}).get("quant_method") == "fp8":
        return "bfloat16"
    name = str(hf.get("torch_dtype") or hf.get("dtype") or "float32").removeprefix("torch.")
    return name if name in DTYPES else "float32"


def _check_supported(hf: dict) -> None:
    rules = {
        "hidden_act": ("silu",), "scoring_func": ("sigmoid",), "topk_method": ("noaux_tc",),
        "attention_bias": (False,), "tie_word_embeddings": (False,),
    }
    for key, allowed in rules.items():
        if key in hf and hf[key] not in allowed:
            raise ConfigError(f"config field {key}={hf[key]!r} is not supported (expected one of {allowed})")
    kvh = hf.get("num_key_value_heads")
    if kvh is not None and "num_attention_heads" in hf and kvh != hf["num_attention_heads"]:
        raise ConfigError(f"config field num_key_value_heads={kvh} must equal num_attention_heads for MLA")


def _rope_from_hf(rope: dict | None, hf: dict) -> RopeScaling | None:
    if not rope:
        return None
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        return None
    if kind != "yarn":
        raise ConfigError(f"config field rope_scaling.type={kind!r} is not supported (expected 'yarn' or 'default')")
    factor = rope.get("factor")
    orig = rope.get("original_max_position_embeddings")
    if orig is None:
        raise ConfigError("config field rope_scaling.original_max_position_embeddings is required for yarn")
    if factor is None:
        factor = hf.get("max_position_embeddings", 4096) / orig
    return RopeScaling(
        factor=float(factor), original_max_position_embeddings=int(orig),
        beta_fast=float(rope.get("beta_fast") or 32), beta_slow=float(rope.get("beta_slow") or 1),
        mscale=rope.get("mscale"), mscale_all_dim=rope.get("mscale_all_dim"),
        truncate=bool(rope.get("truncate", True)), attention_factor=rope.get("attention_factor"),
    )


# ---------------------------------------------------------------- validation

def _require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"config field {field}: {message}")


def validate(c: ModelConfig) -> None:
    """Raise ConfigError naming the first malformed or inconsistent field."""
    positive = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings")
    for name in positive:
        value = getattr(c, name)
        _require(is_int(value) and value > 0, name, f"must be a positive integer, got {value!r}")
    for name in ("first_k_dense_replace", "n_shared_experts", "num_nextn_predict_layers"):
        value = getattr(c, name)
        _require(isinstance(value, int) and value >= 0, name, f"must be a non-negative integer, got {value!r}")
    _require(c.q_lora_rank is None or (isinstance(c.q_lora_rank, int) and c.q_lora_rank > 0), "q_lora_rank",
             f"must be null or a positive integer, got {c.q_lora_rank!r}")
    _require(c.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", f"must be even, got {c.qk_rope_head_dim}")
    _require(c.first_k_dense_replace <= c.num_hidden_layers, "first_k_dense_replace",
             f"{c.first_k_dense_replace} exceeds num_hidden_layers={c.num_hidden_layers}")
    _require(c.rms_norm_eps > 0, "rms_norm_eps", f"must be > 0, got {c.rms_norm_eps}")
    _require(c.rope_theta > 1, "rope_theta", f"must be > 1, got {c.rope_theta}")
    if c.num_moe_layers > 0 or c.num_nextn_predict_layers > 0:
        _validate_moe(c)
    if c.rope_scaling is not None:
        _validate_rope(c.rope_scaling)
    _require(c.dtype in DTYPES, "dtype", f"{c.dtype!r} is not one of {DTYPES}")
    _require(c.param_dtype in DTYPES, "param_dtype", f"{c.param_dtype!r} is not one of {DTYPES}")
    _require(is_int(c.scan_unroll) and c.scan_unroll >= 0,
             "scan_unroll", f"must be a non-negative integer (0 = unroll the whole stack), got {c.scan_unroll!r}")
    _require(c.remat_policy in REMAT_POLICIES, "remat_policy", f"{c.remat_policy!r} is not one of {REMAT_POLICIES}")
    _require(c.moe_impl in MOE_IMPLS, "moe_impl", f"{c.moe_impl!r} is not one of {MOE_IMPLS}")
    _require(c.matmul_precision in MATMUL_PRECISIONS, "matmul_precision",
             f"{c.matmul_precision!r} is not one of {MATMUL_PRECISIONS}")
    _require(c.fp8_impl in FP8_IMPLS, "fp8_impl", f"{c.fp8_impl!r} is not one of {FP8_IMPLS}")
    _require(not (c.fp8_impl == "weight_only" and c.matmul_precision == "fp8"), "fp8_impl",
             "weight_only computes in bf16 from FP8-resident weights (inference); FP8 training GEMMs "
             "(matmul_precision='fp8') need 'blockwise' or 'dequant'")
    _validate_attention(c)
    _require(0 <= c.bos_token_id < c.vocab_size, "bos_token_id", f"{c.bos_token_id} outside [0, {c.vocab_size})")
    _require(0 <= c.eos_token_id < c.vocab_size, "eos_token_id", f"{c.eos_token_id} outside [0, {c.vocab_size})")


def _validate_attention(c: ModelConfig) -> None:
    _require(c.attention_impl in ATTENTION_IMPLS, "attention_impl",
             f"{c.attention_impl!r} is not one of {ATTENTION_IMPLS}")
    block = c.attention_block
    _require(is_int(block) and block >= 8 and block % 8 == 0,
             "attention_block", f"must be a positive multiple of 8, got {block!r}")
    _require(c.attention_impl != "splash" or block % 128 == 0, "attention_block",
             f"the splash kernel needs a multiple of 128, got {block}")


def _validate_moe(c: ModelConfig) -> None:
    for name in ("moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group"):
        value = getattr(c, name)
        _require(isinstance(value, int) and value > 0, name, f"must be a positive integer, got {value!r}")
    _require(c.n_routed_experts % c.n_group == 0, "n_routed_experts",
             f"{c.n_routed_experts} is not divisible by n_group={c.n_group}")
    _require(c.experts_per_group >= 2, "n_group",
             f"each group needs >= 2 experts (group score = sum of its top-2); got {c.experts_per_group}")
    _require(c.topk_group <= c.n_group, "topk_group", f"{c.topk_group} exceeds n_group={c.n_group}")
    kept = c.topk_group * c.experts_per_group
    _require(c.num_experts_per_tok <= kept, "num_experts_per_tok",
             f"{c.num_experts_per_tok} exceeds the {kept} experts held by topk_group={c.topk_group} kept groups")
    _require(c.routed_scaling_factor > 0, "routed_scaling_factor", f"must be > 0, got {c.routed_scaling_factor}")


def _validate_rope(r: RopeScaling) -> None:
    _require(r.factor >= 1, "rope_scaling.factor", f"must be >= 1, got {r.factor}")
    _require(r.original_max_position_embeddings > 0, "rope_scaling.original_max_position_embeddings",
             f"must be > 0, got {r.original_max_position_embeddings}")
    _require(r.beta_fast > r.beta_slow > 0, "rope_scaling.beta_fast",
             f"need beta_fast > beta_slow > 0, got {r.beta_fast}, {r.beta_slow}")


def yarn_mscale(scale: float, mscale: float | None = 1.0) -> float:
    """YaRN magnitude correction: 0.1 · mscale · ln(scale) + 1 (1 when scale <= 1)."""
    if scale <= 1:
        return 1.0
    return 0.1 * (1.0 if mscale is None else mscale) * math.log(scale) + 1.0


# ---------------------------------------------------------------- presets

_V3_671B = ModelConfig()

PRESETS: dict[str, ModelConfig] = {
    # Exact released values (DESIGN.md §1): group-limited routing ON (8 groups, keep 4).
    "deepseek-v3-671b": _V3_671B,
    # DeepSeek-V2-Lite dimensions (no q_lora, 64 experts top-6, 2 shared) with V3 routing (sigmoid + bias).
    "deepseek-v2-lite-style": ModelConfig(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16, q_lora_rank=None,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
        norm_topk_prob=False, routed_scaling_factor=1.0, num_nextn_predict_layers=0,
        rope_scaling=RopeScaling(mscale=0.707, mscale_all_dim=0.707)),
    # ~20M parameters: CPU experiments and benchmarks.
    "small": ModelConfig(
        vocab_size=4096, hidden_size=256, intermediate_size=1024, moe_intermediate_size=256,
        num_hidden_layers=6, first_k_dense_replace=1, num_attention_heads=8, q_lora_rank=128, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16, num_experts_per_tok=4,
        n_group=4, topk_group=2, max_position_embeddings=8192,
        rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=2048), dtype="float32"),
    # A few hundred thousand parameters: unit tests.
    "tiny": ModelConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2,
        n_group=4, topk_group=2, max_position_embeddings=128,
        rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=32), dtype="float32",
        init_std=0.02),
}
