"""Readers for the checkpoint formats `dsv3 convert` accepts, all seen through one small interface.

A `Source` maps HF tensor names (`model.layers.3.mlp.experts.7.up_proj.weight`, `..._scale_inv`) to tensors in HF
layout ([out, in] for linear weights) and their safetensors dtype strings ("F8_E4M3", "BF16", "F32", ...):

- `SafetensorsSource`: a HF directory (index + shards, one `model.safetensors`, or loose shards). Headers are read
  and validated up front; tensors are read with positional reads (`os.preadv`, thread-safe, the GIL released) into
  fresh arrays (no mmap), so the process holds only what the converter keeps and its resident memory does not grow
  with the checkpoint; several threads may read at once, and `read_ahead` reads a plan of reads ahead in large
  requests. The converter sets `direct_io`: reads then bypass the page cache (`dsv3_jax.ckpt.direct`).
- `TorchSource`: PyTorch `.pt` / `.bin` state dicts (torch imported only here, `weights_only=True`, mmapped).
  transformers' fused in-memory expert tensors (`mlp.experts.gate_up_proj` [E, 2I, D], `mlp.experts.down_proj`
  [E, D, I]) are presented as the per-expert names of the released layout.
- the official repository's model-parallel shards live in `dsv3_jax.ckpt.official`.

`dsv3_jax.ckpt.detect.open_source(path, config)` detects the format and finds the config.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

from dsv3_jax.ckpt import direct, readahead
from dsv3_jax.ckpt.safetensors import DTYPES, INDEX_NAME, checkpoint_files, read_header
from dsv3_jax.errors import ConvertError, SafetensorsError

TORCH_SUFFIXES = (".pt", ".pth", ".bin")
TORCH_INDEX_NAME = "pytorch_model.bin.index.json"


class Source:
    """HF-named tensors of one checkpoint. Subclasses fill `_info` (name → (dtype string, shape)) and `_read`."""

    description = "checkpoint"
    reads_into = False  # whether `_read` accepts `out`
    reads_rows = False  # whether `read_rows` reads only the rows asked for
    direct_io = False  # read with O_DIRECT where the source can (set by the converter: each byte is read once)

    def __init__(self) -> None:
        self._info: dict[str, tuple[str, tuple[int, ...]]] = {}

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __contains__(self, name: object) -> bool:
        return name in self._info

    def names(self) -> set[str]:
        """Every tensor name (HF naming)."""
        return set(self._info)

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        """(safetensors dtype string, shape) without reading data."""
        if name not in self._info:
            raise ConvertError(f"{self.description}: no tensor named {name}")
        return self._info[name]

    def nbytes(self, name: str) -> int:
        dtype, shape = self.info(name)
        return DTYPES[dtype].itemsize * int(np.prod(shape)) if dtype in DTYPES else 0

    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """The tensor as a fresh numpy array (HF layout, stored dtype), or read into `out` (C-contiguous, of the
        stored shape and dtype) where the source can."""
        dtype, shape = self.info(name)
        if out is None or not self.reads_into or out.shape != tuple(shape) or out.dtype != DTYPES.get(dtype) or (
                not out.flags.c_contiguous):
            value = self._read(name)
            if out is None:
                return value
            out[...] = value
            return out
        return self._read(name, out)

    def where(self, name: str) -> str:
        """The file(s) holding `name`, for error messages."""
        return self.description

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of the tensor (its first axis) as a fresh array."""
        return np.array(self.read(name)[start:stop])

    def read_temp(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) of the tensor (default all), possibly in a buffer this thread reuses: valid until
        the same thread's next `read_temp` (for a value consumed at once, e.g. transposed into a block buffer)."""
        value = self.read(name)
        return value if start == 0 and stop is None else value[start:stop]

    def read_ahead(self, plan: list[list[tuple[str, int, int]]]) -> None:
        """The reads to come as (name, first row, end row), in windows (a block's reads) in the order they come:
        the source may read them ahead (`dsv3_jax.ckpt.readahead`); no-op by default. Reads not in the plan work
        as before."""

    def done_reading(self) -> None:
        """This thread is done with what its `read_temp` calls returned."""
        direct.done_reading()

    def _read(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release open files."""


class SafetensorsSource(Source):
    """Tensors spread over safetensors files, read by file offset (see the module docstring)."""

    reads_into = reads_rows = True

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        dtype, shape = self.info(name)
        out = np.empty((stop - start, *shape[1:]), DTYPES[dtype])
        row = out.itemsize * math.prod(shape[1:])
        self._read_range(name, self._fd(self._files[name]), self._offsets[name] + start * row,
                         memoryview(out.reshape(-1).view(np.uint8)))
        return out

    def __init__(self, files: dict[str, str], description: str) -> None:
        """`files`: tensor name → absolute path of the file that holds it."""
        super().__init__()
        self.description = description
        self._files = files
        self._offsets: dict[str, int] = {}
        self._fds: dict[str, int] = {}
        self._direct_fds: dict[str, tuple[int, bool]] = {}
        self._lock = threading.Lock()
        self._ahead: readahead.ReadAhead | None = None
        self._held = threading.local()  # read-ahead items this thread's `read_temp` results still point into
        for path in sorted(set(files.values())):
            header, data_start = header_of(path)
            for name, entry in header.items():
                if files.get(name) == path:
                    self._info[name] = (entry["dtype"], tuple(entry["shape"]))
                    self._offsets[name] = data_start + entry["data_offsets"][0]
        for name, path in sorted(files.items()):
            if name not in self._info:
                raise ConvertError(f"{description}: the index puts tensor {name} in {os.path.basename(path)}, "
                                   f"but {path} has no such tensor")

    @classmethod
    def from_directory(cls, directory: str) -> SafetensorsSource:
        """A HF checkpoint directory (index, single `model.safetensors`, or loose `*.safetensors`)."""
        try:
            files = checkpoint_files(directory)
        except SafetensorsError as e:
            raise ConvertError(str(e)) from e
        index = os.path.join(directory, INDEX_NAME)
        return cls(files, index if os.path.isfile(index) else directory)

    def where(self, name: str) -> str:
        return self._files.get(name, self.description)

    def _fd(self, path: str) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def read_ahead(self, plan: list[list[tuple[str, int, int]]]) -> None:
        """Read the plan ahead on `readahead.STREAMS` threads (with O_DIRECT when `direct_io` is set)."""
        self._stop_reading_ahead()
        self._ahead = readahead.ReadAhead([[self._item(*read) for read in window] for window in plan])

    def _item(self, name: str, start: int, stop: int) -> readahead.Item:
        row = self._row_bytes(name)
        return readahead.Item((name, start, stop), self._fd_for(name)[0], self._offsets[name] + start * row,
                              (stop - start) * row)

    def _row_bytes(self, name: str) -> int:
        dtype, shape = self._info[name]
        return DTYPES[dtype].itemsize * math.prod(shape[1:])

    def _take(self, name: str, start: int, stop: int) -> tuple[np.ndarray, readahead.Item] | None:
        """The read-ahead's bytes of rows [start, stop) of `name`, if it has them (see `ReadAhead.take`)."""
        if self._ahead is None:
            return None
        try:
            return self._ahead.take((name, start, stop))
        except (OSError, EOFError) as e:
            raise ConvertError(f"{self._files[name]}: tensor {name}: {e}") from None

    def done_reading(self) -> None:
        for item in getattr(self._held, "items", ()):
            self._ahead.release(item)
        self._held.items = []
        direct.done_reading()

    def _stop_reading_ahead(self) -> None:
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None

    def _read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """Read in parallel pieces (`direct.read_into`: the disk serves several requests at once faster than
        one), through O_DIRECT when `direct_io` is set; from the read-ahead when it has the tensor."""
        dtype, shape = self._info[name]
        got = self._take(name, 0, rows_of(shape))
        if got is not None:
            view, item = got
            value = view.view(DTYPES[dtype]).reshape(shape)
            if out is None:
                out = value.copy()
            else:
                out[...] = value
            self._ahead.release(item)
            return out
        out = np.empty(shape, DTYPES[dtype]) if out is None else out
        fd, is_direct = self._fd_for(name)
        try:
            direct.read_into(fd, self._offsets[name], out, is_direct)
        except EOFError as e:
            raise ConvertError(f"{self._files[name]}: tensor {name}: {e}") from None
        return out

    def read_temp(self, name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        dtype, shape = self._info[name]
        stop = rows_of(shape) if stop is None else stop
        row = self._row_bytes(name)
        if self._ahead is not None:
            self.done_reading()  # this thread's previous result is consumed
        got = self._take(name, start, stop)
        if got is not None:
            raw, item = got
            self._held.items = [item]
        else:
            fd, is_direct = self._fd_for(name)
            try:
                raw = direct.read_range(fd, self._offsets[name] + start * row, (stop - start) * row, is_direct)
            except EOFError as e:
                raise ConvertError(f"{self._files[name]}: tensor {name}: {e}") from None
        return raw.view(DTYPES[dtype]).reshape(((stop - start), *shape[1:]) if shape else ())

    def _fd_for(self, name: str) -> tuple[int, bool]:
        """(fd, whether O_DIRECT) for reading tensor `name`: O_DIRECT only when `direct_io` is set."""
        path = self._files[name]
        if not self.direct_io:
            return self._fd(path), False
        with self._lock:
            if path not in self._direct_fds:
                self._direct_fds[path] = direct.open_direct(path, os.O_RDONLY)
            return self._direct_fds[path]

    def _read_range(self, name: str, fd: int, offset: int, view: memoryview) -> None:
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:done + (1 << 30)]], offset + done)
            if not got:
                raise ConvertError(f"{self._files[name]}: tensor {name}: file ended after {done} of {len(view)} "
                                   "bytes of a range (truncated)")
            done += got

    def close(self) -> None:
        self._stop_reading_ahead()
        with self._lock:
            for fd in [*self._fds.values(), *(fd for fd, _ in self._direct_fds.values())]:
                os.close(fd)
            self._fds.clear()
            self._direct_fds.clear()


def rows_of(shape: tuple[int, ...]) -> int:
    """Rows of a tensor as plans and row reads count them (a scalar is one row)."""
    return shape[0] if shape else 1


def header_of(path: str) -> tuple[dict[str, Any], int]:
    """A validated safetensors header and its data offset; any defect is a ConvertError naming the file."""
    try:
        return read_header(path)
    except (SafetensorsError, OSError) as e:
        raise ConvertError(str(e) if isinstance(e, SafetensorsError) else f"{path}: {e}") from e


_TORCH_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64",
                 "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "int64": "I64", "int32": "I32",
                 "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
_FUSED = re.compile(r"^(?P<prefix>.*\.mlp\.experts\.)(?P<kind>gate_up_proj|down_proj)$")


class TorchSource(Source):
    """PyTorch state dicts (`torch.save` files): one file, or shards listed by `pytorch_model.bin.index.json`."""

    def __init__(self, paths: list[str], description: str) -> None:
        super().__init__()
        self.description = description
        self._getters: dict[str, Callable[[], Any]] = {}
        self._where: dict[str, str] = {}
        for path in paths:
            for name, tensor in _torch_state_dict(path).items():
                self._add(path, name, tensor)

    def _add(self, path: str, name: str, tensor: Any) -> None:
        fused = _FUSED.match(name)
        if fused and tensor.ndim == 3:
            prefix, kind = fused["prefix"], fused["kind"]
            half = tensor.shape[1] // 2
            for j in range(tensor.shape[0]):
                if kind == "down_proj":
                    self._add(path, f"{prefix}{j}.down_proj.weight", tensor[j])
                else:
                    self._add(path, f"{prefix}{j}.gate_proj.weight", tensor[j, :half])
                    self._add(path, f"{prefix}{j}.up_proj.weight", tensor[j, half:])
            return
        if name in self._info:
            raise ConvertError(f"tensor {name} appears in both {self._where[name]} and {path}")
        dtype = _TORCH_DTYPES.get(str(tensor.dtype).removeprefix("torch."), str(tensor.dtype))
        self._info[name] = (dtype, tuple(int(d) for d in tensor.shape))
        self._getters[name] = lambda t=tensor: t
        self._where[name] = path

    def where(self, name: str) -> str:
        return self._where.get(name, self.description)

    def _read(self, name: str) -> np.ndarray:
        tensor = self._getters[name]().contiguous()
        dtype = self._info[name][0]
        if dtype == "BF16":
            import torch

            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        if dtype.startswith("F8"):
            import torch

            return tensor.view(torch.uint8).numpy().view(DTYPES[dtype]).copy()
        return tensor.numpy().copy()


def _torch_state_dict(path: str) -> dict[str, Any]:
    import torch

    try:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            loaded = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:  # torch raises many types for a bad file
        raise ConvertError(f"{path}: cannot read PyTorch state dict ({type(e).__name__}: {e})") from e
    for key in ("state_dict", "model"):
        if isinstance(loaded, dict) and set(loaded) == {key} and isinstance(loaded[key], dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(hasattr(v, "dtype") for v in loaded.values()):
        raise ConvertError(f"{path}: expected a dict of tensor name → tensor, found {type(loaded).__name__}")
    return loaded


def torch_files(directory: str) -> list[str]:
    index = os.path.join(directory, TORCH_INDEX_NAME)
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f).get("weight_map", {}).values()))
        paths = [os.path.join(directory, s) for s in shards]
        for path in paths:
            if not os.path.isfile(path):
                raise ConvertError(f"{index}: weight_map names {os.path.basename(path)} but {path} does not exist")
        return paths
    return sorted(os.path.join(directory, n) for n in os.listdir(directory) if n.endswith(TORCH_SUFFIXES))
