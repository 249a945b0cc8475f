"""The converted checkpoint on disk, written block by block and read back into the scan layout.

    OUT/config.json     ModelConfig.to_hf_config() plus a "dsv3_jax" section {format, version, weights}
    OUT/manifest.json   format, weights, source, and one record per block (name, stack, layer, keys, sizes,
                        the HF dtype of each source tensor: export writes them back in that dtype)
    OUT/blocks/<name>/  one orbax StandardCheckpointer save of the block's tree {collection: subtree}; a
                        QuantArray is stored as {"values": e4m3 [.., K, N], "scales": f32 [.., K/128, N/128]}

Everything is written into a sibling `OUT.tmp-XXXX` directory renamed onto OUT at the end; on any failure the
temporary directory is removed, so OUT is either complete or absent.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator

import jax
import numpy as np

from dsv3_jax.ckpt.blocks import Block, Tree, abstract_tree, check_tree, insert_block
from dsv3_jax.config import RUNTIME_FIELDS, ModelConfig
from dsv3_jax.errors import ConvertError
from dsv3_jax.model.api import Variables
from dsv3_jax.model.axes import STACK_NAMES
from dsv3_jax.quant.fp8 import QuantArray, tree_nbytes

FORMAT = "dsv3_jax.blocks"
VERSION = 1
MANIFEST = "manifest.json"
BLOCKS_DIR = "blocks"


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


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike) -> Iterator[str]:
    """Yield a fresh temporary directory next to `out`, renamed onto `out` when the body succeeds; removed else."""
    out = os.path.abspath(os.fspath(out))
    if os.path.lexists(out):
        raise ConvertError(f"{out}: output already exists; choose a new path or remove it first")
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"{os.path.basename(out)}.tmp-", dir=parent)
    try:
        yield tmp
        if os.path.lexists(out):
            raise ConvertError(f"{out}: output appeared while converting; not overwritten")
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
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
    """Saves one block at a time under `directory/blocks/<name>` (each save completes before the next block)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(os.path.join(directory, BLOCKS_DIR), exist_ok=True)
        self._ckptr = _saver()

    def write(self, name: str, tree: Tree) -> int:
        """Save `tree` (returns when it is on disk); returns its size in bytes."""
        import orbax.checkpoint as ocp

        self._ckptr.save(os.path.join(self.directory, BLOCKS_DIR, name), args=ocp.args.PyTreeSave(to_saveable(tree)))
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
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ConvertError(f"{manifest_path}: not a {FORMAT} v{VERSION} manifest")
    config = ModelConfig.from_hf_config(path)
    dtype = "float32" if manifest["weights"] == "fp32" else "bfloat16"
    return manifest, config.replace(param_dtype=dtype)


def read_block(path: str, block: Block, target: Tree, ckptr=None) -> Tree:
    """Restore one block (numpy leaves, QuantArray where the target has one), checked against `target`."""
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
    tree = from_saveable(jax.tree_util.tree_map(np.asarray, restored), target)
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


def load_converted(path: str | os.PathLike, config: ModelConfig | None = None, *,
                   shardings=None) -> tuple[ModelConfig, Variables]:
    """(config, variables) of a converted checkpoint in the scan layout; arrays keep their stored dtype (QuantArray
    for fp8). `shardings`: a tree of `jax.sharding.Sharding` matching the variables (or one for all)."""
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
            insert_block(host, block, read_block(path, block, block.target(abstract), ckptr), abstract)
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
