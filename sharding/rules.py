"""Named mesh layouts as data: mesh axes with sizes and ONE rules table mapping logical axes to mesh axes.

Model code names logical axes only (see the legend in `dsv3_jax/layers.py`). A layout maps each logical axis to a
mesh axis (or a tuple of them, or None = replicated). Two logical axes of one array landing on the same mesh
axis is an error here, not a silent un-sharding (flax keeps the first and drops the other).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


class ShardingError(ValueError):
    """A layout, mesh or rule that cannot place the model; the message names the layout, axis or parameter."""


MeshAxes = str | tuple[str, ...] | None


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh shape (axis name → size; -1 = whatever the devices leave) and the logical-axis rules."""

    name: str
    mesh_axes: tuple[tuple[str, int], ...]
    rules: tuple[tuple[str, MeshAxes], ...]

    @property
    def rules_dict(self) -> dict[str, MeshAxes]:
        return dict(self.rules)


# Parameters: "layers" is never sharded (scan slices it). Activations: act_* names.
_BASE = (("layers", None), ("norm", None), ("vocab", None), ("embed", None), ("q_lora", None), ("kv_lora", None),
         ("kv_a", None), ("q_heads", None), ("kv_heads", None), ("o_heads", None), ("mlp", None),
         ("mtp_concat", None), ("expert", None), ("expert_embed", None), ("expert_mlp", None), ("router_expert", None),
         ("act_batch", "data"), ("act_seq", None), ("act_embed", None))


def _rules(**overrides: MeshAxes) -> tuple[tuple[str, MeshAxes], ...]:
    table = dict(_BASE)
    unknown = set(overrides) - set(table)
    if unknown:
        raise ShardingError(f"unknown logical axes in rules: {sorted(unknown)}")
    table.update(overrides)
    return tuple(table.items())


LAYOUTS: dict[str, Layout] = {
    "single": Layout("single", (("data", 1),), _rules()),
    # 8 simulated CPU devices (tests): data x expert x tensor; attention data-parallel over data·expert with heads
    # over tensor, routed experts over expert (all-to-all dispatch), dense MLP and vocab over tensor.
    "cpu-8": Layout("cpu-8", (("data", 2), ("expert", 2), ("tensor", 2)), _rules(
        expert="expert", q_heads="tensor", kv_heads="tensor", o_heads="tensor", mlp="tensor", vocab="tensor",
        act_batch=("data", "expert"))),
    "cpu-8-ep": Layout("cpu-8-ep", (("expert", 8),), _rules(expert="expert", act_batch=("expert",))),
    "cpu-8-fsdp": Layout("cpu-8-fsdp", (("fsdp", 8),), _rules(
        embed="fsdp", expert_embed="fsdp", act_batch=("fsdp",))),
    "data": Layout("data", (("data", -1),), _rules()),
    # Single host, 8 GPUs, inference: experts spread 8 ways, attention heads 8 ways (tensor), batch replicated.
    "gpu-8-infer": Layout("gpu-8-infer", (("data", 1), ("expert", 8)), _rules(
        expert="expert", q_heads="expert", kv_heads="expert", o_heads="expert", mlp="expert", vocab="expert")),
    # Report-style training: 64-way expert parallelism across 8 nodes x 8 GPUs, data parallel over the rest,
    # dense weights sharded (FSDP) over the same 64 devices.
    "train-ep64": Layout("train-ep64", (("data", -1), ("expert", 64)), _rules(
        expert="expert", embed="expert", act_batch=("data", "expert"))),
    # TPU pod slice: FSDP over "fsdp", experts over "expert", heads over "tensor".
    "tpu-pod": Layout("tpu-pod", (("fsdp", -1), ("expert", 16), ("tensor", 4)), _rules(
        expert="expert", embed="fsdp", q_heads="tensor", kv_heads="tensor", o_heads="tensor", mlp="tensor",
        vocab="tensor", act_batch=("fsdp", "expert"))),
}


def get_layout(name: str) -> Layout:
    if name not in LAYOUTS:
        raise ShardingError(f"unknown layout {name!r}; known layouts: {', '.join(sorted(LAYOUTS))}")
    return LAYOUTS[name]


def make_mesh(layout: Layout, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with the layout's axes (Auto axis types) over `devices` (default: all)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [size for _, size in layout.mesh_axes]
    known = int(np.prod([s for s in sizes if s != -1]))
    if sizes.count(-1) > 1 or len(devices) % known:
        raise ShardingError(f"layout {layout.name!r} with axes {dict(layout.mesh_axes)} does not fit "
                            f"{len(devices)} devices")
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if int(np.prod(sizes)) != len(devices):
        raise ShardingError(f"layout {layout.name!r} needs {int(np.prod(sizes))} devices, found {len(devices)}")
    names = tuple(name for name, _ in layout.mesh_axes)
    return Mesh(np.asarray(devices).reshape(sizes), names)


def to_mesh_spec(logical: PartitionSpec | Sequence[str | None], layout: Layout, what: str = "array") -> PartitionSpec:
    """Map one array's logical axes to a mesh PartitionSpec; a mesh axis used twice is an error naming `what`."""
    rules = layout.rules_dict
    out, used = [], {}
    for axis in logical:
        if axis is None:
            out.append(None)
            continue
        if axis not in rules:
            raise ShardingError(f"layout {layout.name!r} has no rule for logical axis {axis!r} (in {what})")
        mesh_axes = rules[axis]
        for m in (mesh_axes,) if isinstance(mesh_axes, str) else (mesh_axes or ()):
            if m in used:
                raise ShardingError(f"layout {layout.name!r}: logical axes {used[m]!r} and {axis!r} of {what} "
                                    f"both map to mesh axis {m!r}")
            used[m] = axis
        out.append(mesh_axes)
    return PartitionSpec(*out)


def param_shardings(logical_tree, layout: Layout, mesh: Mesh):
    """NamedSharding tree for a tree of logical PartitionSpecs (e.g. `dsv3_jax.logical_axes(config)`)."""

    def one(path, spec):
        return NamedSharding(mesh, to_mesh_spec(spec, layout, jax.tree_util.keystr(path)))

    return jax.tree_util.tree_map_with_path(one, logical_tree, is_leaf=lambda x: isinstance(x, PartitionSpec))
