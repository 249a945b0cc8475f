"""The `dsv3` command line (`main`): one module per subcommand."""

from dsv3_jax.cli.main import main

__all__ = ["main"]
