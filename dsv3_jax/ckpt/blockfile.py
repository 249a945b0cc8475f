"""One block of a converted checkpoint on disk: `blocks/<name>.safetensors`, its leaves under their dotted names
("params.attn.q_a.kernel", a QuantArray as "....values" and "....scales"), in our layout ([in, out]).

Writing (`write_block`): the leaves are packed back to back in an `direct.Arena` (`direct.packed`: the layout
`blocks.convert_block` already fills, so nothing is copied) and written with O_DIRECT behind a header padded with
spaces (the format allows it) to a multiple of 4096 bytes, into `<name>.safetensors.tmp`, fsynced, then renamed.
The bytes are a plain safetensors file: any safetensors reader opens it.

Reading (`BlockFiles`): headers are checked by the one safetensors header parser; a slice of a leaf is read with
positional reads of whole rows of its leading axis (bounded pieces), so a device's shard of a stacked expert
weight reads only its experts, and nothing is memory-mapped (the process's resident memory is what it keeps).
"""

from __future__ import annotations

import json
import os
import threading

import jax
import numpy as np

from dsv3_jax.ckpt import direct
from dsv3_jax.ckpt.blocks import count_nonfinite
from dsv3_jax.ckpt.safetensors import DTYPE_NAMES, DTYPES, read_header
from dsv3_jax.errors import ConvertError, SafetensorsError

SUFFIX = ".safetensors"
TMP_SUFFIX = ".safetensors.tmp"
READ_PIECE = 64 << 20  # bytes of rows read at once when a slice cuts an inner axis


def flat_arrays(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """{dotted name: array} of a saveable tree (nested dicts of arrays)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_arrays(value, name + "."))
        else:
            out[name] = value
    return out


def _header(arrays: dict[str, np.ndarray], offsets: dict[str, int]) -> bytes:
    entries = {}
    for key, offset in offsets.items():
        a = arrays[key]
        entries[key] = {"dtype": DTYPE_NAMES[np.dtype(a.dtype)], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
    text = json.dumps({"__metadata__": {"format": "dsv3_jax.block"}, **entries}, separators=(",", ":"))
    size = direct.align_up(8 + len(text)) - 8
    return size.to_bytes(8, "little") + text.encode().ljust(size)


def pack_into(arena: direct.Arena, arrays: dict[str, np.ndarray]) -> tuple[dict[str, int], int]:
    """Offsets of `arrays` in the packed layout, copying into `arena` each array not already in place there."""
    offsets, total = direct.packed([(k, a.shape, a.dtype) for k, a in arrays.items()])
    base = arena.take(max(total, 1)).ctypes.data
    for key, offset in offsets.items():
        a = np.asarray(arrays[key])
        if not (a.flags.c_contiguous and a.ctypes.data == base + offset):
            direct.view_at(arena, offset, a.shape, a.dtype)[...] = a
    return offsets, total


def write_block(directory: str, name: str, tree: dict, arena: direct.Arena) -> int:
    """Write one block's saveable tree to `directory/<name>.safetensors` (atomically); returns its data bytes."""
    arrays = {k: np.asarray(v) for k, v in flat_arrays(tree).items()}
    offsets, total = pack_into(arena, arrays)
    tmp, path = os.path.join(directory, name + TMP_SUFFIX), os.path.join(directory, name + SUFFIX)
    try:
        direct.write_file(tmp, _header(arrays, offsets), arena, total)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return total


def read_slice(fd: int, offset: int, shape: tuple[int, ...], dtype, index: tuple[slice, ...]) -> np.ndarray:
    """`array[index]` of a C-order array stored at byte `offset` of the file, as a new array: the rows of the
    leading axis that the index covers are read in pieces of at most READ_PIECE bytes and cut."""
    dtype = np.dtype(dtype)
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    ranges = [range(*sl.indices(n)) for sl, n in zip(index, shape, strict=True)]
    if any(r.step != 1 for r in ranges):
        raise ValueError(f"only unit-step slices are read, got {index}")
    if not shape:
        return _read_rows(fd, offset, np.empty((), dtype))
    out = np.empty([len(r) for r in ranges], dtype)
    row = dtype.itemsize * int(np.prod(shape[1:], dtype=np.int64))
    if all(len(r) == n for r, n in zip(ranges[1:], shape[1:], strict=True)):  # whole rows: read straight into out
        _read_rows(fd, offset + ranges[0].start * row, out)
        return out
    step = max(1, READ_PIECE // max(row, 1))
    for lo in range(0, len(ranges[0]), step):
        hi = min(lo + step, len(ranges[0]))
        rows = _read_rows(fd, offset + (ranges[0].start + lo) * row, np.empty((hi - lo, *shape[1:]), dtype))
        out[lo:hi] = rows[(slice(None), *index[1:])]
    return out


def _read_rows(fd: int, offset: int, out: np.ndarray) -> np.ndarray:
    """Fill the C-contiguous `out` with the file's bytes from `offset`."""
    view, done = memoryview(out.reshape(-1).view(np.uint8)), 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if not got:
            raise EOFError(f"file ended {offset + done} bytes in (truncated)")
        done += got
    return out


class BlockFiles:
    """Slices of the arrays of a converted checkpoint's block files (`read`), each file's header checked once."""

    def __init__(self, directory: str, allow_nonfinite: bool) -> None:
        self.directory, self.allow_nonfinite = directory, allow_nonfinite
        self._files: dict[str, tuple[int, dict, int]] = {}
        self._lock = threading.Lock()

    def _open(self, block: str) -> tuple[int, dict, int]:
        with self._lock:
            if block in self._files:
                return self._files[block]
            path = os.path.join(self.directory, block + SUFFIX)
            if not os.path.isfile(path):
                raise ConvertError(f"{path}: block {block} is missing")
            try:
                header, start = read_header(path)
            except SafetensorsError as e:
                raise ConvertError(f"block {block}: {e}") from e
            self._files[block] = (os.open(path, os.O_RDONLY), header, start)
            return self._files[block]

    def read(self, block: str, key: str, spec, index: tuple[slice, ...] = ()) -> np.ndarray:
        """Block `block`'s tensor `key` at `index`, checked against `spec`'s shape and dtype and (unless allowed)
        for NaN / Inf."""
        fd, header, start = self._open(block)
        path = os.path.join(self.directory, block + SUFFIX)
        entry = header.get(key)
        if entry is None:
            raise ConvertError(f"{path}: block {block} has no tensor {key}")
        dtype, shape = DTYPES[entry["dtype"]], tuple(entry["shape"])
        if shape != tuple(spec.shape) or dtype != np.dtype(spec.dtype):
            raise ConvertError(f"{path}: block {block} tensor {key} is {dtype}{list(shape)}, expected "
                               f"{np.dtype(spec.dtype)}{list(spec.shape)}")
        try:
            value = read_slice(fd, start + entry["data_offsets"][0], shape, dtype, index)
        except (OSError, EOFError) as e:
            raise ConvertError(f"{path}: cannot read block {block} tensor {key} ({e})") from e
        if not self.allow_nonfinite and (bad := count_nonfinite(value)):
            raise ConvertError(f"{path}: block {block} tensor {key} holds {bad} non-finite (NaN/Inf) value(s) "
                               f"in {value.size} read; pass allow_nonfinite=True (--allow-nonfinite) to accept")
        return value

    def read_tree(self, block: str, target: dict) -> dict:
        """The whole saveable tree of a block (numpy leaves) for a saveable target of ShapeDtypeStructs."""
        flat = jax.tree_util.tree_flatten_with_path(target)[0]
        leaves = [self.read(block, ".".join(str(p.key) for p in path), spec) for path, spec in flat]
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target), leaves)

    def close(self) -> None:
        with self._lock:
            for fd, _, _ in self._files.values():
                os.close(fd)
            self._files.clear()
