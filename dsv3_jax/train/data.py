"""Training data pipeline: corpora, tokenisation into one flat stream, packed resumable batches (tokenizers live
in `dsv3_jax.text`).

Corpora are sorted lists of (name, text) documents: `stdlib_corpus` (the Python standard library's own sources,
present on every machine, the default) and `text_file_corpus` (user files). `tokenize_corpus` turns documents
into one int32 stream [N] of bos + tokens + eos per document, and `PackedBatches` cuts that stream into windows
of seq_len + 1 tokens and serves them as shuffled, shardable, resumable {"inputs", "targets"} int32 [B, T] batches.
"""

from __future__ import annotations

import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from dsv3_jax.errors import DataError
from dsv3_jax.text.tokenizers import Tokenizer

if TYPE_CHECKING:
    pass

Document = tuple[str, str]
"""(name, text): a corpus document; the name is a relative path or the path as given."""

STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idlelib", "lib2to3"})
TEXT_SUFFIXES = (".txt", ".md", ".py")
_INT32_MAX = int(np.iinfo(np.int32).max)



# ---------------------------------------------------------------------------------------------------------------
# Corpora
# ---------------------------------------------------------------------------------------------------------------


def _stdlib_paths(root: Path) -> list[str]:
    """Relative posix paths of the stdlib's .py files outside the excluded directories, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS]
        rel = Path(dirpath).relative_to(root)
        found += [(rel / name).as_posix() for name in filenames if name.endswith(".py")]
    return sorted(found)


def stdlib_corpus(max_bytes: int | None = None) -> list[Document]:
    """The Python standard library's own .py sources as (relative path, text), sorted by relative path.

    Skips site-packages, test/tests/idlelib/lib2to3 directories and files that are not valid UTF-8. With
    `max_bytes`, stops once the documents taken hold >= max_bytes bytes (whole files: the last one may overshoot).
    """
    if max_bytes is not None and max_bytes <= 0:
        raise DataError(f"stdlib_corpus: max_bytes must be positive, got {max_bytes}")
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[Document] = []
    total = 0
    for rel in _stdlib_paths(root):
        try:
            data = (root / rel).read_bytes()
            docs.append((rel, data.decode("utf-8")))
        except (OSError, UnicodeDecodeError):
            continue
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    if not docs:
        raise DataError(f"stdlib_corpus: no readable .py files under {root}")
    return docs


def _expand_text_paths(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Files named by `paths`: files as given, directories replaced by their *.txt/*.md/*.py files."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = [p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file()]
            if not found:
                raise DataError(f"{path}: directory holds no {'/'.join(TEXT_SUFFIXES)} files")
            files += found
        elif path.exists():
            files.append(path)
        else:
            raise DataError(f"{path}: text corpus file does not exist")
    return files


def _read_text(path: Path) -> str:
    """UTF-8 text of `path`; a DataError names the file if it cannot be read or decoded."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read text corpus file: {err.strerror or err}") from err
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 (byte {err.start}: {err.reason})") from err


def text_file_corpus(paths: Sequence[str | os.PathLike]) -> list[Document]:
    """User text files as (path, text), sorted by path; directories contribute all *.txt/*.md/*.py beneath them."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise DataError("text_file_corpus: no paths given")
    unique = {os.path.normpath(p): p for p in _expand_text_paths(paths)}
    return [(name, _read_text(unique[name])) for name in sorted(unique)]


def tokenize_corpus(docs: Iterable[Document], tokenizer: Tokenizer) -> np.ndarray:
    """One flat int32 stream [N]: bos + encode(text) + eos for each document, in order."""
    pieces = [np.asarray([tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id], np.int64) for _, text in docs]
    if not pieces:
        raise DataError("tokenize_corpus: no documents")
    stream = np.concatenate(pieces)
    if stream.min() < 0 or stream.max() > _INT32_MAX:
        raise DataError(f"tokenize_corpus: token ids span [{stream.min()}, {stream.max()}], outside int32")
    return stream.astype(np.int32)


# ---------------------------------------------------------------------------------------------------------------
# Packed batches
# ---------------------------------------------------------------------------------------------------------------


def _check_int(name: str, value: int, low: int, high: int | None = None) -> int:
    """`value` as an int, or a DataError naming `name` if it is not an integer in [low, high) (high None: no cap)."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if not ok or value < low or (high is not None and value >= high):
        bound = f">= {low}" if high is None else f"in [{low}, {high})"
        raise DataError(f"PackedBatches: {name} must be an integer {bound}, got {value!r}")
    return int(value)


def _as_token_stream(tokens: np.ndarray) -> np.ndarray:
    """`tokens` as a 1-D int32 array; a DataError says why it cannot be."""
    arr = np.asarray(tokens)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"PackedBatches: tokens must be a 1-D integer array, got {arr.dtype} of shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() > _INT32_MAX):
        raise DataError(f"PackedBatches: token ids span [{arr.min()}, {arr.max()}], outside [0, int32 max]")
    return arr.astype(np.int32, copy=False)


class PackedBatches(Iterator[dict[str, np.ndarray]]):
    """Endless iterator of {"inputs", "targets"}: int32 [batch_size, seq_len] batches packed from one token stream.

    The stream [N] is cut into W = N // (seq_len + 1) non-overlapping windows (the tail is dropped); a window gives
    inputs = window[:-1], targets = window[1:]. Epoch e visits the windows in the order
    `np.random.default_rng((seed, e)).permutation(W)`; step s of that epoch is the global batch of windows
    order[s*G:(s+1)*G], G = batch_size * num_shards (the remainder W % G is dropped), and shard i yields rows
    [i*batch_size, (i+1)*batch_size) of it. `state()` / `restore()` (or the `state` argument) resume exactly.
    """

    STATE_CHECKED_FIELDS: ClassVar[tuple[str, ...]] = ("seed", "batch_size", "seq_len", "num_shards", "num_windows")

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, shard_index: int = 0,
                 num_shards: int = 1, state: dict[str, Any] | None = None) -> None:
        """`tokens`: 1-D integer stream [N]; `seed` >= 0; `state`: a `state()` dict to resume from."""
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.seq_len = _check_int("seq_len", seq_len, 1)
        self.seed = _check_int("seed", seed, 0)
        self.num_shards = _check_int("num_shards", num_shards, 1)
        self.shard_index = _check_int("shard_index", shard_index, 0, self.num_shards)
        stream = _as_token_stream(tokens)
        self._windows = self._cut_windows(stream)
        self.epoch, self.step = 0, 0
        self._order_epoch, self._order = -1, np.empty(0, np.int64)
        if state is not None:
            self.restore(state)

    def _cut_windows(self, stream: np.ndarray) -> np.ndarray:
        """[W, seq_len + 1] view of the stream; a DataError if it holds fewer than one global batch."""
        width = self.seq_len + 1
        global_batch = self.batch_size * self.num_shards
        needed = global_batch * width
        if stream.size < needed:
            raise DataError(
                f"PackedBatches: token stream too short: one global batch of {global_batch} windows "
                f"(batch_size {self.batch_size} x num_shards {self.num_shards}) of seq_len + 1 = {width} tokens "
                f"needs {needed} tokens, but only {stream.size} are available")
        num_windows = stream.size // width
        return stream[: num_windows * width].reshape(num_windows, width)

    @property
    def num_windows(self) -> int:
        """Windows of seq_len + 1 tokens in the stream."""
        return int(self._windows.shape[0])

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch: num_windows // (batch_size * num_shards)."""
        return self.num_windows // (self.batch_size * self.num_shards)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Window indices [num_windows] in the order epoch `epoch` visits them."""
        if epoch != self._order_epoch:
            self._order = np.random.default_rng((self.seed, epoch)).permutation(self.num_windows)
            self._order_epoch = epoch
        return self._order

    def batch_indices(self, epoch: int, step: int) -> np.ndarray:
        """Window indices [batch_size] of this shard's rows of global batch `step` of epoch `epoch`."""
        start = step * self.batch_size * self.num_shards + self.shard_index * self.batch_size
        stop = start + self.batch_size
        return self.epoch_order(epoch)[start:stop]

    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        """The next batch: {"inputs": int32 [B, T], "targets": int32 [B, T]}; epochs roll over forever."""
        rows = self._windows[self.batch_indices(self.epoch, self.step)]
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return {"inputs": np.ascontiguousarray(rows[:, :-1]), "targets": np.ascontiguousarray(rows[:, 1:])}

    def batch_spec(self) -> dict[str, tuple[tuple[int, int], np.dtype]]:
        """(shape, dtype) of each array a batch holds, without taking one."""
        shape = (self.batch_size, self.seq_len)
        return {"inputs": (shape, self._windows.dtype), "targets": (shape, self._windows.dtype)}

    def state(self) -> dict[str, int]:
        """JSON-serialisable position and configuration: the next batch is step `step` of epoch `epoch`."""
        return {
            "epoch": self.epoch, "step": self.step, "seed": self.seed, "batch_size": self.batch_size,
            "seq_len": self.seq_len, "num_shards": self.num_shards, "shard_index": self.shard_index,
            "num_windows": self.num_windows, "steps_per_epoch": self.steps_per_epoch,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Resume from a `state()` dict; DataError naming the field if it belongs to another configuration.

        shard_index is not checked: epoch and step are global, so one saved state resumes every shard.
        """
        for field in (*self.STATE_CHECKED_FIELDS, "epoch", "step"):
            if field not in state:
                raise DataError(f"PackedBatches.restore: state has no field {field!r}")
        mine = self.state()
        for field in self.STATE_CHECKED_FIELDS:
            if state[field] != mine[field]:
                raise DataError(f"PackedBatches.restore: state field {field!r} is {state[field]!r} but this "
                                f"iterator has {mine[field]!r}: the state belongs to a different configuration")
        epoch, step = state["epoch"], state["step"]
        if not isinstance(epoch, int) or epoch < 0:
            raise DataError(f"PackedBatches.restore: state field 'epoch' must be an integer >= 0, got {epoch!r}")
        if not isinstance(step, int) or not 0 <= step < self.steps_per_epoch:
            raise DataError(f"PackedBatches.restore: state field 'step' must be an integer in "
                            f"[0, {self.steps_per_epoch}), got {step!r}")
        self.epoch, self.step = epoch, step
