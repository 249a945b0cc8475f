"""The training loop: data, state, jitted step, JSONL metrics, orbax checkpoints, exact resume, final sample.

Run directory layout:
    config.json      the run config (model, train, data, run)
    tokenizer/       the tokenizer the run was trained with
    metrics.jsonl    one JSON object per step
    checkpoints/     orbax CheckpointManager: {step}/state (params, router, opt_state, step) + {step}/meta (JSON)
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

from dsv3_jax.config import RUNTIME_FIELDS, ModelConfig
from dsv3_jax.errors import TrainingError
from dsv3_jax.model.api import init_variables
from dsv3_jax.text.tokenizers import load_tokenizer, make_tokenizer
from dsv3_jax.train import data as data_lib
from dsv3_jax.train.run_config import RunConfig, run_config_from_dict
from dsv3_jax.train.step import TrainState, init_state, jit_train_step, make_optimizer, make_train_step


def build_data(rc: RunConfig, out_dir: str):
    """(tokenizer, PackedBatches) — the tokenizer is made once and reloaded from the run directory on resume."""
    docs = data_lib.stdlib_corpus(rc.data.max_bytes) if rc.data.corpus == "stdlib" else \
        data_lib.text_file_corpus(list(rc.data.files))
    tok_dir = os.path.join(out_dir, "tokenizer")
    if os.path.isdir(tok_dir):
        tokenizer = load_tokenizer(tok_dir)
    else:
        tokenizer = make_tokenizer(rc.data.tokenizer, (text for _, text in docs))
        tokenizer.save(tok_dir)
    tokens = data_lib.tokenize_corpus(docs, tokenizer)
    batches = data_lib.PackedBatches(tokens, rc.train.batch_size, rc.train.seq_len, rc.train.seed)
    return tokenizer, batches


VOCAB_MULTIPLE = 64  # padded vocabulary: divisible by any mesh axis the vocab is sharded over


def model_config_for(rc: RunConfig, vocab_size: int) -> ModelConfig:
    """The run's model with its vocabulary sized to the tokenizer, rounded up to a multiple of 64 (the extra
    ids never occur in the data)."""
    return rc.model.replace(vocab_size=-(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE)


def _manager(out_dir: str, rc: RunConfig) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=rc.run.keep_checkpoints, create=True)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(out_dir, "checkpoints")), options=options,
                                 item_names=("state", "meta"))


def _check_same_config(saved: dict, rc: RunConfig, out_dir: str) -> None:
    current = json.loads(json.dumps(rc.to_dict()))
    for section in ("model", "data"):
        for key, value in current[section].items():
            if saved[section].get(key) != value and key not in RUNTIME_FIELDS:
                raise TrainingError(f"{out_dir}: checkpoint was trained with [{section}] {key}="
                                    f"{saved[section].get(key)!r}, this run has {value!r}; use another --out")


def _restore(manager, abstract_state, rc: RunConfig, out_dir: str):
    step = manager.latest_step()
    if step is None:
        return None, None
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    _check_same_config(meta["run_config"], rc, out_dir)  # before the state: a shape mismatch must name the field
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"], meta


def _truncate_metrics(path: str, last_step: int) -> None:
    """Drop metric lines past the restored step (written before an interruption), atomically."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= last_step]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(tmp, path)


def _to_json(metrics: dict, step: int, tokens_per_s: float) -> dict:
    out = {"step": step, "tokens_per_s": tokens_per_s}
    for key, value in metrics.items():
        value = np.asarray(value)
        out[key] = value.tolist() if value.ndim else value.item()
    return out


class _Logger:
    """Writes fetched metrics (a step late, so the device never waits) and stops on a non-finite step."""

    def __init__(self, path: str, progress: tqdm, tokens_per_step: int):
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.progress, self.tokens_per_step = progress, tokens_per_step
        self.last_time = time.perf_counter()
        self.last_loss = float("nan")

    def write(self, step: int, metrics: dict) -> None:
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        record = _to_json(metrics, step, self.tokens_per_step / max(now - self.last_time, 1e-9))
        self.last_time = now
        if not record["finite"]:
            raise TrainingError(f"non-finite loss or gradient at step {step} (loss={record['loss']}); the update "
                                "was not applied and the last checkpoint is kept. Lower the learning rate and resume.")
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.last_loss = record["loss"]
        figures = {"loss": record["loss"], "tok/s": round(record["tokens_per_s"])}
        if "max_vio" in record:
            figures["maxvio"] = float(np.mean(record["max_vio"]))
        self.progress.set_postfix(figures, refresh=False)
        self.progress.update(1)

    def close(self) -> None:
        self.file.close()
        self.progress.close()


def _save(manager, step: int, state: TrainState, batches, rc: RunConfig) -> None:
    meta = {"step": step, "data_state": batches.state(), "run_config": json.loads(json.dumps(rc.to_dict()))}
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))


def _write_run_config(out_dir: str, rc: RunConfig) -> None:
    path = os.path.join(out_dir, "config.json")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(rc.to_dict(), f, indent=2)
    os.replace(tmp, path)


def train(rc: RunConfig, out_dir: str, *, log=print, sharded_step=None) -> dict:
    """Train (or resume) in `out_dir` to rc.train.steps; returns a summary with the final state.

    sharded_step(rc, optimizer, abstract_state) -> (step, state shardings) builds the step for rc.run.mesh
    (`dsv3_jax.parallel.api.mesh_train_step`); the training layer does not import the parallel one.
    """
    os.makedirs(out_dir, exist_ok=True)
    tokenizer, batches = build_data(rc, out_dir)
    rc = dataclasses.replace(rc, model=model_config_for(rc, tokenizer.vocab_size))
    _write_run_config(out_dir, rc)
    optimizer = make_optimizer(rc.train)
    abstract = jax.eval_shape(lambda: init_state(init_variables(rc.model, rc.train.seed), optimizer))
    manager = _manager(out_dir, rc)
    step_fn, shardings = _step_function(rc, optimizer, abstract, sharded_step)
    state, meta = _restore(manager, abstract if shardings is None else _with_shardings(abstract, shardings), rc,
                           out_dir)
    start = 0 if meta is None else int(meta["step"])
    if state is None:
        state = init_state(init_variables(rc.model, rc.train.seed), optimizer)
        state = state if shardings is None else jax.device_put(state, shardings)
    else:
        batches.restore(meta["data_state"])
        log(f"resumed from step {start} in {out_dir}")
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    _truncate_metrics(metrics_path, start)
    bar = tqdm(total=rc.train.steps - start, desc="train", unit="step", miniters=rc.run.log_every, mininterval=1.0)
    logger = _Logger(metrics_path, bar, rc.train.batch_size * rc.train.seq_len)
    try:
        state = _loop(rc, state, step_fn, batches, logger, manager, start)
    finally:
        manager.wait_until_finished()
        logger.close()
    return {"state": state, "config": rc, "tokenizer": tokenizer, "final_loss": logger.last_loss}


def _step_function(rc: RunConfig, optimizer, abstract, sharded_step):
    """(step, state shardings or None): single-device jit, or the caller's sharded step under rc.run.mesh."""
    if rc.run.mesh is None:
        return jit_train_step(make_train_step(rc.model, rc.train, optimizer)), None
    if sharded_step is None:
        raise TrainingError(f"run.mesh = {rc.run.mesh!r} needs a sharded step: pass "
                            "sharded_step=dsv3_jax.parallel.api.mesh_train_step (the `dsv3 train` command does)")
    return sharded_step(rc, optimizer, abstract)


def _with_shardings(abstract, shardings):
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _loop(rc: RunConfig, state, step_fn, batches, logger: _Logger, manager, start: int):
    pending = None
    for step in range(start + 1, rc.train.steps + 1):
        batch = next(batches)
        state, metrics = step_fn(state, batch)
        if pending is not None:
            logger.write(*pending)
        pending = (step, metrics)
        if step % rc.run.ckpt_every == 0 or step == rc.train.steps:
            logger.write(*pending)
            pending = None
            _save(manager, step, state, batches, rc)
    if pending is not None:
        logger.write(*pending)
    return state


def load_run(out_dir: str) -> tuple[RunConfig, dict, object]:
    """(run config, variables, tokenizer) of the latest checkpoint in a run directory."""
    with open(os.path.join(out_dir, "config.json"), encoding="utf-8") as f:
        raw = json.load(f)
    model = raw["model"]
    model["rope_scaling"] = None if model["rope_scaling"] is None else _rope(model["rope_scaling"])
    rc = RunConfig(model=ModelConfig(**model), train=run_config_from_dict({"train": raw["train"]}).train)
    optimizer = make_optimizer(rc.train)
    abstract = jax.eval_shape(lambda: init_state(init_variables(rc.model, 0), optimizer))
    state, _ = _restore(_manager(out_dir, rc), abstract, dataclasses.replace(
        rc, data=run_config_from_dict({"data": raw["data"]}).data), out_dir)
    if state is None:
        raise TrainingError(f"{out_dir}: no checkpoint to load")
    return rc, {"params": state.params, "router": state.router}, load_tokenizer(
        os.path.join(out_dir, "tokenizer"))


def _rope(table: dict):
    from dsv3_jax.config import RopeScaling

    return RopeScaling(**table)
