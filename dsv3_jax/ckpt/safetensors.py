"""Reading (our own) and writing (the `safetensors` library's) of safetensors files and HF checkpoint directories.

Why an own reader: `safetensors.numpy` cannot load F8_E4M3 tensors into numpy (it looks for
``numpy.float8_e4m3fn``, which numpy lacks), and the released DeepSeek-V3 checkpoint is F8_E4M3. This reader is
numpy + ml_dtypes, zero-copy and strict about headers. Writing goes through `safetensors.numpy.save_file`, which
does write BF16 and F8_E4M3 arrays. The on-disk format is
``[u64 little-endian header length N][N bytes of UTF-8 JSON header][raw tensor bytes]``; every
header entry is ``{"dtype": str, "shape": [int, ...], "data_offsets": [begin, end]}`` with
offsets in bytes relative to the start of the data region (byte ``8 + N`` of the file).

Reads are zero-copy: tensors are read-only numpy views of a read-only ``mmap`` of the file.
Writes are atomic: a temporary file in the target directory is fsynced, then ``os.replace``-d.
Multi-byte tensors are stored little-endian (this module assumes a little-endian host for the
ml_dtypes types, as every supported accelerator host is).
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import mmap
import os
import pathlib
import tempfile
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any

import ml_dtypes
import numpy as np
import safetensors.numpy as st_numpy

from dsv3_jax.errors import SafetensorsError, is_int

__all__ = [
    "DTYPES",
    "DTYPE_NAMES",
    "INDEX_NAME",
    "SINGLE_FILE_NAME",
    "CheckpointReader",
    "SafetensorsError",
    "SafetensorsFile",
    "checkpoint_files",
    "read_header",
    "save_file",
    "write_sharded",
]

PathLike = str | os.PathLike[str]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAME = "model.safetensors"
_METADATA_KEY = "__metadata__"
_HEADER_LEN_BYTES = 8
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # same cap as the reference implementation

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype(bool),
}
"""safetensors dtype string -> numpy dtype (little-endian)."""

DTYPE_NAMES: dict[np.dtype, str] = {dt: name for name, dt in DTYPES.items()}
"""numpy dtype -> safetensors dtype string (inverse of :data:`DTYPES`, used for writing)."""



# --------------------------------------------------------------------------------------------
# Header parsing
# --------------------------------------------------------------------------------------------


def _read_header_len(f: IO[bytes], path: str, file_size: int) -> int:
    """Header length N in bytes from the first 8 bytes; validated against ``file_size`` (bytes)."""
    if file_size < _HEADER_LEN_BYTES:
        raise SafetensorsError(f"{path}: file is {file_size} bytes, expected at least 8 (header length prefix)")
    n = int.from_bytes(f.read(_HEADER_LEN_BYTES), "little")
    if n > _MAX_HEADER_BYTES:
        raise SafetensorsError(f"{path}: header length {n} exceeds the {_MAX_HEADER_BYTES}-byte limit")
    if _HEADER_LEN_BYTES + n > file_size:
        raise SafetensorsError(
            f"{path}: header length {n} needs {_HEADER_LEN_BYTES + n} bytes but the file has {file_size} bytes"
        )
    return n


def _decode_header_json(raw: bytes, path: str) -> dict[str, Any]:
    """Decode the UTF-8 JSON header object."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise SafetensorsError(f"{path}: header is not valid UTF-8 ({e})") from e
    except json.JSONDecodeError as e:
        raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header must be a JSON object, found {type(header).__name__}")
    return header


def _check_entry_fields(name: str, entry: object, path: str) -> tuple[str, list[int], list[int]]:
    """Type-check one header entry; returns (dtype string, shape, [begin, end] offsets in bytes)."""
    if not isinstance(entry, dict):
        raise SafetensorsError(f"{path}: tensor {name!r}: entry must be an object, found {type(entry).__name__}")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise SafetensorsError(f"{path}: tensor {name!r}: entry is missing {key!r} (found keys {sorted(entry)})")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise SafetensorsError(f"{path}: tensor {name!r}: unknown dtype {dtype!r}, expected one of {sorted(DTYPES)}")
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        raise SafetensorsError(f"{path}: tensor {name!r}: shape must be a list of ints >= 0, found {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets)):
        raise SafetensorsError(f"{path}: tensor {name!r}: data_offsets must be [begin, end], found {offsets!r}")
    return dtype, shape, offsets


def _check_entry(name: str, entry: object, path: str, data_size: int) -> None:
    """Validate one header entry against its dtype/shape and the data region size (bytes)."""
    dtype, shape, (begin, end) = _check_entry_fields(name, entry, path)
    if not 0 <= begin <= end:
        raise SafetensorsError(f"{path}: tensor {name!r}: data_offsets {[begin, end]} must satisfy 0 <= begin <= end")
    expected = DTYPES[dtype].itemsize * math.prod(shape)
    if end - begin != expected:
        raise SafetensorsError(
            f"{path}: tensor {name!r}: data_offsets {[begin, end]} span {end - begin} bytes, "
            f"expected {expected} ({dtype} x shape {shape})"
        )
    if end > data_size:
        raise SafetensorsError(
            f"{path}: tensor {name!r}: data ends at data byte {end} but the file only has {data_size} data bytes "
            "(truncated file?)"
        )


def _check_layout(header: dict[str, dict[str, Any]], path: str, data_size: int) -> None:
    """The tensors must tile the data region exactly, as the format (and the reference library) requires: taken in
    offset order, the first begins at data byte 0, each begins where the previous ends (no overlap, no gap), and
    the last ends at the end of the file."""
    spans = sorted((e["data_offsets"][0], e["data_offsets"][1], name) for name, e in header.items())
    pos, prev = 0, None
    for begin, end, name in spans:
        if begin < pos:
            raise SafetensorsError(f"{path}: tensor {name!r} (data bytes [{begin}, {end}]) overlaps tensor {prev!r} "
                                   f"(which ends at data byte {pos})")
        if begin > pos:
            after = f"tensor {prev!r} ends at data byte {pos}" if prev else "the data region starts at byte 0"
            raise SafetensorsError(f"{path}: {begin - pos} unused bytes before tensor {name!r} (data bytes "
                                   f"[{begin}, {end}]): {after}; tensors must be contiguous")
        pos, prev = end, name
    if pos != data_size:
        raise SafetensorsError(f"{path}: {data_size - pos} bytes after the last tensor ({prev!r} ends at data byte "
                               f"{pos} of {data_size}); the file is longer than its header says")


def _parse_header(f: IO[bytes], path: str) -> tuple[dict[str, dict[str, Any]], dict[str, str], int]:
    """Parse and validate the header of open file ``f``; returns (tensors, metadata, data_start byte offset)."""
    file_size = os.fstat(f.fileno()).st_size
    n = _read_header_len(f, path, file_size)
    header = _decode_header_json(f.read(n), path)
    metadata = header.pop(_METADATA_KEY, None) or {}
    if not isinstance(metadata, dict):
        raise SafetensorsError(f"{path}: {_METADATA_KEY} must be an object, found {type(metadata).__name__}")
    data_start = _HEADER_LEN_BYTES + n
    for name, entry in header.items():
        _check_entry(name, entry, path, file_size - data_start)
    _check_layout(header, path, file_size - data_start)
    return header, metadata, data_start


def read_header(path: PathLike) -> tuple[dict[str, dict[str, Any]], int]:
    """Read and validate a safetensors header.

    Returns ``(header, data_start)``: ``header`` maps tensor name -> ``{"dtype", "shape", "data_offsets"}``
    (``__metadata__`` removed); ``data_start`` is the absolute byte offset of the data region, to which
    ``data_offsets`` are relative. Raises :class:`SafetensorsError` on any malformed or truncated file.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        header, _, data_start = _parse_header(f, path)
    return header, data_start


# --------------------------------------------------------------------------------------------
# Reading a single file
# --------------------------------------------------------------------------------------------


class _Closing:
    """`with reader:` returns the reader and closes it on exit."""

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SafetensorsFile(_Closing):
    """A read-only, memory-mapped safetensors file whose tensors are zero-copy numpy views.

    Arrays returned by :meth:`get` stay valid after :meth:`close` (they keep the mapping alive).
    """

    def __init__(self, path: PathLike) -> None:
        """Open ``path``, validate its header and mmap it read-only (the file is never modified)."""
        self.path = os.path.abspath(os.fspath(path))
        with open(self.path, "rb") as f:
            self._header, self._metadata, self._data_start = _parse_header(f, self.path)
            self._mmap: mmap.mmap | None = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def __contains__(self, name: object) -> bool:
        return name in self._header

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._header)

    def keys(self) -> list[str]:
        """Tensor names, sorted."""
        return sorted(self._header)

    def metadata(self) -> dict[str, str]:
        """The header's ``__metadata__`` object, or ``{}``."""
        return dict(self._metadata)

    def _entry(self, name: str) -> dict[str, Any]:
        if name not in self._header:
            raise SafetensorsError(f"{self.path}: no tensor named {name!r} ({len(self._header)} tensors in file)")
        return self._header[name]

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        """``(dtype string, shape)`` of tensor ``name`` without touching its data."""
        entry = self._entry(name)
        return entry["dtype"], tuple(entry["shape"])

    def get(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a read-only numpy view of the mapped file (no copy), with its dtype and shape."""
        entry = self._entry(name)
        if self._mmap is None:
            raise SafetensorsError(f"{self.path}: cannot read tensor {name!r}, the file is closed")
        shape = tuple(entry["shape"])
        offset = self._data_start + entry["data_offsets"][0]
        flat = np.frombuffer(self._mmap, dtype=DTYPES[entry["dtype"]], count=math.prod(shape), offset=offset)
        return flat.reshape(shape)

    def close(self) -> None:
        """Release the mapping; still-referenced arrays keep it alive until they are freed."""
        mm, self._mmap = self._mmap, None
        if mm is not None:
            # exported views may exist; the mapping is then released when the last one is garbage-collected
            with contextlib.suppress(BufferError):
                mm.close()


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _dtype_name(dtype: np.dtype, name: str, path: str) -> str:
    """safetensors dtype string for numpy ``dtype`` (byte order ignored: data is written little-endian)."""
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    if dt not in DTYPE_NAMES:
        raise SafetensorsError(f"{path}: tensor {name!r}: unsupported dtype {dt}, expected one of {sorted(DTYPES)}")
    return DTYPE_NAMES[dt]


def _tensor_spec(name: object, tensor: Any, path: str) -> tuple[str, tuple[int, ...]]:
    """(dtype string, shape) of an array-like, read from ``.dtype``/``.shape`` without converting its data."""
    if not isinstance(name, str) or not name or name == _METADATA_KEY:
        raise SafetensorsError(f"{path}: invalid tensor name {name!r}")
    if not (hasattr(tensor, "dtype") and hasattr(tensor, "shape")):
        raise SafetensorsError(f"{path}: tensor {name!r}: expected an array with .dtype/.shape, found {type(tensor)}")
    return _dtype_name(tensor.dtype, name, path), tuple(int(d) for d in tensor.shape)


def _little_endian(name: str, tensor: Any, spec: tuple[str, tuple[int, ...]], path: str) -> np.ndarray:
    """``tensor`` as a contiguous little-endian numpy array of the dtype and shape its spec promised."""
    arr = np.asarray(tensor)
    dtype, shape = spec
    if _dtype_name(arr.dtype, name, path) != dtype or arr.shape != shape:
        raise SafetensorsError(
            f"{path}: tensor {name!r}: converted to {arr.dtype}{list(arr.shape)}, expected {dtype}{list(shape)}"
        )
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    return np.require(arr, requirements="C")  # keeps 0-d arrays 0-d (np.ascontiguousarray does not)


def _check_metadata(metadata: Mapping[str, str] | None, path: str) -> dict[str, str]:
    metadata = dict(metadata or {})
    for k, v in metadata.items():
        if not (isinstance(k, str) and isinstance(v, str)):
            raise SafetensorsError(f"{path}: metadata must map str -> str, found {k!r}: {v!r}")
    return metadata


def _fsync_dir(directory: str) -> None:
    """Best-effort fsync of a directory so that renames into it are durable."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(path: str, write: Any) -> None:
    """Call ``write(tmp_path)`` for a temp file next to ``path``, fsync it, then rename it onto ``path``.

    On any exception the temp file is removed and ``path`` is left untouched.
    """
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_file(tensors: Mapping[str, Any], path: PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Atomically write ``tensors`` (name -> array) to a safetensors file at ``path`` (mode per the umask).

    Names, dtypes and metadata are checked here (errors name the file and tensor); the bytes are written by the
    `safetensors` library (`safetensors.numpy.save_file`, which writes BF16 and F8_E4M3 arrays too). Values need
    ``.dtype``/``.shape`` and are converted with ``np.asarray``. No partial file is ever left at ``path``.
    """
    path = os.path.abspath(os.fspath(path))
    specs = {name: _tensor_spec(name, t, path) for name, t in tensors.items()}
    meta = _check_metadata(metadata, path)
    arrays = {name: _little_endian(name, tensors[name], specs[name], path) for name in specs}
    _atomic_write(path, lambda tmp: st_numpy.save_file(arrays, tmp, metadata=meta or None))


# --------------------------------------------------------------------------------------------
# Checkpoint directories
# --------------------------------------------------------------------------------------------


def _load_index(index_path: str) -> dict[str, str]:
    """``weight_map`` (tensor name -> shard file name) of a HF ``*.safetensors.index.json``."""
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{index_path}: not a valid JSON index ({e})") from e
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise SafetensorsError(f"{index_path}: expected a 'weight_map' object of tensor name -> shard file name")
    return weight_map


def _files_from_index(directory: str, index_path: str) -> dict[str, str]:
    """Tensor name -> absolute shard path from the index, checking that every shard exists."""
    weight_map = _load_index(index_path)
    resolved = {shard: os.path.join(directory, shard) for shard in set(weight_map.values())}
    for shard, shard_path in sorted(resolved.items()):
        if not os.path.isfile(shard_path):
            raise SafetensorsError(f"{index_path}: weight_map names shard {shard!r} but {shard_path} does not exist")
    return {name: resolved[shard] for name, shard in weight_map.items()}


def _files_from_shards(shard_paths: list[str]) -> dict[str, str]:
    """Tensor name -> shard path by reading each shard's header; a name in two shards is an error."""
    files: dict[str, str] = {}
    for shard_path in shard_paths:
        for name in read_header(shard_path)[0]:
            if name in files:
                raise SafetensorsError(f"tensor {name!r} appears in both {files[name]} and {shard_path}")
            files[name] = shard_path
    return files


def checkpoint_files(directory: PathLike) -> dict[str, str]:
    """Tensor name -> absolute shard path for a HF checkpoint directory.

    Uses ``model.safetensors.index.json`` when present, else ``model.safetensors``, else every
    ``*.safetensors`` file in the directory. Raises :class:`SafetensorsError` if there is nothing to read.
    """
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        raise SafetensorsError(f"{directory}: checkpoint directory does not exist")
    index_path = os.path.join(directory, INDEX_NAME)
    single = os.path.join(directory, SINGLE_FILE_NAME)
    if os.path.isfile(index_path):
        files = _files_from_index(directory, index_path)
    elif os.path.isfile(single):
        files = _files_from_shards([single])
    else:
        files = _files_from_shards(sorted(glob.glob(os.path.join(glob.escape(directory), "*.safetensors"))))
    if not files:
        raise SafetensorsError(f"{directory}: no safetensors tensors found (no index, model.safetensors or shards)")
    return files


class CheckpointReader(_Closing):
    """Lazy reader for a HF checkpoint directory: each shard is opened (mmapped) on first use and cached."""

    def __init__(self, directory: PathLike) -> None:
        """Resolve the tensor -> shard map of ``directory`` (see :func:`checkpoint_files`); opens no shard yet."""
        self.directory = os.path.abspath(os.fspath(directory))
        self._files = checkpoint_files(self.directory)
        self._open: dict[str, SafetensorsFile] = {}

    def __contains__(self, name: object) -> bool:
        return name in self._files

    def __len__(self) -> int:
        return len(self._files)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def keys(self) -> list[str]:
        """Tensor names, sorted."""
        return sorted(self._files)

    def _shard(self, name: str) -> SafetensorsFile:
        if name not in self._files:
            raise SafetensorsError(f"{self.directory}: no tensor named {name!r} in checkpoint")
        path = self._files[name]
        if path not in self._open:
            self._open[path] = SafetensorsFile(path)
        return self._open[path]

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        """``(dtype string, shape)`` of tensor ``name``."""
        return self._shard(name).info(name)

    def get(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a read-only zero-copy numpy view of its memory-mapped shard."""
        return self._shard(name).get(name)

    def close(self) -> None:
        """Close every opened shard."""
        for f in self._open.values():
            f.close()
        self._open.clear()


# --------------------------------------------------------------------------------------------
# Sharded writing
# --------------------------------------------------------------------------------------------


def _shard_name(i: int, n: int) -> str:
    """Final HF shard file name for 1-based shard ``i`` of ``n``."""
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def _iter_shards(
    tensors_iter: Iterable[tuple[str, Any]], max_shard_bytes: int, directory: str
) -> Iterator[tuple[dict[str, Any], int]]:
    """Group ``(name, array)`` pairs into ``(tensors, nbytes)`` shards of at most ``max_shard_bytes`` bytes.

    A tensor larger than ``max_shard_bytes`` gets a shard of its own. Only one shard is held at a time.
    """
    seen: set[str] = set()
    shard: dict[str, Any] = {}
    size = 0
    for name, tensor in tensors_iter:
        dtype, shape = _tensor_spec(name, tensor, directory)
        if name in seen:
            raise SafetensorsError(f"{directory}: tensor {name!r} was given twice")
        seen.add(name)
        nbytes = DTYPES[dtype].itemsize * math.prod(shape)
        if shard and size + nbytes > max_shard_bytes:
            yield shard, size
            shard, size = {}, 0
        shard[name] = tensor
        size += nbytes
    if shard:
        yield shard, size


def _write_index(directory: str, weight_map: dict[str, str], metadata: dict[str, Any]) -> None:
    """Atomically write ``model.safetensors.index.json``."""
    index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
    data = (json.dumps(index, indent=2) + "\n").encode("utf-8")
    _atomic_write(os.path.join(directory, INDEX_NAME), lambda tmp: pathlib.Path(tmp).write_bytes(data))


def _write_temp_shards(
    tensors_iter: Iterable[tuple[str, Any]],
    directory: str,
    max_shard_bytes: int,
    metadata: dict[str, str],
    temps: list[tuple[str, list[str]]],
) -> int:
    """Write shards under temporary names, appending ``(temp path, tensor names)`` to ``temps``; returns total bytes."""
    token = uuid.uuid4().hex[:12]
    total = 0
    for shard, nbytes in _iter_shards(tensors_iter, max_shard_bytes, directory):
        tmp = os.path.join(directory, f".model-{len(temps) + 1:05d}.{token}.safetensors.partial")
        save_file(shard, tmp, metadata)
        temps.append((tmp, sorted(shard)))
        total += nbytes
    return total


def write_sharded(
    tensors_iter: Iterable[tuple[str, Any]],
    directory: PathLike,
    max_shard_bytes: int,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Stream ``(name, array)`` pairs into ``model-0000i-of-0000N.safetensors`` shards plus the index.

    Shards hold at most ``max_shard_bytes`` bytes of tensor data (a bigger tensor gets its own shard);
    only one shard's tensors are held at a time. Each shard is written atomically under a temporary
    name and renamed once N is known; the index (``metadata.total_size`` in bytes, plus ``metadata``,
    which is also each shard's ``__metadata__``) is written last. Returns the weight_map
    (tensor name -> shard file name). On failure the temporary shards are removed.
    """
    directory = os.path.abspath(os.fspath(directory))
    if max_shard_bytes <= 0:
        raise SafetensorsError(f"{directory}: max_shard_bytes must be > 0, found {max_shard_bytes}")
    meta = _check_metadata(metadata, directory)
    os.makedirs(directory, exist_ok=True)
    temps: list[tuple[str, list[str]]] = []
    weight_map: dict[str, str] = {}
    try:
        total = _write_temp_shards(tensors_iter, directory, max_shard_bytes, meta, temps)
        if not temps:
            raise SafetensorsError(f"{directory}: no tensors to write")
        for i, (tmp, names) in enumerate(temps, start=1):
            final = _shard_name(i, len(temps))
            os.replace(tmp, os.path.join(directory, final))
            weight_map.update(dict.fromkeys(names, final))
        _write_index(directory, weight_map, {**meta, "total_size": total})
    finally:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)
    _fsync_dir(directory)
    return dict(sorted(weight_map.items()))
