"""The DeepSeek-V3 transformer: decoder blocks, the dense and MoE stacks (scan or loop, optional remat), the
untied output head, and the multi-token-prediction (MTP) module (DESIGN.md §2)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.attention import MLA
from dsv3_jax.model.axes import CACHE_COLLECTION, ROUTER_COLLECTION, STACKS, STATS_COLLECTION
from dsv3_jax.model.layers import MLP, RMSNorm, constrain, weight
from dsv3_jax.model.moe.layer import MoE
from dsv3_jax.quant.matmul import einsum

_CHECKPOINT_POLICIES = {  # config.REMAT_POLICIES other than "none" → jax checkpoint policy
    "full": None,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class DecoderLayer(nn.Module):
    """Pre-norm block: x + MLA(norm(x)), then x + FFN(norm(x)) with a dense MLP or the MoE."""

    config: ModelConfig
    use_moe: bool
    cache_len: int = 0

    @nn.compact
    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array):
        c = self.config
        h_BTD = RMSNorm(c, c.hidden_size, name="attn_norm")(x_BTD)
        x_BTD = x_BTD + MLA(c, self.cache_len, name="attn")(h_BTD, positions_BT)
        h_BTD = RMSNorm(c, c.hidden_size, name="ffn_norm")(x_BTD)
        ffn = MoE(c, name="moe") if self.use_moe else MLP(c, c.intermediate_size, name="mlp")
        x_BTD = constrain(x_BTD + ffn(h_BTD), ("act_batch", "act_seq", "act_embed"))
        return x_BTD, None


def _layer_class(config: ModelConfig, looped: bool = False) -> type[DecoderLayer]:
    """The decoder layer, rematerialised per `remat_policy`; `looped`: it runs as the body of a rolled scan (the
    loop already keeps XLA from merging the recomputation with the forward)."""
    if config.remat_policy == "none":
        return DecoderLayer
    return nn.remat(DecoderLayer, policy=_CHECKPOINT_POLICIES[config.remat_policy], prevent_cse=not looped)


def _scan_unroll(config: ModelConfig, count: int, cache_len: int) -> int:
    """lax.scan's unroll for a stack of `count` layers: `scan_unroll` (0 = all of them), 1 with a decode cache.

    Unrolled, the training step keeps no zero-filled [layers, ...] residual stacks and dynamic slices of them: the
    tiny_stdlib step ran ~10% faster on 2 CPU cores (`small`'s ~4%) and compiled no slower; a decoding program
    compiled 40% slower unrolled and ran no faster, so programs with a cache always loop."""
    if cache_len:
        return 1
    return count if config.scan_unroll == 0 else min(config.scan_unroll, count)


class LayerStack(nn.Module):
    """`count` identical decoder layers: one nn.scan (parameters stacked on a leading "layers" axis) or a loop."""

    config: ModelConfig
    use_moe: bool
    count: int
    cache_len: int = 0

    @nn.compact
    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array) -> jax.Array:
        unroll = _scan_unroll(self.config, self.count, self.cache_len)
        layer_cls = _layer_class(self.config, looped=self.config.scan_layers and unroll == 1)
        if not self.config.scan_layers:
            for i in range(self.count):
                x_BTD, _ = layer_cls(self.config, self.use_moe, self.cache_len, name=f"layer_{i}")(
                    x_BTD, positions_BT)
            return x_BTD
        scanned = nn.scan(
            layer_cls, length=self.count, in_axes=(nn.broadcast,),
            variable_axes={"params": 0, ROUTER_COLLECTION: 0, STATS_COLLECTION: 0, CACHE_COLLECTION: 0},
            split_rngs={"params": True}, metadata_params={nn.PARTITION_NAME: "layers"}, unroll=unroll,
        )
        x_BTD, _ = scanned(self.config, self.use_moe, self.cache_len, name="layers")(x_BTD, positions_BT)
        return x_BTD


class MTPLayer(nn.Module):
    """One MTP depth: h' = W_eh [enorm(emb(t_{i+k})); hnorm(h^{k-1}_i)], one MoE block, then `head_norm`."""

    config: ModelConfig
    cache_len: int = 0

    @nn.compact
    def __call__(self, h_BTD: jax.Array, emb_BTD: jax.Array, positions_BT: jax.Array):
        c = self.config
        eh_proj = weight(self, "eh_proj", (2 * c.hidden_size, c.hidden_size), ("mtp_concat", "embed"), c)
        joined = jnp.concatenate([RMSNorm(c, c.hidden_size, name="enorm")(emb_BTD),
                                  RMSNorm(c, c.hidden_size, name="hnorm")(h_BTD)], axis=-1)
        x_BTD = einsum("btk,kd->btd", joined, eh_proj)
        use_moe = c.num_hidden_layers >= c.first_k_dense_replace and c.n_routed_experts > 0
        x_BTD, _ = _layer_class(c)(c, use_moe, self.cache_len, name="block")(x_BTD, positions_BT)
        return RMSNorm(c, c.hidden_size, name="head_norm")(x_BTD)


def head_logits(h_BTD: jax.Array, lm_head_DV: jax.Array) -> jax.Array:
    """The output head: hidden states [..., D] (compute dtype) · lm_head [D, V] → float32 logits [..., V]."""
    return einsum("...d,dv->...v", h_BTD, lm_head_DV).astype(jnp.float32)


class Transformer(nn.Module):
    """Embedding → dense stack → MoE stack → final norm → untied head; `mtp` runs the MTP depths on top.

    With cache_len > 0 every attention layer decodes against a latent cache of cache_len slots (collection
    "cache", see `attention.MLA`); positions then index cache slots and the mask is causal over slots.
    """

    config: ModelConfig
    cache_len: int = 0

    def setup(self):
        c = self.config
        self.embedding = self.param("embed_tokens", nn.with_logical_partitioning(
            nn.initializers.normal(c.init_std), ("vocab", "embed")), (c.vocab_size, c.hidden_size), c.weight_dtype)
        self.stacks = [LayerStack(c, use_moe, count, self.cache_len, name=name) for (name, use_moe), count
                       in zip(STACKS, (c.num_dense_layers, c.num_moe_layers), strict=True) if count > 0]
        self.final_norm = RMSNorm(c, c.hidden_size)
        self.lm_head = self.param("lm_head", nn.with_logical_partitioning(
            nn.initializers.normal(c.init_std), ("embed", "vocab")), (c.hidden_size, c.vocab_size), c.weight_dtype)
        self.mtp_layers = [MTPLayer(c, self.cache_len, name=f"mtp_{k}") for k in range(c.num_nextn_predict_layers)]

    def embed(self, tokens_BT: jax.Array) -> jax.Array:
        x_BTD = jnp.take(self.embedding, tokens_BT, axis=0).astype(self.config.compute_dtype)
        return constrain(x_BTD, ("act_batch", "act_seq", "act_embed"))

    def logits(self, h_BTD: jax.Array) -> jax.Array:
        """Untied output head → float32 logits [B,T,V] (`head_logits`: a chunked loss applies it chunk by chunk,
        so only the positions a caller asks for are ever materialised)."""
        return head_logits(h_BTD, self.lm_head)

    def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """tokens [B,T] → (logits [B,T,V] float32, final hidden state after the final norm [B,T,D])."""
        h_BTD = self.hidden_states(tokens_BT, positions_BT)
        return self.logits(h_BTD), h_BTD

    def hidden_states(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None) -> jax.Array:
        """tokens [B,T] → the final hidden state after the final norm [B,T,D] (no logits: callers that need only
        some positions' logits apply `logits` to those)."""
        positions_BT = self._positions(tokens_BT, positions_BT)
        x_BTD = self.embed(tokens_BT)
        for stack in self.stacks:
            x_BTD = stack(x_BTD, positions_BT)
        return self.final_norm(x_BTD)

    def mtp(self, h_BTD: jax.Array, tokens_BT: jax.Array, positions_BT: jax.Array | None = None) -> jax.Array:
        """MTP logits [depth, B, T, V]: depth k at position i predicts token i+k+1 from h^{k-1}_i and t_{i+k}.

        `tokens_BT` are the main model's input tokens; positions whose t_{i+k} lies past the end see a pad token
        (id 0) and must be masked by the caller (causality keeps earlier positions exact).
        """
        positions_BT = self._positions(tokens_BT, positions_BT)
        outputs = []
        for k, layer in enumerate(self.mtp_layers, start=1):
            shifted_BT = jnp.pad(tokens_BT[:, k:], ((0, 0), (0, k)))
            h_BTD = layer(h_BTD, self.embed(shifted_BT), positions_BT)
            outputs.append(self.logits(h_BTD))
        if not outputs:
            return jnp.zeros((0, *tokens_BT.shape, self.config.vocab_size), jnp.float32)
        return jnp.stack(outputs)

    def mtp_draft(self, h_BTD: jax.Array, next_tokens_BT: jax.Array, positions_BT: jax.Array) -> jax.Array:
        """Depth-1 MTP logits [B,T,V] at `positions` from main hidden states h_i and the tokens t_{i+1} (decoding)."""
        return self.logits(self.mtp_layers[0](h_BTD, self.embed(next_tokens_BT), positions_BT))

    @staticmethod
    def _positions(tokens_BT, positions_BT):
        if positions_BT is None:
            return jnp.broadcast_to(jnp.arange(tokens_BT.shape[1], dtype=jnp.int32), tokens_BT.shape)
        return positions_BT

    def forward_with_mtp(self, tokens_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(main logits [B,T,V], MTP logits [depth,B,T,V]); used to initialise every parameter."""
        logits_BTV, h_BTD = self(tokens_BT)
        return logits_BTV, self.mtp(h_BTD, tokens_BT)
