"""Tokenizers for training from scratch. They share one interface (`Tokenizer`) with the specials fixed at ids
bos = 0, eos = 1, pad = 2:

* `ByteTokenizer`: byte b -> id b + 3 (vocab 259); needs no training and no files.
* `BpeTokenizer`: byte-level BPE trained with the Hugging Face `tokenizers` library. A well-kept, widely used Rust
  library beats a hand-written BPE: it is fast enough to train on the whole standard library in seconds, its
  byte-level pre-tokenizer/decoder pair round-trips any text exactly, its training is deterministic, and its
  `tokenizer.json` format is readable by every other tool. It is imported lazily, so the byte tokenizer works
  without it.

The released DeepSeek-V3 tokenizer (its own special-token ids and chat template) is `hf_tokenizer.HFTokenizer`.
"""

from __future__ import annotations

import abc
import importlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from dsv3_jax.errors import DataError

if TYPE_CHECKING:
    import tokenizers

BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>")
META_FILE = "tokenizer_meta.json"
BPE_FILE = "tokenizer.json"
HF_CONFIG_FILE = "tokenizer_config.json"  # beside tokenizer.json: a released tokenizer (`HFTokenizer`)




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
    """Restore the tokenizer `Tokenizer.save` wrote into `directory`; a released tokenizer (tokenizer.json +
    tokenizer_config.json) loads as `HFTokenizer`, a bare `tokenizer.json` as BPE."""
    path = Path(directory)
    meta_path = path / META_FILE
    if not meta_path.exists() and (path / HF_CONFIG_FILE).exists():
        from dsv3_jax.text.hf_tokenizer import HFTokenizer

        return HFTokenizer.load(path)
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
