"""`dsv3 convert` / `dsv3 export`: FP8 and bf16 HF checkpoints, the official mp format and .pt state dicts into
dsv3-jax block checkpoints and back, against a HF reference model; bad inputs; atomic output; SRC untouched."""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil

import jax
import numpy as np
import pytest
import torch
from convert_fixtures import (
    BF16,
    FIXTURE_CONFIG,
    FP8,
    MOVED_SCALES,
    OFFICIAL_CONFIG,
    dequantize_blocks,
    write_bf16_checkpoint,
    write_fp8_checkpoint,
    write_official_mp,
)

import dsv3_jax as d
from dsv3_jax.ckpt import convert, export
from dsv3_jax.ckpt.names import main_entries, mtp_entries
from dsv3_jax.ckpt.safetensors import CheckpointReader, SafetensorsFile, save_file
from dsv3_jax.cli.convert import register
from dsv3_jax.errors import ConvertError
from dsv3_jax.quant.fp8 import QuantArray

FP32_LOGIT_TOL = 1e-4
# bf16 weights (each rounded to 8 significant bits) against the HF model holding the unrounded float32 weights;
# logits here are O(1) (std ≈ 0.26): the observed gap is ≈ 4e-3.
BF16_LOGIT_TOL = 2e-2
TOKENS = np.random.RandomState(0).randint(0, FIXTURE_CONFIG.vocab_size, (2, 24)).astype(np.int32)
MTP = f"model.layers.{FIXTURE_CONFIG.num_hidden_layers}."


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def fx(work):
    return write_fp8_checkpoint(str(work / "fp8_src"))


@pytest.fixture(scope="module")
def converted(fx, work):
    """weights → converted directory of the FP8 fixture, converted once on first use."""
    cache: dict[str, str] = {}

    def get(weights: str) -> str:
        if weights not in cache:
            cache[weights] = str(work / f"out_{weights}")
            convert(fx.directory, cache[weights], weights, progress=False)
        return cache[weights]

    return get


def _tree_close(a, b, **kw):
    jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(np.asarray(x, np.float32),
                                                                   np.asarray(y, np.float32), **kw), a, b)


def _hf_logits(fx) -> np.ndarray:
    with torch.no_grad():
        return fx.model(torch.from_numpy(TOKENS).long()).logits.numpy()


def _read_dir(directory) -> dict[str, np.ndarray]:
    with CheckpointReader(directory) as reader:
        return {k: np.array(reader.get(k)) for k in reader}


def _hash_tree(directory) -> dict[str, str]:
    out = {}
    for path in sorted(glob.glob(os.path.join(directory, "**"), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


# ---------------------------------------------------------------- FP8 source → logits and parameters


def test_fp32_logits_match_hf(fx, converted):
    config, variables = d.load_pretrained(converted("fp32"))
    assert config.param_dtype == "float32" and config.replace(init_std=FIXTURE_CONFIG.init_std) == FIXTURE_CONFIG
    got = np.asarray(d.forward(config, variables, TOKENS))
    np.testing.assert_allclose(got, _hf_logits(fx), atol=FP32_LOGIT_TOL, rtol=0)


def test_bf16_logits_match_hf(fx, converted):
    config, variables = d.load_pretrained(converted("bf16"))
    assert config.param_dtype == "bfloat16"
    params = variables["params"]
    assert params["moe_layers"]["layers"]["moe"]["w_up"].dtype == BF16
    assert params["moe_layers"]["layers"]["moe"]["gate"].dtype == np.float32  # the router stays float32
    # bf16 weights upcast exactly to float32: the forward compiled for the fp32 test serves here too.
    upcast = jax.tree_util.tree_map(lambda x: np.asarray(x).astype(np.float32), variables)
    got = np.asarray(d.forward(config.replace(param_dtype="float32"), upcast, TOKENS))
    np.testing.assert_allclose(got, _hf_logits(fx), atol=BF16_LOGIT_TOL, rtol=0)
    _, fp32 = d.load_pretrained(converted("fp32"))
    jax.tree_util.tree_map(lambda b, f: np.testing.assert_array_equal(np.asarray(b), np.asarray(f).astype(b.dtype)),
                           variables, fp32)  # bf16 output == exact dequantisation rounded once


def test_half_split_rope_checkpoint(work):
    """rope_interleave=false (HF's half-split rotary rows): FP8 rows dequantised, permuted to pairs; same logits.
    Kept as FP8, the permuted q_b / kv_a weights are re-quantised: within one e4m3 step of their exact values."""
    fx = write_fp8_checkpoint(str(work / "half_split_src"), seed=5, rope_interleave=False)
    convert(fx.directory, work / "half_split_fp32", "fp32", progress=False)
    config, variables = d.load_pretrained(work / "half_split_fp32")
    np.testing.assert_allclose(d.forward(config, variables, TOKENS), _hf_logits(fx), atol=FP32_LOGIT_TOL, rtol=0)
    convert(fx.directory, work / "half_split_fp8", "fp8", progress=False)
    _, quant = d.load_pretrained(work / "half_split_fp8")
    exact = np.asarray(variables["params"]["dense_layers"]["layers"]["attn"]["wq_b"][0])
    got = _dequantize(quant["params"]["dense_layers"]["layers"]["attn"]["wq_b"])[0]
    assert not np.array_equal(exact, fx.tensors["model.layers.0.self_attn.q_b_proj.weight"].T)  # rows moved
    np.testing.assert_allclose(got, exact, rtol=2 ** -4, atol=np.abs(exact).max() / 448 / 8)


def test_every_parameter_equals_dequantised_tensor(fx, converted):
    """Main model and MTP: each stored (dequantised) tensor lands, transposed, at its variable path."""
    variables = jax.tree_util.tree_map(np.asarray, d.load_pretrained(converted("fp32"))[1])
    for entry in main_entries(FIXTURE_CONFIG) + mtp_entries(FIXTURE_CONFIG, 0):
        leaf = variables[entry.collection]
        for key in entry.path:
            leaf = leaf[key]
        got = np.asarray(leaf[entry.index] if entry.index else leaf)
        want = fx.tensors[entry.hf_name]
        np.testing.assert_array_equal(got, want.T if entry.transpose else want, err_msg=entry.hf_name)
    mtp = variables["params"]["mtp_0"]
    down = fx.tensors[MTP + "mlp.experts.5.down_proj.weight"]
    np.testing.assert_array_equal(mtp["block"]["moe"]["w_down"][5], down.T)
    np.testing.assert_array_equal(mtp["eh_proj"], fx.tensors[MTP + "eh_proj.weight"].T)
    np.testing.assert_array_equal(variables["router"]["mtp_0"]["block"]["moe"]["bias"],
                                  fx.tensors[MTP + "mlp.gate.e_score_correction_bias"])
    assert "embed_tokens" not in mtp and "shared_head" not in mtp  # the copies are dropped


def test_fp8_weights_kept_with_scales(fx, converted):
    _config, variables = d.load_pretrained(converted("fp8"))
    w_up = variables["params"]["moe_layers"]["layers"]["moe"]["w_up"]
    assert isinstance(w_up, QuantArray) and w_up.values.dtype == FP8 and w_up.values.shape == (2, 8, 160, 136)
    assert w_up.scales.shape == (2, 8, 2, 2)
    name = "model.layers.2.mlp.experts.6.up_proj.weight"
    np.testing.assert_array_equal(np.asarray(w_up.values[1, 6]).view(np.uint8), fx.stored[name].T.view(np.uint8))
    np.testing.assert_array_equal(w_up.scales[1, 6], fx.stored[name + "_scale_inv"].T)
    assert variables["params"]["embed_tokens"].dtype == BF16
    _, fp32 = d.load_pretrained(converted("fp32"))
    dense = jax.tree_util.tree_map(_dequantize, variables, is_leaf=lambda x: isinstance(x, QuantArray))
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), dense, fp32)


def _dequantize(x) -> np.ndarray:
    """A QuantArray (any leading axes) → float32 with numpy; a plain array → float32."""
    if not isinstance(x, QuantArray):
        return np.asarray(x, np.float32)
    values, scales = np.asarray(x.values), np.asarray(x.scales)
    k, n = values.shape[-2:]
    full = np.repeat(np.repeat(scales, 128, -2), 128, -1)[..., :k, :n]
    return values.astype(np.float32) * full


# ---------------------------------------------------------------- round trips through export


def test_roundtrip_bf16_hf_is_bit_exact(fx, work):
    src = str(work / "bf16_src")
    stored = write_bf16_checkpoint(src, fx)
    convert(src, work / "rt_bf16", "bf16", progress=False)
    export(work / "rt_bf16", work / "rt_bf16_hf", "bf16", max_shard_bytes=2_000_000, progress=False)
    back = _read_dir(work / "rt_bf16_hf")
    assert set(back) == set(stored)  # MTP copies of embedding and head written back too
    for name, value in stored.items():
        assert back[name].dtype == value.dtype, name
        np.testing.assert_array_equal(back[name].view(np.uint8), value.view(np.uint8), err_msg=name)
    with open(work / "rt_bf16_hf" / "model.safetensors.index.json") as f:
        assert len(set(json.load(f)["weight_map"].values())) > 1
    with open(work / "rt_bf16_hf" / "config.json") as f:
        assert "quantization_config" not in json.load(f)


def test_roundtrip_fp8_is_bit_exact(fx, converted, work):
    export(converted("fp8"), work / "rt_fp8_hf", "fp8", progress=False)
    back = _read_dir(work / "rt_fp8_hf")
    assert set(back) == set(fx.stored)
    for name, value in fx.stored.items():
        assert back[name].dtype == value.dtype, name
        np.testing.assert_array_equal(back[name].view(np.uint8), value.view(np.uint8), err_msg=name)
    with open(work / "rt_fp8_hf" / "config.json") as f:
        assert json.load(f)["quantization_config"]["weight_block_size"] == [128, 128]


def test_requantised_export_within_one_step(fx, converted, work):
    """Dequantised fp32 → export fp8 quantises afresh: every value within one e4m3 step of the original."""
    export(converted("fp32"), work / "rq_fp8_hf", "fp8", progress=False)
    back = _read_dir(work / "rq_fp8_hf")
    for name, q in fx.stored.items():
        if q.dtype != FP8:
            continue
        scale = fx.stored[name + "_scale_inv"]
        got = dequantize_blocks(back[name], back[name + "_scale_inv"])
        want = dequantize_blocks(q, scale)
        step = np.repeat(np.repeat(scale, 128, 0), 128, 1)[:q.shape[0], :q.shape[1]] * _e4m3_step(q)
        assert np.all(np.abs(got - want) <= step), name


def _e4m3_step(q: np.ndarray) -> np.ndarray:
    """Spacing of e4m3 values at |q| (3 mantissa bits; subnormal spacing 2^-9)."""
    mag = np.abs(q.astype(np.float32))
    exponent = np.floor(np.log2(np.maximum(mag, 2.0 ** -6)))
    return 2.0 ** (exponent - 3)


# ---------------------------------------------------------------- other source formats


def test_official_mp_format_matches_hf(fx, converted, work):
    mp = str(work / "mp2")
    write_official_mp(fx.directory, mp, 2, FIXTURE_CONFIG)
    assert sorted(os.listdir(mp)) == ["config.json", "model0-mp2.safetensors", "model1-mp2.safetensors"]
    with SafetensorsFile(os.path.join(mp, "model1-mp2.safetensors")) as f:
        assert f.info("layers.0.attn.wo.weight")[1] == (160, 80) and "layers.1.ffn.experts.4.w1.weight" in f
    convert(mp, work / "out_mp", "fp32", progress=False)
    official = str(work / "config_official.json")
    with open(official, "w") as f:
        json.dump(OFFICIAL_CONFIG, f)
    convert(mp, work / "out_mp_official_cfg", "fp32", config=official, progress=False)
    _, want = d.load_pretrained(converted("fp32"))
    for params in ("params", "router"):
        want[params].pop("mtp_0")  # the official format drops the MTP layer
    for out in ("out_mp", "out_mp_official_cfg"):
        _, got = d.load_pretrained(work / out)
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, want)


def test_torch_state_dict(fx, work):
    """A torch.save'd HF state dict (transformers' fused expert tensors, bf16) converts like the HF directory."""
    state = {k: (v if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16))
             for k, v in fx.model.state_dict().items()}
    assert any(k.endswith("mlp.experts.gate_up_proj") for k in state)
    src = work / "pt_src"
    src.mkdir()
    torch.save(state, src / "pytorch_model.bin")
    shutil.copy(os.path.join(fx.directory, "config.json"), src / "config.json")
    convert(src / "pytorch_model.bin", work / "out_pt", "bf16", progress=False)
    got = jax.tree_util.tree_map(np.asarray, d.load_pretrained(work / "out_pt")[1])
    assert "mtp_0" not in got["params"]
    for entry in main_entries(FIXTURE_CONFIG):
        leaf = got[entry.collection]
        for key in entry.path:
            leaf = leaf[key]
        value = np.asarray(leaf[entry.index] if entry.index else leaf)
        want = fx.tensors[entry.hf_name].astype(value.dtype)
        np.testing.assert_array_equal(value, want.T if entry.transpose else want, err_msg=entry.hf_name)


def test_load_with_shardings(converted):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(jax.devices()[:2]), ("expert",))
    config, plain = d.load_pretrained(converted("bf16"))

    def spec(path, leaf):
        experts = leaf.ndim == 4 and path[-1].key in ("w_gate", "w_up", "w_down")
        return NamedSharding(mesh, PartitionSpec(None, "expert") if experts else PartitionSpec())

    shardings = jax.tree_util.tree_map_with_path(spec, plain)
    _, placed = d.load_pretrained(converted("bf16"), config, shardings=shardings)
    w_up = placed["params"]["moe_layers"]["layers"]["moe"]["w_up"]
    assert w_up.sharding == shardings["params"]["moe_layers"]["layers"]["moe"]["w_up"]
    assert w_up.addressable_shards[0].data.shape == (2, 4, 160, 136)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), placed, plain)
    with pytest.raises(ConvertError, match="num_hidden_layers"):
        d.load_pretrained(converted("bf16"), config.replace(num_hidden_layers=4))


# ---------------------------------------------------------------- bad input, atomic output, SRC untouched


def _edit(directory: str, edit) -> None:
    """Apply `edit(tensors)` to every shard (name → array dict, mutated in place) and rewrite shards and index."""
    index_path = os.path.join(directory, "model.safetensors.index.json")
    with open(index_path) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    for shard in shards:
        path = os.path.join(directory, shard)
        with SafetensorsFile(path) as f:
            tensors = {k: np.array(f.get(k)) for k in sorted(f.keys())}
        edit(shard, tensors)
        save_file(tensors, path)
        index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
        index["weight_map"].update(dict.fromkeys(tensors, shard))
    with open(index_path, "w") as f:
        json.dump(index, f)


EXPERT = "model.layers.1.mlp.experts.3.up_proj.weight"
Q_B = "model.layers.1.self_attn.q_b_proj.weight"  # its scale sits in the second shard


def _drop(name):
    return lambda shard, t: [t.pop(k) for k in (name, name + "_scale_inv") if k in t]


def _put(name, value, shard_no=1):
    return lambda shard, t: t.update({name: value}) if shard.startswith(f"model-{shard_no:05d}") else None


def _replace(name, fn):
    return lambda shard, t: t.update({name: fn(t[name])}) if name in t else None


BAD_SOURCES = {
    "missing_tensor": (_drop(EXPERT), ["missing", EXPERT]),
    "missing_mtp_tensor": (_drop(MTP + "eh_proj.weight"), ["missing", MTP + "eh_proj.weight"]),
    "unexpected_tensor": (_put("model.layers.0.mlp.extra.weight", np.zeros((4, 4), BF16)),
                          ["unexpected", "model.layers.0.mlp.extra.weight", "model-00001-of-00003"]),
    "wrong_shape": (_replace("model.norm.weight", lambda x: x[:-1]),
                    ["model.norm.weight", "(159,)", "(160,)", "model-00002-of-00003"]),
    "wrong_dtype": (_replace("model.layers.0.input_layernorm.weight", lambda x: x.astype(np.int32)),
                    ["model.layers.0.input_layernorm.weight", "I32", "model-00001-of-00003"]),
    "scale_shape": (_replace(Q_B + "_scale_inv", lambda s: s[:1]),
                    [Q_B + "_scale_inv", "[1, 2]", "[2, 2]", Q_B, "model-00002-of-00003"]),
    "fp8_without_scale": (_drop(EXPERT + "_scale_inv"), ["no block scale", EXPERT, "model-00001-of-00003"]),
    "copy_shape": (_replace(MTP + "shared_head.head.weight", lambda x: x[:-2]),
                   [MTP + "shared_head.head.weight", "lm_head.weight", "model-00003-of-00003"]),
}


def _assert_no_output(out) -> None:
    out = str(out)
    assert not os.path.exists(out)
    assert not glob.glob(out + ".tmp-*"), "temporary directory left behind"


@pytest.mark.parametrize("case", list(BAD_SOURCES))
def test_bad_source_raises_clear_error(fx, tmp_path, case):
    edit, words = BAD_SOURCES[case]
    src = shutil.copytree(fx.directory, tmp_path / "src")
    _edit(str(src), edit)
    with pytest.raises(ConvertError) as info:
        convert(src, tmp_path / "out", "bf16", progress=False)
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    _assert_no_output(tmp_path / "out")


def _truncate(path):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)


def _corrupt(path):
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage{{")


@pytest.mark.parametrize("damage,words", [(_truncate, ["truncated"]), (_corrupt, ["header"])])
def test_damaged_shard(fx, tmp_path, damage, words):
    src = shutil.copytree(fx.directory, tmp_path / "src")
    damage(str(src / "model-00002-of-00003.safetensors"))
    with pytest.raises(ConvertError) as info:
        convert(src, tmp_path / "out", "fp8", progress=False)
    assert "model-00002-of-00003.safetensors" in str(info.value)
    assert all(w in str(info.value) for w in words), str(info.value)
    _assert_no_output(tmp_path / "out")


def test_index_names_absent_file(fx, tmp_path):
    src = shutil.copytree(fx.directory, tmp_path / "src")
    os.remove(src / "model-00003-of-00003.safetensors")
    with pytest.raises(ConvertError, match=r"model-00003-of-00003\.safetensors"):
        convert(src, tmp_path / "out", "bf16", progress=False)
    _assert_no_output(tmp_path / "out")


def test_output_exists(fx, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ConvertError, match="already exists") as info:
        convert(fx.directory, tmp_path / "out", "bf16", progress=False)
    assert str(tmp_path / "out") in str(info.value)
    assert os.listdir(tmp_path / "out") == ["keep.txt"]


def test_failure_midway_leaves_nothing_and_src_untouched(fx, tmp_path, monkeypatch):
    """A NaN scale in the MTP block (written last) fails after five blocks were saved: no OUT, no temp dir."""
    src = shutil.copytree(fx.directory, tmp_path / "src")
    name = MTP + "self_attn.kv_b_proj.weight_scale_inv"
    assert name in MOVED_SCALES
    _edit(str(src), _replace(name, lambda s: np.full_like(s, np.nan)))
    before = _hash_tree(src)
    from dsv3_jax.ckpt import conversion as pipeline

    written = []
    original = pipeline.BlockWriter.write
    monkeypatch.setattr(pipeline.BlockWriter, "write",
                        lambda self, n, t, *a: written.append(n) or original(self, n, t, *a))
    with pytest.raises(ConvertError, match=name):
        convert(src, tmp_path / "out", "bf16", progress=False)
    assert written == ["embed", "layer_000", "layer_001", "layer_002", "head"]
    _assert_no_output(tmp_path / "out")
    assert _hash_tree(src) == before


def test_src_never_modified(fx, tmp_path):
    before = _hash_tree(fx.directory)
    convert(fx.directory, tmp_path / "a", "fp8", progress=False)
    convert(fx.directory, tmp_path / "b", "fp32", progress=False)
    with pytest.raises(ConvertError):
        convert(fx.directory, tmp_path / "a", "bf16", progress=False)
    assert _hash_tree(fx.directory) == before


def test_cli_convert_and_export(fx, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="dsv3")
    register(parser.add_subparsers(dest="command", required=True))

    def run(*argv):
        args = parser.parse_args([str(a) for a in argv])
        return args.func(args)

    assert run("convert", fx.directory, tmp_path / "out", "--weights", "fp8") == 0
    err = capsys.readouterr().err
    assert "B/s" in err and "peak RSS" in err and "tensors" in err
    assert run("export", tmp_path / "out", tmp_path / "hf", "--weights", "fp8", "--max-shard-bytes", "1M") == 0
    assert len(glob.glob(str(tmp_path / "hf" / "model-*.safetensors"))) > 1
    with pytest.raises(ConvertError, match="already exists"):  # bad input: the CLI boundary reports it, exit 2
        run("convert", fx.directory, tmp_path / "out")
    from dsv3_jax.cli import main

    assert main(["convert", str(fx.directory), str(tmp_path / "out")]) == 2
    assert "already exists" in capsys.readouterr().err
