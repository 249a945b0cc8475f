"""Per-run settings read from a small TOML file (`experiments/configs/*.toml`): [model], [data], [train], [run]."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from typing import Any

from dsv3_jax.config import ModelConfig
from dsv3_jax.errors import ConfigError
from dsv3_jax.train.step import TrainConfig


@dataclasses.dataclass(frozen=True)
class DataConfig:
    corpus: str = "stdlib"  # "stdlib" (the Python standard library's sources: no download) or "files"
    files: tuple[str, ...] = ()
    max_bytes: int | None = 4_000_000
    tokenizer: str = "byte"  # "byte" or "bpe:N"


@dataclasses.dataclass(frozen=True)
class RunSettings:
    log_every: int = 10
    ckpt_every: int = 100
    keep_checkpoints: int = 3
    sample_prompt: str = "def "
    sample_tokens: int = 120
    sample_temperature: float = 0.8
    mesh: str | None = None  # a layout name from sharding/rules.py (None: one device)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    train: TrainConfig
    data: DataConfig = DataConfig()
    run: RunSettings = RunSettings()

    def to_dict(self) -> dict:
        return {"model": dataclasses.asdict(self.model), "train": dataclasses.asdict(self.train),
                "data": dataclasses.asdict(self.data), "run": dataclasses.asdict(self.run)}


def _build(cls, table: dict, section: str, **extra: Any):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"[{section}] unknown field(s) {unknown}; known: {sorted(known)}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
    try:
        return cls(**values, **extra)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[{section}] {e}") from None


def model_from_table(table: dict) -> ModelConfig:
    table = dict(table)
    preset = table.pop("preset", "small")
    base = ModelConfig.from_preset(preset)
    if "rope_scaling" in table:
        raise ConfigError("[model] rope_scaling cannot be overridden from a run file; pick a preset")
    unknown = sorted(set(table) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise ConfigError(f"[model] unknown field(s) {unknown}")
    return base.replace(**table)


def run_config_from_dict(data: dict) -> RunConfig:
    unknown = sorted(set(data) - {"model", "data", "train", "run"})
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; expected [model], [data], [train], [run]")
    return RunConfig(model=model_from_table(data.get("model", {})),
                     train=_build(TrainConfig, data.get("train", {}), "train"),
                     data=_build(DataConfig, data.get("data", {}), "data"),
                     run=_build(RunSettings, data.get("run", {}), "run"))


def load_run_config(path: str | os.PathLike, **train_overrides: Any) -> RunConfig:
    """Read a TOML run file; `train_overrides` (e.g. steps=50) replace [train] fields."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such run config file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    data.setdefault("train", {}).update({k: v for k, v in train_overrides.items() if v is not None})
    try:
        return run_config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
