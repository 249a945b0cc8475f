"""Per-run settings read from a small TOML file (`experiments/configs/*.toml`): [model], [data], [train], [run].

Every field is checked here, before anything is created: its type (from the dataclass annotation), its range, and
the relations between fields (batch_size divisible by grad_accum, seq_len within max_position_embeddings, ...).
Errors name the section, the field, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Callable
from typing import Any

from dsv3_jax.config import ModelConfig, RopeScaling
from dsv3_jax.errors import ConfigError, is_int
from dsv3_jax.train.step import TrainConfig

CORPORA = {"stdlib": "the Python standard library's own sources (embedded, no download)",
           "files": "your UTF-8 text files, listed in [data] files"}
MIN_BPE_VOCAB = 259  # 256 byte tokens + 3 specials


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
    mesh: str | None = None  # a layout name from sharding/layouts.toml (None: one device)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    train: TrainConfig
    data: DataConfig = DataConfig()
    run: RunSettings = RunSettings()

    def to_dict(self) -> dict:
        return {"model": dataclasses.asdict(self.model), "train": dataclasses.asdict(self.train),
                "data": dataclasses.asdict(self.data), "run": dataclasses.asdict(self.run)}


# ---------------------------------------------------------------- types, from the dataclass annotations


_TYPES: dict[str, tuple[Callable[[object], bool], str]] = {
    "int": (is_int, "an integer"),
    "float": (lambda v: is_int(v) or isinstance(v, float), "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "tuple[str, ...]": (lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v),
                        "a list of strings"),
}


def _check_type(section: str, name: str, value: object, annotation: str) -> object:
    """`value` if it has the annotated type (ints accepted and converted where a float is expected)."""
    optional = annotation.endswith(" | None")
    base = annotation.removesuffix(" | None")
    if value is None and optional:
        return None
    ok, what = _TYPES[base]
    if not ok(value):
        raise ConfigError(f"[{section}] {name} = {value!r}: must be {what}{' (or absent)' if optional else ''}, "
                          f"got {type(value).__name__}")
    if base == "float":
        return float(value)
    return tuple(value) if base.startswith("tuple") else value


# ---------------------------------------------------------------- ranges and relations


def _at_least(low: int) -> tuple[Callable[[object], bool], str]:
    return (lambda v: v is None or v >= low), f">= {low}"


_POSITIVE = ((lambda v: math.isfinite(v) and v > 0), "a finite number > 0")
_NON_NEGATIVE = ((lambda v: math.isfinite(v) and v >= 0), "a finite number >= 0")
_FRACTION = ((lambda v: 0 <= v < 1), "in [0, 1)")

RULES: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "train": {
        **{k: _at_least(1) for k in ("steps", "batch_size", "seq_len", "grad_accum")},
        **{k: _at_least(0) for k in ("warmup_steps", "decay_start", "decay_end", "mtp_lambda_switch",
                                     "bias_gamma_stop", "seed")},
        "lr": _POSITIVE, "eps": _POSITIVE, "clip_norm": _POSITIVE, "b1": _FRACTION, "b2": _FRACTION,
        **{k: _NON_NEGATIVE for k in ("final_lr_ratio", "weight_decay", "mtp_lambda", "mtp_lambda_after",
                                      "balance_alpha", "bias_gamma")},
        "moment_dtype": ((lambda v: v in ("float32", "bfloat16")), "'float32' or 'bfloat16'"),
    },
    "data": {"max_bytes": _at_least(1)},
    "run": {
        **{k: _at_least(1) for k in ("log_every", "ckpt_every", "keep_checkpoints")},
        "sample_tokens": _at_least(0),
        "sample_temperature": _NON_NEGATIVE,
        "mesh": ((lambda v: v is None or bool(v.strip())), "a layout name (or absent)"),
    },
}


def _check_tokenizer_spec(spec: str) -> None:
    kind, _, size = spec.partition(":")
    if spec == "byte" or (kind == "bpe" and size.isdigit() and int(size) >= MIN_BPE_VOCAB):
        return
    raise ConfigError(f"[data] tokenizer = {spec!r}: expected 'byte' or 'bpe:N' with N an integer >= "
                      f"{MIN_BPE_VOCAB} (256 byte tokens + 3 specials)")


def _check_relations(section: str, v: dict) -> None:
    if section == "train":
        if v["batch_size"] % v["grad_accum"]:
            raise ConfigError(f"[train] batch_size = {v['batch_size']} is not divisible by grad_accum = "
                              f"{v['grad_accum']}")
        if v["decay_start"] is not None and v["decay_end"] is not None and v["decay_end"] < v["decay_start"]:
            raise ConfigError(f"[train] decay_end = {v['decay_end']} is before decay_start = {v['decay_start']}")
    elif section == "data":
        if v["corpus"] not in CORPORA:
            known = "; ".join(f"{k!r}: {what}" for k, what in CORPORA.items())
            raise ConfigError(f"[data] corpus = {v['corpus']!r}: unknown corpus; known corpora are {known}")
        if v["corpus"] == "files" and not v["files"]:
            raise ConfigError("[data] corpus = 'files' needs files = [\"path\", ...] (text files or directories)")
        if v["corpus"] != "files" and v["files"]:
            raise ConfigError(f"[data] files are read only with corpus = 'files'; this run has corpus = "
                              f"{v['corpus']!r}")
        _check_tokenizer_spec(v["tokenizer"])


def check_section(section: str, values: dict) -> None:
    """Range and relation checks of one section's complete field values; ConfigError naming the field."""
    for name, (ok, what) in RULES.get(section, {}).items():
        value = values[name]
        if not ok(value):
            raise ConfigError(f"[{section}] {name} = {value!r}: must be {what}")
    _check_relations(section, values)


def check_run_config(rc: RunConfig) -> None:
    """Every check of a run config, the relations between its sections included (ConfigError on the first)."""
    for section in ("train", "data", "run"):
        obj = getattr(rc, section)
        values = {f.name: _check_type(section, f.name, getattr(obj, f.name), f.type)
                  for f in dataclasses.fields(obj)}
        check_section(section, values)
    max_pos = rc.model.max_position_embeddings
    if rc.train.seq_len > max_pos:
        raise ConfigError(f"[train] seq_len = {rc.train.seq_len} exceeds [model] max_position_embeddings = "
                          f"{max_pos}")
    if rc.run.sample_tokens >= max_pos:
        raise ConfigError(f"[run] sample_tokens = {rc.run.sample_tokens}: must be < [model] "
                          f"max_position_embeddings = {max_pos} (the prompt needs room too)")


# ---------------------------------------------------------------- reading


def _build(cls, table: dict, section: str, **extra: Any):
    if not isinstance(table, dict):
        raise ConfigError(f"[{section}] must be a table, got {type(table).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(f"[{section}] unknown field(s) {unknown}; known: {sorted(fields)}")
    given = {k: _check_type(section, k, v, fields[k].type) for k, v in table.items()}
    defaults = {k: f.default for k, f in fields.items() if f.default is not dataclasses.MISSING}
    check_section(section, {**defaults, **given})
    try:
        return cls(**given, **extra)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"[{section}] {e}") from None


def model_from_table(table: dict) -> ModelConfig:
    if not isinstance(table, dict):
        raise ConfigError(f"[model] must be a table, got {type(table).__name__}")
    table = dict(table)
    preset = table.pop("preset", "small")
    try:
        base = ModelConfig.from_preset(preset)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"[model] preset: {e}") from None
    if "rope_scaling" in table:
        raise ConfigError("[model] rope_scaling cannot be overridden from a run file; pick a preset")
    unknown = sorted(set(table) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise ConfigError(f"[model] unknown field(s) {unknown}")
    try:
        return base.replace(**table)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"[model] {e}") from None


def run_config_from_dict(data: dict) -> RunConfig:
    """A RunConfig from the four tables, each field checked; `check_run_config` adds the relations between
    sections (seq_len within the model's positions), which `load_run_config` and `train` check."""
    unknown = sorted(set(data) - {"model", "data", "train", "run"})
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}; expected [model], [data], [train], [run]")
    rc = RunConfig(model=model_from_table(data.get("model", {})),
                   train=_build(TrainConfig, data.get("train", {}), "train"),
                   data=_build(DataConfig, data.get("data", {}), "data"),
                   run=_build(RunSettings, data.get("run", {}), "run"))
    return rc


def run_config_from_json(raw: dict) -> RunConfig:
    """The run config a run directory recorded in config.json (`RunConfig.to_dict`, the full model included)."""
    model = dict(raw["model"])
    rope = model.get("rope_scaling")
    model["rope_scaling"] = None if rope is None else RopeScaling(**rope)
    return RunConfig(model=ModelConfig(**model), train=_build(TrainConfig, raw["train"], "train"),
                     data=_build(DataConfig, raw.get("data", {}), "data"),
                     run=_build(RunSettings, raw.get("run", {}), "run"))


def load_run_config(path: str | os.PathLike, **train_overrides: Any) -> RunConfig:
    """Read a TOML run file; `train_overrides` (e.g. steps=50) replace [train] fields."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such run config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a TOML run config file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from None
    train = data.setdefault("train", {})
    if isinstance(train, dict):
        train.update({k: v for k, v in train_overrides.items() if v is not None})
    try:
        rc = run_config_from_dict(data)
        check_run_config(rc)
        return rc
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
