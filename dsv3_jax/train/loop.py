"""The training loop: data, state, jitted step, JSONL metrics, orbax checkpoints, exact resume, final sample.

Run directory layout:
    .lock            flock'ed by the one trainer using the directory (holds its pid and host)
    config.json      the run config (model, train, data, run) the directory was made with: a later run with
                     another [model] or [data] (tokenizer included) is refused, checkpoints or not
    tokenizer/       the tokenizer the run was trained with
    metrics.jsonl    one JSON object per step
    checkpoints/     orbax CheckpointManager: {step}/state (params, router, opt_state, step) + {step}/meta (JSON)

Everything that can be checked is checked before the directory is created: the run config, the corpus, the
tokenizer, the batches and the (sharded) step. Then the directory is created and locked, config.json and the
tokenizer are written, and training starts (a one-device step compiles on a helper thread while the state is
initialised: `_compile_ahead`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

from dsv3_jax.config import RUNTIME_FIELDS, ModelConfig
from dsv3_jax.errors import TrainingError, os_error_of
from dsv3_jax.model.api import init_variables
from dsv3_jax.quant.matmul import target_platform
from dsv3_jax.text.tokenizers import Tokenizer, load_tokenizer, make_tokenizer
from dsv3_jax.train import data as data_lib
from dsv3_jax.train.run_config import RunConfig, check_run_config, run_config_from_json
from dsv3_jax.train.step import TrainState, init_state, jit_train_step, make_optimizer, make_train_step

CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
LOCK_FILE = ".lock"
VOCAB_MULTIPLE = 64  # padded vocabulary: divisible by any mesh axis the vocab is sharded over
FLAT, PER_PARAMETER = "flat", "per_parameter"  # checkpoint meta "moments": how the state holds the Adam moments
ITEMS = ("state", "meta")  # the items of each checkpoint step


def model_config_for(rc: RunConfig, vocab_size: int) -> ModelConfig:
    """The run's model with its vocabulary sized to the tokenizer, rounded up to a multiple of 64 (the extra
    ids never occur in the data; samplers mask them with `vocab_limit`)."""
    return rc.model.replace(vocab_size=-(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE)


# ---------------------------------------------------------------- the run directory: what it was made with


def _read_recorded(out_dir: str) -> dict | None:
    """The run config recorded in out_dir/config.json (None for a new or empty directory); refuses a path that is
    not a directory and a non-empty directory without config.json."""
    if not os.path.lexists(out_dir):
        return None
    if not os.path.isdir(out_dir):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory (--out must be a run directory)", out_dir)
    path = os.path.join(out_dir, CONFIG_FILE)
    if not os.path.exists(path):
        others = sorted(n for n in os.listdir(out_dir) if n != LOCK_FILE)
        if others:
            raise TrainingError(f"{out_dir}: not a run directory (no {CONFIG_FILE}) and not empty: holds "
                                f"{others[:5]}; a run that failed before recording its settings may leave files "
                                "there. Remove them or use another --out")
        return None
    try:
        with open(path, encoding="utf-8") as f:
            recorded = json.load(f)
        return {section: dict(recorded[section]) for section in ("model", "data", "train")}
    except (ValueError, KeyError, TypeError) as e:
        raise TrainingError(f"{path}: cannot read the recorded run config ({type(e).__name__}: {e}); remove the "
                            "run directory or use another --out") from None


def _compare(saved: dict, rc: RunConfig, out_dir: str, what: str, skip: tuple[str, ...] = ()) -> None:
    """The [model] and [data] of `rc` must equal the saved ones (runtime fields and `skip` aside)."""
    current = json.loads(json.dumps(rc.to_dict()))
    for section in ("model", "data"):
        for key, value in current[section].items():
            if key in RUNTIME_FIELDS or key in skip:
                continue
            if saved[section].get(key) != value:
                raise TrainingError(f"{out_dir}: {what} was made with [{section}] {key}="
                                    f"{saved[section].get(key)!r}, this run has {value!r}; use another --out")


def _check_recorded(out_dir: str, rc: RunConfig, skip: tuple[str, ...] = ()) -> bool:
    """Refuse a run directory recorded with another model or data setting; True when it holds a recording."""
    recorded = _read_recorded(out_dir)
    if recorded is not None:
        _compare(recorded, rc, out_dir, "run directory", skip)
    return recorded is not None


def _write_json_atomic(path: str, data: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def _save_tokenizer(tokenizer: Tokenizer, out_dir: str) -> None:
    """Write tokenizer/ atomically (a temporary sibling renamed into place), unless it is there already."""
    final = os.path.join(out_dir, TOKENIZER_DIR)
    if os.path.isdir(final):
        return
    tmp = f"{final}.tmp-{os.getpid()}"
    tokenizer.save(tmp)
    os.replace(tmp, final)


# ---------------------------------------------------------------- one trainer per run directory


def _lock_holder(fd: int) -> str:
    """"pid N on host H" from the lock file (the holder writes it right after taking the lock)."""
    for _ in range(20):
        text = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
        if text:
            return f"pid {text[0]}" + (f" on host {text[1]}" if len(text) > 1 else "")
        time.sleep(0.05)
    return "another process"


@contextlib.contextmanager
def run_lock(out_dir: str, log=print) -> Iterator[None]:
    """Hold out_dir/.lock (fcntl.flock, released by the kernel when the process dies) while the body runs;
    TrainingError naming the holder when another trainer has it. A lock file left by a dead trainer is taken
    over (and said so). Creates out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainingError(f"{out_dir}: run directory is in use by another trainer ({_lock_holder(fd)}, "
                                f"lock file {path}); wait for it to finish or use another --out") from None
        stale = os.pread(fd, 256, 0).decode("utf-8", "replace").split()
        if stale and stale[0] != str(os.getpid()):
            log(f"{out_dir}: took over the lock left by pid {stale[0]} (no longer running)")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # releases the flock


# ---------------------------------------------------------------- data


def _corpus(rc: RunConfig) -> list:
    if rc.data.corpus == "stdlib":
        return data_lib.stdlib_corpus(rc.data.max_bytes)
    return data_lib.text_file_corpus(list(rc.data.files))


def _check_tokenizer_kind(tokenizer: Tokenizer, spec: str, where: str) -> None:
    kind, _, size = spec.partition(":")
    if tokenizer.kind != kind or (kind == "bpe" and tokenizer.vocab_size > int(size)):
        raise TrainingError(f"{where}: holds a {tokenizer.kind} tokenizer of {tokenizer.vocab_size} ids, this run "
                            f"asks for [data] tokenizer={spec!r}; use another --out")


def build_data(rc: RunConfig, out_dir: str, recorded: bool = True):
    """(tokenizer, PackedBatches), in memory: the tokenizer of a recorded run directory is reloaded, a new one is
    made from the corpus (and saved later, once the directory is created)."""
    docs = _corpus(rc)
    tok_dir = os.path.join(out_dir, TOKENIZER_DIR)
    if recorded and os.path.isdir(tok_dir):
        tokenizer = load_tokenizer(tok_dir)
        _check_tokenizer_kind(tokenizer, rc.data.tokenizer, tok_dir)
    else:
        tokenizer = make_tokenizer(rc.data.tokenizer, (text for _, text in docs))
    tokens = data_lib.tokenize_corpus(docs, tokenizer)
    batches = data_lib.PackedBatches(tokens, rc.train.batch_size, rc.train.seq_len, rc.train.seed)
    return tokenizer, batches


# ---------------------------------------------------------------- checkpoints


def _checkpoint_dir(out_dir: str) -> str:
    return os.path.abspath(os.path.join(out_dir, "checkpoints"))


def _manager(out_dir: str, rc: RunConfig) -> ocp.CheckpointManager:
    """The trainer's manager: creates the directory, removes what a save cut short left (disk full, SIGKILL)."""
    options = ocp.CheckpointManagerOptions(max_to_keep=rc.run.keep_checkpoints, create=True,
                                           cleanup_tmp_directories=True)
    return ocp.CheckpointManager(_checkpoint_dir(out_dir), options=options, item_names=ITEMS)


@contextlib.contextmanager
def _reader(out_dir: str):
    """A manager that only reads out_dir's checkpoints (creates and removes nothing: a trainer may be saving), or
    None when there is no checkpoint directory."""
    directory = _checkpoint_dir(out_dir)
    if not os.path.isdir(directory):
        yield None
        return
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False), item_names=ITEMS)
    try:
        yield manager
    finally:
        manager.close()


def _latest_meta(manager) -> tuple[int | None, dict | None]:
    """(latest step, its meta), (None, None) when there is no checkpoint."""
    step = None if manager is None else manager.latest_step()
    if step is None:
        return None, None
    return step, manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def _saved_mesh(meta: dict) -> str | None:
    return meta["run_config"].get("run", {}).get("mesh")


def _restore(manager, abstract_state, rc: RunConfig, out_dir: str):
    """(state, meta) of the latest checkpoint, checked by `_check_resumable`; (None, None) without one (or without
    a manager: `_reader` of a run that has no checkpoint directory)."""
    step, meta = _latest_meta(manager)
    if step is None:
        return None, None
    _check_resumable(step, meta, rc, out_dir)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"], meta


def _check_resumable(step: int, meta: dict, rc: RunConfig, out_dir: str) -> None:
    """Refuse a checkpoint saved with another model (names the field) or on the other kind of run (one device /
    mesh), before its state is read."""
    _compare(meta["run_config"], rc, out_dir, "checkpoint")  # before the state: a shape mismatch must name the field
    saved_mesh = _saved_mesh(meta)
    if (saved_mesh is None) != (rc.run.mesh is None):
        kinds = {True: "one device", False: "a mesh"}
        raise TrainingError(f"{out_dir}: checkpoint step {step} was saved by a run on {kinds[saved_mesh is None]}; "
                            f"this run is on {kinds[rc.run.mesh is None]}: resume it with run.mesh = {saved_mesh!r} "
                            "(the checkpoint is kept as it is)")


def _check_latest_checkpoint(rc: RunConfig, out_dir: str) -> None:
    """`_check_resumable` on the latest checkpoint, read only: before the run writes its config.json."""
    with _reader(out_dir) as manager:
        step, meta = _latest_meta(manager)
    if step is not None:
        _check_resumable(step, meta, rc, out_dir)


def _guarded_save(out_dir: str, step: int, save) -> None:
    """Run `save()`; a failure becomes an OSError (disk full, read-only, ...) or a TrainingError naming the step.
    The previous checkpoints are untouched: orbax writes a step into a temporary directory first."""
    try:
        save()
    except Exception as e:
        cause = os_error_of(e)
        where = os.path.join(out_dir, "checkpoints")
        if cause is not None:
            raise OSError(cause.errno, f"{cause.strerror} while saving a checkpoint (reported at step {step}; "
                                       "the last finished checkpoint is kept)", where) from e
        raise TrainingError(f"{where}: cannot save a checkpoint (reported at step {step}; {type(e).__name__}: {e}); "
                            "the last finished checkpoint is kept") from e


def _save(manager, step: int, state: TrainState, batches, rc: RunConfig, out_dir: str, moments: str) -> None:
    meta = {"step": step, "data_state": batches.state(), "run_config": json.loads(json.dumps(rc.to_dict())),
            "moments": moments}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    _guarded_save(out_dir, step, lambda: manager.save(step, args=args))


# ---------------------------------------------------------------- metrics


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

    def write(self, step: int, metrics: dict, ready_at: float | None) -> None:
        """`ready_at`: when the step's results were seen computed (`_ready_time`), else the fetch here waits."""
        metrics = jax.device_get(metrics)
        now = time.perf_counter() if ready_at is None else ready_at
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


# ---------------------------------------------------------------- training


@dataclasses.dataclass
class _Prepared:
    """Everything a run needs, built and checked in memory before the run directory exists."""

    rc: RunConfig
    tokenizer: Tokenizer
    batches: data_lib.PackedBatches
    optimizer: object
    moments: str  # FLAT or PER_PARAMETER (`saved_moments`)
    abstract: object
    step_fn: object
    shardings: object


def run_optimizer(rc: RunConfig, moments: str):
    """The run's optimizer: Adam moments per parameter (sharded like the parameters under a mesh), or in one flat
    vector (`moments == FLAT`) to resume a one-device checkpoint saved that way; see `make_optimizer`."""
    return make_optimizer(rc.train, flat=moments == FLAT)


def saved_moments(out_dir: str) -> str:
    """How the latest checkpoint in `out_dir` holds its Adam moments (PER_PARAMETER when there is none).

    One-device runs kept them in one flat vector until 2026-12-08 (why they no longer do: `make_optimizer`); their
    checkpoints have no "moments" field, and such a checkpoint resumes and loads with the flat optimizer."""
    with _reader(out_dir) as manager:
        step, meta = _latest_meta(manager)
    return PER_PARAMETER if step is None else moments_of(meta, f"{out_dir}: checkpoint step {step}")


def moments_of(meta: dict, where: str = "checkpoint") -> str:
    """A checkpoint meta's "moments"; written before the field existed: FLAT for a one-device run."""
    if "moments" not in meta:
        return FLAT if _saved_mesh(meta) is None else PER_PARAMETER
    if meta["moments"] not in (FLAT, PER_PARAMETER):
        raise TrainingError(f"{where}: unknown \"moments\" {meta['moments']!r} in its meta (expected {FLAT!r} or "
                            f"{PER_PARAMETER!r}); the checkpoint is kept as it is")
    return meta["moments"]


def _prepare(rc: RunConfig, out_dir: str, sharded_step) -> _Prepared:
    check_run_config(rc)
    recorded = _check_recorded(out_dir, rc, skip=("vocab_size",))  # the padded vocabulary follows the tokenizer
    tokenizer, batches = build_data(rc, out_dir, recorded)
    rc = dataclasses.replace(rc, model=model_config_for(rc, tokenizer.vocab_size))
    # Under a mesh: per parameter (`_restore` refuses a one-device checkpoint there).
    moments = saved_moments(out_dir) if rc.run.mesh is None else PER_PARAMETER
    optimizer = run_optimizer(rc, moments)
    abstract = jax.eval_shape(lambda: init_state(init_variables(rc.model, rc.train.seed), optimizer))
    step_fn, shardings = _step_function(rc, optimizer, abstract, sharded_step)
    return _Prepared(rc, tokenizer, batches, optimizer, moments, abstract, step_fn, shardings)


def train(rc: RunConfig, out_dir: str, *, log=print, sharded_step=None) -> dict:
    """Train (or resume) in `out_dir` to rc.train.steps; returns a summary with the final state.

    sharded_step(rc, optimizer, abstract_state) -> (step, state shardings) builds the step for rc.run.mesh
    (`dsv3_jax.parallel.api.mesh_train_step`); the training layer does not import the parallel one.
    """
    p = _prepare(rc, out_dir, sharded_step)
    lock = run_lock(out_dir, log) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:
        _check_recorded(out_dir, p.rc)  # again, under the lock, vocabulary included
        _check_latest_checkpoint(p.rc, out_dir)  # a refused resume must not rewrite config.json
        _write_json_atomic(os.path.join(out_dir, CONFIG_FILE), p.rc.to_dict())
        _save_tokenizer(p.tokenizer, out_dir)
        return _train_locked(p, out_dir, log)


def _train_locked(p: _Prepared, out_dir: str, log) -> dict:
    rc = p.rc
    manager = _manager(out_dir, rc)
    target = p.abstract if p.shardings is None else _with_shardings(p.abstract, p.shardings)
    state, meta = _restore(manager, target, rc, out_dir)
    start = 0 if meta is None else int(meta["step"])
    if state is None:
        state = _initial_state(p)
    else:
        p.batches.restore(meta["data_state"])
        log(f"resumed from step {start} in {out_dir}")
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    _truncate_metrics(metrics_path, start)
    bar = tqdm(total=rc.train.steps - start, desc="train", unit="step", miniters=rc.run.log_every, mininterval=1.0)
    logger = _Logger(metrics_path, bar, rc.train.batch_size * rc.train.seq_len)
    try:
        state = _loop(rc, state, p.step_fn, p.batches, logger, manager, start, out_dir, p.moments)
    finally:
        try:
            _guarded_save(out_dir, rc.train.steps, manager.wait_until_finished)
        finally:
            logger.close()
    return {"state": state, "config": rc, "tokenizer": p.tokenizer, "final_loss": logger.last_loss}


def _initial_state(p: _Prepared):
    """The random initial state (on the mesh's shardings, if any); a one-device step compiles meanwhile."""
    compiling = _compile_ahead(p)
    state = init_state(init_variables(p.rc.model, p.rc.train.seed), p.optimizer)
    if compiling is not None:
        compiling.result()  # a compile error surfaces here, as it would have at the first step
    return state if p.shardings is None else jax.device_put(state, p.shardings)


def _compile_ahead(p: _Prepared) -> concurrent.futures.Future | None:
    """Lower and compile the one-device CPU step on a helper thread while the state is initialised; None under a
    mesh or on an accelerator (measured on the CPU only; XLA:GPU autotunes kernels on the device the init uses). A
    restored run compiles at its first step, after a restore that is quick on one device. jit shares its caches
    with `.lower(...).compile()`, so the loop's first call then runs the compiled program. On 2 CPU cores,
    tiny_stdlib with MTP, fresh processes: init then the first step 12.8-13.3 s, both at once 9.8-10.7 s (the
    step's tracing and XLA's passes are single-threaded; the init's compile and run fill the other core).

    The helper thread sees JAX's default settings, not thread-local ones of the caller (`jax.default_device`,
    `default_matmul_precision`, ...): under those the first step compiles again (the same results, the time lost).
    If the init fails, the process still waits for the compile to end before it exits (a running thread cannot be
    cancelled)."""
    if p.shardings is not None or target_platform() != "cpu":
        return None
    batch = {key: jax.ShapeDtypeStruct(shape, dtype) for key, (shape, dtype) in p.batches.batch_spec().items()}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="dsv3-compile")
    try:
        return pool.submit(lambda: p.step_fn.lower(p.abstract, batch).compile())
    finally:
        pool.shutdown(wait=False)


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


def _ready_time(metrics: dict) -> float | None:
    """Now, if the step's results are already computed (a one-device CPU program runs inline and returns when done,
    `dsv3_jax.host`), else None (dispatched asynchronously: the logger's fetch waits for them and times that).
    Without it a step written right after the previous one (a checkpoint step, the last step) showed millions of
    tokens/s."""
    done = all(leaf.is_ready() for leaf in jax.tree_util.tree_leaves(metrics))
    return time.perf_counter() if done else None


def _loop(rc: RunConfig, state, step_fn, batches, logger: _Logger, manager, start: int, out_dir: str,
          moments: str):
    pending = None
    for step in range(start + 1, rc.train.steps + 1):
        batch = next(batches)
        state, metrics = step_fn(state, batch)
        if pending is not None:
            logger.write(*pending)
        pending = (step, metrics, _ready_time(metrics))
        if step % rc.run.ckpt_every == 0 or step == rc.train.steps:
            logger.write(*pending)
            pending = None
            _save(manager, step, state, batches, rc, out_dir, moments)
    if pending is not None:
        logger.write(*pending)
    return state


def load_run(out_dir: str) -> tuple[RunConfig, dict, object]:
    """(run config, variables, tokenizer) of the latest checkpoint in a run directory."""
    path = os.path.join(out_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise TrainingError(f"{out_dir}: not a run directory (no {CONFIG_FILE})")
    try:
        with open(path, encoding="utf-8") as f:
            rc = run_config_from_json(json.load(f))
    except (ValueError, KeyError, TypeError) as e:
        raise TrainingError(f"{path}: cannot read the run config ({type(e).__name__}: {e})") from None
    optimizer = run_optimizer(rc, saved_moments(out_dir))
    abstract = jax.eval_shape(lambda: init_state(init_variables(rc.model, 0), optimizer))
    with _reader(out_dir) as manager:  # read only: a trainer may be saving into this directory
        state, _ = _restore(manager, abstract, rc, out_dir)
    if state is None:
        raise TrainingError(f"{out_dir}: no checkpoint to load (the run saved none yet)")
    return rc, {"params": state.params, "router": state.router}, load_tokenizer(os.path.join(out_dir, TOKENIZER_DIR))
