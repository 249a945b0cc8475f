"""Named mesh layouts as data: mesh axes with sizes and ONE rules table mapping logical axes to mesh axes.

The table itself is `sharding/layouts.toml` (installed as `dsv3_jax.parallel.tables`). Model code names logical
axes only (see the legend in `dsv3_jax/model/axes.py`). A layout maps each logical axis to a
mesh axis (or a tuple of them, or None = replicated). Two logical axes of one array landing on the same mesh
axis is an error here, not a silent un-sharding (flax keeps the first and drops the other).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import tomllib
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from dsv3_jax.errors import ShardingError
from dsv3_jax.model.axes import LOGICAL_AXES

MeshAxes = str | tuple[str, ...] | None
LAYOUTS_FILE = "layouts.toml"


@dataclasses.dataclass(frozen=True)
class Layout:
    """A mesh shape (axis name → size; -1 = whatever the devices leave) and the logical-axis rules."""

    name: str
    mesh_axes: tuple[tuple[str, int], ...]
    rules: tuple[tuple[str, MeshAxes], ...]
    doc: str = ""

    @property
    def rules_dict(self) -> dict[str, MeshAxes]:
        return dict(self.rules)


def _mesh_axes(value, where: str) -> MeshAxes:
    """A TOML rule value: "axis", ["a", "b"] or [] (replicated)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value) or None
    raise ShardingError(f"{where}: a rule must be a mesh axis name or a list of them, got {value!r}")


def read_layouts(text: str, where: str = LAYOUTS_FILE) -> dict[str, Layout]:
    """Parse the layouts table (TOML, see `sharding/layouts.toml`); every rule names a known logical axis."""
    try:
        data = tomllib.loads(text)
        base, layouts = data["base"], data["layouts"]
    except (tomllib.TOMLDecodeError, KeyError) as e:
        raise ShardingError(f"{where}: cannot read the layouts table ({e})") from e
    unknown = set(base) ^ set(LOGICAL_AXES)
    if unknown:
        raise ShardingError(f"{where}: [base] must give exactly the logical axes {LOGICAL_AXES}; differs in "
                            f"{sorted(unknown)}")
    out = {}
    for name, spec in layouts.items():
        rules = {**base, **spec.get("rules", {})}
        if set(rules) - set(base):
            raise ShardingError(f"{where}: layout {name!r} has rules for unknown logical axes "
                                f"{sorted(set(rules) - set(base))}")
        table = tuple((axis, _mesh_axes(v, f"{where} [layouts.{name}] {axis}")) for axis, v in rules.items())
        out[name] = Layout(name, tuple((k, int(v)) for k, v in spec["mesh"].items()), table, spec.get("doc", ""))
    return out


LAYOUTS: dict[str, Layout] = read_layouts(
    importlib.resources.files("dsv3_jax.parallel.tables").joinpath(LAYOUTS_FILE).read_text(encoding="utf-8"))


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
