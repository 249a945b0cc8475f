"""Every error the package raises on purpose, in one place.

`Dsv3Error` is the common base: the command line turns any of them into one clear paragraph on stderr. Each is
also a `ValueError` (bad input: exit code 2) or a `RuntimeError` (a failure while working: exit code 1), so
callers may catch them by either.
"""

from __future__ import annotations

import errno
import os


class Dsv3Error(Exception):
    """Base of every dsv3-jax error; the message names the culprit (file, tensor, field, value) and what was
    expected."""

    exit_code = 2  # bad input


class ConfigError(Dsv3Error, ValueError):
    """A configuration field is missing, malformed or inconsistent; the message names the field."""


class InputError(Dsv3Error, ValueError):
    """Token ids, prompts, sequence lengths or sampling settings the model cannot take; the message says which."""


class QuantError(Dsv3Error, ValueError):
    """Malformed quantised tensors (scale shape, non-finite values); the message says which and why."""


class SafetensorsError(Dsv3Error, ValueError):
    """Malformed, truncated, missing or unwritable safetensors data; the message names the file."""


class CheckpointError(Dsv3Error, ValueError):
    """A checkpoint does not match its config: the message names the tensor, the file and what was expected."""


class ConvertError(CheckpointError):
    """A source or converted checkpoint cannot be read or written; the message names the file and the tensor."""


class TokenizerError(Dsv3Error, ValueError):
    """Tokenizer files or a chat template that cannot be used; the message names the file and the field."""


class DataError(Dsv3Error, ValueError):
    """Bad data-pipeline input: a file, tokenizer spec, token stream or saved state; the message says which."""


class ShardingError(Dsv3Error, ValueError):
    """A layout, mesh or rule that cannot place the model; the message names the layout, axis or parameter."""


class PlanError(Dsv3Error, ValueError):
    """An input the planner cannot plan for; the message names the field (chip, layout, chips, batch, ...)."""


class TrainingError(Dsv3Error, RuntimeError):
    """Training cannot go on (non-finite loss, a checkpoint from another config); the message says what to do."""

    exit_code = 1


def is_int(value: object) -> bool:
    """A Python int that is not a bool (True is an int to Python, not a size, a count or an offset): what the
    config, run-file and safetensors-header checks require of an integer field."""
    return isinstance(value, int) and not isinstance(value, bool)


def os_error_of(error: BaseException) -> OSError | None:
    """The OSError behind a failure of a library that wraps it (orbax, tensorstore, safetensors: chained, or only
    quoted in the message), if any — so disk full / read-only / permission problems reach the user as such."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen
        seen = seen.__cause__ or seen.__context__
    text = str(error).lower()
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG, errno.ENOTDIR):
        if os.strerror(code).lower() in text:
            return OSError(code, os.strerror(code))
    return None
