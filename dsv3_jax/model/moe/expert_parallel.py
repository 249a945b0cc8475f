"""Expert parallelism: routed experts sharded over one mesh axis, token-expert pairs dispatched to the devices that
hold their experts with all-to-all inside `jax.shard_map`, and combined back the same way. Dropless.

Routing happens once, in `moe.layer.MoE`, on the (sharded) tokens; this module wraps only the dispatch and the
combine: `ExpertParallel.expert_ffn` has the same contract as the functions in `moe.dispatch`.

Model code never names a mesh axis: a caller (see `dsv3_jax.parallel`) activates
`use_expert_parallel(ExpertParallel(...))` around tracing, and `MoE` picks the expert-parallel path when one is
active.

Buffers have static shapes, so each (source, destination) pair reserves room for every one of the source's
token-expert pairs (the worst case): dropless at the cost of Y× the average receive buffer. Backends with
`ragged_all_to_all` can size them exactly; this module keeps the portable form that also runs on CPU.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.moe.dispatch import combine, expert_ffn

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
    onehot_MY = jax.nn.one_hot(dest_M, ep, dtype=jnp.int32)
    return jnp.sum((jnp.cumsum(onehot_MY, axis=0) - onehot_MY) * onehot_MY, axis=1)


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

    def expert_ffn(self, x_ND, experts_NX, weights_NX, w_gate, w_up, w_down, config: ModelConfig) -> jax.Array:
        """Same contract as `moe.dispatch` functions, with x, experts and weights sharded over the token axes."""
        if config.n_routed_experts % self.size:
            raise ValueError(f"n_routed_experts={config.n_routed_experts} is not divisible by the "
                             f"{self.expert_axis!r} mesh axis of size {self.size}")
        tokens, experts = PartitionSpec(self.token_axes), PartitionSpec(self.expert_axis)
        body = jax.shard_map(
            lambda *args: self._local(*args, config=config), mesh=self.mesh,
            in_specs=(tokens, tokens, tokens, experts, experts, experts), out_specs=tokens, check_vma=False)
        return body(x_ND, experts_NX, weights_NX, w_gate, w_up, w_down)

    def _local(self, x_ND, experts_NX, weights_NX, w_gate, w_up, w_down, *, config: ModelConfig) -> jax.Array:
        """One device: send each pair to its expert's device, run the local experts, send results back, combine."""
        (n, d), x = x_ND.shape, experts_NX.shape[1]
        ep = self.size
        m, local_experts = n * x, config.n_routed_experts // ep
        dest_M, local_M = experts_NX.reshape(-1) // local_experts, experts_NX.reshape(-1) % local_experts
        slot_M = _dispatch_slots(dest_M, ep)
        token_M = jnp.arange(m) // x
        send_YMD = jnp.zeros((ep, m, d), x_ND.dtype).at[dest_M, slot_M].set(x_ND[token_M])
        send_ids_YM = jnp.full((ep, m), local_experts, jnp.int32).at[dest_M, slot_M].set(local_M)
        recv_YMD = jax.lax.all_to_all(send_YMD, self.expert_axis, 0, 0)
        recv_ids = jax.lax.all_to_all(send_ids_YM, self.expert_axis, 0, 0).reshape(-1, 1)
        valid = (recv_ids < local_experts).astype(jnp.float32)
        out_PD = expert_ffn(config.moe_impl)(recv_YMD.reshape(ep * m, d), jnp.minimum(recv_ids, local_experts - 1),
                                             valid, w_gate, w_up, w_down, config.matmul_policy)
        back_YMD = jax.lax.all_to_all(out_PD.reshape(ep, m, d), self.expert_axis, 0, 0)
        return combine(back_YMD[dest_M, slot_M].reshape(n, x, d), weights_NX)
