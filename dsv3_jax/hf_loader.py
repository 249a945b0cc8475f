"""Minimal HF checkpoint loader: a directory with `config.json` and bf16/f16/fp32 safetensors → (config, variables).

Every tensor is checked against the abstract parameter tree: a missing, unexpected or misshaped tensor is an error
that names it and its file. FP8 checkpoints and streaming to disk are the converter's job (`dsv3_jax.convert`).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.api import Variables, abstract_variables
from dsv3_jax.config import ModelConfig
from dsv3_jax.hf_names import Entry, is_mtp_name, main_entries, mtp_entries, mtp_shared_copies
from dsv3_jax.safetensors_io import CheckpointReader, checkpoint_files


class CheckpointError(ValueError):
    """A checkpoint does not match its config: the message names the tensor, the file and what was expected."""


def expected_entries(config: ModelConfig, names: set[str]) -> tuple[list[Entry], dict[str, str]]:
    """(entries to load, {MTP copy of embedding/head: the main tensor it duplicates}) for a checkpoint's names.

    MTP tensors are expected when the checkpoint has any of them (HF's save_pretrained drops layer 61).
    """
    entries = main_entries(config)
    copies: dict[str, str] = {}
    if any(is_mtp_name(config, n) for n in names):
        for depth in range(config.num_nextn_predict_layers):
            entries += mtp_entries(config, depth)
            copies.update({k: v for k, v in mtp_shared_copies(config, depth).items() if k in names})
    return entries, copies


def _check_names(entries: list[Entry], ignored: set[str], names: set[str], directory: str) -> None:
    expected = {e.hf_name for e in entries}
    missing, unexpected = sorted(expected - names), sorted(names - expected - ignored)
    if missing:
        raise CheckpointError(f"{directory}: {len(missing)} missing tensor(s), first: {missing[:5]}")
    if unexpected:
        raise CheckpointError(f"{directory}: {len(unexpected)} unexpected tensor(s), first: {unexpected[:5]}")


def _reject_fp8(files: dict[str, str], directory: str) -> None:
    scales = sorted(name for name in files if name.endswith("_scale_inv"))
    if scales:
        raise CheckpointError(f"{directory}: FP8 checkpoint (block scales such as {scales[0]} in "
                              f"{files[scales[0]]}); convert it with `dsv3 convert` first")


def rope_rows_to_pairs(w_OI: np.ndarray, period: int, rope_start: int, rope_dim: int) -> np.ndarray:
    """Reorder output rows of a HF weight from half-split rotary layout (rope_interleave=false) to adjacent pairs.

    Rows are grouped in blocks of `period`; inside each block rows [rope_start, rope_start + rope_dim) are rotary.
    """
    half = rope_dim // 2
    order = np.arange(rope_dim).reshape(2, half).T.reshape(-1)  # pair i ← (i, i + R/2)
    perm = np.arange(w_OI.shape[0]).reshape(-1, period)
    perm[:, rope_start:] = perm[:, rope_start:][:, order]
    return w_OI[perm.reshape(-1)]


def _prepare(entry: Entry, tensor: np.ndarray, config: ModelConfig, interleaved: bool) -> np.ndarray:
    if entry.rope and not interleaved:
        period = config.qk_head_dim if entry.rope == "q" else tensor.shape[0]
        tensor = rope_rows_to_pairs(tensor, period, period - config.qk_rope_head_dim, config.qk_rope_head_dim)
    return tensor.T if entry.transpose else tensor


def _leaf(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _set_leaf(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def load_hf_directory(directory: str | os.PathLike, config: ModelConfig | None = None) -> tuple[ModelConfig, Variables]:
    """Read a HF DeepseekV3 directory into (config, variables) in the scan layout, dtype config.param_dtype."""
    directory = os.fspath(directory)
    config = config or ModelConfig.from_hf_config(directory)
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
        interleaved = bool(json.load(f).get("rope_interleave", True))
    files = checkpoint_files(directory)
    _reject_fp8(files, directory)
    entries, copies = expected_entries(config, set(files))
    _check_names(entries, set(copies), set(files), directory)
    abstract = abstract_variables(config)
    buffers: dict = {}
    for entry in entries:
        path = (entry.collection, *entry.path)
        if not _has(buffers, path):
            target = _leaf(abstract, path)
            _set_leaf(buffers, path, np.zeros(target.shape, target.dtype))
    with CheckpointReader(directory) as reader:
        for name, source in sorted(copies.items()):
            _check_copy(reader, name, source, files)
        for entry in entries:
            _fill(_leaf(buffers, (entry.collection, *entry.path)), entry, reader, files[entry.hf_name], config,
                  interleaved)
    return config, jax.tree_util.tree_map(jnp.asarray, buffers)


def _has(tree: dict, path: tuple[str, ...]) -> bool:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return False
        tree = tree[key]
    return True


def _check_copy(reader: CheckpointReader, name: str, source: str, files: dict[str, str]) -> None:
    found, expected = reader.info(name)[1], reader.info(source)[1]
    if found != expected:
        raise CheckpointError(f"{files[name]}: tensor {name} has shape {found}, expected {expected} (as {source})")


def _fill(buf: np.ndarray, entry: Entry, reader: CheckpointReader, file: str, config: ModelConfig,
          interleaved: bool) -> None:
    dtype_name, shape = reader.info(entry.hf_name)
    if dtype_name.startswith("F8"):
        raise CheckpointError(f"{file}: tensor {entry.hf_name} is {dtype_name}; FP8 checkpoints need `dsv3 convert`")
    if dtype_name not in ("F32", "BF16", "F16", "F64"):
        raise CheckpointError(f"{file}: tensor {entry.hf_name} has dtype {dtype_name}, expected a float dtype")
    target = buf[entry.index] if entry.index else buf
    want = target.shape[::-1] if entry.transpose else target.shape
    if tuple(shape) != tuple(want):
        raise CheckpointError(f"{file}: tensor {entry.hf_name} has shape {tuple(shape)}, expected {tuple(want)}")
    value = _prepare(entry, np.asarray(reader.get(entry.hf_name)), config, interleaved)
    if entry.index:
        buf[entry.index] = value.astype(buf.dtype)
    else:
        buf[...] = value.astype(buf.dtype)
