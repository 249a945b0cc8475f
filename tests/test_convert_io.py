"""The converter's disk I/O (`dsv3_jax.ckpt.direct`, `dsv3_jax.ckpt.blockfile`): O_DIRECT and buffered paths give
the same bytes, chunked transposes equal whole ones, block files are plain safetensors, slice reads equal numpy
slicing."""

from __future__ import annotations

import errno
import os
import time

import jax
import ml_dtypes
import numpy as np
import pytest
from convert_fixtures import write_fp8_checkpoint
from safetensors import safe_open

import dsv3_jax as d
from dsv3_jax.ckpt import blockfile, blocks, convert, direct, readahead
from dsv3_jax.errors import ConvertError


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return write_fp8_checkpoint(str(tmp_path_factory.mktemp("convert_io") / "fp8_src"))


def _block_bytes(out) -> dict[str, bytes]:
    folder = os.path.join(out, "blocks")
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


@pytest.mark.parametrize("weights", ["fp8", "bf16"])
def test_direct_chunked_and_buffered_conversions_write_the_same_bytes(fx, tmp_path, monkeypatch, weights):
    """Buffered whole-tensor I/O vs O_DIRECT with tiny pieces (many parallel transfers, unaligned tensor
    offsets) and tiny transpose chunks (every large-tensor path taken): identical block files."""
    monkeypatch.setattr(direct, "DIRECT_IO", False)
    convert(fx.directory, tmp_path / "buffered", weights, progress=False)
    monkeypatch.setattr(direct, "DIRECT_IO", hasattr(os, "O_DIRECT"))
    monkeypatch.setattr(direct, "PIECE", 3 * direct.ALIGN)
    monkeypatch.setattr(blocks, "TEMP_BYTES", 1000)
    monkeypatch.setattr(blocks, "_TILE_BYTES", 8)
    chunked = []
    original = blocks._convert_in_chunks
    monkeypatch.setattr(blocks, "_convert_in_chunks", lambda *a: chunked.append(a[0]) or original(*a))
    convert(fx.directory, tmp_path / "direct", weights, progress=False)
    assert len(chunked) >= (20 if weights == "fp8" else 1)  # FP8 weights kept FP8; the bf16 head
    assert _block_bytes(tmp_path / "buffered") == _block_bytes(tmp_path / "direct")
    _, a = d.load_pretrained(tmp_path / "direct")
    _, b = d.load_pretrained(fx.directory, weights=weights)
    for x, y in zip(*(jax.tree_util.tree_leaves(v) for v in (a, b)), strict=True):
        np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


def test_block_files_are_plain_safetensors_with_aligned_data(fx, tmp_path):
    """Any safetensors reader opens a block file (the reference library here), tensor for tensor; the data
    region starts on a 4096-byte boundary (the header is padded with spaces)."""
    out = tmp_path / "fp8"
    convert(fx.directory, out, "fp8", progress=False)
    path = os.path.join(out, "blocks", "layer_001.safetensors")
    files = blockfile.BlockFiles(os.path.join(out, "blocks"), allow_nonfinite=False)
    _, header, start = files._open("layer_001")
    assert start % direct.ALIGN == 0
    with safe_open(path, framework="pt") as f:
        assert set(f.keys()) == set(header)
        for key in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
            ours = files.read("layer_001", key, _spec(header[key]))
            theirs = f.get_tensor(key)
            assert list(theirs.shape) == list(ours.shape)
            np.testing.assert_array_equal(theirs.contiguous().view(-1).view(dtype=_torch_uint(ours)).numpy(),
                                          ours.reshape(-1).view({1: np.uint8, 2: np.int16, 4: np.int32}[ours.itemsize]))
    files.close()


def _spec(entry):
    from dsv3_jax.ckpt.safetensors import DTYPES

    return jax.ShapeDtypeStruct(tuple(entry["shape"]), DTYPES[entry["dtype"]])


def _torch_uint(a: np.ndarray):
    import torch

    return {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.itemsize]


def test_slice_reads_equal_numpy_slicing(tmp_path, monkeypatch):
    """Shards of a stored [E, K, N] array along each axis (inner axes cut: rows read in pieces) equal slicing."""
    monkeypatch.setattr(blockfile, "READ_PIECE", 700)
    a = np.random.default_rng(0).standard_normal((6, 10, 12)).astype(ml_dtypes.bfloat16)
    arena = direct.Arena()
    blockfile.write_block(str(tmp_path), "b", {"params": {"w": a, "s": np.float32(3.0)}}, arena)
    files = blockfile.BlockFiles(str(tmp_path), allow_nonfinite=False)
    spec = jax.ShapeDtypeStruct(a.shape, a.dtype)
    for index in [(slice(2, 4),), (slice(None), slice(5, 10)), (slice(1, 5), slice(None), slice(3, 9)),
                  (slice(None), slice(None), slice(0, 6))]:
        np.testing.assert_array_equal(files.read("b", "params.w", spec, index), a[index])
    assert files.read("b", "params.s", jax.ShapeDtypeStruct((), np.float32)) == 3.0
    with pytest.raises(ConvertError, match=r"b.safetensors: block b tensor params.w is bfloat16\[6, 10, "
                                                    r"12\], expected float32"):
        files.read("b", "params.w", jax.ShapeDtypeStruct(a.shape, np.float32))
    files.close()


def test_a_filesystem_without_o_direct_falls_back_to_buffered_io(tmp_path, monkeypatch):
    """open(O_DIRECT) failing with EINVAL (tmpfs does) → the same file opened buffered; the write still lands."""
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    fd, is_direct = direct.open_direct(str(tmp_path / "x"), os.O_WRONLY | os.O_CREAT)
    os.close(fd)
    assert not is_direct
    arena = direct.Arena()
    data = np.arange(5000, dtype=np.uint8)
    blockfile.write_block(str(tmp_path), "b", {"p": {"x": data}}, arena)
    files = blockfile.BlockFiles(str(tmp_path), allow_nonfinite=False)
    np.testing.assert_array_equal(files.read("b", "p.x", jax.ShapeDtypeStruct((5000,), np.uint8)), data)
    files.close()


@pytest.mark.parametrize("dtype", [ml_dtypes.float8_e4m3fn, ml_dtypes.bfloat16, np.float32])
@pytest.mark.parametrize("shape", [(200, 2048), (130, 77), (1, 5), (64, 64), (600, 300)])
def test_tiled_transpose_equals_numpy(monkeypatch, dtype, shape):
    """The padded-tile transpose (single thread, and split over threads) is exactly w.T, ragged tiles included."""
    w = np.random.default_rng(1).standard_normal(shape).astype(dtype)
    for split_bytes in (1 << 40, 1):
        monkeypatch.setattr(blocks, "_SPLIT_BYTES", split_bytes)
        out = np.empty(shape[::-1], dtype)
        blocks.transpose_into(w, out)
        np.testing.assert_array_equal(out.view(np.uint8), np.ascontiguousarray(w.T).view(np.uint8))


def _ahead_file(tmp_path, nbytes=1 << 20):
    data = np.random.default_rng(0).integers(0, 256, nbytes, np.uint8)
    path = tmp_path / "data.bin"
    data.tofile(path)
    return os.open(path, os.O_RDONLY), data


@pytest.mark.parametrize("piece", [direct.ALIGN, 4 << 20])
@pytest.mark.parametrize("order", ["plan", "reversed", "shuffled"])
def test_read_ahead_hands_out_the_right_bytes_in_any_order(tmp_path, monkeypatch, order, piece):
    """Items coalesced into small requests, each read as one piece or as several, three buffers reused: whatever
    order consumers take items in, each gets its own bytes or (not read yet) None, never a wait on a request the
    buffers hold back; one item is never taken and the rest still flow."""
    monkeypatch.setattr(readahead, "REQUEST_BYTES", 3 * direct.ALIGN + 100)
    monkeypatch.setattr(readahead, "PIECE_BYTES", piece)
    monkeypatch.setattr(readahead, "BUFFERS", 3)
    fd, data = _ahead_file(tmp_path)
    spans = [(i * 5000 + 7, 3000 + i % 3 * 1000) for i in range(60)]
    items = [readahead.Item(("t", i), fd, off, n) for i, (off, n) in enumerate(spans)]
    ahead = readahead.ReadAhead([items[:30], items[30:]])
    keys = list(range(1, 60))  # item 0 is never taken
    keys = {"plan": keys, "reversed": keys[::-1],
            "shuffled": list(np.random.default_rng(1).permutation(keys))}[order]
    served = 0
    for i in keys:
        if order == "plan":
            time.sleep(0.003)  # a consumer slower than the disk: the read-ahead keeps ahead of it
        got = ahead.take(("t", int(i)))
        if got is not None:
            view, item = got
            off, n = spans[int(i)]
            np.testing.assert_array_equal(view, data[off:off + n])
            ahead.release(item)
            served += 1
    assert ahead.take(("t", 5)) is None or order != "plan"  # taken once only
    ahead.close()
    os.close(fd)
    if order == "plan":
        assert served >= 20


@pytest.mark.parametrize("piece", [direct.ALIGN, 4 << 20])
def test_read_ahead_of_a_truncated_file_is_an_error_naming_it(tmp_path, monkeypatch, piece):
    """The file ends inside the request (in its second piece when pieces are one page): EOFError on take."""
    monkeypatch.setattr(readahead, "PIECE_BYTES", piece)
    fd, _ = _ahead_file(tmp_path, 10_000)
    ahead = readahead.ReadAhead([[readahead.Item(("t", 0), fd, 8_000, 4_000)]])
    try:
        deadline = time.time() + 10
        while ahead._queue[0].state in ("planned", "reading") and time.time() < deadline:
            time.sleep(0.01)
        with pytest.raises(EOFError, match="file ended"):
            ahead.take(("t", 0))
    finally:
        ahead.close()
        os.close(fd)


def test_read_ahead_of_an_empty_item_is_ready_and_empty(tmp_path):
    """A zero-byte item at an aligned offset (a request spanning no page) is still read: it does not wait forever."""
    fd, _ = _ahead_file(tmp_path, 10_000)
    ahead = readahead.ReadAhead([[readahead.Item(("t", 0), fd, direct.ALIGN, 0)]])
    try:
        deadline = time.time() + 10
        while ahead._queue[0].state in ("planned", "reading") and time.time() < deadline:
            time.sleep(0.01)
        assert ahead._queue[0].state == "ready"
        view, item = ahead.take(("t", 0))
        assert view.size == 0
        ahead.release(item)
    finally:
        ahead.close()
        os.close(fd)


@pytest.mark.parametrize("weights", ["fp8", "bf16"])
def test_conversion_with_and_without_read_ahead_writes_the_same_bytes(fx, tmp_path, monkeypatch, weights):
    """The read-ahead (small requests, few buffers: most reads served by it, some given up) changes no byte;
    a spy counts the reads it served."""
    from dsv3_jax.ckpt import sources

    monkeypatch.setattr(sources.SafetensorsSource, "read_ahead", sources.Source.read_ahead)
    convert(fx.directory, tmp_path / "plain", weights, progress=False)
    monkeypatch.undo()
    monkeypatch.setattr(readahead, "REQUEST_BYTES", 64 << 10)
    monkeypatch.setattr(readahead, "PIECE_BYTES", 3 * direct.ALIGN)  # several pieces per request
    monkeypatch.setattr(readahead, "BUFFERS", 3)
    monkeypatch.setattr(blocks, "TEMP_BYTES", 1000)
    served = []
    original = sources.SafetensorsSource._take
    monkeypatch.setattr(sources.SafetensorsSource, "_take",
                        lambda self, *a: (lambda got: served.append(got is not None) or got)(original(self, *a)))
    convert(fx.directory, tmp_path / "ahead", weights, progress=False)
    assert sum(served) > len(served) // 2
    assert _block_bytes(tmp_path / "plain") == _block_bytes(tmp_path / "ahead")
