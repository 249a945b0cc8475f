"""Data pipeline: tokenizers, corpora, flat token streams and packed, sharded, resumable batches."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from dsv3_jax.errors import DataError
from dsv3_jax.text import BpeTokenizer, ByteTokenizer, load_tokenizer, make_tokenizer
from dsv3_jax.train.data import PackedBatches, stdlib_corpus, text_file_corpus, tokenize_corpus

MAX_BYTES = 200_000


@pytest.fixture(scope="module")
def stdlib_docs() -> list[tuple[str, str]]:
    return stdlib_corpus(max_bytes=MAX_BYTES)


@pytest.fixture(scope="module")
def bpe(stdlib_docs) -> BpeTokenizer:
    return BpeTokenizer.train((text for _, text in stdlib_docs), vocab_size=512)


def take(batches: PackedBatches, n: int) -> list[dict[str, np.ndarray]]:
    return list(itertools.islice(batches, n))


# --- tokenizers -------------------------------------------------------------------------------------------------


def test_byte_tokenizer_ids_and_round_trip():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (259, 0, 1, 2)
    assert tok.encode("A") == [ord("A") + 3]
    text = "héllo, 世界 🙂\n\ttabs <eos>"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert max(ids) < 259 and min(ids) >= 3
    assert tok.decode([0, *ids, 1, 2]) == text
    assert tok.decode([0xFF + 3]) == "\ufffd"
    with pytest.raises(DataError, match="259"):
        tok.decode([259])


def test_byte_tokenizer_save_load(tmp_path):
    ByteTokenizer().save(tmp_path / "tok")
    assert isinstance(load_tokenizer(tmp_path / "tok"), ByteTokenizer)


def test_bpe_specials_and_exact_ascii_round_trip(bpe, stdlib_docs):
    assert bpe.vocab_size == 512
    assert [bpe.vocab()[t] for t in ("<bos>", "<eos>", "<pad>")] == [0, 1, 2]
    for _, text in stdlib_docs[:5]:
        ids = bpe.encode(text)
        assert len(ids) < len(text.encode("utf-8"))
        assert bpe.decode(ids) == text
    spelled = "x = '<eos>'  # spelled specials stay text\r\n\té"
    assert 1 not in bpe.encode(spelled)
    assert bpe.decode(bpe.encode(spelled)) == spelled
    assert bpe.decode([0, *bpe.encode("ab"), 1, 2]) == "ab"


def test_bpe_training_is_deterministic(bpe, stdlib_docs):
    again = BpeTokenizer.train((text for _, text in stdlib_docs), vocab_size=512)
    assert again.vocab() == bpe.vocab()
    text = stdlib_docs[3][1]
    assert again.encode(text) == bpe.encode(text)


def test_bpe_save_load_round_trip(bpe, stdlib_docs, tmp_path):
    bpe.save(tmp_path)
    assert (tmp_path / "tokenizer.json").exists()
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, BpeTokenizer)
    assert loaded.vocab() == bpe.vocab()
    text = stdlib_docs[0][1] + "<bos>"
    assert loaded.encode(text) == bpe.encode(text)
    assert loaded.decode(loaded.encode(text)) == text


def test_bpe_vocab_too_small():
    with pytest.raises(DataError, match="vocab_size 100 < 259"):
        BpeTokenizer.train(["abc"], vocab_size=100)


def test_make_tokenizer_specs():
    assert isinstance(make_tokenizer("byte"), ByteTokenizer)
    tok = make_tokenizer("bpe:300", ["def f(x):\n    return x\n"] * 20)
    assert isinstance(tok, BpeTokenizer) and tok.vocab_size <= 300
    for bad in ("bpe", "bpe:lots", "word:10"):
        with pytest.raises(DataError, match="expected 'byte' or 'bpe:N'"):
            make_tokenizer(bad, [])


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="no tokenizer here"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_meta.json").write_text('{"kind": "wordpiece"}')
    with pytest.raises(DataError, match=r"tokenizer_meta\.json: field 'kind' is 'wordpiece'"):
        load_tokenizer(tmp_path)


# --- corpora ----------------------------------------------------------------------------------------------------


def test_stdlib_corpus(stdlib_docs):
    names = [name for name, _ in stdlib_docs]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert all(name.endswith(".py") for name in names)
    excluded = {"site-packages", "test", "tests", "idlelib", "lib2to3"}
    assert not any(excluded & set(name.split("/")[:-1]) for name in names)
    sizes = [len(text.encode("utf-8")) for _, text in stdlib_docs]
    assert sum(sizes) >= MAX_BYTES > sum(sizes[:-1])
    assert stdlib_corpus(max_bytes=MAX_BYTES) == stdlib_docs
    assert stdlib_corpus(max_bytes=1)[0] == stdlib_docs[0]


def test_text_file_corpus(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.md").write_text("# zed")
    (tmp_path / "b" / "a.py").write_text("x = 1\n")
    (tmp_path / "b" / "skip.bin").write_bytes(b"\xff\x00")
    (tmp_path / "a.txt").write_text("héllo")
    docs = text_file_corpus([str(tmp_path / "b"), str(tmp_path / "a.txt")])
    assert [name for name, _ in docs] == sorted(name for name, _ in docs)
    assert [(name.rsplit("/", 1)[-1], text) for name, text in docs] == [
        ("a.txt", "héllo"), ("a.py", "x = 1\n"), ("z.md", "# zed")]


def test_text_file_corpus_errors(tmp_path):
    with pytest.raises(DataError, match=r"missing\.txt: text corpus file does not exist"):
        text_file_corpus([str(tmp_path / "missing.txt")])
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\xff\xfe")
    with pytest.raises(DataError, match=r"bad\.txt: not valid UTF-8 \(byte 2"):
        text_file_corpus([str(bad)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="directory holds no"):
        text_file_corpus([str(tmp_path / "empty")])


def test_tokenize_corpus_frames_documents():
    tok = ByteTokenizer()
    stream = tokenize_corpus([("a", "hi"), ("b", ""), ("c", "é")], tok)
    assert stream.dtype == np.int32
    expected = [0, *tok.encode("hi"), 1, 0, 1, 0, *tok.encode("é"), 1]
    np.testing.assert_array_equal(stream, expected)
    with pytest.raises(DataError, match="no documents"):
        tokenize_corpus([], tok)


# --- packed batches ---------------------------------------------------------------------------------------------

SEQ = 8
WIDTH = SEQ + 1


def window_stream(num_windows: int, tail: int = 3) -> np.ndarray:
    """A stream whose window w holds w * WIDTH + [0, WIDTH): window ids are readable from the first token."""
    return np.arange(num_windows * WIDTH + tail, dtype=np.int32)


def window_ids(batch: dict[str, np.ndarray]) -> list[int]:
    return (batch["inputs"][:, 0] // WIDTH).tolist()


def test_packing_shapes_shift_and_epoch_coverage():
    batches = PackedBatches(window_stream(23), batch_size=4, seq_len=SEQ, seed=7)
    assert batches.steps_per_epoch == 5 and batches.num_windows == 23
    epochs = []
    for _ in range(3):
        epoch = take(batches, batches.steps_per_epoch)
        for b in epoch:
            assert b["inputs"].shape == b["targets"].shape == (4, SEQ)
            assert b["inputs"].dtype == b["targets"].dtype == np.int32
            np.testing.assert_array_equal(b["targets"][:, :-1], b["inputs"][:, 1:])
            np.testing.assert_array_equal(b["targets"][:, -1], b["inputs"][:, -1] + 1)
        ids = [w for b in epoch for w in window_ids(b)]
        assert len(ids) == len(set(ids)) == 20
        expected = np.random.default_rng((7, len(epochs))).permutation(23)[:20]
        assert ids == expected.tolist()
        epochs.append(ids)
    assert epochs[0] != epochs[1]


def test_same_seed_same_batches_other_seed_differs():
    stream = window_stream(40)
    a, b, c = (take(PackedBatches(stream, 4, SEQ, seed), 3) for seed in (1, 1, 2))
    assert [window_ids(x) for x in a] == [window_ids(x) for x in b]
    assert [window_ids(x) for x in a] != [window_ids(x) for x in c]


def test_shards_disjoint_and_union_is_global_batch():
    stream = window_stream(50)
    whole = take(PackedBatches(stream, batch_size=6, seq_len=SEQ, seed=3), 8)
    shards = [take(PackedBatches(stream, 2, SEQ, 3, shard_index=i, num_shards=3), 8) for i in range(3)]
    for step, global_batch in enumerate(whole):
        parts = [shard[step] for shard in shards]
        ids = [set(window_ids(p)) for p in parts]
        assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
        for key in ("inputs", "targets"):
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), global_batch[key])


@pytest.mark.parametrize("num_windows", [22, 400])
def test_resume_is_bit_exact(num_windows, stdlib_docs):
    stream = tokenize_corpus(stdlib_docs[:2], ByteTokenizer())[: num_windows * WIDTH + 5]
    uninterrupted = PackedBatches(stream, 2, SEQ, seed=11, shard_index=1, num_shards=2)
    take(uninterrupted, 7)
    state = json.loads(json.dumps(uninterrupted.state()))
    expected = take(uninterrupted, 5)
    restored = PackedBatches(stream, 2, SEQ, seed=11, shard_index=1, num_shards=2)
    restored.restore(state)
    for resumed in (PackedBatches(stream, 2, SEQ, seed=11, shard_index=1, num_shards=2, state=state), restored):
        for got, want in zip(take(resumed, 5), expected, strict=False):
            assert got["inputs"].tobytes() == want["inputs"].tobytes()
            assert got["targets"].tobytes() == want["targets"].tobytes()
    if num_windows == 22:
        assert uninterrupted.steps_per_epoch == 5 and state["epoch"] == 1 and uninterrupted.state()["epoch"] == 2


def test_too_short_stream_says_how_many_tokens():
    with pytest.raises(DataError, match="needs 72 tokens, but only 71 are available"):
        PackedBatches(np.arange(71), batch_size=4, seq_len=8, seed=0, num_shards=2)


@pytest.mark.parametrize("field, kwargs", [
    ("seq_len", {"seq_len": SEQ - 1}), ("batch_size", {"batch_size": 3}), ("seed", {"seed": 5}),
    ("num_shards", {"num_shards": 2})])
def test_restore_rejects_other_configuration(field, kwargs):
    stream = window_stream(60)
    saved = PackedBatches(stream, 2, SEQ, 0)
    take(saved, 2)
    config = {"batch_size": 2, "seq_len": SEQ, "seed": 0, **kwargs}
    other = PackedBatches(stream, **config)
    with pytest.raises(DataError, match=f"state field '{field}' is"):
        other.restore(saved.state())


def test_restore_rejects_malformed_state():
    batches = PackedBatches(window_stream(20), 2, SEQ, 0)
    state = batches.state()
    with pytest.raises(DataError, match="state has no field 'epoch'"):
        batches.restore({k: v for k, v in state.items() if k != "epoch"})
    with pytest.raises(DataError, match=r"'step' must be an integer in \[0, 10\), got 10"):
        batches.restore({**state, "step": 10})


@pytest.mark.parametrize("kwargs, message", [
    ({"shard_index": 2, "num_shards": 2}, r"shard_index must be an integer in \[0, 2\), got 2"),
    ({"shard_index": -1}, r"shard_index must be an integer in \[0, 1\), got -1"),
    ({"seed": -1}, "seed must be an integer >= 0"),
    ({"seq_len": 0}, "seq_len must be an integer >= 1"),
])
def test_bad_arguments(kwargs, message):
    config = {"batch_size": 2, "seq_len": SEQ, "seed": 0, **kwargs}
    with pytest.raises(DataError, match=message):
        PackedBatches(window_stream(30), **config)


@pytest.mark.parametrize("dtype", [np.int32, np.uint16])
def test_batch_spec_describes_the_next_batch_without_taking_it(dtype):
    """The trainer compiles its step from `batch_spec()` before the first batch is taken (`train.loop`)."""
    batches = PackedBatches(np.arange(400, dtype=dtype) % 50, batch_size=3, seq_len=7, seed=1)
    spec, before = batches.batch_spec(), batches.state()
    assert batches.state() == before  # nothing taken
    batch = next(batches)
    assert sorted(spec) == sorted(batch)
    for key, (shape, kind) in spec.items():
        assert batch[key].shape == shape and batch[key].dtype == kind, key

