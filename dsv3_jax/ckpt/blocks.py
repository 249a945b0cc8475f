"""Conversion blocks: which HF tensors make which block, each block's target cut from the abstract parameter
tree, the one shared check against that target, and the one function that converts a block.

Blocks: `embed` (embedding), `layer_{i:03d}` (decoder layer i, one slice of the "dense_layers" / "moe_layers"
stack, router bias included), `head` (final norm + output head), `mtp_{d}` (MTP depth d; its copies of the embedding
and head are checked and dropped). A block's tree is {collection: subtree}; a layer block's leaves lack the leading
stacked-layer axis ([E, in, out] for experts, [in, out] for other linear weights).

Weights: "fp32" / "bf16" store plain arrays of that dtype (router gate and bias stay float32, as the model keeps
them); "fp8" stores every linear weight the FP8 recipe covers as `QuantArray(values [.., K, N] e4m3, scales
[.., ceil(K/128), ceil(N/128)] f32)`, everything else bf16. FP8 tensors are dequantised in `dequantize_fp8` only.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.ckpt import direct
from dsv3_jax.ckpt.names import Entry, expected_entries
from dsv3_jax.ckpt.safetensors import DTYPES
from dsv3_jax.ckpt.sources import Source, rows_of
from dsv3_jax.config import ModelConfig
from dsv3_jax.errors import ConvertError
from dsv3_jax.model.api import abstract_variables
from dsv3_jax.model.axes import STACK_NAMES
from dsv3_jax.model.check import check_tree as _check_tree
from dsv3_jax.model.check import leaf_at
from dsv3_jax.quant.fp8 import BLOCK, QuantArray, dequantize, quantize_params, quantize_weight

WEIGHTS = ("fp32", "bf16", "fp8")
FP8 = "F8_E4M3"
FLOAT_DTYPES = ("F32", "BF16", "F16", "F64")
SCALE_SUFFIX = "_scale_inv"

Tree = dict


@dataclasses.dataclass(frozen=True)
class Block:
    """One unit of conversion: its HF tensors and where its variables sit in the model tree."""

    name: str
    entries: tuple[Entry, ...] = ()
    stack: str | None = None  # "dense_layers" / "moe_layers" for a decoder layer
    layer: int | None = None  # index of the layer inside its stack
    keys: tuple[str, ...] = ()  # top-level variable names of an unstacked block (e.g. "embed_tokens")
    copies: tuple[tuple[str, str], ...] = ()  # (MTP copy, the main HF tensor it duplicates): checked, not stored

    def local(self, entry: Entry) -> tuple[str, tuple[str, ...], tuple[int, ...]]:
        """(collection, path inside the block tree, index into that leaf) of one of its entries."""
        if self.stack is None:
            return entry.collection, entry.path, entry.index
        return entry.collection, entry.path[2:], entry.index[1:]

    def target(self, abstract: Tree) -> Tree:
        """The block's slice of the abstract variables: ShapeDtypeStruct (or QuantArray of them) leaves."""
        out = {}
        for collection, tree in abstract.items():
            if self.stack is not None:
                if self.stack in tree:
                    out[collection] = jax.tree_util.tree_map(
                        lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), tree[self.stack]["layers"])
            else:
                sub = {k: tree[k] for k in self.keys if k in tree}
                if sub:
                    out[collection] = sub
        return out

    def record(self) -> dict:
        """JSON description for the manifest (enough to rebuild `target`)."""
        return {"name": self.name, "stack": self.stack, "layer": self.layer, "keys": list(self.keys)}

    @classmethod
    def from_record(cls, record: dict) -> Block:
        return cls(record["name"], stack=record["stack"], layer=record["layer"], keys=tuple(record["keys"]))


def _block_key(entry: Entry) -> tuple[int, str]:
    head = entry.path[0]
    if head == "embed_tokens":
        return 0, "embed"
    if head in STACK_NAMES:
        return 1, f"layer_{int(entry.hf_name.split('.')[2]):03d}"
    if head in ("final_norm", "lm_head"):
        return 2, "head"
    return 3, head


def plan_blocks(config: ModelConfig, names: set[str]) -> list[Block]:
    """Blocks in write order (embedding, layers, head, MTP depths) for a checkpoint holding `names`."""
    entries, copies = expected_entries(config, names)
    groups: dict[tuple[int, str], list[Entry]] = {}
    for entry in entries:
        groups.setdefault(_block_key(entry), []).append(entry)
    blocks = []
    for (_, name), group in sorted(groups.items()):
        first = group[0]
        if first.path[0] in STACK_NAMES:
            blocks.append(Block(name, tuple(group), stack=first.path[0], layer=first.index[0]))
        else:
            prefix = ".".join(first.hf_name.split(".")[:3]) + "."  # "model.layers.{L + d}."
            mtp = [(c, m) for c, m in sorted(copies.items()) if c.startswith(prefix)]
            keys = tuple(dict.fromkeys(e.path[0] for e in group))
            blocks.append(Block(name, tuple(group), keys=keys, copies=tuple(mtp) if name.startswith("mtp_") else ()))
    return blocks


def abstract_tree(config: ModelConfig, weights: str) -> Tree:
    """The whole model's abstract variables for a weights format (cached: do not mutate). Only the architecture
    fields of `config` matter."""
    if weights not in WEIGHTS:
        raise ConvertError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    return _abstract_tree(config.replace(param_dtype="float32", dtype="float32", scan_layers=True), weights)


@functools.lru_cache(maxsize=16)
def _abstract_tree(config: ModelConfig, weights: str) -> Tree:
    if weights == "fp8":
        tree = _abstract_tree(config, "bf16")
        return {**tree, "params": jax.eval_shape(quantize_params, tree["params"])}
    return abstract_variables(config.replace(param_dtype="float32" if weights == "fp32" else "bfloat16"))


# ---------------------------------------------------------------- the one check against the abstract tree


def check_tree(tree: Tree, target: Tree, where: str) -> None:
    """Every leaf of `tree` must exist in `target` with its shape and dtype, and every target leaf must be there."""
    _check_tree(tree, target, where, error=ConvertError)


# ---------------------------------------------------------------- header-level checks of a source


def _at(want, index: tuple[int, ...]):
    """The target of one indexed slot (leading axes removed)."""
    cut = len(index)
    return jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape[cut:], s.dtype), want)


def _hf_shape(entry: Entry, want) -> tuple[int, ...]:
    shape = tuple(want.values.shape if isinstance(want, QuantArray) else want.shape)
    return shape[::-1] if entry.transpose else shape


def check_names(blocks: list[Block], source: Source) -> None:
    """Missing / unexpected tensors, by name (a `_scale_inv` is expected next to its weight)."""
    expected = {e.hf_name for b in blocks for e in b.entries} | {c for b in blocks for c, _ in b.copies}
    names = source.names()
    missing = sorted(expected - names)
    if missing:
        raise ConvertError(f"{source.description}: {len(missing)} missing tensor(s), first: {missing[:5]}")
    unexpected = sorted(n for n in names - expected if n.removesuffix(SCALE_SUFFIX) not in expected
                        or not n.endswith(SCALE_SUFFIX))
    if unexpected:
        raise ConvertError(f"{source.where(unexpected[0])}: unexpected tensor {unexpected[0]} "
                           f"({len(unexpected)} unexpected in total, first: {unexpected[:5]})")


def check_entry(entry: Entry, want, source: Source) -> None:
    """dtype, shape and (for FP8) the block scale of one HF tensor, from headers only."""
    name = entry.hf_name
    dtype, shape = source.info(name)
    if dtype not in (*FLOAT_DTYPES, FP8):
        raise ConvertError(f"{source.where(name)}: tensor {name} has dtype {dtype}, expected one of "
                           f"{(*FLOAT_DTYPES, FP8)}")
    expected = _hf_shape(entry, want)
    if tuple(shape) != expected:
        raise ConvertError(f"{source.where(name)}: tensor {name} has shape {tuple(shape)}, expected {expected}")
    scale = name + SCALE_SUFFIX
    if dtype != FP8:
        if scale in source:
            raise ConvertError(f"{source.where(scale)}: scale {scale} belongs to tensor {name}, which is {dtype}, "
                               "not FP8")
        return
    if scale not in source:
        raise ConvertError(f"{source.where(name)}: FP8 tensor {name} has no block scale {scale}")
    s_dtype, s_shape = source.info(scale)
    s_want = tuple(math.ceil(d / BLOCK) for d in shape)
    if len(shape) != 2 or s_dtype != "F32" or tuple(s_shape) != s_want:
        raise ConvertError(f"{source.where(scale)}: scale {scale} is {s_dtype}{list(s_shape)}, expected "
                           f"F32{list(s_want)} for FP8 tensor {name} of shape {list(shape)} ({BLOCK}x{BLOCK} blocks)")


def check_source(blocks: list[Block], source: Source, abstract: Tree) -> None:
    """Every check that needs no tensor data, for the whole source, before anything is written."""
    check_names(blocks, source)
    for block in blocks:
        target = block.target(abstract)
        for entry in block.entries:
            collection, path, index = block.local(entry)
            check_entry(entry, _at(leaf_at(target[collection], path), index), source)
        for copy, main in block.copies:
            if source.info(copy)[1] != source.info(main)[1]:
                raise ConvertError(f"{source.where(copy)}: tensor {copy} has shape {source.info(copy)[1]}, "
                                   f"expected {source.info(main)[1]} (a copy of {main})")


# ---------------------------------------------------------------- FP8: the one dequantisation, and quantisation


@functools.partial(jax.jit, static_argnames=("transpose", "dtype"))
def _dequantize(values: jax.Array, scales: jax.Array, transpose: bool, dtype: str) -> jax.Array:
    w = dequantize(QuantArray(values, scales), jnp.float32)
    return (w.T if transpose else w).astype(dtype)


def dequantize_fp8(values: np.ndarray, scales: np.ndarray, *, transpose: bool = False,
                   dtype: str = "float32") -> np.ndarray:
    """W = q · s[i // 128, j // 128] in float32 for q [A, B] and s [ceil(A/128), ceil(B/128)] (either layout: HF's
    `weight_scale_inv` against [out, in], or our scales against [in, out]); ragged edge blocks. Then optionally
    transposed and rounded to `dtype`, fused in one compiled pass (C-contiguous result)."""
    return np.asarray(_dequantize(values, scales, transpose, np.dtype(dtype).name))


@functools.partial(jax.jit, static_argnames=("transpose", "dtype"))
def _relayout(w: jax.Array, transpose: bool, dtype: str) -> jax.Array:
    return (w.T if transpose else w).astype(dtype)


_COMPILE_MIN_SIZE = 1 << 20  # elements; below this numpy is faster than compiling one more shape
_TILE_BYTES = 256  # a tile of the blocked transpose has this many bytes of each column: 256 rows of FP8, 128 of
# bf16 (each output row gets 4 whole cache lines per tile; measured against 64 rows for every dtype: FP8
# [7168, 2048] 1.1 -> 2.1 GB/s, [1536, 24576] 1.0 -> 1.3, bf16 [512, 18432] 1.6 -> 2.1, bf16 [4480, 7168] even)
_PAD = 64  # elements added to each row of a tile's copy (breaks power-of-two strides)
_SPLIT, _SPLIT_BYTES = 4, 64 << 20  # tensors this large are transposed by 4 threads
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def transpose_into(w_AB: np.ndarray, out_BA: np.ndarray) -> np.ndarray:
    """out = w.T for a 2-D array, in tiles of `_TILE_BYTES` // itemsize source rows, on raw bits (any 1/2/4/8-byte
    dtype; numpy copies without the GIL, so threads transposing different tensors run in parallel). Each tile is first
    copied into a buffer whose rows are `_PAD` elements longer: the source's row stride is often a power of two (2048
    bytes for an FP8 down projection), and walking a column at that stride maps every row to the same few cache sets —
    the padded copy ran 2–4× faster (0.47 → 1.0–1.8 GB/s for [7168, 2048] FP8, 0.9 → 2.1 GB/s for the bf16 head,
    `tests/test_convert_io.py` checks it against numpy)."""
    src, dst = w_AB.view(_UINT[w_AB.itemsize]), out_BA.view(_UINT[out_BA.itemsize])
    cols, tile_rows = src.shape[1], max(1, _TILE_BYTES // src.itemsize)

    def rows(start: int, stop: int) -> None:
        tile = np.empty((tile_rows, cols + _PAD), src.dtype)
        for i in range(start, stop, tile_rows):
            n = min(tile_rows, stop - i)
            tile[:n, :cols] = src[i:i + n]
            dst[:, i:i + n] = tile[:n, :cols].T

    if w_AB.nbytes < _SPLIT_BYTES:
        rows(0, src.shape[0])
        return out_BA
    step = -(-src.shape[0] // tile_rows // _SPLIT) * tile_rows  # a large tensor (the head): split over threads
    with concurrent.futures.ThreadPoolExecutor(_SPLIT, "dsv3-transpose") as pool:
        for part in [pool.submit(rows, i, min(i + step, src.shape[0])) for i in range(0, src.shape[0], step)]:
            part.result()
    return out_BA


def relayout(w: np.ndarray, transpose: bool, dtype, out: np.ndarray | None = None) -> np.ndarray:
    """Transpose (HF [out, in] → ours [in, out]) and cast, into `out` when given (the block buffer: no second
    copy). Same dtype: a tiled numpy transpose; a cast of a large tensor: one compiled pass; small ones: numpy."""
    dtype = np.dtype(dtype)
    if w.dtype == dtype and w.ndim == 2 and transpose and w.dtype.itemsize in _UINT:
        return transpose_into(w, out if out is not None else np.empty(w.shape[::-1], dtype))
    if w.size < _COMPILE_MIN_SIZE or w.dtype == dtype:
        w = w.T if transpose else w
        w = w if w.dtype == dtype else w.astype(dtype)
    else:
        w = np.asarray(_relayout(w, transpose, dtype.name))
    if out is None:
        return w
    out[...] = w
    return out


_quantize = jax.jit(quantize_weight)


def quantize_fp8(w: np.ndarray) -> QuantArray:
    """w [..., K, N] → QuantArray of numpy arrays (128×128 blocks, scale = amax / 448)."""
    q = _quantize(w)
    return QuantArray(np.asarray(q.values), np.asarray(q.scales))


# ---------------------------------------------------------------- converting one block


def rope_rows_to_pairs(w_OI: np.ndarray, period: int, rope_start: int, rope_dim: int) -> np.ndarray:
    """Reorder output rows of a HF weight from half-split rotary layout (rope_interleave=false) to adjacent pairs.

    Rows are grouped in blocks of `period`; inside each block rows [rope_start, rope_start + rope_dim) are rotary.
    """
    half = rope_dim // 2
    order = np.arange(rope_dim).reshape(2, half).T.reshape(-1)  # pair i ← (i, i + R/2)
    perm = np.arange(w_OI.shape[0]).reshape(-1, period)
    perm[:, rope_start:] = perm[:, rope_start:][:, order]
    return w_OI[perm.reshape(-1)]




def _read_scale(entry: Entry, source: Source) -> np.ndarray:
    name = entry.hf_name + SCALE_SUFFIX
    scale = source.read(name)
    if not np.all(np.isfinite(scale) & (scale >= 0)):
        raise ConvertError(f"{source.where(name)}: scale {name} of FP8 tensor {entry.hf_name} holds non-finite or "
                           "negative values")
    return scale


# dtype → (unsigned view, mask, value): an element is NaN or Inf exactly when `bits & mask == value`
_NONFINITE_BITS = {"float64": (np.uint64, 0x7FF0000000000000, 0x7FF0000000000000),
                   "float32": (np.uint32, 0x7F800000, 0x7F800000), "float16": (np.uint16, 0x7C00, 0x7C00),
                   "bfloat16": (np.uint16, 0x7F80, 0x7F80), "float8_e4m3fn": (np.uint8, 0x7F, 0x7F),
                   "float8_e5m2": (np.uint8, 0x7C, 0x7C)}
_CHUNK = 1 << 18  # elements per pass: temporaries of 256 KB come from the heap and are reused (4 MB ones were
# mapped afresh per pass: 250k page faults per GB checked)


def count_nonfinite(arr: np.ndarray) -> int:
    """How many elements of a float array are NaN or Inf (0 for other dtypes), from the exponent bits, in chunks."""
    flat = np.ascontiguousarray(arr).reshape(-1)
    spec = _NONFINITE_BITS.get(flat.dtype.name)
    if spec is None and not np.issubdtype(flat.dtype, np.inexact):
        return 0
    bad = 0
    for start in range(0, flat.size, _CHUNK):
        chunk = flat[start:start + _CHUNK]
        if spec is None:
            bad += chunk.size - int(np.count_nonzero(np.isfinite(chunk)))
        else:
            bad += int(np.count_nonzero((chunk.view(spec[0]) & spec[1]) == spec[2]))
    return bad


def _refuse_nonfinite(entry: Entry, source: Source, raw: np.ndarray) -> None:
    if not getattr(source, "allow_nonfinite", False) and (bad := count_nonfinite(raw)):
        raise ConvertError(f"{source.where(entry.hf_name)}: tensor {entry.hf_name} holds {bad} non-finite (NaN/Inf) "
                           f"value(s) of {raw.size}; pass allow_nonfinite=True (--allow-nonfinite) to accept them")


def convert_entry(entry: Entry, source: Source, want, config: ModelConfig, interleaved: bool, out=None,
                  rows: slice | None = None):
    """One HF tensor → its value in our layout ([in, out]) and the slot's dtype (or a QuantArray); bytes read.
    `out`: the slot's buffer (a QuantArray of two for FP8), written in place where the conversion allows.
    `rows`: only that range of the HF tensor's rows (2-D plain tensors: not FP8, no rotary permutation), in our
    layout (columns `rows` of a transposed tensor).
    NaN / Inf values are refused (ConvertError naming the tensor and file) unless `source.allow_nonfinite`."""
    rope = entry.rope is not None and not interleaved
    t = entry.transpose
    if rows is not None:
        raw = source.read_rows(entry.hf_name, rows.start, rows.stop)
        _refuse_nonfinite(entry, source, raw)
        return relayout(raw, t, want.dtype), raw.nbytes
    dequantise = None if out is None else _in_chunks(entry, source, want, rope)
    if dequantise is not None:
        dst = out.values if isinstance(want, QuantArray) else out
        scale = _read_scale(entry, source) if dequantise or isinstance(want, QuantArray) else None
        nbytes = _convert_in_chunks(entry, source, dst, scale if dequantise else None)
        nbytes += 0 if scale is None else scale.nbytes
        if not isinstance(want, QuantArray):
            return out, nbytes
        return QuantArray(out.values, np.ascontiguousarray(scale.T)), nbytes
    direct = (out is not None and not t and not rope and not isinstance(want, QuantArray)
              and DTYPES.get(source.info(entry.hf_name)[0]) == np.dtype(want.dtype))
    # straight into the block buffer when it can; else, when converting into a block buffer, a temporary
    # (this thread's reused buffer: consumed below before the thread reads again)
    raw = source.read(entry.hf_name, out) if direct else (
        source.read(entry.hf_name) if out is None else source.read_temp(entry.hf_name))
    _refuse_nonfinite(entry, source, raw)
    scale = _read_scale(entry, source) if raw.dtype == np.dtype(jnp.float8_e4m3fn) else None
    nbytes = raw.nbytes + (0 if scale is None else scale.nbytes)
    if direct:
        return raw, nbytes
    if scale is not None and isinstance(want, QuantArray) and not rope:
        values = relayout(raw, t, raw.dtype, None if out is None else out.values)
        return QuantArray(values, np.ascontiguousarray(scale.T if t else scale)), nbytes
    plain = not rope and not isinstance(want, QuantArray)
    if scale is not None:
        w = dequantize_fp8(raw, scale, transpose=t and plain, dtype=want.dtype if plain else "float32")
    else:
        w = relayout(raw, t and plain, want.dtype if plain else "float32", out if plain else None)
    if plain:
        return w, nbytes
    if rope:
        period = config.qk_head_dim if entry.rope == "q" else w.shape[0]
        w = rope_rows_to_pairs(w, period, period - config.qk_rope_head_dim, config.qk_rope_head_dim)
    w = w.T if t else w
    return (quantize_fp8(w) if isinstance(want, QuantArray) else relayout(w, False, want.dtype)), nbytes


TEMP_BYTES = 32 << 20  # a large tensor is read into a block buffer this many bytes of rows at a time
DEQUANT_BYTES = 8 << 20  # the same for an FP8 tensor dequantised on the way
CHUNK_THREADS = 4  # row chunks of one large tensor converted at once (one thread waits on the disk, two compute)


def _in_chunks(entry: Entry, source: Source, want, rope: bool) -> bool | None:
    """For a 2-D weight that goes into its block buffer in row chunks: whether it is dequantised on the way (an
    FP8 weight dequantised to a plain dtype, any size: XLA's dequantisation without its slow transpose, then the
    tiled numpy one, ran 1.5-3.5x faster) or not (a large weight kept in its dtype: an FP8 weight kept FP8, the
    bf16 head and embedding kept bf16); None for every other conversion. `want`: the slot's abstract value."""
    dtype, shape = source.info(entry.hf_name)
    src_dtype = DTYPES.get(dtype)
    fp8 = src_dtype == np.dtype(jnp.float8_e4m3fn)
    big = source.nbytes(entry.hf_name) > TEMP_BYTES
    dst = want.values if isinstance(want, QuantArray) else want
    if rope or len(dst.shape) != 2 or len(shape) != 2:
        return None
    if isinstance(want, QuantArray):
        return False if fp8 and big and np.dtype(dst.dtype) == src_dtype and entry.transpose else None
    if fp8:
        return True if entry.transpose else None
    return False if big and np.dtype(dst.dtype) == src_dtype else None


def _chunk_rows(entry: Entry, source: Source, dequantise: bool) -> list[tuple[int, int]]:
    """The row ranges a chunked weight is read in: TEMP_BYTES of rows (DEQUANT_BYTES when dequantising, whole
    128-row scale blocks; a dequantised chunk is a fresh XLA buffer: kept under glibc's mmap threshold it is
    reused, not faulted in)."""
    rows = source.info(entry.hf_name)[1][0]
    row_bytes = source.nbytes(entry.hf_name) // max(rows, 1)
    unit = BLOCK if dequantise else _TILE_BYTES  # whole tiles of any dtype
    step = max(unit, (DEQUANT_BYTES if dequantise else TEMP_BYTES) // row_bytes // unit * unit)
    return [(start, min(rows, start + step)) for start in range(0, rows, step)]


def read_plan(block: Block, source: Source, target: Tree, interleaved: bool) -> list[tuple[str, int, int]]:
    """(HF name, first row, end row) of every read `convert_block` makes for the block, in the order it makes
    them (the source reads them ahead: `Source.read_ahead`). Must follow `convert_entry`; a read missing here
    is still made, only not ahead."""
    plan = []
    for entry in block.entries:
        collection, path, index = block.local(entry)
        want = _at(leaf_at(target[collection], path), index)
        rope = entry.rope is not None and not interleaved
        name, scale = entry.hf_name, entry.hf_name + SCALE_SUFFIX
        whole = [(name, 0, rows_of(source.info(name)[1]))]
        scales = [(scale, 0, source.info(scale)[1][0])] if scale in source else []
        dequantise = _in_chunks(entry, source, want, rope)
        if dequantise is None:
            plan += whole + scales
        else:
            needs_scale = dequantise or isinstance(want, QuantArray)
            plan += (scales if needs_scale else []) + [(name, a, b) for a, b in _chunk_rows(entry, source, dequantise)]
    return plan


def _convert_in_chunks(entry: Entry, source: Source, out: np.ndarray, scale: np.ndarray | None) -> int:
    """out = the HF tensor (transposed when the entry is; dequantised with its block `scale` when given), in the
    row chunks of `_chunk_rows` on CHUNK_THREADS threads: each reads its chunk into its own reused buffer (no
    whole-tensor temporary: at the 671B shapes the head alone is 1.85 GB), checks it and puts it in place, so
    the disk reads one chunk while others are transposed. Returns the bytes read."""

    def chunk(start: int, stop: int) -> None:
        raw = source.read_temp(entry.hf_name, start, stop)
        _refuse_nonfinite(entry, source, raw)
        if scale is not None:
            raw = dequantize_fp8(raw, scale[start // BLOCK:-(-stop // BLOCK)], dtype=out.dtype)
        if entry.transpose:
            transpose_into(raw, out[:, start:stop])
        else:
            out[start:stop] = raw
        source.done_reading()

    direct.run_all(direct.shared_pool("chunks", CHUNK_THREADS), chunk,
                   _chunk_rows(entry, source, scale is not None))
    return source.nbytes(entry.hf_name)


def _allocate(target: Tree, arena: direct.Arena | None) -> Tree:
    """Buffers for a block's leaves: fresh arrays, or views packed into `arena` in the layout the block file
    is written in (`direct.packed`, dotted names of the saveable tree: the writer then copies nothing)."""
    if arena is None:
        return jax.tree_util.tree_map(lambda s: np.empty(s.shape, s.dtype), target)
    flat = jax.tree_util.tree_flatten_with_path(target)[0]  # a QuantArray's two leaves: values, scales
    names = [".".join(_key_name(k) for k in path) for path, _ in flat]
    offsets, total = direct.packed([(n, s.shape, s.dtype) for n, (_, s) in zip(names, flat, strict=True)])
    arena.take(max(total, 1))
    views = [direct.view_at(arena, offsets[n], s.shape, s.dtype) for n, (_, s) in zip(names, flat, strict=True)]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(target), views)


def _key_name(key) -> str:
    """A tree path element as the saved name's part (dict key, or a QuantArray field: "values" / "scales")."""
    return str(key.key) if hasattr(key, "key") else str(key.name)


def _view(slot, index: tuple[int, ...]):
    """The slot's buffer at `index` (a QuantArray of the two buffers for FP8)."""
    if isinstance(slot, QuantArray):
        return QuantArray(slot.values[index], slot.scales[index])
    return slot[index]


def _store(slot, index: tuple[int, ...], value) -> None:
    """Copy `value` into the slot unless it was converted in place."""
    pairs = ((slot.values, value.values), (slot.scales, value.scales)) if isinstance(slot, QuantArray) else (
        (slot, value),)
    for buf, part in pairs:
        if not np.may_share_memory(buf, part):
            buf[index] = part


def convert_block(block: Block, source: Source, target: Tree, config: ModelConfig, interleaved: bool,
                  pool: concurrent.futures.Executor | None = None,
                  arena: direct.Arena | None = None) -> tuple[Tree, int]:
    """Read, transform and assemble one block (no side effect but reading); returns (tree, bytes read).
    `pool`: threads that convert the block's tensors in parallel (each reads and converts whole tensors straight
    into the block's buffers); default one at a time. `arena`: build the block's buffers in it (reused from
    block to block: its pages are faulted in once), laid out as the block file is written."""
    tree = _allocate(target, arena)
    filled: dict[tuple, set] = {}

    def one(entry: Entry) -> int:
        collection, path, index = block.local(entry)
        slot = leaf_at(tree[collection], path)
        value, nbytes = convert_entry(entry, source, _at(leaf_at(target[collection], path), index), config,
                                      interleaved, out=_view(slot, index))
        _store(slot, index, value)
        source.done_reading()
        return nbytes

    if pool is None:
        sizes = [one(entry) for entry in block.entries]
    else:
        futures = [pool.submit(one, entry) for entry in block.entries]
        try:
            sizes = [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()
            concurrent.futures.wait(futures)
    for entry in block.entries:
        collection, path, index = block.local(entry)
        filled.setdefault((collection, path), set()).add(index)
    _check_filled(block.name, target, filled)
    check_tree(tree, target, block.name)
    return tree, sum(sizes)


def _check_filled(where: str, target: Tree, filled: dict[tuple, set]) -> None:
    """Every target leaf (every expert slot of a stacked one) was written by exactly one HF tensor."""
    for collection, sub in target.items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(sub, is_leaf=lambda x: isinstance(x, QuantArray))[0]:
            keys = tuple(getattr(p, "key", None) for p in path)
            indices = filled.get((collection, keys), set())
            count = math.prod(_leading(leaf, indices))
            if len(indices) != count:
                raise ConvertError(f"{where}: {collection}{jax.tree_util.keystr(path)} filled by "
                                   f"{len(indices)} of {count} HF tensors")


def _leading(leaf, indices: set) -> tuple[int, ...]:
    depth = len(next(iter(indices))) if indices else 0
    shape = leaf.values.shape if isinstance(leaf, QuantArray) else leaf.shape
    return tuple(shape[:depth]) if indices else (1,)
