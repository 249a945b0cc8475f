"""The converted checkpoint on disk, written block by block and read back into the scan layout.

    OUT/config.json     ModelConfig.to_hf_config() plus a "dsv3_jax" section {format, version, weights}
    OUT/manifest.json   format, weights, source, and one record per block (name, stack, layer, keys, sizes,
                        the HF dtype of each source tensor: export writes them back in that dtype)
    OUT/blocks/<name>/  one orbax StandardCheckpointer save of the block's tree {collection: subtree}; a
                        QuantArray is stored as {"values": e4m3 [.., K, N], "scales": f32 [.., K/128, N/128]}

Everything is written into a sibling `OUT.tmp-<pid>-XXXX` directory renamed onto OUT at the end; on any failure
(Ctrl-C included: it waits for the block being saved, then cleans up) the temporary directory is removed, so OUT
is either complete or absent. The temporary directory records its owner (pid, host, process start time); a later
run removes the ones whose owner is gone (a SIGKILL, a power cut) and says so. Outputs follow the user's umask.
"""

from __future__ import annotations

import contextlib
import errno
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

from dsv3_jax.ckpt.blocks import Block, Tree, abstract_tree, check_tree, count_nonfinite, insert_block
from dsv3_jax.config import RUNTIME_FIELDS, ModelConfig
from dsv3_jax.errors import ConfigError, ConvertError
from dsv3_jax.model.api import Variables
from dsv3_jax.model.axes import STACK_NAMES
from dsv3_jax.quant.fp8 import QuantArray, tree_nbytes

FORMAT = "dsv3_jax.blocks"
VERSION = 1
MANIFEST = "manifest.json"
BLOCKS_DIR = "blocks"
OWNER_FILE = ".dsv3-owner.json"  # inside a temporary output directory: who is writing it


def _checkpointer():
    """For restoring (numpy leaves when the target is ShapeDtypeStructs without sharding)."""
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def _saver():
    """A synchronous PyTree checkpointer whose numpy handler does not deep-copy arrays before writing (orbax's
    default, a guard against concurrent mutation): nothing touches a block while it is saved, and the copy would
    double the peak memory of a conversion. No zstd: weights barely compress and it dominated the write time."""
    import orbax.checkpoint as ocp

    handlers = ocp.type_handlers
    registry = handlers.create_type_handler_registry(
        (np.ndarray, handlers.NumpyHandler(deepcopy_host_arrays=False)), (np.number, handlers.ScalarHandler()))
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False))


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


def os_error_of(error: BaseException) -> OSError | None:
    """The OSError behind an orbax / tensorstore / safetensors failure (chained, or only quoted), if any."""
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
    """Saves one block at a time under `directory/blocks/<name>` (each save completes before the next block)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(os.path.join(directory, BLOCKS_DIR), exist_ok=True)
        self._ckptr = _saver()

    def write(self, name: str, tree: Tree) -> int:
        """Save `tree` (returns when it is on disk; a Ctrl-C meanwhile waits for it); returns its size in bytes.
        A failed write is an OSError (disk full, read-only, ...) or a ConvertError, naming the block."""
        import orbax.checkpoint as ocp

        location = os.path.join(self.directory, BLOCKS_DIR, name)
        try:
            with deferred_interrupt():
                self._ckptr.save(location, args=ocp.args.PyTreeSave(to_saveable(tree)))
        except OSError:
            raise
        except Exception as e:  # orbax / tensorstore raise many types
            cause = os_error_of(e)
            if cause is not None:
                raise OSError(cause.errno, f"{cause.strerror} while writing block {name}", location) from e
            raise ConvertError(f"{location}: cannot write block {name} ({type(e).__name__}: {e})") from e
        return tree_nbytes(tree)

    def close(self) -> None:
        self._ckptr.close()


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


def check_finite(tree: Tree, where: str, what: str) -> None:
    """ConvertError naming the first leaf of `tree` that holds NaN or Inf (and how many values do)."""
    for key, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        arr = np.asarray(leaf)
        bad = count_nonfinite(arr)
        if bad:
            raise ConvertError(f"{where}: {what} {jax.tree_util.keystr(key)} holds {bad} non-finite (NaN/Inf) "
                               f"value(s) of {arr.size}; pass allow_nonfinite=True (--allow-nonfinite) to accept")


def read_block(path: str, block: Block, target: Tree, ckptr=None, *, allow_nonfinite: bool = False) -> Tree:
    """Restore one block (numpy leaves, QuantArray where the target has one), checked against `target` and, unless
    `allow_nonfinite`, for NaN / Inf values."""
    location = os.path.join(os.path.abspath(path), BLOCKS_DIR, block.name)
    if not os.path.isdir(location):
        raise ConvertError(f"{location}: block {block.name} is missing")
    abstract = to_saveable(target)
    own = ckptr is None
    ckptr = ckptr or _checkpointer()
    try:
        restored = ckptr.restore(location, abstract)
    except Exception as e:  # orbax / tensorstore raise many types
        raise ConvertError(f"{location}: cannot restore block {block.name} ({type(e).__name__}: {e})") from e
    finally:
        if own:
            ckptr.close()
    restored = jax.tree_util.tree_map(np.asarray, restored)
    if not allow_nonfinite:
        check_finite(restored, location, f"block {block.name} tensor")
    tree = from_saveable(restored, target)
    check_tree(tree, target, location)
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


def place_variables(host: Tree, shardings) -> Variables:
    """Host arrays → jax arrays, leaf by leaf (each host buffer dropped once placed)."""
    leaves, treedef = jax.tree_util.tree_flatten(host)
    del host
    if shardings is None:
        targets = [None] * len(leaves)
    elif isinstance(shardings, jax.sharding.Sharding):
        targets = [shardings] * len(leaves)
    else:
        targets, other = jax.tree_util.tree_flatten(shardings)
        if other != treedef:
            raise ConvertError(f"shardings tree does not match the variables: {other} vs {treedef}")
    placed = []
    for i, sharding in enumerate(targets):
        placed.append(jax.device_put(leaves[i], sharding))  # no compile, unlike jnp.asarray
        leaves[i] = None
    return jax.tree_util.tree_unflatten(treedef, placed)


def load_converted(path: str | os.PathLike, config: ModelConfig | None = None, *, shardings=None,
                   allow_nonfinite: bool = False) -> tuple[ModelConfig, Variables]:
    """(config, variables) of a converted checkpoint in the scan layout; arrays keep their stored dtype (QuantArray
    for fp8). `shardings`: a tree of `jax.sharding.Sharding` matching the variables (or one for all). NaN / Inf
    weights are refused unless `allow_nonfinite`."""
    path = os.path.abspath(os.fspath(path))
    manifest, stored = read_manifest(path)
    config = _resolve_config(config, stored, path)
    abstract = abstract_tree(stored.replace(param_dtype="float32"), manifest["weights"])
    host: Tree = {}
    counts: dict[str, int] = {}
    ckptr = _checkpointer()
    try:
        for record in manifest["blocks"]:
            block = Block.from_record(record)
            tree = read_block(path, block, block.target(abstract), ckptr, allow_nonfinite=allow_nonfinite)
            insert_block(host, block, tree, abstract)
            if block.stack is not None:
                counts[block.stack] = counts.get(block.stack, 0) + 1
    finally:
        ckptr.close()
    for stack in STACK_NAMES:
        want = jax.tree_util.tree_leaves(abstract["params"].get(stack, {}))
        if want and counts.get(stack, 0) != want[0].shape[0]:
            raise ConvertError(f"{path}: {MANIFEST} lists {counts.get(stack, 0)} blocks of {stack}, "
                               f"expected {want[0].shape[0]}")
    return config, place_variables(host, shardings)
