"""The one checker of variable trees against what a config expects (shapes and dtypes from the abstract tree).

Used by loading and conversion (`ckpt`) and by generation (`infer`); each passes its own error class so the
message reaches the user as a checkpoint error or an input error.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np

from dsv3_jax.config import ModelConfig
from dsv3_jax.errors import Dsv3Error, InputError
from dsv3_jax.model.api import abstract_variables
from dsv3_jax.quant.fp8 import QuantArray


def flat_leaves(tree, *, quant_leaf: bool = False) -> dict[str, object]:
    """{"['params']['embed_tokens']": leaf, ...}; a QuantArray is one leaf when `quant_leaf`, else its values and
    scales are two."""
    is_leaf = (lambda x: isinstance(x, QuantArray)) if quant_leaf else None
    return {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf)[0]}


def leaf_at(tree, path: tuple[str, ...]):
    """tree[path[0]][path[1]]..."""
    for key in path:
        tree = tree[key]
    return tree


def check_tree(tree, target, where: str, *, error: type[Dsv3Error], dtypes: bool = True,
               optional: Callable[[str], bool] = lambda name: False) -> None:
    """Every leaf of `target` is in `tree` with its shape (and dtype), and `tree` has nothing else.

    `optional(name)` marks target leaves that may be absent (e.g. the MTP module when only decoding).
    """
    got, want = flat_leaves(tree), flat_leaves(target)
    missing = sorted(k for k in set(want) - set(got) if not optional(k))
    extra = sorted(set(got) - set(want))
    if missing or extra:
        raise error(f"{where}: variables do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for path, leaf in got.items():
        expected = want[path]
        if tuple(leaf.shape) != tuple(expected.shape) or (dtypes and np.dtype(leaf.dtype) != np.dtype(expected.dtype)):
            raise error(f"{where}: variable {path} is {np.dtype(leaf.dtype)}{list(leaf.shape)}, expected "
                        f"{np.dtype(expected.dtype)}{list(expected.shape)}")


def check_variables(config: ModelConfig, variables: dict, *, need_mtp: bool = False) -> None:
    """Variables for `config` (params and router; any dtype, FP8 allowed): InputError naming the first mismatch."""
    expected = abstract_variables(config)
    for collection in ("params", "router"):
        got = flat_leaves(variables.get(collection, {}), quant_leaf=True)
        want = flat_leaves(expected.get(collection, {}))
        for path, leaf in want.items():
            name = f"{collection}{path}"
            if path not in got:
                if "mtp_" in name and not need_mtp:
                    continue
                raise InputError(f"variables do not match the config: {name} is missing")
            if tuple(got[path].shape) != tuple(leaf.shape):
                raise InputError(f"variables do not match the config: {name} has shape "
                                 f"{tuple(got[path].shape)}, config expects {tuple(leaf.shape)}")
