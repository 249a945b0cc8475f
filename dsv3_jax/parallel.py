"""Expert parallelism: routed experts sharded over one mesh axis, tokens dispatched to the devices that hold
their experts with all-to-all inside `jax.shard_map`, and combined back the same way. Dropless.

Model code never names a mesh axis: a caller (see `sharding/`) activates `use_expert_parallel(ExpertParallel(...))`
around tracing, and `moe.MoE` picks the expert-parallel path when one is active.

Buffers have static shapes, so each (source, destination) pair reserves room for every one of the source's
token-expert pairs (the worst case): dropless at the cost of ep× the average receive buffer. Backends with
`ragged_all_to_all` can size them exactly; this module keeps the portable form that also runs on CPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

_ACTIVE: contextvars.ContextVar[ExpertParallel | None] = contextvars.ContextVar("expert_parallel", default=None)


def current_expert_parallel() -> ExpertParallel | None:
    return _ACTIVE.get()


@contextlib.contextmanager
def use_expert_parallel(ep: ExpertParallel | None):
    """Trace MoE layers expert-parallel inside this block (None: no-op)."""
    token = _ACTIVE.set(ep)
    try:
        yield ep
    finally:
        _ACTIVE.reset(token)


def _dispatch_slots(dest_M: jax.Array, ep: int) -> jax.Array:
    """Rank of each pair among the pairs going to the same destination device [M]."""
    onehot_ME = jax.nn.one_hot(dest_M, ep, dtype=jnp.int32)
    return jnp.sum((jnp.cumsum(onehot_ME, axis=0) - onehot_ME) * onehot_ME, axis=1)


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """Experts sharded over `expert_axis`; the token batch sharded over `token_axes` (which include it)."""

    mesh: Mesh
    expert_axis: str
    token_axes: tuple[str, ...]

    def __post_init__(self):
        if self.expert_axis not in self.token_axes:
            raise ValueError(f"expert axis {self.expert_axis!r} must be one of the token axes {self.token_axes}: "
                             "tokens are exchanged along it")

    @property
    def size(self) -> int:
        return self.mesh.shape[self.expert_axis]

    def routed_experts(self, x_BTD, gate_DE, bias_E, w_gate, w_up, w_down, config):
        """Same contract as `moe.routed_experts`; loads and the balance term are global over the token axes."""
        if config.n_routed_experts % self.size:
            raise ValueError(f"n_routed_experts={config.n_routed_experts} is not divisible by the "
                             f"{self.expert_axis!r} mesh axis of size {self.size}")
        tokens, experts = PartitionSpec(self.token_axes), PartitionSpec(self.expert_axis)
        body = jax.shard_map(
            lambda *args: self._local(*args, config=config), mesh=self.mesh,
            in_specs=(tokens, PartitionSpec(), PartitionSpec(), experts, experts, experts),
            out_specs=(tokens, PartitionSpec(), PartitionSpec()), check_vma=False)
        return body(x_BTD, gate_DE, bias_E, w_gate, w_up, w_down)

    def _local(self, x_BTD, gate_DE, bias_E, w_gate, w_up, w_down, *, config):
        from dsv3_jax.moe import EXPERT_FFNS, balance_term, resolve_impl, route

        b, t, d = x_BTD.shape
        e, ep = config.n_routed_experts, self.size
        x_ND = x_BTD.reshape(b * t, d)
        weights_NX, experts_NX, scores_NE = route(jnp.einsum("nd,de->ne", x_ND.astype(jnp.float32), gate_DE),
                                                  bias_E, config)
        n, x = experts_NX.shape
        m, local_experts = n * x, e // ep
        dest_M, local_M = experts_NX.reshape(-1) // local_experts, experts_NX.reshape(-1) % local_experts
        slot_M = _dispatch_slots(dest_M, ep)
        token_M = jnp.arange(m) // x
        send_XMD = jnp.zeros((ep, m, d), x_ND.dtype).at[dest_M, slot_M].set(x_ND[token_M])
        send_ids = jnp.full((ep, m), local_experts, jnp.int32).at[dest_M, slot_M].set(local_M)
        recv_XMD = jax.lax.all_to_all(send_XMD, self.expert_axis, 0, 0)
        recv_ids = jax.lax.all_to_all(send_ids, self.expert_axis, 0, 0).reshape(-1, 1)
        valid = (recv_ids < local_experts).astype(jnp.float32)
        ffn = EXPERT_FFNS[resolve_impl(config.moe_impl)]
        out_RD = ffn(recv_XMD.reshape(ep * m, d), jnp.minimum(recv_ids, local_experts - 1), valid, w_gate, w_up,
                     w_down, config.matmul_policy)
        back_XMD = jax.lax.all_to_all(out_RD.reshape(ep, m, d), self.expert_axis, 0, 0)
        y_NXD = back_XMD[dest_M, slot_M].reshape(n, x, d)
        out_ND = jnp.einsum("nxd,nx->nd", y_NXD, weights_NX, preferred_element_type=jnp.float32).astype(x_ND.dtype)
        load_E = jax.lax.psum(jnp.bincount(experts_NX.reshape(-1), length=e), self.token_axes)
        balance = jax.lax.pmean(balance_term(scores_NE.reshape(b, t, e), experts_NX.reshape(b, t, -1), e),
                                self.token_axes)
        return out_ND.reshape(b, t, d), load_E, balance
