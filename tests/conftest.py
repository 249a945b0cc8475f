"""Shared fixtures: tiny HF DeepseekV3 reference models built in-test, saved to safetensors, loaded by dsv3-jax."""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
import pytest

# Compiled for compile time: the suite's programs are tiny and compile-bound. LLVM -O0 (on 2 cores, in-process:
# tests/test_training.py 196 -> 121 s, test_invariants + test_chunked_loss 177 -> 120 s) and XLA:CPU's older
# kernel emitters instead of the MLIR fusion emitters (a tiny_stdlib train step at O0 compiled in 6.9 s instead of
# 11.1, medians of 3, interleaved). They change how fast the kernels run, not what they compute. Subprocesses (CLI,
# notebooks, multi-host) inherit them. Timings belong to experiments/, which compile with the defaults.
SUITE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {SUITE_XLA_FLAGS}")

# The suite runs on the CPU; with libtpu installed (the TPU-compile tests) jax would otherwise probe for a TPU at
# start-up and print warnings. Abstract TPU topologies still work under JAX_PLATFORMS=cpu (DESIGN.md §8).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Hermetic: the CLI's persistent compilation cache (~/.cache/dsv3-jax/xla) stays off in tests; the cache's own
# test turns it on for its subprocesses.
os.environ.setdefault("DSV3_COMPILATION_CACHE", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from dsv3_jax import ModelConfig, RopeScaling  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "dsv3_jax.cli.main"]  # `dsv3` as a child process (run with cwd=REPO, env=cli_env)

# The longest files first: `--dist loadfile` hands each file to the next free process in collection order, so a long
# file collected last runs alone at the end. Ordered by their time on 2 cores (the full suite with --durations=0:
# 500 / 270 / 250 / 250 / 230 / 170 / 160 / 160 s); the other files keep pytest's order, and so does every file's
# tests.
LONGEST_FILES = ("test_sharding.py", "test_notebooks.py", "test_aot.py", "test_training.py", "test_long_context.py",
                 "test_generate.py", "test_invariants.py", "test_hardening.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable


def subprocess_env(devices: int = 1, **extra: str) -> dict[str, str]:
    """This process's environment for a child process: `devices` simulated CPU devices, the suite's compile flags,
    the repository first on PYTHONPATH, then `extra`."""
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {SUITE_XLA_FLAGS}",
            "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])), **extra}


def cli_env(cache) -> dict[str, str]:
    """subprocess_env for `python -m dsv3_jax.cli.main` on one device, with JAX's persistent compilation cache in
    `cache` (every program written to it)."""
    return subprocess_env(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                          JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


TINY = ModelConfig.from_preset("tiny")

# The parity matrix required by the model-core issue; each is a float32 tiny DeepSeek-V3.
PARITY_CONFIGS = {
    # yarn on (factor 4, original length 32); tests run sequences longer than 32.
    "yarn_groups_bias": TINY,
    # q_lora_rank null: one full query projection.
    "no_q_lora": dataclasses.replace(TINY, q_lora_rank=None),
    # two dense layers before the MoE stack, 8 groups of 2 keeping 3, top-3.
    "two_dense": dataclasses.replace(TINY, num_hidden_layers=4, first_k_dense_replace=2, n_routed_experts=16,
                                     n_group=8, topk_group=3, num_experts_per_tok=3, n_shared_experts=2),
    # no rope scaling, unnormalised top-k weights, different head sizes.
    "plain_rope": dataclasses.replace(TINY, rope_scaling=None, norm_topk_prob=False, routed_scaling_factor=1.0,
                                      qk_nope_head_dim=8, qk_rope_head_dim=16, v_head_dim=20),
    # yarn with mscale != mscale_all_dim (cos/sin carry a factor) and a single group.
    "yarn_mscale": dataclasses.replace(TINY, rope_scaling=RopeScaling(
        factor=8.0, original_max_position_embeddings=16, mscale=0.9, mscale_all_dim=0.5), n_group=1, topk_group=1),
}


def build_hf_model(config: ModelConfig, seed: int = 0, *, rope_interleave: bool = True, bias_scale: float = 0.5):
    """A random HF DeepseekV3ForCausalLM for `config`: random norms and a random non-zero correction bias."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    hf_config = DeepseekV3Config(**{**config.to_hf_config(), "rope_interleave": rope_interleave})
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.copy_(bias_scale * (2 * torch.rand_like(
                    module.e_score_correction_bias) - 1))
    return model


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """name → (HF model, checkpoint dir) for every PARITY_CONFIGS entry, built once per session."""
    out = {}
    for i, (name, config) in enumerate(PARITY_CONFIGS.items()):
        model = build_hf_model(config, seed=i)
        path = tmp_path_factory.mktemp(f"hf_{name}")
        model.save_pretrained(path)
        out[name] = (model, str(path))
    return out


def random_tokens(config: ModelConfig, batch: int, seq: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, config.vocab_size, (batch, seq)).astype(np.int32)
