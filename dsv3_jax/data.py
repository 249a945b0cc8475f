"""Training data pipeline: tokenizers, corpora, tokenisation into one flat stream, packed resumable batches.

Tokenizers share one interface (`Tokenizer`) with the specials fixed at ids bos = 0, eos = 1, pad = 2:

* `ByteTokenizer`: byte b -> id b + 3 (vocab 259); needs no training and no files.
* `BpeTokenizer`: byte-level BPE trained with the Hugging Face `tokenizers` library. A well-kept, widely used Rust
  library beats a hand-written BPE: it is fast enough to train on the whole standard library in seconds, its
  byte-level pre-tokenizer/decoder pair round-trips any text exactly, its training is deterministic, and its
  `tokenizer.json` format is readable by every other tool. It is imported lazily, so the byte tokenizer and the
  rest of this module work without it.

Corpora are sorted lists of (name, text) documents: `stdlib_corpus` (the Python standard library's own sources,
present on every machine, the default) and `text_file_corpus` (user files). `tokenize_corpus` turns documents
into one int32 stream [N] of bos + tokens + eos per document, and `PackedBatches` cuts that stream into windows
of seq_len + 1 tokens and serves them as shuffled, shardable, resumable {"inputs", "targets"} int32 [B, T] batches.
"""

from __future__ import annotations

import abc
import importlib
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

if TYPE_CHECKING:
    import tokenizers

Document = tuple[str, str]
"""(name, text): a corpus document; the name is a relative path or the path as given."""

BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>")
META_FILE = "tokenizer_meta.json"
BPE_FILE = "tokenizer.json"
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idlelib", "lib2to3"})
TEXT_SUFFIXES = (".txt", ".md", ".py")
_INT32_MAX = int(np.iinfo(np.int32).max)


class DataError(ValueError):
    """Bad data-pipeline input: a file, tokenizer spec, token stream or saved state; the message says which."""


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------------------------


class Tokenizer(abc.ABC):
    """Text <-> token ids. Specials: bos_id = 0, eos_id = 1, pad_id = 2; ids lie in [0, vocab_size)."""

    kind: ClassVar[str]
    bos_id: ClassVar[int] = BOS_ID
    eos_id: ClassVar[int] = EOS_ID
    pad_id: ClassVar[int] = PAD_ID

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, specials included."""

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without bos/eos; text that spells a special (e.g. "<eos>") is encoded as text."""

    @abc.abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special ids are skipped."""

    def save(self, directory: str | os.PathLike) -> None:
        """Write the tokenizer into `directory` (created if missing) so that `load_tokenizer` restores it."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"kind": self.kind, "vocab_size": self.vocab_size}
        (path / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        self._save_files(path)

    def _save_files(self, directory: Path) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Write the kind-specific files; the byte tokenizer has none."""

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """Read the kind-specific files from `directory`; kinds without files just construct themselves."""
        return cls()


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: byte b -> id b + 3; vocab_size 259."""

    kind = "byte"
    OFFSET: ClassVar[int] = 3

    @property
    def vocab_size(self) -> int:
        """256 byte ids plus the 3 specials."""
        return 256 + self.OFFSET

    def encode(self, text: str) -> list[int]:
        """One id per UTF-8 byte of `text`."""
        return (np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int64) + self.OFFSET).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        """UTF-8 decode (errors="replace") of the byte ids; specials are skipped."""
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        bad = arr[(arr < 0) | (arr >= self.vocab_size)]
        if bad.size:
            raise DataError(f"ByteTokenizer.decode: id {int(bad[0])} is outside [0, {self.vocab_size})")
        data = (arr[arr >= self.OFFSET] - self.OFFSET).astype(np.uint8).tobytes()
        return data.decode("utf-8", errors="replace")


def _require_tokenizers() -> Any:
    """The `tokenizers` module, or a DataError saying how to get it."""
    try:
        return importlib.import_module("tokenizers")
    except ImportError as err:
        raise DataError("BpeTokenizer needs the `tokenizers` package: pip install tokenizers") from err


class BpeTokenizer(Tokenizer):
    """Byte-level BPE (Hugging Face `tokenizers`); saved as `tokenizer.json`."""

    kind = "bpe"

    def __init__(self, backend: tokenizers.Tokenizer, source: str = "BpeTokenizer") -> None:
        """Wrap a trained `tokenizers.Tokenizer`; `source` names it (e.g. its file) in errors."""
        for want_id, token in enumerate(SPECIAL_TOKENS):
            got_id = backend.token_to_id(token)
            if got_id != want_id:
                raise DataError(f"{source}: special token {token!r} has id {got_id}, expected {want_id}")
        backend.encode_special_tokens = True
        self._backend = backend

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BpeTokenizer:
        """Train on `texts`; `vocab_size` (>= 259: 256 bytes + 3 specials) is an upper bound on the vocabulary."""
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise DataError(f"BpeTokenizer.train: vocab_size {vocab_size} < 259 (256 byte tokens + 3 specials)")
        tk = _require_tokenizers()
        backend = tk.Tokenizer(tk.models.BPE())
        backend.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> BpeTokenizer:
        """Read `directory/tokenizer.json`."""
        path = Path(directory) / BPE_FILE
        tk = _require_tokenizers()
        try:
            backend = tk.Tokenizer.from_file(str(path))
        except Exception as err:
            raise DataError(f"{path}: cannot load BPE tokenizer: {err}") from err
        return cls(backend, source=str(path))

    @property
    def vocab_size(self) -> int:
        """Learned vocabulary size, specials included (may be below the size asked for on a small corpus)."""
        return self._backend.get_vocab_size()

    def vocab(self) -> dict[str, int]:
        """Token string -> id, specials included."""
        return self._backend.get_vocab()

    def encode(self, text: str) -> list[int]:
        """BPE ids of `text` (no bos/eos added)."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, specials skipped; invalid UTF-8 becomes U+FFFD."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=True)

    def _save_files(self, directory: Path) -> None:
        self._backend.save(str(directory / BPE_FILE))


_TOKENIZER_KINDS: dict[str, type[Tokenizer]] = {"byte": ByteTokenizer, "bpe": BpeTokenizer}


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer:
    """Restore the tokenizer `Tokenizer.save` wrote into `directory` (a bare `tokenizer.json` counts as BPE)."""
    path = Path(directory)
    meta_path = path / META_FILE
    if not meta_path.exists():
        if (path / BPE_FILE).exists():
            return BpeTokenizer.load(path)
        raise DataError(f"{path}: no tokenizer here (expected {META_FILE} or {BPE_FILE})")
    try:
        kind = json.loads(meta_path.read_text(encoding="utf-8"))["kind"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{meta_path}: cannot read field 'kind': {err!r}") from err
    if kind in _TOKENIZER_KINDS:
        return _TOKENIZER_KINDS[kind].load(path)
    raise DataError(f"{meta_path}: field 'kind' is {kind!r}, expected one of {sorted(_TOKENIZER_KINDS)}")


def make_tokenizer(spec: str, texts: Iterable[str] = ()) -> Tokenizer:
    """Tokenizer from a spec: "byte", or "bpe:N" (BPE of at most N ids trained on `texts`)."""
    if spec == "byte":
        return ByteTokenizer()
    kind, _, size = spec.partition(":")
    if kind == "bpe" and size.isdigit():
        return BpeTokenizer.train(texts, int(size))
    raise DataError(f"tokenizer spec {spec!r}: expected 'byte' or 'bpe:N' with N an integer vocabulary size")


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
