"""Loop-aware counts of a traced program, to correct XLA's `cost_analysis()`.

XLA's cost analysis counts a while loop's body once, and every layer stack here is a `lax.scan` (a while loop), so
its FLOPs and bytes for a 61-layer program are those of about one layer of each stack. `program_counts` walks the
program's jaxpr and counts its matmuls twice: as XLA does (each loop body once) and as the program runs (each body
times its trip count). Their ratio scales XLA's figures to the whole program. A `lax.cond` counts its costliest
branch (as XLA does), but runs nothing when one branch only returns zeros: the expert-parallel overflow rounds,
skipped when routing is balanced (`model.moe.expert_parallel`) — the figures are for balanced routing; blockwise
attention's skipped key blocks (a branch that passes its carry through) are counted as computed — an upper bound.

Units: FLOPs are 2 per multiply-add of every dot_general / ragged_dot (elementwise work is not counted); bytes are
the dots' operands and results. Shapes outside `shard_map` are global and are divided by the number of devices;
inside they are per device already.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.extend import core as jex_core

_DOTS = ("dot_general", "ragged_dot", "ragged_dot_general")


@dataclasses.dataclass(frozen=True)
class Counts:
    """Per-device matmul FLOPs and bytes, once per loop body (`*_once`, as XLA counts) and per run (`*_run`)."""

    flops_once: float = 0.0
    flops_run: float = 0.0
    bytes_once: float = 0.0
    bytes_run: float = 0.0

    def __add__(self, other: Counts) -> Counts:
        return Counts(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)))

    def scaled(self, once: float, run: float) -> Counts:
        return Counts(self.flops_once * once, self.flops_run * run, self.bytes_once * once, self.bytes_run * run)

    @property
    def flops_factor(self) -> float:
        return self.flops_run / self.flops_once if self.flops_once else 1.0

    @property
    def bytes_factor(self) -> float:
        return self.bytes_run / self.bytes_once if self.bytes_once else 1.0


def _nbytes(aval) -> int:
    return math.prod(aval.shape) * np.dtype(aval.dtype).itemsize


def _dot_counts(eqn) -> Counts:
    lhs, rhs = (v.aval for v in eqn.invars[:2])
    out = eqn.outvars[0].aval
    if eqn.primitive.name == "dot_general":
        (contract, _), _ = eqn.params["dimension_numbers"]
        k = math.prod(lhs.shape[d] for d in contract)
    else:  # ragged: every row of lhs [M, K] meets one group of rhs [G, K, N]
        k = lhs.shape[-1]
    flops = 2.0 * math.prod(out.shape) * k
    nbytes = float(_nbytes(lhs) + _nbytes(rhs) + _nbytes(out))
    return Counts(flops, flops, nbytes, nbytes)


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jex_core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jex_core.Jaxpr):
                yield item


def _only_zeros(jaxpr) -> bool:
    """A branch that computes nothing but broadcast constants (the skipped overflow round). A branch that passes
    its operands through (blockwise attention skipping a fully masked key block) is not one: the other branch is
    counted for every block — an upper bound on the work (causal skipping runs about half of the blocks)."""
    passes_through = any(v in jaxpr.invars for v in jaxpr.outvars if isinstance(v, jex_core.Var))
    computes = any(eqn.primitive.name in _DOTS or any(True for _ in _sub_jaxprs(eqn)) for eqn in jaxpr.eqns)
    return not passes_through and not computes


def _walk(jaxpr, devices: int) -> Counts:
    total = Counts()
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in _DOTS:
            total += _dot_counts(eqn).scaled(1.0 / devices, 1.0 / devices)
        elif name == "cond":
            branches = [b.jaxpr for b in eqn.params["branches"]]
            costliest = max((_walk(b, devices) for b in branches), key=lambda c: c.flops_once)
            skipped = any(_only_zeros(b) for b in branches)  # runs nothing when routing is balanced
            total += costliest.scaled(1.0, 0.0 if skipped else 1.0)
        elif name == "shard_map":
            total += _walk(eqn.params["jaxpr"], 1)
        else:
            subs = list(_sub_jaxprs(eqn))
            trips = eqn.params.get("length", 1) if name == "scan" else 1
            for sub in subs:
                total += _walk(sub, devices).scaled(1.0, float(trips))
    return total


def program_counts(fn, *args, devices: int = 1) -> Counts:
    """Counts of `fn(*args)` (abstract args are fine), per device of a mesh of `devices`."""
    return _walk(jax.make_jaxpr(fn)(*args).jaxpr, devices)
