"""Bad inputs and faults against the real `dsv3` command (issue 14), each classified by what the user sees.

    python experiments/bad_inputs.py [--only SUBSTRING] [--workers 2] [--keep]

Builds tiny fixtures in a temporary directory (one trained run, reused; the FP8 and bf16 HF checkpoints of
`tests/convert_fixtures.py`; a converted checkpoint), runs every case as a subprocess and classifies it:

    ok                 an expected success that did what it should (checked)
    clean error        non-zero exit, one `error:` paragraph on stderr, no traceback, nothing half-made left
    traceback          a Python traceback on stderr
    silent wrong       exit 0 where an error was due, or a success whose result is wrong (checked)
    partial output     a failure that left its output (or a temporary one) behind
    hang               ran past its timeout
    security failure   a malicious pickle ran code

Prints a markdown table and writes experiments/results/bad_inputs.json. Read-only and full-disk cases use small
tmpfs mounts when run as root (else chmod 0555 and a file-size limit, RLIMIT_FSIZE, named as such).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import glob
import itertools
import json
import os
import pickle
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
RESULTS = os.path.join(REPO, "experiments", "results", "bad_inputs.json")
OUTCOMES = ("ok", "clean error", "traceback", "silent wrong", "partial output", "hang", "security failure",
            "harness error")
MODEL = dict(preset="tiny", hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
             first_k_dense_replace=1, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
             qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
             max_position_embeddings=64)
RUN = {"model": MODEL, "data": {"corpus": "stdlib", "max_bytes": 20000, "tokenizer": "byte"},
       "train": {"steps": 3, "batch_size": 2, "seq_len": 16, "lr": 1e-3, "warmup_steps": 0},
       "run": {"log_every": 100, "ckpt_every": 1, "sample_tokens": 24, "sample_temperature": 1.0}}
NAN_TENSOR = "model.layers.1.mlp.experts.3.up_proj.weight"
FP8_SCALE = "model.layers.0.self_attn.q_b_proj.weight_scale_inv"


def toml(table: dict) -> str:
    def value(v):
        if isinstance(v, float) and v != v:
            return "nan"
        return json.dumps(v).replace("Infinity", "inf")

    return "".join(f"[{s}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in f.items()) for s, f in table.items())


def with_field(section: str, field: str, value) -> dict:
    table = {k: dict(v) for k, v in RUN.items()}
    table[section][field] = value
    return table


# ---------------------------------------------------------------- fixtures


class Fixtures:
    """The temporary directory, the JAX compile cache shared by all runs, and the fixtures built once."""

    def __init__(self, root: str):
        self.root = root
        self.cache = os.path.join(root, "jax_cache")
        self.counter = itertools.count()
        self.root_user = os.geteuid() == 0
        self.mounts: list[str] = []

    def path(self, name: str) -> str:
        return os.path.join(self.root, f"{next(self.counter):03d}_{name}")

    def env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "DSV3_DEBUG")}
        env.update(JAX_COMPILATION_CACHE_DIR=self.cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
        return env

    def write_toml(self, table: dict, name: str = "run.toml") -> str:
        path = self.path(name)
        with open(path, "w", encoding="utf-8") as f:
            f.write(toml(table))
        return path

    def build(self) -> None:
        from convert_fixtures import FIXTURE_CONFIG, write_bf16_checkpoint, write_fp8_checkpoint

        self.fp8 = write_fp8_checkpoint(os.path.join(self.root, "fp8_src"), FIXTURE_CONFIG).directory
        self.bf16 = os.path.join(self.root, "bf16_src")
        fixture = write_fp8_checkpoint(os.path.join(self.root, "fp8_ref"), FIXTURE_CONFIG)
        write_bf16_checkpoint(self.bf16, fixture)
        self.toml = self.write_toml(RUN, "tiny.toml")
        self.run_dir = os.path.join(self.root, "run")
        self.converted = os.path.join(self.root, "converted")

    def mount(self, name: str, size: str, read_only: bool = False) -> str | None:
        """A small tmpfs (root only); None when it cannot be mounted."""
        if not self.root_user:
            return None
        path = os.path.join(self.root, name)
        os.makedirs(path, exist_ok=True)
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                          capture_output=True).returncode:
            return None
        self.mounts.append(path)
        if read_only and subprocess.run(["mount", "-o", "remount,ro", path], capture_output=True).returncode:
            return None
        return path

    def unmount(self) -> None:
        for path in reversed(self.mounts):
            subprocess.run(["umount", "-l", path], capture_output=True)


def copy_src(fx: Fixtures, which: str = "bf16") -> str:
    dst = fx.path(f"src_{which}")
    shutil.copytree(fx.bf16 if which == "bf16" else fx.fp8, dst)
    return dst


def shard_of(src: str, name: str) -> str:
    with open(os.path.join(src, "model.safetensors.index.json"), encoding="utf-8") as f:
        return os.path.join(src, json.load(f)["weight_map"][name])


def edit_tensor(src: str, name: str, fn: Callable[[np.ndarray], np.ndarray | None]) -> str:
    """Rewrite the shard holding `name` with fn(array) in its place (dropped when fn returns None)."""
    from dsv3_jax.ckpt.safetensors import SafetensorsFile, save_file

    path = shard_of(src, name)
    with SafetensorsFile(path) as f:
        tensors = {k: np.array(f.get(k)) for k in f}
    new = fn(tensors.pop(name))
    if new is not None:
        tensors[name] = new
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def set_value(value: float) -> Callable[[np.ndarray], np.ndarray]:
    def edit(a: np.ndarray) -> np.ndarray:
        a = a.copy()
        a.reshape(-1)[min(7, a.size - 1)] = value
        return a

    return edit


def rewrite_layout(path: str, how: str) -> None:
    """Move the last tensor of a shard (in offset order) so it overlaps the previous one, leaves a gap before it,
    or add trailing bytes; the header stays valid JSON of the same form."""
    with open(path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little")
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    begin, end = header[last]["data_offsets"]
    if how == "overlap":  # 8 bytes earlier: its first bytes lie inside the previous tensor
        header[last]["data_offsets"] = [begin - 8, end - 8]
        body = data[:begin - 8] + data[begin:end]
    elif how == "gap":  # 8 unused bytes before it
        header[last]["data_offsets"] = [begin + 8, end + 8]
        body = data[:begin] + b"\0" * 8 + data[begin:end]
    else:  # 8 bytes after the last tensor
        body = data + b"\0" * 8
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + body)


# ---------------------------------------------------------------- cases


@dataclasses.dataclass
class Case:
    name: str
    group: str
    argv: Callable[[Fixtures], list] | None = None  # dsv3 arguments (built when the case runs)
    expect: str = "error"  # "error" or "ok"
    leftovers: Callable[[Fixtures, list], list[str]] = lambda fx, argv: []  # paths that must not exist after
    check: Callable[[Fixtures, subprocess.CompletedProcess], str | None] | None = None  # a problem, or None
    custom: Callable[[Fixtures], dict] | None = None  # runs the case itself (signals, concurrency)
    serial: bool = False  # run alone (timing-sensitive, or reused state)
    preexec: Callable[[], None] | None = None
    timeout: float = 300


def out_left(index: int = -1) -> Callable[[Fixtures, list], list[str]]:
    """The output argument and its temporary siblings must be gone."""
    return lambda fx, argv: [str(argv[index]), str(argv[index]) + ".tmp-*"]


def dsv3(fx: Fixtures, argv: list, timeout: float, preexec=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "dsv3_jax.cli.main", *map(str, argv)]
    try:
        return subprocess.run(cmd, cwd=REPO, env=fx.env(), capture_output=True, text=True, timeout=timeout,
                              preexec_fn=preexec)
    except subprocess.TimeoutExpired as e:
        return subprocess.CompletedProcess(cmd, None, e.stdout or "", e.stderr or "")


def classify(case: Case, fx: Fixtures, argv: list, proc: subprocess.CompletedProcess) -> tuple[str, str]:
    err = proc.stderr if isinstance(proc.stderr, str) else (proc.stderr or b"").decode()
    if proc.returncode is None:
        return "hang", "timed out"
    if "Traceback (most recent call last)" in err:
        return "traceback", err.strip().splitlines()[-1][:200]
    left = [p for pattern in case.leftovers(fx, argv) for p in glob.glob(pattern)]
    message = next((line for line in err.splitlines() if "error:" in line), "")[:300]
    if case.expect == "ok":
        if proc.returncode != 0:
            return "silent wrong", f"rc {proc.returncode}: {message or err[-200:]}"
        problem = case.check(fx, proc) if case.check else None
        return ("silent wrong", problem) if problem else ("ok", "")
    if proc.returncode == 0:
        return "silent wrong", "exit 0 " + (proc.stdout.strip().splitlines() or [""])[-1][:150]
    if left:
        return "partial output", f"left {left[:3]}; {message}"
    problem = case.check(fx, proc) if case.check else None
    if problem:
        return "silent wrong", problem
    if not message:
        return "traceback", f"rc {proc.returncode} without an error message: {err[-200:]}"
    return "clean error", f"rc {proc.returncode}: {message}"


def run_case(case: Case, fx: Fixtures) -> dict:
    start = time.perf_counter()
    try:
        result = _run(case, fx)
    except Exception as e:  # a fault of this script, not of dsv3: reported as such
        result = {"outcome": "harness error", "detail": f"{type(e).__name__}: {e}", "rc": None}
    return {"case": case.name, "group": case.group, "seconds": round(time.perf_counter() - start, 1), **result}


def _run(case: Case, fx: Fixtures) -> dict:
    if case.custom is not None:
        result = case.custom(fx)
    else:
        argv = case.argv(fx)
        proc = dsv3(fx, argv, case.timeout, case.preexec)
        outcome, detail = classify(case, fx, argv, proc)
        result = {"outcome": outcome, "detail": detail, "rc": proc.returncode,
                  "command": "dsv3 " + " ".join(os.path.relpath(str(a), fx.root) if str(a).startswith(fx.root)
                                               else str(a) for a in argv)}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=None, help="run the cases whose name contains this")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="dsv3_bad_inputs_")
    os.chmod(root, 0o755)
    fx = Fixtures(root)
    started = time.perf_counter()
    try:
        fx.build()
        cases = [c for i, c in enumerate(all_cases(fx)) if args.only is None or args.only in c.name or i < 2]
        results = run_all(cases, fx, args.workers)
    finally:
        fx.unmount()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    report(results, time.perf_counter() - started)
    return 0


def run_all(cases: list[Case], fx: Fixtures, workers: int) -> list[dict]:
    """Serial cases in order first (they build state others reuse), then the rest on `workers` threads."""
    results = {}
    for case in (c for c in cases if c.serial):
        results[case.name] = run_case(case, fx)
        print(f"  {case.name}: {results[case.name]['outcome']} ({results[case.name]['seconds']} s)", flush=True)
    with concurrent.futures.ThreadPoolExecutor(max(workers, 1)) as pool:
        futures = {pool.submit(run_case, c, fx): c for c in cases if not c.serial}
        for future in concurrent.futures.as_completed(futures):
            r = future.result()
            results[r["case"]] = r
            print(f"  {r['case']}: {r['outcome']} ({r['seconds']} s)", flush=True)
    return [results[c.name] for c in cases]


def report(results: list[dict], seconds: float) -> None:
    counts = {o: sum(r["outcome"] == o for r in results) for o in OUTCOMES}
    lines = ["| # | group | case | outcome | detail |", "|---|---|---|---|---|"]
    for i, r in enumerate(results, 1):
        detail = r["detail"].replace("|", "\\|").replace("\n", " ")[:160]
        lines.append(f"| {i} | {r['group']} | {r['case']} | {r['outcome']} | {detail} |")
    summary = ", ".join(f"{n} {o}" for o, n in counts.items() if n)
    print("\n".join(lines))
    print(f"\n{len(results)} cases in {seconds:.0f} s: {summary}")
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w", encoding="utf-8") as f:
        json.dump({"counts": counts, "seconds": round(seconds), "cases": results}, f, indent=2)
        f.write("\n")


def as_nobody() -> None:
    """preexec_fn: drop to uid/gid 65534 (so that root sees permission errors too)."""
    os.setgid(65534)
    os.setuid(65534)


def file_size_limit(nbytes: int) -> Callable[[], None]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return limit


def evil_pickle(path: str, marker: str) -> None:
    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    with open(path, "wb") as f:
        pickle.dump({"model.embed_tokens.weight": Evil()}, f)


def wait_for(predicate: Callable[[], bool], proc: subprocess.Popen, timeout: float = 240) -> bool:
    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.002)
    return predicate()


def popen(fx: Fixtures, argv: list) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dsv3_jax.cli.main", *map(str, argv)], cwd=REPO, env=fx.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def signal_convert(fx: Fixtures, sig: int) -> dict:
    """SIGINT / SIGKILL once the first block file appears (mid-conversion); then the next invocation must leave
    only a complete OUT."""
    out = fx.path("sig_out")
    proc = popen(fx, ["convert", fx.fp8, out, "--quiet"])
    hit = wait_for(lambda: bool(glob.glob(f"{out}.tmp-*/blocks/*.safetensors*")), proc)
    if hit:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    time.sleep(0.5)
    if not hit:
        return {"outcome": "silent wrong", "detail": "convert finished before the signal", "rc": proc.returncode}
    if "Traceback" in err:
        return {"outcome": "traceback", "detail": err.strip().splitlines()[-1], "rc": proc.returncode}
    after_signal = glob.glob(f"{out}*")
    again = dsv3(fx, ["convert", fx.fp8, out, "--quiet"], 180)
    left = sorted(glob.glob(f"{out}*"))
    named = [line for line in again.stderr.splitlines() if line.startswith("removed ")]
    detail = f"rc {proc.returncode}, left after the signal: {len(after_signal)}; next run rc {again.returncode}" + (
        f", {named[0][:120]}" if named else "")
    if sig == signal.SIGINT and after_signal:
        return {"outcome": "partial output", "detail": detail, "rc": proc.returncode}
    ok = again.returncode == 0 and left == [out] and (sig == signal.SIGINT or named)
    return {"outcome": "ok" if ok else "partial output", "detail": detail, "rc": proc.returncode}


def concurrent_trainers(fx: Fixtures) -> dict:
    """A holds the run directory; B is refused naming A's pid; A is SIGKILLed after a checkpoint; C takes the
    stale lock over and resumes."""
    out = fx.path("locked_run")
    toml_path = fx.write_toml(with_field("train", "steps", 4))
    a = popen(fx, ["train", "--config", toml_path, "--out", out])
    lock = os.path.join(out, ".lock")
    wait_for(lambda: os.path.exists(lock) and os.path.getsize(lock) > 0, a)
    b = dsv3(fx, ["train", "--config", toml_path, "--out", out], 240)
    wait_for(lambda: os.path.isdir(os.path.join(out, "checkpoints", "1")), a)
    a.send_signal(signal.SIGKILL)
    a.communicate(timeout=60)
    c = dsv3(fx, ["train", "--config", toml_path, "--out", out], 300)
    refused = b.returncode == 1 and f"pid {a.pid}" in b.stderr and "Traceback" not in b.stderr
    took_over = c.returncode == 0 and "took over the lock" in c.stdout and "resumed from step" in c.stdout
    detail = (f"B rc {b.returncode}: {next((x for x in b.stderr.splitlines() if 'error:' in x), '')[:120]}; "
              f"C rc {c.returncode}, took over: {took_over}")
    return {"outcome": "ok" if refused and took_over else ("traceback" if "Traceback" in b.stderr + c.stderr
                                                           else "silent wrong"), "detail": detail, "rc": b.returncode}


# ---------------------------------------------------------------- the case table


def cli(name: str, group: str, argv: Callable[[Fixtures], list], expect: str = "error", **kw) -> Case:
    return Case(name, group, argv=argv, expect=expect, **kw)


def train_case(name: str, table: dict | str | None = None, extra: tuple = (), group: str = "run settings",
               **kw) -> Case:
    """`dsv3 train` on a run file built from `table` (text when a str) into a fresh --out, which must not appear."""
    def argv(fx: Fixtures) -> list:
        if isinstance(table, str):
            path = fx.path("run.toml")
            with open(path, "w", encoding="utf-8") as f:
                f.write(table)
        else:
            path = fx.write_toml(table or RUN)
        return ["train", "--config", path, "--out", fx.path("run"), *extra]

    return Case(name, group, argv=argv, leftovers=kw.pop("leftovers", lambda fx, a: [a[4]]), **kw)


def convert_case(name: str, damage: Callable[[Fixtures, str], object] = lambda fx, src: None, which: str = "bf16",
                 extra: tuple = (), expect: str = "error", **kw) -> Case:
    """`dsv3 convert` of a damaged copy of a fixture into a fresh OUT (absent after a failure)."""
    def argv(fx: Fixtures) -> list:
        src = copy_src(fx, which)
        damage(fx, src)
        return ["convert", src, fx.path("out"), "--quiet", *extra]

    return Case(name, "checkpoints", argv=argv, expect=expect, leftovers=out_left(2) if expect == "error" else
                (lambda fx, a: [a[2] + ".tmp-*"]), **kw)


def gen(*extra) -> Callable[[Fixtures], list]:
    return lambda fx: ["generate", "--checkpoint", fx.run_dir, *extra]


def sample_printed(fx: Fixtures, proc) -> str | None:
    return None if "--- sample" in proc.stdout else "no sample printed"


def umask_kept(fx: Fixtures, proc) -> str | None:
    out = proc.args[proc.args.index("convert") + 2]
    mode = os.stat(out).st_mode & 0o777
    return None if mode == 0o777 & ~current_umask() else f"output mode {oct(mode)}"


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def last_checkpoint_loads(fx: Fixtures, proc) -> str | None:
    out = proc.args[proc.args.index("--out") + 1]
    if not glob.glob(os.path.join(out, "checkpoints", "[0-9]*")):
        return None
    again = dsv3(fx, ["generate", "--checkpoint", out, "--prompt-ids", "1,2", "--max-new-tokens", "2"], 180)
    return None if again.returncode == 0 else f"last checkpoint does not load: {again.stderr[-200:]}"


def no_marker(fx: Fixtures, proc) -> str | None:
    return "SECURITY: the pickle ran code" if glob.glob(os.path.join(fx.root, "*PWNED*")) else None


def readonly(fx: Fixtures) -> tuple[str, Callable | None, str]:
    """(a directory this user cannot write, preexec_fn, how)."""
    path = fx.mount("ro", "1m", read_only=True)
    if path:
        return path, None, "read-only tmpfs"
    path = fx.path("ro")
    os.makedirs(path)
    os.chmod(path, 0o555)
    return path, (as_nobody if fx.root_user else None), "chmod 0555"


def full_disk(fx: Fixtures, size: str) -> tuple[str, Callable | None]:
    path = fx.mount(f"full_{size}", size)
    if path:
        return path, None
    return fx.path("full"), file_size_limit(256 * 1024)


def all_cases(fx: Fixtures) -> list[Case]:
    return [*serial_cases(fx), *cli_cases(), *config_cases(), *settings_cases(), *run_dir_cases(),
            *checkpoint_cases(), *filesystem_cases(fx)]


def serial_cases(fx: Fixtures) -> list[Case]:
    return [
        Case("short run ends exit 0 with a sample", "training", argv=lambda fx: [
            "train", "--config", fx.toml, "--out", fx.run_dir], expect="ok", check=sample_printed, serial=True),
        Case("convert fp8 → fp8 (the converted fixture)", "checkpoints", argv=lambda fx: [
            "convert", fx.fp8, fx.converted, "--weights", "fp8", "--quiet"], expect="ok", check=umask_kept,
            serial=True),
        Case("two trainers on one --out; SIGKILL; stale lock taken over", "concurrency",
             custom=concurrent_trainers, serial=True),
        Case("SIGINT mid-convert, then convert again", "signals",
             custom=lambda fx: signal_convert(fx, signal.SIGINT), serial=True),
        Case("SIGKILL mid-convert, then convert again", "signals",
             custom=lambda fx: signal_convert(fx, signal.SIGKILL), serial=True),
    ]


def cli_cases() -> list[Case]:
    g = "CLI arguments"
    return [
        cli("no subcommand", g, lambda fx: []),
        cli("unknown subcommand", g, lambda fx: ["trian"]),
        cli("train without --config", g, lambda fx: ["train"]),
        cli("--steps abc", g, lambda fx: ["train", "--config", fx.toml, "--steps", "abc"]),
        cli("--steps 0", g, lambda fx: ["train", "--config", fx.toml, "--steps", "0"]),
        cli("generate --prompt-ids 1,a", g, gen("--prompt-ids", "1,a")),
        cli("generate --prompt-ids ''", g, gen("--prompt-ids", ",")),
        cli("generate --prompt-ids 99999 (outside the vocabulary)", g, gen("--prompt-ids", "99999",
                                                                            "--max-new-tokens", "4")),
        cli("generate --prompt-ids -1", g, gen("--prompt-ids=-1", "--max-new-tokens", "4")),
        cli("generate --max-new-tokens 0", g, gen("--prompt", "a", "--max-new-tokens", "0")),
        cli("generate --max-new-tokens past max_position_embeddings", g, gen("--prompt", "a", "--max-new-tokens",
                                                                              "1000")),
        cli("generate --temperature -1", g, gen("--prompt", "a", "--temperature", "-1")),
        cli("generate --temperature nan", g, gen("--prompt", "a", "--temperature", "nan")),
        cli("generate --top-p 0", g, gen("--prompt", "a", "--temperature", "1", "--top-p", "0")),
        cli("generate --top-k -1", g, gen("--prompt", "a", "--temperature", "1", "--top-k", "-1")),
        cli("generate --top-k 100000", g, gen("--prompt", "a", "--temperature", "1", "--top-k", "100000")),
        cli("generate --speculative at temperature 0.5", g, gen("--prompt", "a", "--speculative", "--temperature",
                                                                "0.5")),
        cli("generate --prompt on the run directory", g, gen("--prompt", "def ", "--temperature", "1.0",
                                                             "--max-new-tokens", "24"),
            expect="ok", check=lambda fx, p: None if p.stdout.strip() else "no text"),
        cli("generate --speculative on the run directory", g, gen("--prompt", "def ", "--speculative",
                                                                  "--max-new-tokens", "24"),
            expect="ok"),
        cli("generate from a missing directory", g, lambda fx: ["generate", "--checkpoint", fx.path("absent"),
                                                                "--prompt", "a"]),
        cli("generate from a file", g, lambda fx: ["generate", "--checkpoint", fx.toml, "--prompt", "a"]),
        cli("generate --prompt on a checkpoint without tokenizer", g, lambda fx: [
            "generate", "--checkpoint", fx.converted, "--prompt", "a"]),
        cli("generate --prompt-ids on the converted checkpoint", g, lambda fx: [
            "generate", "--checkpoint", fx.converted, "--prompt-ids", "1,2,3", "--max-new-tokens", "4"],
            expect="ok"),
        cli("info with an unknown name", g, lambda fx: ["info", "nonsense"]),
        cli("demo --preset nope", g, lambda fx: ["demo", "--preset", "nope"]),
        cli("plan nope", g, lambda fx: ["plan", "nope"]),
        cli("plan --batch -1", g, lambda fx: ["plan", "small", "--batch", "-1"]),
        cli("convert --weights fp4", g, lambda fx: ["convert", fx.fp8, fx.path("out"), "--weights", "fp4"]),
        cli("export --max-shard-bytes 0", g, lambda fx: ["export", fx.converted, fx.path("hf"),
                                                         "--max-shard-bytes", "0"]),
        cli("export --max-shard-bytes inf", g, lambda fx: ["export", fx.converted, fx.path("hf"),
                                                           "--max-shard-bytes", "inf"]),
    ]


def config_cases() -> list[Case]:
    g = "config files"
    return [
        cli("train --config missing.toml", g, lambda fx: ["train", "--config", fx.path("missing.toml")]),
        cli("train --config a directory", g, lambda fx: ["train", "--config", fx.root]),
        train_case("invalid TOML", "[train\nsteps = 3\n", group=g),
        train_case("unknown section", "[modle]\nhidden_size = 32\n", group=g),
        train_case("unknown field", toml(RUN) + "stpes = 3\n", group=g),
        train_case("unknown preset", toml(with_field("model", "preset", "huge")), group=g),
        train_case("hidden_size = -1", with_field("model", "hidden_size", -1), group=g),
        train_case("hidden_size = 'big'", with_field("model", "hidden_size", "big"), group=g),
        train_case("rope_scaling overridden", toml(RUN).replace("[data]", "rope_scaling = { factor = 2.0 }\n[data]"),
                   group=g),
        train_case("a section that is not a table", "train = 3\n", group=g),
        cli("info on a config.json with vocab_size 0", g, lambda fx: ["info", bad_config(fx, vocab_size=0)]),
        cli("info on invalid JSON", g, lambda fx: ["info", write_text(fx, "config.json", "{not json")]),
    ]


def settings_cases() -> list[Case]:
    return [
        train_case("lr = -1", with_field("train", "lr", -1.0)),
        train_case("lr = nan", with_field("train", "lr", float("nan"))),
        train_case("lr = inf", with_field("train", "lr", float("inf"))),
        train_case("warmup_steps = -5", with_field("train", "warmup_steps", -5)),
        train_case("steps = 20.5", with_field("train", "steps", 20.5)),
        train_case("steps = '10'", with_field("train", "steps", "10")),
        train_case("ckpt_every = 0", with_field("run", "ckpt_every", 0)),
        train_case("keep_checkpoints = 0", with_field("run", "keep_checkpoints", 0)),
        train_case("seq_len > max_position_embeddings", with_field("train", "seq_len", 65)),
        train_case("batch_size 2 with grad_accum 3", with_field("train", "grad_accum", 3)),
        train_case("b1 = 1.5", with_field("train", "b1", 1.5)),
        train_case("corpus = 'wikipedia'", with_field("data", "corpus", "wikipedia"),
                   check=lambda fx, p: None if "unknown corpus" in p.stderr else "does not say unknown corpus"),
        train_case("corpus = 'files' without files", with_field("data", "corpus", "files")),
        train_case("corpus file missing", {**RUN, "data": {"corpus": "files", "files": ["/nonexistent.txt"]}}),
        train_case("corpus file not UTF-8", {**RUN, "data": {"corpus": "files", "files": [os.path.join(
            REPO, "experiments", "results", "mtp_ce.png")]}}),
        train_case("tokenizer = 'bpe:10'", with_field("data", "tokenizer", "bpe:10")),
        train_case("tokenizer = 'sentencepiece'", with_field("data", "tokenizer", "sentencepiece")),
        train_case("sample_temperature = -1", with_field("run", "sample_temperature", -1.0)),
        train_case("corpus smaller than one batch", {**RUN, "data": {"corpus": "files", "files": [os.path.join(
            REPO, "experiments", "configs", "tiny_stdlib.toml")]}, "train": {**RUN["train"], "batch_size": 64,
                                                                             "seq_len": 64}}),
        train_case("--mesh nope", extra=("--mesh", "nope")),
        train_case("--mesh cpu-8 on one device", extra=("--mesh", "cpu-8")),
    ]


def run_dir_cases() -> list[Case]:
    g = "run directory"
    return [
        cli("--out is a file", g, lambda fx: ["train", "--config", fx.toml, "--out", fx.toml]),
        cli("--out under a file", g, lambda fx: ["train", "--config", fx.toml, "--out", fx.toml + "/run"]),
        cli("resume with another tokenizer", g, lambda fx: [
            "train", "--config", fx.write_toml(with_field("data", "tokenizer", "bpe:300")), "--out", fx.run_dir]),
        cli("resume with another hidden_size", g, lambda fx: [
            "train", "--config", fx.write_toml(with_field("model", "hidden_size", 48)), "--out", fx.run_dir]),
        cli("a failed run's leftover tokenizer/, another tokenizer", g, lambda fx: [
            "train", "--config", fx.write_toml(with_field("data", "tokenizer", "bpe:300")), "--out",
            leftover_tokenizer(fx)], leftovers=lambda fx, a: [os.path.join(a[4], "config.json")]),
        cli("generate from a run directory without checkpoints", g, lambda fx: [
            "generate", "--checkpoint", run_without_checkpoints(fx), "--prompt", "a"]),
    ]


def leftover_tokenizer(fx: Fixtures) -> str:
    out = fx.path("leftover")
    shutil.copytree(os.path.join(fx.run_dir, "tokenizer"), os.path.join(out, "tokenizer"))
    return out


def run_without_checkpoints(fx: Fixtures) -> str:
    out = fx.path("run_nockpt")
    os.makedirs(os.path.join(out, "checkpoints"))
    shutil.copy(os.path.join(fx.run_dir, "config.json"), out)
    shutil.copytree(os.path.join(fx.run_dir, "tokenizer"), os.path.join(out, "tokenizer"))
    return out


def bad_config(fx: Fixtures, **fields) -> str:
    with open(os.path.join(fx.bf16, "config.json"), encoding="utf-8") as f:
        return write_text(fx, "config.json", json.dumps({**json.load(f), **fields}))


def write_text(fx: Fixtures, name: str, text: str) -> str:
    directory = fx.path("cfg")
    os.makedirs(directory)
    path = os.path.join(directory, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def checkpoint_cases() -> list[Case]:
    first = "model.embed_tokens.weight"
    return [
        convert_case("missing tensor", lambda fx, s: edit_tensor(s, "model.norm.weight", lambda a: None)),
        convert_case("extra tensor", lambda fx, s: edit_tensor(s, first, lambda a: a) and add_tensor(s)),
        convert_case("misshaped tensor", lambda fx, s: edit_tensor(s, "model.norm.weight", lambda a: a[:-1])),
        convert_case("int32 tensor", lambda fx, s: edit_tensor(s, "model.norm.weight", lambda a: a.astype(
            np.int32))),
        convert_case("NaN weight", lambda fx, s: edit_tensor(s, NAN_TENSOR, set_value(np.nan))),
        convert_case("Inf weight", lambda fx, s: edit_tensor(s, NAN_TENSOR, set_value(np.inf))),
        convert_case("NaN weight with --allow-nonfinite", lambda fx, s: edit_tensor(s, NAN_TENSOR, set_value(
            np.nan)), extra=("--allow-nonfinite",), expect="ok"),
        convert_case("NaN FP8 scale", lambda fx, s: edit_tensor(s, FP8_SCALE, set_value(np.nan)), which="fp8"),
        convert_case("overlapping offsets", lambda fx, s: rewrite_layout(shard_of(s, first), "overlap")),
        convert_case("gap between tensors", lambda fx, s: rewrite_layout(shard_of(s, first), "gap")),
        convert_case("trailing bytes", lambda fx, s: rewrite_layout(shard_of(s, first), "trailing")),
        convert_case("truncated shard", lambda fx, s: os.truncate(shard_of(s, first), os.path.getsize(
            shard_of(s, first)) - 100)),
        convert_case("corrupt header", lambda fx, s: overwrite(shard_of(s, first), 8, b"\x00garbage{{")),
        convert_case("header length 2^60", lambda fx, s: overwrite(shard_of(s, first), 0, (2**60).to_bytes(
            8, "little"))),
        convert_case("index names an absent shard", lambda fx, s: os.remove(shard_of(s, first))),
        convert_case("no config.json", lambda fx, s: os.remove(os.path.join(s, "config.json"))),
        convert_case("config.json with vocab_size 0", lambda fx, s: patch_config(s, vocab_size=0)),
        convert_case("config.json not JSON", lambda fx, s: overwrite(os.path.join(s, "config.json"), 0, b"{{{")),
        convert_case("malicious pickle (.pt)", lambda fx, s: evil_pickle(os.path.join(s, "model.pt"), os.path.join(
            fx.root, "PWNED")) or [os.remove(p) for p in glob.glob(os.path.join(s, "*.safetensors*"))],
            check=no_marker),
        cli("convert a missing source", "checkpoints", lambda fx: ["convert", fx.path("absent"), fx.path("out")]),
        cli("convert a text file", "checkpoints", lambda fx: ["convert", fx.toml, fx.path("out")]),
        cli("convert into an existing output", "checkpoints", lambda fx: ["convert", fx.fp8, fx.converted]),
        cli("export a non-converted directory", "checkpoints", lambda fx: ["export", fx.bf16, fx.path("hf")],
            leftovers=out_left(2)),
        cli("export with a block missing", "checkpoints", lambda fx: ["export", damaged_converted(
            fx, lambda d: shutil.rmtree(os.path.join(d, "blocks", "layer_001"))), fx.path("hf")],
            leftovers=out_left(2)),
        cli("export with a corrupt manifest", "checkpoints", lambda fx: ["export", damaged_converted(
            fx, lambda d: overwrite(os.path.join(d, "manifest.json"), 0, b"[]   ")), fx.path("hf")],
            leftovers=out_left(2)),
        cli("generate from converted NaN weights", "checkpoints", lambda fx: [
            "generate", "--checkpoint", nan_converted(fx), "--prompt-ids", "1,2", "--max-new-tokens", "3"]),
        cli("generate from a HF directory with a NaN weight", "checkpoints", lambda fx: [
            "generate", "--checkpoint", nan_source(fx), "--prompt-ids", "1,2", "--max-new-tokens", "3"]),
        cli("load a converted checkpoint whose config.json is bad", "checkpoints", lambda fx: [
            "generate", "--checkpoint", damaged_converted(fx, lambda d: patch_config(d, hidden_size=-3)),
            "--prompt-ids", "1"], check=lambda fx, p: None if "config.json" in p.stderr else "no file named"),
    ]


def filesystem_cases(fx: Fixtures) -> list[Case]:
    g = "file system"
    ro, ro_pre, how = readonly(fx)
    full, full_pre = full_disk(fx, "1m")
    small, small_pre = full_disk(fx, "2m")
    return [
        cli(f"convert into a read-only directory ({how})", g, lambda fx: ["convert", fx.bf16, ro + "/out",
                                                                          "--quiet"],
            preexec=ro_pre, leftovers=out_left(2)),
        cli(f"train into a read-only directory ({how})", g, lambda fx: ["train", "--config", fx.toml, "--out",
                                                                        ro + "/run"], preexec=ro_pre),
        cli("convert into a full disk", g, lambda fx: ["convert", fx.bf16, fx.path("out").replace(
            fx.root, full), "--quiet", "--weights", "fp32"], preexec=full_pre, leftovers=out_left(2)),
        cli("export onto a full disk", g, lambda fx: ["export", fx.converted, fx.path("hf").replace(fx.root, full),
                                                      "--quiet"], preexec=full_pre, leftovers=out_left(2)),
        cli("train onto a full disk (last checkpoint kept)", g, lambda fx: [
            "train", "--config", fx.toml, "--out", os.path.join(small, "run")], preexec=small_pre,
            check=last_checkpoint_loads, serial=True),
        cli("convert under a file", g, lambda fx: ["convert", fx.fp8, fx.toml + "/out"]),
        cli("export under a file", g, lambda fx: ["export", fx.converted, fx.toml + "/hf"]),
    ]


def add_tensor(src: str) -> bool:
    from dsv3_jax.ckpt.safetensors import SafetensorsFile, save_file

    path = shard_of(src, "model.embed_tokens.weight")
    with SafetensorsFile(path) as f:
        tensors = {k: np.array(f.get(k)) for k in f}
    tensors["model.layers.0.mlp.extra.weight"] = np.zeros((4, 4), np.float32)
    save_file(tensors, path, metadata={"format": "pt"})
    index_path = os.path.join(src, "model.safetensors.index.json")
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    index["weight_map"]["model.layers.0.mlp.extra.weight"] = os.path.basename(path)
    with open(index_path, "w", encoding="utf-8") as f:
        json.dump(index, f)
    return True


def overwrite(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def patch_config(directory: str, **fields) -> None:
    path = os.path.join(directory, "config.json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({**data, **fields}, f)


def damaged_converted(fx: Fixtures, damage: Callable[[str], object]) -> str:
    out = fx.path("converted_copy")
    shutil.copytree(fx.converted, out)
    damage(out)
    return out


def nan_source(fx: Fixtures) -> str:
    src = copy_src(fx, "bf16")
    edit_tensor(src, NAN_TENSOR, set_value(np.nan))
    return src


def nan_converted(fx: Fixtures) -> str:
    out = fx.path("nan_converted")
    proc = dsv3(fx, ["convert", nan_source(fx), out, "--quiet", "--allow-nonfinite"], 180)
    if proc.returncode:
        raise RuntimeError(f"could not build the NaN fixture: {proc.stderr[-500:]}")
    return out


if __name__ == "__main__":
    sys.exit(main())
