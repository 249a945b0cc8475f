"""The converted checkpoint on disk, written block by block and read back into the scan layout.

    OUT/config.json     ModelConfig.to_hf_config() plus a "dsv3_jax" section {format, version, weights}
    OUT/manifest.json   format, weights, source, and one record per block (name, stack, layer, keys, sizes,
                        the HF dtype of each source tensor: export writes them back in that dtype)
    OUT/blocks/<name>.safetensors  the block's tree {collection: subtree} as one safetensors file (`blockfile`),
                        leaves under dotted names; a QuantArray as "<name>.values" (e4m3 [.., K, N]) and
                        "<name>.scales" (f32 [.., K/128, N/128]); written with O_DIRECT (`direct`)

`load_converted` reads it straight into shardings: every leaf is a `jax.make_array_from_callback` whose per-device
callbacks read their slice of each layer block's array (`blockfile.BlockFiles`: positional reads of the rows the
slice covers), so no step holds the model on the host and each process of a multi-process run reads only for its
own devices. Version 1 (orbax/zarr blocks, written before this format) is refused with a note to re-convert.

Everything is written into a sibling `OUT.tmp-<pid>-XXXX` directory renamed onto OUT at the end; on any failure
(Ctrl-C included: it waits for the block being saved, then cleans up) the temporary directory is removed, so OUT
is either complete or absent. The temporary directory records its owner (pid, host, process start time); a later
run removes the ones whose owner is gone (a SIGKILL, a power cut) and says so. Outputs follow the user's umask.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np

from dsv3_jax.ckpt import direct
from dsv3_jax.ckpt.blockfile import SUFFIX as BLOCK_SUFFIX
from dsv3_jax.ckpt.blockfile import BlockFiles, write_block
from dsv3_jax.ckpt.blocks import Block, Tree, abstract_tree, check_tree
from dsv3_jax.ckpt.place import check_shardings, leaf_sharding, place_leaf
from dsv3_jax.config import RUNTIME_FIELDS, ModelConfig
from dsv3_jax.errors import ConfigError, ConvertError
from dsv3_jax.model.api import Variables
from dsv3_jax.model.axes import STACK_NAMES
from dsv3_jax.quant.fp8 import QuantArray

FORMAT = "dsv3_jax.blocks"
VERSION = 2  # 1: orbax/zarr blocks (before O_DIRECT safetensors blocks)
MANIFEST = "manifest.json"
BLOCKS_DIR = "blocks"
OWNER_FILE = ".dsv3-owner.json"  # inside a temporary output directory: who is writing it


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux /proc), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            fields = f.read().rpartition(")")[2].split()
        return None if fields[0] == "Z" else fields[19]  # a zombie has finished
    except (OSError, IndexError):
        return None


def _alive(owner: dict) -> bool:
    """Whether the process that wrote `owner` (pid, host, start) still runs on this host."""
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    if os.path.isdir("/proc") and owner.get("start") is not None:
        return _start_time(pid) == owner["start"]
    return True


def sweep_stale(out: str, log: Callable[[str], None]) -> None:
    """Remove `out.tmp-*` directories whose recorded owner process is gone (naming each); leave, and name, those
    of a running process, of another host, or without an owner record."""
    for tmp in sorted(glob.glob(glob.escape(out) + ".tmp-*")):
        try:
            with open(os.path.join(tmp, OWNER_FILE), encoding="utf-8") as f:
                owner = json.load(f)
        except (OSError, ValueError):
            log(f"note: {tmp} is left in place: it has no {OWNER_FILE} (written by an older dsv3?); remove it by "
                "hand if no conversion is writing it")
            continue
        if owner.get("host") != socket.gethostname():
            log(f"note: {tmp} belongs to pid {owner.get('pid')} on host {owner.get('host')}; left in place")
        elif _alive(owner):
            log(f"note: {tmp} is being written by running pid {owner['pid']}; left in place")
        else:
            _remove_tree(tmp)
            log(f"removed {tmp}: an unfinished output of pid {owner.get('pid')}, which is no longer running")


def _remove_tree(path: str) -> None:
    """rmtree, repeated while something still writes into the tree (at most ~1 s)."""
    for _ in range(10):
        shutil.rmtree(path, ignore_errors=True)
        time.sleep(0.02)
        if not os.path.lexists(path):
            return
        time.sleep(0.08)


@contextlib.contextmanager
def deferred_interrupt(reraise: bool = True) -> Iterator[None]:
    """Hold SIGINT (Ctrl-C) back while the body runs, then raise KeyboardInterrupt if one came (`reraise`): a
    block being saved is finished before the cleanup removes its directory. A second Ctrl-C interrupts at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def hold(signum, frame):
        if received and reraise:
            raise KeyboardInterrupt
        received.append(signum)
        print("interrupt: finishing the block being written, then cleaning up", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received and reraise:
        raise KeyboardInterrupt


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _make_temp_dir(out: str) -> str:
    """`out.tmp-<pid>-<random>` (mode per the umask) with its owner record."""
    for _ in range(100):
        tmp = f"{out}.tmp-{os.getpid()}-{secrets.token_hex(3)}"
        try:
            os.mkdir(tmp, 0o777)
            break
        except FileExistsError:
            continue
    else:
        raise ConvertError(f"{out}: cannot find a free temporary directory name next to it")
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid()),
             "argv": sys.argv}
    write_json(os.path.join(tmp, OWNER_FILE), owner)
    return tmp


def check_output(out: str | os.PathLike) -> str:
    """The absolute output path, refused (before any work) when it exists or a component of it is a file."""
    out = os.path.abspath(os.fspath(out))
    if os.path.lexists(out):
        raise ConvertError(f"{out}: output already exists; choose a new path or remove it first")
    parent = os.path.dirname(out)
    while not os.path.lexists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory (the output must go inside a directory)", parent)
    return out


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, log: Callable[[str], None] | None = None) -> Iterator[str]:
    """Yield a fresh temporary directory next to `out`, renamed onto `out` when the body succeeds; removed else
    (after the block being saved, on Ctrl-C). Stale temporary directories of dead runs are removed first."""
    out = check_output(out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    sweep_stale(out, log or (lambda line: print(line, file=sys.stderr)))
    tmp = _make_temp_dir(out)
    try:
        yield tmp
        if os.path.lexists(out):
            raise ConvertError(f"{out}: output appeared while converting; not overwritten")
        os.remove(os.path.join(tmp, OWNER_FILE))
        os.rename(tmp, out)
    except BaseException:
        with deferred_interrupt(reraise=False):
            _remove_tree(tmp)
        raise


def write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def to_saveable(tree: Tree) -> Tree:
    """QuantArray nodes → {"values", "scales"} dicts (orbax stores plain nested dicts)."""
    if isinstance(tree, QuantArray):
        return {"values": tree.values, "scales": tree.scales}
    if isinstance(tree, dict):
        return {k: to_saveable(v) for k, v in tree.items()}
    return tree


def from_saveable(tree: Tree, target: Tree) -> Tree:
    """Inverse of `to_saveable`, guided by the target's structure."""
    if isinstance(target, QuantArray):
        return QuantArray(tree["values"], tree["scales"])
    if isinstance(target, dict):
        return {k: from_saveable(tree[k], v) for k, v in target.items() if k in tree}
    return tree


class BlockWriter:
    """Saves one block at a time as `directory/blocks/<name>.safetensors` (`write` may run in another thread than
    the caller's, one call at a time). `sizes`: block name → bytes written."""

    def __init__(self, directory: str) -> None:
        self.directory = os.path.join(directory, BLOCKS_DIR)
        self.sizes: dict[str, int] = {}
        os.makedirs(self.directory, exist_ok=True)
        self._arena = direct.Arena()  # for trees not built in an arena (copied in before writing)

    def write(self, name: str, tree: Tree, arena: direct.Arena | None = None) -> int:
        """Save `tree` (returns when it is on disk; a Ctrl-C meanwhile waits for it); returns its size in bytes.
        `arena`: the one `blocks.convert_block` built the tree in (written without a copy). A failed write is an
        OSError (disk full, read-only, ...) naming the block."""
        try:
            with deferred_interrupt():
                self.sizes[name] = write_block(self.directory, name, to_saveable(tree), arena or self._arena)
        except OSError as e:
            location = os.path.join(self.directory, name + BLOCK_SUFFIX)
            raise OSError(e.errno, f"{e.strerror} while writing block {name}", location) from e
        return self.sizes[name]

    def close(self) -> None:
        self._arena.release()


def hf_config_with_section(config: ModelConfig, weights: str) -> dict:
    """config.json of a converted checkpoint."""
    return {**config.to_hf_config(), "dsv3_jax": {"format": FORMAT, "version": VERSION, "weights": weights}}


def is_converted(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), MANIFEST))


def read_manifest(path: str | os.PathLike) -> tuple[dict, ModelConfig]:
    """(manifest, stored config with param_dtype of its weights) of a converted checkpoint."""
    path = os.fspath(path)
    manifest_path = os.path.join(path, MANIFEST)
    try:
        with open(manifest_path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConvertError(f"{manifest_path}: cannot read manifest ({e})") from e
    if isinstance(manifest, dict) and manifest.get("format") == FORMAT and manifest.get("version") == 1:
        raise ConvertError(f"{manifest_path}: a {FORMAT} v1 checkpoint (orbax blocks, written by an older dsv3); "
                           f"this version reads v{VERSION}: convert the source again with `dsv3 convert`")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ConvertError(f"{manifest_path}: not a {FORMAT} v{VERSION} manifest")
    for key, kind in (("weights", str), ("blocks", list)):
        if not isinstance(manifest.get(key), kind):
            raise ConvertError(f"{manifest_path}: field {key!r} is missing or not a {kind.__name__}")
    config_path = os.path.join(path, "config.json")
    try:
        config = ModelConfig.from_hf_config(config_path)
    except (ConfigError, TypeError) as e:
        where = "" if config_path in str(e) else f"{config_path}: "
        raise ConvertError(f"{where}{e}") from None
    dtype = "float32" if manifest["weights"] == "fp32" else "bfloat16"
    return manifest, config.replace(param_dtype=dtype, dtype=dtype)


def read_block(path: str, block: Block, target: Tree, files: BlockFiles | None = None, *,
               allow_nonfinite: bool = False) -> Tree:
    """Read one whole block (numpy leaves, QuantArray where the target has one), checked against `target` and,
    unless `allow_nonfinite`, for NaN / Inf values."""
    own = files is None
    files = files or BlockFiles(os.path.join(os.path.abspath(path), BLOCKS_DIR), allow_nonfinite)
    try:
        tree = from_saveable(files.read_tree(block.name, to_saveable(target)), target)
    finally:
        if own:
            files.close()
    check_tree(tree, target, os.path.join(path, BLOCKS_DIR, block.name + BLOCK_SUFFIX))
    return tree


def _architecture(config: ModelConfig) -> dict:
    return {k: v for k, v in vars(config).items() if k not in RUNTIME_FIELDS}


def _resolve_config(config: ModelConfig | None, stored: ModelConfig, path: str) -> ModelConfig:
    if config is None:
        return stored
    theirs, ours = _architecture(config), _architecture(stored)
    diff = sorted(k for k in ours if theirs[k] != ours[k])
    if diff:
        raise ConvertError(f"{path}: config does not match the checkpoint in {diff[:5]} "
                           f"(checkpoint: {[ours[k] for k in diff[:5]]}, given: {[theirs[k] for k in diff[:5]]})")
    return config


def _leaf_sources(blocks: list[Block], abstract: Tree) -> dict[str, tuple[list[str] | str, str]]:
    """Leaf key (`flat_leaves` naming, QuantArray one leaf) → (its blocks: one per layer for a stacked leaf, by
    layer index, or the one block of an unstacked leaf; the leaf's dotted name inside those blocks)."""
    layers = {(b.stack, b.layer): b.name for b in blocks if b.stack is not None}
    owner = {(c, k): b.name for b in blocks if b.stack is None for c in abstract for k in b.keys}
    out = {}
    flat = jax.tree_util.tree_flatten_with_path(abstract, is_leaf=lambda x: isinstance(x, QuantArray))[0]
    for path, want in flat:
        keys = tuple(p.key for p in path)
        if keys[1] in STACK_NAMES:
            count = (want.values if isinstance(want, QuantArray) else want).shape[0]
            names = [layers.get((keys[1], i)) for i in range(count)]
            if all(names):
                out[jax.tree_util.keystr(path)] = (names, ".".join((keys[0], *keys[3:])))
        elif (keys[0], keys[1]) in owner:
            out[jax.tree_util.keystr(path)] = (owner[(keys[0], keys[1])], ".".join(keys))
    return out


def _read_slice(index: tuple[slice, ...], spec, part: str | None, *, blocks, key: str, arrays: BlockFiles):
    """The numpy block `index` of one leaf: from one block, or (stacked leaf) one layer block per row."""
    key = key if part is None else f"{key}.{part}"
    if isinstance(blocks, str):
        return arrays.read(blocks, key, spec, index)
    rows = range(*index[0].indices(spec.shape[0]))
    layer_spec = jax.ShapeDtypeStruct(spec.shape[1:], spec.dtype)
    out = np.empty((len(rows), *(len(range(*sl.indices(n))) for sl, n in zip(index[1:], spec.shape[1:],
                                                                                 strict=True))), spec.dtype)
    for j, layer in enumerate(rows):
        out[j] = arrays.read(blocks[layer], key, layer_spec, tuple(index[1:]))
    return out


def load_converted(path: str | os.PathLike, config: ModelConfig | None = None, *, shardings=None,
                   allow_nonfinite: bool = False) -> tuple[ModelConfig, Variables]:
    """(config, variables) of a converted checkpoint in the scan layout; arrays keep their stored dtype (QuantArray
    for fp8). Every leaf is read straight into its sharding (`place.place_leaf`): each device's shard reads only
    the chunks it covers, layer block by layer block, so the host never holds more than the shards being built
    (in a multi-process run, each process only its own devices' shards). `shardings`: one Sharding, or a tree
    matching the variables (a QuantArray weight takes one, its values', or a QuantArray of two); default: the
    default device. NaN / Inf weights are refused unless `allow_nonfinite`."""
    path = os.path.abspath(os.fspath(path))
    manifest, stored = read_manifest(path)
    config = _resolve_config(config, stored, path)
    abstract = abstract_tree(stored.replace(param_dtype="float32"), manifest["weights"])
    blocks = [Block.from_record(record) for record in manifest["blocks"]]
    _check_stack_counts(path, blocks, abstract)
    sources = _leaf_sources(blocks, abstract)
    check_shardings(shardings, set(sources), ConvertError)
    arrays = BlockFiles(os.path.join(path, BLOCKS_DIR), allow_nonfinite)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    out: Tree = {}
    for leaf_path, want in jax.tree_util.tree_flatten_with_path(abstract, is_leaf=lambda x: isinstance(x,
                                                                                                    QuantArray))[0]:
        key = jax.tree_util.keystr(leaf_path)
        if key not in sources:  # e.g. no MTP module in this checkpoint
            continue
        node = out
        for k in leaf_path[:-1]:
            node = node.setdefault(k.key, {})
        owner, name = sources[key]
        node[leaf_path[-1].key] = place_leaf(want, leaf_sharding(shardings, key, default), functools.partial(
            _read_slice, blocks=owner, key=name, arrays=arrays))
    arrays.close()
    return config, out


def _check_stack_counts(path: str, blocks: list[Block], abstract: Tree) -> None:
    for stack in STACK_NAMES:
        want = jax.tree_util.tree_leaves(abstract["params"].get(stack, {}))
        count = sum(b.stack == stack for b in blocks)
        if want and count != want[0].shape[0]:
            raise ConvertError(f"{path}: {MANIFEST} lists {count} blocks of {stack}, expected {want[0].shape[0]}")
