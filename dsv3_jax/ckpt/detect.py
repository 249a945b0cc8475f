"""Opening any supported checkpoint source: detect its kind (HF safetensors, the official model-parallel shards,
PyTorch state dicts), read its config (HF or official format), and yield the matching `Source`."""

from __future__ import annotations

import contextlib
import json
import os

from dsv3_jax.ckpt.official import MPSource, mp_files, official_config_to_hf
from dsv3_jax.ckpt.safetensors import INDEX_NAME
from dsv3_jax.ckpt.sources import TORCH_INDEX_NAME, TORCH_SUFFIXES, SafetensorsSource, Source, TorchSource, torch_files
from dsv3_jax.config import ModelConfig
from dsv3_jax.errors import ConfigError, ConvertError


def read_config_dict(path: str) -> dict:
    """A HF `config.json` dict, or the official repository's `config_*.json` translated to HF field names."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: cannot read config ({e})") from e
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: config must be a JSON object")
    if "dim" in data and "n_layers" in data:
        return official_config_to_hf(data)
    return data


def _config(config: str | os.PathLike | ModelConfig | None, directory: str, kind: str) -> tuple[ModelConfig, bool]:
    """(architecture config, rope_interleave) from an explicit config or `directory`/config.json."""
    if isinstance(config, ModelConfig):
        return config, True
    path = os.fspath(config) if config is not None else os.path.join(directory, "config.json")
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        hint = "pass --config" if kind != "hf" else "a HF checkpoint directory holds config.json"
        raise ConvertError(f"{path}: no config for the {kind} source ({hint})")
    data = read_config_dict(path)
    try:
        return ModelConfig.from_hf_config(data), bool(data.get("rope_interleave", True))
    except (ConfigError, TypeError) as e:
        raise ConvertError(f"{path}: {e}") from e


def detect(path: str) -> str:
    """"hf", "mp" (official model-parallel shards) or "torch" for a source path; ConvertError otherwise."""
    if os.path.isfile(path):
        if path.endswith(TORCH_SUFFIXES):
            return "torch"
        raise ConvertError(f"{path}: a source file must be a PyTorch state dict ({', '.join(TORCH_SUFFIXES)}); "
                           "for safetensors pass the directory")
    if not os.path.isdir(path):
        raise ConvertError(f"{path}: no such file or directory")
    names = os.listdir(path)
    if mp_files(path):
        return "mp"
    if INDEX_NAME in names or any(n.endswith(".safetensors") for n in names):
        return "hf"
    if TORCH_INDEX_NAME in names or any(n.endswith(TORCH_SUFFIXES) for n in names):
        return "torch"
    raise ConvertError(f"{path}: no checkpoint found (no safetensors, model{{r}}-mp{{n}} shards or .pt/.bin files)")


@contextlib.contextmanager
def open_source(path: str | os.PathLike, config: str | os.PathLike | ModelConfig | None = None):
    """Yield (source, architecture config, rope_interleave, kind) for any supported source; closes it after."""
    path = os.path.abspath(os.fspath(path))
    kind = detect(path)
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    model_config, interleaved = _config(config, directory, kind)
    if kind == "hf":
        source: Source = SafetensorsSource.from_directory(path)
    elif kind == "mp":
        source = MPSource(path)
    else:
        files = [path] if os.path.isfile(path) else torch_files(path)
        source = TorchSource(files, path)
    try:
        yield source, model_config, interleaved, kind
    finally:
        source.close()
