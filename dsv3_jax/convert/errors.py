"""The one error type of the converter (a `CheckpointError`, hence a `ValueError`)."""

from __future__ import annotations

from dsv3_jax.hf_loader import CheckpointError


class ConvertError(CheckpointError):
    """A source or converted checkpoint cannot be read or written; the message names the file and the tensor."""
