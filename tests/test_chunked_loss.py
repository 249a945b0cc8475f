"""The chunked cross-entropy of the train step (no [B,T,V] logits) against the loss on whole logits: the same
loss and gradients (≤ 1e-5) for chunks that divide the sequence and that do not."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY

import dsv3_jax as d
from dsv3_jax.model.moe import STATS_COLLECTION
from dsv3_jax.model.transformer import Transformer
from dsv3_jax.train.losses import chunked_cross_entropy, masked_mean, mtp_losses, token_cross_entropy
from dsv3_jax.train.step import TrainConfig, make_loss_fn

CONFIG = TINY.replace(init_std=0.05)
B, T = 3, 40


@pytest.fixture(scope="module")
def setup():
    variables = d.init_variables(CONFIG, 0)
    rng = np.random.default_rng(0)
    batch = {"inputs": jnp.asarray(rng.integers(0, CONFIG.vocab_size, (B, T)), jnp.int32),
             "targets": jnp.asarray(rng.integers(0, CONFIG.vocab_size, (B, T)), jnp.int32),
             "mask": jnp.asarray(rng.random((B, T)) > 0.2)}
    want = jax.jit(jax.value_and_grad(_whole_logits_loss))(variables["params"], variables["router"], batch, 0.3)
    return variables, batch, want


def _whole_logits_loss(params, router, batch, lam):
    """The train step's loss as it was: whole logits from forward_with_mtp (λ-weighted MTP, no balance term)."""
    (logits, mtp_logits), _ = Transformer(CONFIG).apply(
        {"params": params, "router": router}, batch["inputs"], method=Transformer.forward_with_mtp,
        mutable=[STATS_COLLECTION])
    ce = masked_mean(token_cross_entropy(logits, batch["targets"]), batch["mask"])
    return ce + lam * jnp.mean(mtp_losses(mtp_logits, batch["targets"], batch["mask"]))


@pytest.mark.parametrize("chunk", [8, 7])  # divides T = 40; does not (the last chunk padded)
def test_chunked_loss_and_gradients_match_whole_logits(setup, chunk):
    variables, batch, (want, want_grads) = setup
    loss_fn = make_loss_fn(CONFIG, TrainConfig(balance_alpha=0.0, loss_chunk=chunk))
    (got, _), got_grads = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, variables["router"], batch, 0.3),
                                                     has_aux=True))(variables["params"])
    diff = max(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda a, b: float(jnp.max(jnp.abs(a - b))), got_grads, want_grads)))
    print(f"chunk {chunk}: loss {float(got):.7f} vs {float(want):.7f}, max gradient difference {diff:.2e}")
    assert abs(float(got) - float(want)) <= 1e-5 and diff <= 1e-5


def _all_shapes(jaxpr) -> set[tuple[int, ...]]:
    """Shapes of every value a jaxpr and its sub-jaxprs (scan bodies, checkpoints, ...) compute."""
    out = set()
    for eqn in jaxpr.eqns:
        out |= {tuple(v.aval.shape) for v in eqn.outvars}
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    out |= _all_shapes(sub)
    return out


def test_chunks_never_hold_whole_logits():
    """Forward and backward of the chunked loss compute no [B,T,V] array; the one-piece loss does."""
    h = jax.ShapeDtypeStruct((2, 4096, 64), jnp.bfloat16)
    head = jax.ShapeDtypeStruct((64, 129280), jnp.float32)
    targets = jnp.zeros((2, 4096), jnp.int32)

    def shapes(chunk):
        loss = lambda h, w: jnp.sum(chunked_cross_entropy(h, w, targets, chunk))  # noqa: E731
        return _all_shapes(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(h, head).jaxpr)

    assert (2, 4096, 129280) in shapes(0)
    assert (2, 4096, 129280) not in shapes(512) and (2, 512, 129280) in shapes(512)
