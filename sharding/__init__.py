"""Data, not code: `layouts.toml` holds the named mesh layouts and the logical-axis rules table.

This folder is installed as `dsv3_jax.parallel.tables` (see pyproject.toml); import the layouts from
`dsv3_jax.parallel`, never from here.
"""
