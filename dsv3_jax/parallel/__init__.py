"""Mesh layouts, the logical-axis → mesh-axis rules table (the only place mesh axis names appear), and the
sharded entry points built on them."""

from dsv3_jax.errors import ShardingError
from dsv3_jax.parallel.rules import LAYOUTS, Layout, get_layout, make_mesh, param_shardings, to_mesh_spec

__all__ = ["LAYOUTS", "Layout", "ShardingError", "get_layout", "make_mesh", "param_shardings", "to_mesh_spec"]
