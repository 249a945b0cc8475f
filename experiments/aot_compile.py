"""DeepSeek-V3 671B at full size, compiled for real TPU slices on this CPU host: XLA's per-device memory beside
the planner's, fits, FLOPs and the roofline bound (`dsv3_jax.plan.aot`; DESIGN.md §8). No TPU is needed.

Run (each row is one compile in a fresh process; ~25 min on 2 cores, the v5p-256 train step ~10 of them):

    python experiments/aot_compile.py                 # every row of ROWS
    python experiments/aot_compile.py --only train-v5p-256 --layers 4   # one row, 4 layers (quick check)

Writes experiments/results/aot_compile.json (one record per row, merged with earlier runs) and
experiments/results/aot_compile.md (the README table). GiB = 2³⁰ bytes, as XLA reports. FLOPs, bytes and the
roofline bound are estimates from the compiler's cost model and the traced program, not measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS_JSON = os.path.join(HERE, "results", "aot_compile.json")
RESULTS_MD = os.path.join(HERE, "results", "aot_compile.md")
MAXTEXT_V5P_TFLOPS = 152  # MaxText's published DeepSeek-V3 671B training, v5p-1024, seq 8192, per chip

# name: (program, weights, batch, seq, topology, layout, prefill chunk, config overrides)
ROWS = {
    "prefill-bf16-v5p-64": ("prefill", "bf16", 16, 4096, "v5p:4x4x4", "infer-ep-tp4", 4096, {}),
    "prefill-bf16-v5p-32": ("prefill", "bf16", 16, 4096, "v5p:4x4x2", "infer-ep-tp4", 4096, {}),
    "prefill-bf16-v5p-64-tpu-pod": ("prefill", "bf16", 16, 4096, "v5p:4x4x4", "tpu-pod", 4096, {}),
    "prefill-fp8-tpu7x-8": ("prefill", "fp8", 32, 32768, "tpu7x:2x2x2", "infer-ep", 2048,
                            {"fp8_impl": "weight_only"}),
    "decode-fp8-tpu7x-8": ("decode", "fp8", 32, 32768, "tpu7x:2x2x2", "infer-ep", 4096, {"fp8_impl": "weight_only"}),
    "prefill-fp8-tpu7x-8-128k": ("prefill", "fp8", 1, 131072, "tpu7x:2x2x2", "infer-ep-seq", 4096,
                                 {"fp8_impl": "weight_only"}),
    "decode-fp8-tpu7x-8-128k": ("decode", "fp8", 16, 131072, "tpu7x:2x2x2", "infer-ep", 4096,
                                {"fp8_impl": "weight_only"}),
    "decode-fp8-v5p-16": ("decode", "fp8", 32, 4096, "v5p:2x2x4", "infer-ep", 4096, {"fp8_impl": "weight_only"}),
    "decode-bf16-v5p-64": ("decode", "bf16", 64, 32768, "v5p:4x4x4", "infer-ep-tp4", 4096, {}),
    "train-v5p-128": ("train", "bf16", 128, 4096, "v5p:4x4x8", "train-fsdp-ep64", 4096, {}),
    "train-v5p-256": ("train", "bf16", 256, 4096, "v5p:4x8x8", "train-fsdp-ep64", 4096, {}),
}


def run_row(name: str, layers: int | None) -> dict:
    """Compile one row in this process; the AotResult as a dict (fits False with XLA's words when it does not)."""
    from dsv3_jax.config import ModelConfig
    from dsv3_jax.errors import PlanError
    from dsv3_jax.plan import aot

    program, weights, batch, seq, topology, layout, chunk, overrides = ROWS[name]
    config = ModelConfig.from_preset("deepseek-v3-671b", **overrides)
    start = time.perf_counter()
    try:
        result = aot.compile_program(config, aot.Program(program, batch, seq, weights, chunk), topology, layout,
                                     layers=layers)
    except PlanError as e:
        return {"name": name, "error": str(e), "wall_s": time.perf_counter() - start}
    print(result.table(), file=sys.stderr)
    return {"name": name, **result.to_dict(), "fp8_impl": overrides.get("fp8_impl"),
            "wall_s": round(time.perf_counter() - start, 1)}


def _gib(nbytes) -> str:
    return "—" if nbytes is None else f"{nbytes / 2**30:.1f}"


def _row_md(r: dict) -> str:
    if "error" in r:
        return f"| {r['name']} | error: {r['error']} |" + " |" * 9
    xla = r["xla"]
    if xla:
        parts = (xla["argument"], xla["temp"], xla["output"] - xla["alias"])
        memory = f"{_gib(xla['total'])} ({' / '.join(_gib(p) for p in parts)})"
    else:
        memory = f"needs {_gib(r['oom_need'])} of {_gib(r['hbm_bytes'])} (RESOURCE_EXHAUSTED)"
    ratio = f"{r['ratio']:.2f}" if r.get("ratio") else "—"
    fits = "yes" if r["fits"] else "**no**"
    weights = r["weights"] + (f" ({r['fp8_impl']})" if r.get("fp8_impl") else "")
    shape = f"{r['batch']} × {'cache ' if r['program'] == 'decode' else ''}{r['seq']}"
    target = f"{r['topology']} ({r['chips']} chips, {r['devices']} dev)"
    if r.get("roofline_s"):
        cost = (f"{r['flops_per_token']:.3g} / {r['model_flops_per_token']:.3g} | {r['roofline_s'] * 1e3:,.0f} ms; "
                f"{r['tokens_per_s']:,.0f} tok/s")
        if r["program"] == "train":
            cost += f"; {r['model_tflops_per_chip']:.0f} TFLOP/s/chip"
    else:
        cost = "— | —"
    layers = "" if r["layers"] == 61 else f" ({r['layers']} layers)"
    return (f"| {r['program']}{layers} | {weights} | {shape} | {target} | {r['layout']} | {memory} | "
            f"{_gib(r['planner_total'])} | {ratio} | {fits} | {cost} |")


def markdown(records: list[dict]) -> str:
    lines = [
        "# DeepSeek-V3 671B compiled for TPU slices (XLA vs planner, per device)",
        "",
        "Generated by `python experiments/aot_compile.py` (libtpu 0.0.42, jax 0.10.2; the TPU compiler run on a CPU",
        "host for abstract devices of each slice). GiB = 2³⁰ bytes. XLA total = argument + temp + output − aliased",
        "(columns: total (argument / temp / non-aliased output)); planner = `plan.programs.program_memory`. FLOPs per",
        "token: XLA's cost analysis scaled to the whole program by the loop trip counts / the model's (planner",
        "formula). Roofline = max(FLOPs / peak bf16, matmul bytes / HBM bandwidth) per device: an estimate, not a",
        "measurement (no communication, perfect overlap; routing balanced). tpu7x: 2 devices (TensorCores) per chip.",
        "",
        "| program | weights | batch × seq | slice | layout | XLA GiB / device | planner GiB | planner / XLA | "
        "fits | FLOPs / token XLA / model | roofline bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [_row_md(r) for r in records]
    train = [r for r in records if r.get("program") == "train" and r.get("fits") and r.get("model_tflops_per_chip")]
    if train:
        best = min(train, key=lambda r: r["chips"])
        peak = 459.0  # v5p bf16 TFLOP/s per chip
        lines += ["", f"Train step, {best['topology']} ({best['chips']} chips, the smallest v5p slice that fits): "
                  f"{best['model_tflops_per_chip']:.0f} model TFLOP/s per chip at the roofline bound "
                  f"({best['model_tflops_per_chip'] / peak:.0%} MFU of 459), against MaxText's published "
                  f"{MAXTEXT_V5P_TFLOPS} TFLOP/s per chip (v5p-1024, seq 8192) — a bound, not a measurement."]
    return "\n".join(lines) + "\n"


def _load() -> dict[str, dict]:
    if not os.path.exists(RESULTS_JSON):
        return {}
    with open(RESULTS_JSON, encoding="utf-8") as f:
        return {r["name"]: r for r in json.load(f)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="*", choices=sorted(ROWS), default=None, help="rows to (re)compile")
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (quick checks)")
    parser.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: compile one row, print JSON
    args = parser.parse_args()
    if args.row:
        print(json.dumps(run_row(args.row, args.layers)))
        return 0
    records: dict[str, dict] = {}
    for name in args.only or list(ROWS):
        cmd = [sys.executable, __file__, "--row", name] + (["--layers", str(args.layers)] if args.layers else [])
        print(f"== {name}", file=sys.stderr, flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if not lines:
            print(done.stderr[-3000:], file=sys.stderr)
            records[name] = {"name": name, "error": f"compile process failed (exit {done.returncode})"}
            continue
        records[name] = json.loads(lines[-1])
        print("\n".join(line for line in done.stderr.splitlines() if not line.startswith(("W0", "I0", "E0"))),
              file=sys.stderr)
    records = {**_load(), **records}  # merged with the file as it is now (another run may have written it)
    ordered = [records[n] for n in ROWS if n in records]
    text = markdown(ordered)
    _write_atomic(RESULTS_JSON, json.dumps(ordered, indent=2))
    _write_atomic(RESULTS_MD, text)
    print(text)
    return 0


def _write_atomic(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
