"""Reading a checkpoint source straight into sharded arrays: every leaf is built with
`jax.make_array_from_callback`, and each device's callback reads, converts and slices only the source tensors
its shard covers (one HF tensor at a time; a small byte-bounded cache keeps a tensor that several shards need).
Nothing holds the whole model in host memory, and in a multi-process run each process reads only the shards of
its own devices.

FP8-resident leaves (`QuantArray`) become two sharded arrays: the values take the leaf's sharding, the 128×128
block scales the same partition where their (128× smaller) dimensions divide it, else replicated on that axis.
"""

from __future__ import annotations

import collections
import functools
import itertools
import math

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from dsv3_jax.ckpt.blocks import FP8, Block, Tree, convert_entry
from dsv3_jax.ckpt.names import Entry
from dsv3_jax.ckpt.sources import Source
from dsv3_jax.config import ModelConfig
from dsv3_jax.errors import CheckpointError
from dsv3_jax.model.check import flat_leaves
from dsv3_jax.quant.fp8 import QuantArray

CACHE_BYTES = 1 << 29  # converted source tensors kept for the next shard that needs them


def _slots(blocks: list[Block]) -> dict[str, list[tuple[tuple[int, ...], Entry]]]:
    """Leaf key (as `flat_leaves` names it) → [(index into the leaf's leading axes, the entry that fills it)]."""
    out: dict[str, list] = collections.defaultdict(list)
    for block in blocks:
        for entry in block.entries:
            key = jax.tree_util.keystr(tuple(jax.tree_util.DictKey(k) for k in (entry.collection, *entry.path)))
            out[key].append((tuple(entry.index), entry))
    return out


class _Converted:
    """Source tensors converted to our layout, cached up to CACHE_BYTES (least recently used dropped first)."""

    def __init__(self, source: Source, config: ModelConfig, interleaved: bool) -> None:
        self.source, self.config, self.interleaved = source, config, interleaved
        self.cache: collections.OrderedDict[str, object] = collections.OrderedDict()
        self.bytes = 0

    def get(self, entry: Entry, want):
        if entry.hf_name in self.cache:
            self.cache.move_to_end(entry.hf_name)
            return self.cache[entry.hf_name]
        value, _ = convert_entry(entry, self.source, want, self.config, self.interleaved)
        size = sum(np.asarray(a).nbytes for a in jax.tree_util.tree_leaves(value))
        while self.cache and self.bytes + size > CACHE_BYTES:
            _, old = self.cache.popitem(last=False)
            self.bytes -= sum(np.asarray(a).nbytes for a in jax.tree_util.tree_leaves(old))
        if size <= CACHE_BYTES:
            self.cache[entry.hf_name], self.bytes = value, self.bytes + size
        return value


def _slot_target(want, lead: int):
    cut = lambda s: jax.ShapeDtypeStruct(s.shape[lead:], s.dtype)  # noqa: E731
    return QuantArray(cut(want.values), cut(want.scales)) if isinstance(want, QuantArray) else cut(want)


def _fill(index: tuple[slice, ...], spec, part: str | None, *, slots, want, converted: _Converted):
    """The numpy block `index` of one leaf (or of its values / scales), assembled from the entries it covers."""
    shape, dtype = spec.shape, spec.dtype
    ranges = [range(*sl.indices(size)) for sl, size in zip(index, shape, strict=True)]
    out = np.empty(tuple(len(r) for r in ranges), dtype)
    filled = 0
    for slot, entry in slots:
        lead = len(slot)
        if not all(i in ranges[a] for a, i in enumerate(slot)):
            continue
        where = tuple(ranges[a].index(i) for a, i in enumerate(slot))
        target = _slot_target(want, lead)
        rows = _row_range(entry, target, tuple(index[lead:]), converted)
        if rows is not None:  # a large plain tensor: read only the HF rows this shard covers
            value, _ = convert_entry(entry, converted.source, target, converted.config, converted.interleaved,
                                     rows=rows)
            local = list(index[lead:])
            local[1 if entry.transpose else 0] = slice(None)
            out[where] = value[tuple(local)]
        else:
            value = converted.get(entry, target)
            value = getattr(value, part) if part else value
            out[where] = np.asarray(value)[tuple(index[lead:])]
        filled += 1
    lead = len(slots[0][0])
    expected = math.prod(len(r) for r in ranges[:lead])
    if filled != expected:
        raise CheckpointError(f"shard {index} of a variable got {filled} of {expected} source tensors")
    return out


ROW_READ_BYTES = 1 << 26  # plain source tensors this large are read per shard, only the rows it covers


def _row_range(entry: Entry, target, index: tuple[slice, ...], converted: _Converted) -> slice | None:
    """The HF row range a shard `index` of a 2-D plain (not FP8, no rotary permutation, not quantised) tensor
    needs, when reading only those rows is worth it; else None (the whole tensor is read and cached)."""
    if isinstance(target, QuantArray) or len(target.shape) != 2 or (entry.rope is not None and not
                                                                     converted.interleaved):
        return None
    dtype, shape = converted.source.info(entry.hf_name)
    if dtype == FP8 or not converted.source.reads_rows or converted.source.nbytes(entry.hf_name) < ROW_READ_BYTES:
        return None
    rows = index[1 if entry.transpose else 0]
    start, stop, _ = rows.indices(shape[0])
    return None if (start, stop) == (0, shape[0]) else slice(start, stop)


def scale_sharding(sharding, values_shape, scales_shape):
    """The scales' sharding: the values' partition on every axis whose scale count it divides."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    spec = list(sharding.spec) + [None] * (len(values_shape) - len(sharding.spec))
    mesh = sharding.mesh
    for axis, names in enumerate(spec):
        if names is None:
            continue
        size = math.prod(mesh.shape[n] for n in ((names,) if isinstance(names, str) else names))
        if scales_shape[axis] % size:
            spec[axis] = None
    return NamedSharding(mesh, PartitionSpec(*spec))


def check_shardings(shardings, keys: set[str], error: type[Exception] = CheckpointError) -> None:
    """A sharding tree must give every variable (`keys`, as `flat_leaves` names them) one."""
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return
    missing = sorted(keys - set(flat_leaves(shardings, quant_leaf=True)))
    if missing:
        raise error(f"shardings tree does not match the variables: no sharding for {missing[:5]}")


def leaf_sharding(shardings, key: str, default):
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return shardings or default
    found = flat_leaves(shardings, quant_leaf=True)
    if key not in found:
        raise CheckpointError(f"shardings tree does not match the variables: no sharding for {key}")
    return found[key]


def place_from_source(source: Source, blocks: list[Block], abstract: Tree, config: ModelConfig, interleaved: bool,
                      shardings) -> Tree:
    """Every leaf of `abstract` that `blocks` fill, as a jax.Array read from `source` into its sharding (see the
    module docstring); leaves nothing fills (an absent MTP module) are left out.

    `shardings`: one Sharding for all, or a tree matching the variables with one Sharding per leaf (a QuantArray
    leaf takes one Sharding — its values', the scales follow — or a QuantArray of two). Default: the default
    device.
    """
    slots = _slots(blocks)
    converted = _Converted(source, config, interleaved)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    flat = jax.tree_util.tree_flatten_with_path(abstract, is_leaf=lambda x: isinstance(x, QuantArray))[0]
    check_shardings(shardings, set(slots))
    out: Tree = {}
    for path, want in flat:
        key = jax.tree_util.keystr(path)
        if key not in slots:  # e.g. the MTP module of a checkpoint saved without it (HF's save_pretrained)
            continue
        node = out
        for k in path[:-1]:
            node = node.setdefault(k.key, {})
        node[path[-1].key] = place_leaf(want, leaf_sharding(shardings, key, default), functools.partial(
            _fill, slots=slots[key], want=want, converted=converted))
    return out


def place_leaf(want, sharding, read):
    """One leaf as a jax.Array (or a QuantArray of two) built with `make_array_from_callback`: `read(index, spec,
    part)` returns the numpy block `index` of the leaf (`part` None), or of its "values" / "scales"; each device's
    shard is read on its own. `sharding`: a Sharding (a QuantArray leaf's values'; its scales follow, see
    `scale_sharding`) or, for a QuantArray leaf, a QuantArray of two."""
    if not isinstance(want, QuantArray):
        return jax.make_array_from_callback(want.shape, sharding, lambda index: read(index, want, None))
    if not isinstance(sharding, QuantArray):
        sharding = QuantArray(sharding, scale_sharding(sharding, want.values.shape, want.scales.shape))
    parts = {}
    for part, shard in (("values", sharding.values), ("scales", sharding.scales)):
        spec = getattr(want, part)
        parts[part] = jax.make_array_from_callback(spec.shape, shard, lambda index, spec=spec, part=part: read(
            index, spec, part))
    return QuantArray(parts["values"], parts["scales"])


def shard_bytes(variables) -> int:
    """Bytes of the shards this process holds (every addressable shard of every leaf)."""
    return sum(s.data.nbytes for leaf in jax.tree_util.tree_leaves(variables)
               for s in itertools.chain(leaf.addressable_shards))
