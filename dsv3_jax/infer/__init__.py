"""Inference: batched generation on the MLA latent cache with MTP speculative decoding (`generate`) and the one
sampler (`sampling`)."""

from dsv3_jax.infer.generate import Generation, generate
from dsv3_jax.infer.sampling import Sampling, sample_logits

__all__ = ["Generation", "Sampling", "generate", "sample_logits"]
