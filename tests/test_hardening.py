"""Bad inputs and faults (issue 14): a short run ends with exit 0 and a sample below the tokenizer's vocabulary;
one trainer per run directory; bad settings refused before the run directory exists; a run directory refuses
another tokenizer; SIGINT and SIGKILL during `dsv3 convert` leave nothing once the next invocation ran; NaN/Inf
weights and overlapping safetensors offsets refused; CLI errors as one paragraph on stderr, no traceback."""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import CLI, REPO, cli_env
from convert_fixtures import FIXTURE_CONFIG, write_bf16_checkpoint, write_fp8_checkpoint

import dsv3_jax as d
from dsv3_jax.ckpt import convert, load_converted, load_pretrained
from dsv3_jax.ckpt.safetensors import SafetensorsFile, read_header, save_file
from dsv3_jax.cli.main import main
from dsv3_jax.errors import ConfigError, ConvertError, DataError, SafetensorsError, TrainingError
from dsv3_jax.infer.sampling import Sampling, sample_logits
from dsv3_jax.train.loop import run_lock, train
from dsv3_jax.train.run_config import load_run_config, run_config_from_dict

MODEL = dict(preset="tiny", hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
             first_k_dense_replace=1, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
             qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
             max_position_embeddings=64)
TABLE = {"model": MODEL, "data": {"corpus": "stdlib", "max_bytes": 20000, "tokenizer": "byte"},
         "train": {"steps": 2, "batch_size": 2, "seq_len": 16, "lr": 1e-3, "warmup_steps": 0},
         "run": {"log_every": 100, "ckpt_every": 2, "sample_tokens": 24, "sample_temperature": 1.0}}


def _toml_value(v) -> str:
    return ("nan" if v != v else json.dumps(v).replace("Infinity", "inf")) if isinstance(v, float) else json.dumps(v)


def _toml(table: dict) -> str:
    lines = []
    for section, fields in table.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in fields.items()]
    return "\n".join(lines) + "\n"


def _dsv3(*argv, cache, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, argv)], cwd=REPO, env=cli_env(cache),
                          capture_output=True, text=True, timeout=timeout)


def _clean_error(err: str) -> None:
    """One `error:` paragraph, no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if not line.startswith(("WARNING", "train:", "convert:"))]
    assert lines and lines[-1].startswith("error: "), err
    assert sum(line.startswith("error:") for line in lines) == 1, err


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("hardening")


@pytest.fixture(scope="module")
def run_dir(work):
    """`dsv3 train` of a tiny model for 2 steps: (run directory, completed process)."""
    toml = work / "tiny.toml"
    toml.write_text(_toml(TABLE))
    out = work / "run"
    return out, _dsv3("train", "--config", toml, "--out", out, cache=work / "jax_cache")


# ---------------------------------------------------------------- 1. padded vocabulary: a sample, exit 0


def test_short_run_ends_with_exit_0_and_a_sample(run_dir):
    out, proc = run_dir
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "--- sample" in proc.stdout and "Traceback" not in proc.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["vocab_size"] == 320 and config["data"]["tokenizer"] == "byte"  # 259 padded to 320


def test_generate_on_run_dir_decodes(run_dir, capsys):
    out, _ = run_dir
    assert main(["generate", "--checkpoint", str(out), "--prompt", "def ", "--temperature", "1.0",
                 "--max-new-tokens", "24"]) == 0
    assert "tokens in" in capsys.readouterr().err


def test_sampler_never_emits_padded_ids():
    logits = jnp.zeros((4, 320)).at[:, 259:].set(50.0)  # the padded rows are by far the likeliest
    for sampling in (Sampling(), Sampling(1.0), Sampling(1.0, top_k=5), Sampling(0.7, top_p=0.9)):
        ids = sample_logits(logits, jax.random.key(0), dataclasses.replace(sampling, vocab_limit=259))
        assert int(ids.max()) < 259, sampling


def test_generate_with_vocab_limit_plain_and_speculative():
    """A limit of 40 ids in a random model of 320: unmasked greedy decoding leaves it, masked decoding never does,
    and speculative decoding (which verifies unmasked) falls back to the same masked greedy tokens."""
    config = run_config_from_dict({"model": MODEL}).model.replace(vocab_size=320)
    variables = d.init_variables(config, 0)
    prompt, limit = list(range(3, 11)), 40
    free = d.generate(config, variables, prompt, 8, stop_ids=(), speculative=True).tokens[0]
    assert max(free) >= limit
    masked = d.generate(config, variables, prompt, 8, stop_ids=(), vocab_limit=limit).tokens[0]
    assert max(masked) < limit
    speculative = d.generate(config, variables, prompt, 8, stop_ids=(), vocab_limit=limit, speculative=True)
    assert speculative.tokens[0] == masked


# ---------------------------------------------------------------- 2. one trainer per run directory


def test_concurrent_trainer_refused_and_stale_lock_taken_over(work, tmp_path):
    out = tmp_path / "locked"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from dsv3_jax.train.loop import run_lock\n"
                               f"with run_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(600)"],
                              cwd=REPO, env=cli_env(work / "jax_cache"), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TrainingError, match=rf"in use by another trainer \(pid {holder.pid}\b"):
            train(run_config_from_dict(TABLE), str(out), log=lambda *_: None)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    said = []
    with run_lock(str(out), log=said.append):
        pass
    assert said and f"pid {holder.pid}" in said[0] and "no longer running" in said[0]
    assert sorted(os.listdir(out)) == [".lock"]


# ---------------------------------------------------------------- 3. settings refused before anything exists


BAD_SETTINGS = {
    "lr_negative": (("train", "lr", -1.0), r"\[train\] lr = -1\.0"),
    "lr_nan": (("train", "lr", float("nan")), r"\[train\] lr = nan"),
    "warmup_negative": (("train", "warmup_steps", -5), r"warmup_steps = -5"),
    "steps_float": (("train", "steps", 20.5), r"steps = 20\.5: must be an integer"),
    "ckpt_every_zero": (("run", "ckpt_every", 0), r"ckpt_every = 0"),
    "keep_zero": (("run", "keep_checkpoints", 0), r"keep_checkpoints = 0"),
    "seq_len_too_long": (("train", "seq_len", 65), r"seq_len = 65 exceeds \[model\] max_position_embeddings = 64"),
    "batch_vs_accum": (("train", "grad_accum", 3), r"batch_size ?= ?2 is not divisible by grad_accum ?= ?3"),
    "unknown_corpus": (("data", "corpus", "wikipedia"), r"corpus = 'wikipedia': unknown corpus"),
    "tokenizer_spec": (("data", "tokenizer", "bpe:12"), r"tokenizer = 'bpe:12'"),
}


@pytest.mark.parametrize("case", list(BAD_SETTINGS))
def test_bad_settings_refused_before_the_run_directory_exists(tmp_path, case):
    (section, field, value), pattern = BAD_SETTINGS[case]
    table = {k: dict(v) for k, v in TABLE.items()}
    table[section][field] = value
    toml = tmp_path / "bad.toml"
    toml.write_text(_toml(table))
    with pytest.raises(ConfigError, match=pattern):
        load_run_config(toml)
    rc = run_config_from_dict(TABLE)  # the same value set programmatically is refused by train() itself
    with pytest.raises(ValueError, match=pattern):  # ConfigError, or TrainConfig's own check
        rc = dataclasses.replace(rc, **{section: dataclasses.replace(getattr(rc, section), **{field: value})})
        train(rc, str(tmp_path / "run"), log=lambda *_: None)
    assert not os.path.exists(tmp_path / "run")


def test_missing_corpus_file_and_unknown_mesh_refused_before_the_run_directory_exists(tmp_path, capsys):
    rc = run_config_from_dict({**TABLE, "data": {"corpus": "files", "files": [str(tmp_path / "absent.txt")]}})
    with pytest.raises(DataError, match=r"absent\.txt"):
        train(rc, str(tmp_path / "run"), log=lambda *_: None)
    toml = tmp_path / "run.toml"
    toml.write_text(_toml(TABLE))
    assert main(["train", "--config", str(toml), "--out", str(tmp_path / "run"), "--mesh", "nope"]) == 2
    assert "unknown layout 'nope'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")


def test_run_directory_refuses_another_tokenizer(run_dir, tmp_path):
    out, proc = run_dir
    assert proc.returncode == 0
    bpe = run_config_from_dict({**TABLE, "data": {**TABLE["data"], "tokenizer": "bpe:300"}})
    with pytest.raises(TrainingError, match=r"\[data\] tokenizer='byte', this run has 'bpe:300'"):
        train(bpe, str(out), log=lambda *_: None)
    leftover = tmp_path / "leftover"  # a failed run's tokenizer/ without a recorded config
    shutil.copytree(out / "tokenizer", leftover / "tokenizer")
    with pytest.raises(TrainingError, match=r"no config.json\) and not empty: holds \['tokenizer'\]"):
        train(bpe, str(leftover), log=lambda *_: None)


# ---------------------------------------------------------------- 4. SIGINT / SIGKILL during convert


@pytest.fixture(scope="module")
def fp8_src(work):
    return write_fp8_checkpoint(str(work / "fp8_src"), dataclasses.replace(FIXTURE_CONFIG, num_hidden_layers=6))


def _interrupt_convert(src: str, out, sig: int, cache) -> tuple[int, str]:
    """Start `dsv3 convert`, send `sig` once its first block file appears (mid-conversion); (return code, stderr)."""
    proc = subprocess.Popen([*CLI, "convert", src, str(out), "--quiet"],
                            cwd=REPO, env=cli_env(cache), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if glob.glob(f"{out}.tmp-*/blocks/*.safetensors*"):
            proc.send_signal(sig)
            break
        time.sleep(0.001)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (-sig, 128 + sig, 130), f"convert ended (rc {proc.returncode}) before the signal:\n{err}"
    return proc.returncode, err


def _leftovers(out) -> list[str]:
    return glob.glob(f"{out}*")


def test_sigint_mid_convert_leaves_nothing(fp8_src, work, tmp_path):
    out = tmp_path / "out"
    code, err = _interrupt_convert(fp8_src.directory, out, signal.SIGINT, work / "jax_cache")
    assert code == 130 and "Traceback" not in err, err
    time.sleep(0.5)  # nothing may reappear (a writer thread outliving the cleanup)
    assert _leftovers(out) == []


def test_sigkill_mid_convert_is_swept_by_the_next_invocation(fp8_src, work, tmp_path, capsys):
    out = tmp_path / "out"
    code, _ = _interrupt_convert(fp8_src.directory, out, signal.SIGKILL, work / "jax_cache")
    assert code == -signal.SIGKILL
    stale = glob.glob(f"{out}.tmp-*")
    assert len(stale) == 1 and not os.path.exists(out)
    assert main(["convert", fp8_src.directory, str(out), "--quiet"]) == 0
    assert f"removed {stale[0]}" in capsys.readouterr().err
    assert _leftovers(out) == [str(out)]
    assert oct(os.stat(out).st_mode & 0o777) == oct(0o777 & ~_umask())  # the user's umask, not mkdtemp's 0700


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------- 5. NaN weights, overlapping offsets


@pytest.fixture(scope="module")
def nan_src(fp8_src, work):
    """The fixture as bf16 HF safetensors with one NaN in one tensor: (directory, tensor name, shard file)."""
    src = str(work / "nan_src")
    write_bf16_checkpoint(src, fp8_src)
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    with open(os.path.join(src, "model.safetensors.index.json"), encoding="utf-8") as f:
        shard = json.load(f)["weight_map"][name]
    with SafetensorsFile(os.path.join(src, shard)) as f:
        tensors = {k: np.array(f.get(k)) for k in f}
    tensors[name][2, 5] = np.nan
    save_file(tensors, os.path.join(src, shard), metadata={"format": "pt"})
    return src, name, shard


def test_nan_weights_refused_unless_allowed(nan_src, tmp_path):
    src, name, shard = nan_src
    with pytest.raises(ConvertError, match=rf"{shard}.*tensor {name} holds 1 non-finite"):
        convert(src, tmp_path / "out", "bf16", progress=False)
    assert _leftovers(tmp_path / "out") == []
    with pytest.raises(ConvertError, match=rf"{shard}.*{name} holds 1 non-finite"):
        load_pretrained(src)
    convert(src, tmp_path / "out", "bf16", progress=False, allow_nonfinite=True)
    with pytest.raises(ConvertError, match=r"layer_001.safetensors: block layer_001 tensor .*holds 1 non-finite"):
        load_converted(tmp_path / "out")
    _, variables = load_converted(tmp_path / "out", allow_nonfinite=True)
    leaves = jax.tree_util.tree_leaves(variables["params"])
    assert sum(int(np.isnan(np.asarray(x, np.float32)).sum()) for x in leaves) == 1


def _raw_file(path, entries: dict, data: bytes) -> str:
    header = json.dumps(entries).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header + data)
    return str(path)


@pytest.mark.parametrize("offsets, data, words", [
    ({"a": [0, 16], "b": [8, 24]}, 24, ["overlaps", "'b'", "'a'"]),
    ({"a": [0, 16], "b": [24, 40]}, 40, ["8 unused bytes before tensor 'b'", "'a' ends at data byte 16"]),
    ({"a": [16, 32], "b": [0, 16]}, 40, ["8 bytes after the last tensor", "'a'"]),
])
def test_safetensors_layout_overlap_gap_trailing_refused(tmp_path, offsets, data, words):
    entries = {k: {"dtype": "F32", "shape": [4], "data_offsets": v} for k, v in offsets.items()}
    path = _raw_file(tmp_path / "bad.safetensors", entries, b"\0" * data)
    with pytest.raises(SafetensorsError) as info:
        read_header(path)
    assert "bad.safetensors" in str(info.value)
    for word in words:
        assert word in str(info.value), str(info.value)
    import safetensors.numpy

    with pytest.raises(Exception):  # noqa: B017 - the reference library refuses the same file
        safetensors.numpy.load_file(path)


# ---------------------------------------------------------------- 6. CLI errors: one paragraph, exit 2 / 1


def test_cli_errors_are_one_paragraph_without_traceback(run_dir, fp8_src, work, tmp_path):
    out, _ = run_dir
    (tmp_path / "file").write_text("x")
    cases = [
        (("generate", "--checkpoint", out, "--prompt-ids", "1,a"), 2, "entry 1 ('a') is not an integer"),
        (("train", "--config", tmp_path / "absent.toml"), 2, "no such run config file"),
        (("info", "nonsense"), 2, "neither a preset"),
        (("convert", fp8_src.directory, tmp_path / "file" / "out"), 1, "ENOTDIR"),
    ]
    for argv, code, words in cases:
        proc = _dsv3(*argv, cache=work / "jax_cache", timeout=120)
        assert proc.returncode == code, (argv, proc.stderr)
        _clean_error(proc.stderr)
        assert words in proc.stderr, (argv, proc.stderr)


def test_cli_boundary_in_process(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(_toml({**TABLE, "train": {**TABLE["train"], "steps": 20.5}}))
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "run")]) == 2
    _clean_error(capsys.readouterr().err)
    assert main(["generate", "--checkpoint", str(tmp_path / "absent"), "--prompt-ids", "1"]) == 2
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text('{"hidden_size": -3}')
    from dsv3_jax.ckpt.store import FORMAT, VERSION

    (tmp_path / "cfg" / "manifest.json").write_text(json.dumps({"format": FORMAT, "version": VERSION,
                                                                "weights": "bf16", "blocks": []}))
    with pytest.raises(ConvertError, match=r"cfg/config.json.*hidden_size"):
        load_pretrained(tmp_path / "cfg")
    assert not os.path.exists(tmp_path / "run")
