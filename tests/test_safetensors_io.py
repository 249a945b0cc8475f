"""Tests for dsv3_jax.ckpt.safetensors: round trips, interop with the reference library, views, errors, atomicity."""

from __future__ import annotations

import importlib
import json
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest

from dsv3_jax.ckpt.safetensors import (
    DTYPE_NAMES,
    DTYPES,
    INDEX_NAME,
    CheckpointReader,
    SafetensorsFile,
    checkpoint_files,
    read_header,
    save_file,
    write_sharded,
)
from dsv3_jax.errors import SafetensorsError

SHAPES = [(), (0,), (7,), (3, 5), (2, 3, 4)]


def _random(dtype: np.dtype, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random array of ``dtype``/``shape`` covering the dtype's bit patterns reasonably."""
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return (rng.standard_normal(size=shape) * 4).astype(np.float32).astype(dtype)


def _bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def _write_raw(path: Path, header: dict | bytes, data: bytes = b"", header_len: int | None = None) -> Path:
    """Write a hand-crafted safetensors file (header may be invalid on purpose)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def _sample_tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"t_{name.lower()}": _random(dt, (3, 4), rng) for name, dt in DTYPES.items()}


# ------------------------------------------------------------------------------------------
# Round trips and layout
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
def test_round_trip_every_dtype_byte_exact(tmp_path: Path, dtype_name: str) -> None:
    rng = np.random.default_rng(1234)
    dt = DTYPES[dtype_name]
    tensors = {f"x{i}": _random(dt, shape, rng) for i, shape in enumerate(SHAPES)}
    path = tmp_path / "rt.safetensors"
    save_file(tensors, path, metadata={"format": "np"})
    with SafetensorsFile(path) as f:
        assert f.keys() == sorted(tensors)
        assert f.metadata() == {"format": "np"}
        for name, want in tensors.items():
            got = f.get(name)
            assert f.info(name) == (dtype_name, want.shape)
            assert got.dtype == dt and got.shape == want.shape
            assert _bits(got) == _bits(want)


def test_header_layout_sorted_contiguous_padded(tmp_path: Path) -> None:
    tensors = _sample_tensors(1)
    path = tmp_path / "layout.safetensors"
    save_file(tensors, path)
    header, data_start = read_header(path)
    assert data_start % 8 == 0
    assert b"__metadata__" not in path.read_bytes()[:data_start]
    offset = 0  # the library orders tensors by alignment, then name: contiguous and gap-free in offset order
    for name in sorted(tensors, key=lambda n: header[n]["data_offsets"]):
        assert header[name]["data_offsets"] == [offset, offset + tensors[name].nbytes]
        offset += tensors[name].nbytes
    assert os.path.getsize(path) == data_start + offset


def test_non_contiguous_and_big_endian_inputs(tmp_path: Path) -> None:
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    tensors = {"t": base.T, "be": np.arange(5, dtype=">i4"), "s": base[:, ::2]}
    save_file(tensors, tmp_path / "x.safetensors")
    with SafetensorsFile(tmp_path / "x.safetensors") as f:
        for name, want in tensors.items():
            np.testing.assert_array_equal(f.get(name), want)
        assert f.info("be") == ("I32", (5,))


def test_dtype_tables_are_inverse() -> None:
    assert DTYPES["BF16"] == np.dtype(ml_dtypes.bfloat16)
    assert DTYPES["F8_E4M3"] == np.dtype(ml_dtypes.float8_e4m3fn)
    assert DTYPES["F8_E5M2"] == np.dtype(ml_dtypes.float8_e5m2)
    assert all(DTYPE_NAMES[dt] == name for name, dt in DTYPES.items())


# ------------------------------------------------------------------------------------------
# Interoperability with the reference safetensors library
# ------------------------------------------------------------------------------------------

NUMPY_DTYPES = ["F64", "F32", "F16", "I64", "I32", "I16", "I8", "U8", "BOOL"]
TORCH_DTYPES = {"BF16": (np.uint16, "int16"), "F8_E4M3": (np.uint8, "uint8"), "F8_E5M2": (np.uint8, "uint8")}


def test_interop_numpy_ours_to_reference(tmp_path: Path) -> None:
    st_numpy = importlib.import_module("safetensors.numpy")
    rng = np.random.default_rng(7)
    tensors = {n.lower(): _random(DTYPES[n], (4, 3), rng) for n in NUMPY_DTYPES}
    save_file(tensors, tmp_path / "ours.safetensors", metadata={"format": "np"})
    loaded = st_numpy.load_file(str(tmp_path / "ours.safetensors"))
    assert sorted(loaded) == sorted(tensors)
    for name, want in tensors.items():
        assert loaded[name].dtype == want.dtype and _bits(loaded[name]) == _bits(want)


def test_interop_numpy_reference_to_ours(tmp_path: Path) -> None:
    st_numpy = importlib.import_module("safetensors.numpy")
    rng = np.random.default_rng(8)
    tensors = {n.lower(): _random(DTYPES[n], (2, 5), rng) for n in NUMPY_DTYPES}
    st_numpy.save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"k": "v"})
    with SafetensorsFile(tmp_path / "ref.safetensors") as f:
        assert f.metadata() == {"k": "v"}
        for name, want in tensors.items():
            assert f.get(name).dtype == want.dtype and _bits(f.get(name)) == _bits(want)


def _torch_tensors(torch: Any, seed: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 5, generator=gen) * 4
    return {"bf16": x.to(torch.bfloat16), "f8_e4m3": x.to(torch.float8_e4m3fn), "f8_e5m2": x.to(torch.float8_e5m2)}


def _same_bits(ours: np.ndarray, ref: Any, torch: Any) -> bool:
    uint, tname = TORCH_DTYPES[DTYPE_NAMES[ours.dtype]]
    ref_bits = ref.contiguous().view(getattr(torch, tname)).numpy().view(uint)
    return ours.shape == tuple(ref.shape) and np.array_equal(ours.view(uint), ref_bits)


def test_interop_torch_reference_to_ours(tmp_path: Path) -> None:
    torch = importlib.import_module("torch")
    st_torch = importlib.import_module("safetensors.torch")
    tensors = _torch_tensors(torch, 0)
    st_torch.save_file(tensors, str(tmp_path / "ref.safetensors"))
    with SafetensorsFile(tmp_path / "ref.safetensors") as f:
        assert f.info("bf16")[0] == "BF16" and f.info("f8_e4m3")[0] == "F8_E4M3"
        for name, ref in tensors.items():
            assert _same_bits(f.get(name), ref, torch)


def test_interop_torch_ours_to_reference(tmp_path: Path) -> None:
    torch = importlib.import_module("torch")
    st_torch = importlib.import_module("safetensors.torch")
    rng = np.random.default_rng(9)
    ours = {n.lower(): _random(DTYPES[n], (3, 7), rng) for n in TORCH_DTYPES}
    save_file(ours, tmp_path / "ours.safetensors")
    loaded = st_torch.load_file(str(tmp_path / "ours.safetensors"))
    assert loaded["bf16"].dtype == torch.bfloat16 and loaded["f8_e4m3"].dtype == torch.float8_e4m3fn
    for name, arr in ours.items():
        assert _same_bits(arr, loaded[name], torch)


# ------------------------------------------------------------------------------------------
# Zero-copy read-only views
# ------------------------------------------------------------------------------------------


def _root_base(a: np.ndarray) -> object:
    while isinstance(a, np.ndarray) and a.base is not None:
        a = a.base
    return a.obj if isinstance(a, memoryview) else a


def test_get_returns_read_only_views_of_the_mmap(tmp_path: Path) -> None:
    path = tmp_path / "v.safetensors"
    save_file(_sample_tensors(2), path)
    before = path.read_bytes()
    with SafetensorsFile(path) as f:
        a, b = f.get("t_f32"), f.get("t_f32")
        assert not a.flags.writeable and not a.flags.owndata
        assert np.shares_memory(a, b)
        assert type(_root_base(a)).__name__ == "mmap"
        with pytest.raises(ValueError):
            a[0, 0] = 1.0
        assert not f.get("t_bf16").flags.writeable
    assert path.read_bytes() == before


def test_arrays_survive_close_and_get_after_close_fails(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    tensors = _sample_tensors(3)
    save_file(tensors, path)
    f = SafetensorsFile(path)
    kept = f.get("t_i64")
    f.close()
    np.testing.assert_array_equal(kept, tensors["t_i64"])
    with pytest.raises(SafetensorsError, match=r"c\.safetensors.*t_i64.*closed"):
        f.get("t_i64")


# ------------------------------------------------------------------------------------------
# Error cases
# ------------------------------------------------------------------------------------------


def _good_entry(nbytes: int = 16) -> dict:
    return {"dtype": "F32", "shape": [nbytes // 4], "data_offsets": [0, nbytes]}


def test_error_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "trunc.safetensors"
    save_file({"weight": np.ones((8, 8), np.float32)}, path)
    os.truncate(path, os.path.getsize(path) - 5)
    with pytest.raises(SafetensorsError, match=r"trunc\.safetensors.*'weight'.*truncated") as e:
        SafetensorsFile(path)
    assert "256" in str(e.value) and "251" in str(e.value)


def test_error_file_shorter_than_prefix(tmp_path: Path) -> None:
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    with pytest.raises(SafetensorsError, match=r"tiny\.safetensors.*3 bytes"):
        read_header(path)


def test_error_corrupt_header_json(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "badjson.safetensors", b'{"w": {"dtype": "F32", ', b"\0" * 16)
    with pytest.raises(SafetensorsError, match=r"badjson\.safetensors.*JSON"):
        read_header(path)


def test_error_non_utf8_header(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "badutf.safetensors", b"\xff\xfe{}     ")
    with pytest.raises(SafetensorsError, match=r"badutf\.safetensors.*UTF-8"):
        read_header(path)


def test_error_header_length_beyond_file(tmp_path: Path) -> None:
    path = _write_raw(tmp_path / "hlen.safetensors", b"{}      ", header_len=4096)
    with pytest.raises(SafetensorsError, match=r"hlen\.safetensors.*4096.*16 bytes"):
        read_header(path)


def test_error_bad_offsets(tmp_path: Path) -> None:
    header = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}
    path = _write_raw(tmp_path / "offs.safetensors", header, b"\0" * 16)
    with pytest.raises(SafetensorsError, match=r"offs\.safetensors.*'w'.*12 bytes, expected 16"):
        read_header(path)


def test_error_reversed_offsets(tmp_path: Path) -> None:
    header = {"w": {"dtype": "U8", "shape": [0], "data_offsets": [8, 4]}}
    path = _write_raw(tmp_path / "rev.safetensors", header, b"\0" * 16)
    with pytest.raises(SafetensorsError, match=r"rev\.safetensors.*'w'.*begin <= end"):
        read_header(path)


def test_error_unknown_dtype(tmp_path: Path) -> None:
    header = {"w": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}
    path = _write_raw(tmp_path / "dt.safetensors", header, b"\0" * 16)
    with pytest.raises(SafetensorsError, match=r"dt\.safetensors.*'w'.*unknown dtype 'F128'"):
        read_header(path)


@pytest.mark.parametrize("missing", ["dtype", "shape", "data_offsets"])
def test_error_entry_missing_field(tmp_path: Path, missing: str) -> None:
    entry = _good_entry()
    del entry[missing]
    path = _write_raw(tmp_path / "miss.safetensors", {"w": entry}, b"\0" * 16)
    with pytest.raises(SafetensorsError, match=rf"miss\.safetensors.*'w'.*missing '{missing}'"):
        read_header(path)


def test_error_absent_tensor(tmp_path: Path) -> None:
    path = tmp_path / "abs.safetensors"
    save_file({"present": np.zeros(3, np.int8)}, path)
    with SafetensorsFile(path) as f, pytest.raises(SafetensorsError, match=r"abs\.safetensors.*'nope'"):
        f.get("nope")
    with CheckpointReader(tmp_path) as r, pytest.raises(SafetensorsError, match=rf"{tmp_path.name}.*'nope'"):
        r.info("nope")


def test_error_index_names_absent_shard(tmp_path: Path) -> None:
    save_file({"a": np.zeros(2, np.float32)}, tmp_path / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "gone.safetensors"}}
    (tmp_path / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(SafetensorsError, match=rf"{re.escape(INDEX_NAME)}.*gone\.safetensors"):
        checkpoint_files(tmp_path)


def test_error_duplicate_tensor_across_shards(tmp_path: Path) -> None:
    save_file({"a": np.zeros(2, np.float32), "dup": np.zeros(1, np.int8)}, tmp_path / "one.safetensors")
    save_file({"b": np.zeros(2, np.float32), "dup": np.ones(1, np.int8)}, tmp_path / "two.safetensors")
    with pytest.raises(SafetensorsError, match=r"'dup'.*one\.safetensors.*two\.safetensors"):
        checkpoint_files(tmp_path)


def test_error_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(SafetensorsError, match=re.escape(str(tmp_path))):
        checkpoint_files(tmp_path)


def test_error_unsupported_dtype_on_write(tmp_path: Path) -> None:
    with pytest.raises(SafetensorsError, match=r"c\.safetensors.*'z'.*complex"):
        save_file({"z": np.zeros(2, np.complex64)}, tmp_path / "c.safetensors")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------
# Atomic writes
# ------------------------------------------------------------------------------------------


class _ExplodingArray:
    """Array-like with a valid dtype/shape whose data conversion fails (e.g. a failed device transfer)."""

    dtype = np.dtype(np.float32)
    shape = (1024,)

    def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
        raise RuntimeError("device transfer failed")


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "atomic.safetensors"
    tensors = {"a_first": np.ones(4096, np.float32), "b_boom": _ExplodingArray()}
    with pytest.raises(RuntimeError, match="device transfer failed"):
        save_file(tensors, path)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_preserves_existing_file_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "atomic.safetensors"
    save_file({"old": np.arange(3, dtype=np.int32)}, path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        save_file({"a": np.zeros(8, np.float32), "b": _ExplodingArray()}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["atomic.safetensors"]


def test_save_file_accepts_lazy_array_likes(tmp_path: Path) -> None:
    class Lazy:
        dtype, shape = np.dtype(ml_dtypes.bfloat16), (2, 3)

        def __array__(self, dtype: object = None, copy: object = None) -> np.ndarray:
            return np.full(self.shape, 1.5, ml_dtypes.bfloat16)

    save_file({"lazy": Lazy()}, tmp_path / "l.safetensors")
    with SafetensorsFile(tmp_path / "l.safetensors") as f:
        np.testing.assert_array_equal(f.get("lazy").astype(np.float32), np.full((2, 3), 1.5, np.float32))


# ------------------------------------------------------------------------------------------
# Checkpoint directories and sharded writing
# ------------------------------------------------------------------------------------------


def _stream(
    tensors: dict[str, np.ndarray], directory: Path, partial_counts: list[int]
) -> Iterator[tuple[str, np.ndarray]]:
    """Yield tensors while recording how many temporary shards had been written so far."""
    for name, arr in tensors.items():
        partial_counts.append(sum(p.name.endswith(".partial") for p in directory.iterdir()))
        yield name, arr


def test_write_sharded_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(11)
    dts = [DTYPES[n] for n in ("BF16", "F8_E4M3", "F32", "I64", "BOOL")]
    tensors = {f"layers.{i}.w": _random(dts[i % len(dts)], (16, 8 + i), rng) for i in range(10)}
    out = tmp_path / "ckpt"
    out.mkdir()
    counts: list[int] = []
    weight_map = write_sharded(_stream(tensors, out, counts), out, max_shard_bytes=1024, metadata={"format": "pt"})
    shards = sorted(set(weight_map.values()))
    assert len(shards) >= 3
    assert counts[-1] >= 1 and counts[0] == 0  # earlier shards were flushed while streaming
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", s) for s in shards)
    assert sorted(p.name for p in out.iterdir()) == sorted([*shards, INDEX_NAME])
    index = json.loads((out / INDEX_NAME).read_text())
    assert index["weight_map"] == weight_map and sorted(weight_map) == sorted(tensors)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    with CheckpointReader(out) as reader:
        assert reader.keys() == sorted(tensors)
        for name, want in tensors.items():
            assert reader.info(name) == (DTYPE_NAMES[want.dtype], want.shape)
            assert _bits(reader.get(name)) == _bits(want)
    for shard in shards:
        with SafetensorsFile(out / shard) as f:
            assert f.metadata() == {"format": "pt"}
            sizes = [tensors[n].nbytes for n in f]
            assert len(sizes) == 1 or sum(sizes) <= 1024


def test_write_sharded_oversized_tensor_gets_own_shard(tmp_path: Path) -> None:
    tensors = [("small", np.zeros(4, np.uint8)), ("huge", np.zeros(100, np.float64)), ("tail", np.ones(2, np.int16))]
    weight_map = write_sharded(iter(tensors), tmp_path, max_shard_bytes=64)
    assert len(set(weight_map.values())) == 3
    assert checkpoint_files(tmp_path)["huge"] == str(tmp_path / weight_map["huge"])


def test_write_sharded_failure_leaves_no_temp_shards(tmp_path: Path) -> None:
    def gen() -> Iterator[tuple[str, np.ndarray]]:
        for i in range(6):
            yield f"t{i}", np.full(64, i, np.float32)
        raise RuntimeError("producer died")

    with pytest.raises(RuntimeError, match="producer died"):
        write_sharded(gen(), tmp_path, max_shard_bytes=256)
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_files_single_and_glob_fallbacks(tmp_path: Path) -> None:
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir()
    multi.mkdir()
    save_file({"a": np.zeros(1, np.int8)}, single / "model.safetensors")
    save_file({"x": np.zeros(1, np.int8)}, single / "ignored.safetensors")
    assert checkpoint_files(single) == {"a": str(single / "model.safetensors")}
    save_file({"a": np.zeros(1, np.int8)}, multi / "p1.safetensors")
    save_file({"b": np.zeros(1, np.int8)}, multi / "p2.safetensors")
    assert checkpoint_files(multi) == {"a": str(multi / "p1.safetensors"), "b": str(multi / "p2.safetensors")}


def test_checkpoint_reader_opens_shards_lazily(tmp_path: Path) -> None:
    tensors = {f"t{i}": np.full(32, i, np.int32) for i in range(6)}
    write_sharded(iter(tensors.items()), tmp_path, max_shard_bytes=256)
    with CheckpointReader(tmp_path) as reader:
        assert len(reader._open) == 0
        np.testing.assert_array_equal(reader.get("t0"), tensors["t0"])
        assert len(reader._open) == 1
        assert not reader.get("t5").flags.writeable
        assert len(reader._open) == 2
