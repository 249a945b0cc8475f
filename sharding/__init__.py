"""Mesh layouts, the logical-axis → mesh-axis rules table (the only place mesh axis names appear), and the
sharded entry points built on them."""

from sharding.rules import LAYOUTS, Layout, ShardingError, get_layout, make_mesh, param_shardings, to_mesh_spec

__all__ = ["LAYOUTS", "Layout", "ShardingError", "get_layout", "make_mesh", "param_shardings", "to_mesh_spec"]
