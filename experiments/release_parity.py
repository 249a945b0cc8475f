"""Logits of the release-shaped FP8 checkpoint at the REAL 671B widths, loaded straight into sharded arrays on 8
simulated devices, against HF transformers' DeepseekV3 on the dequantised weights.

    python experiments/release_parity.py                      # builds /tmp/dsv3_release_parity if absent
    python experiments/release_parity.py --dir D --layout gpu-8-infer --tokens 8

The directory comes from `experiments/release_load_memory.py`'s builder (hidden 7168, q_lora 1536, kv_lora 512,
128 heads, expert FFN 2048, dense FFN 18432, vocab 129,280; here 1 dense + 1 MoE layer with 16 experts and the
MTP layer, to leave room for the float32 forward). Each side runs in a fresh process:

- HF: `tests/hf_reference.layerwise_hf_logits` — float32 on the dequantised weights (W = q · s per 128×128
  block), one `DeepseekV3DecoderLayer` in memory at a time;
- ours, FP8-resident (`load_pretrained` default) with `fp8_impl="weight_only"` and float32 compute: x · dequant(W)
  in float32, the same arithmetic as HF up to summation order → tolerance 1e-4 × max|logit|;
- ours, dequantised once to bf16 (`weights="bf16"`), float32 compute, against HF on the same bf16-rounded
  dequantised weights (`round_bf16=True`) → tolerance 1e-4 × max|logit|. Its distance to HF on the exact
  weights is reported beside it, not bounded: rounding every weight to bf16 (≤ 2^-9 relative each) moves hidden
  states enough to flip routed experts of some tokens, and a flipped expert changes that token's logits by O(1).

Results: experiments/results/release_parity.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results", "release_parity.json")
TOLERANCE = 1e-4  # max |ours - HF| / max |HF|, both float32 on the same weights


def tokens(directory: str, count: int) -> np.ndarray:
    with open(os.path.join(directory, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    return np.random.default_rng(0).integers(0, vocab, (1, count)).astype(np.int32)


def hf_child(directory: str, count: int, out: str, round_bf16: bool) -> dict:
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from hf_reference import layerwise_hf_logits

    start = time.perf_counter()
    np.save(out, layerwise_hf_logits(directory, tokens(directory, count), round_bf16=round_bf16))
    return {"seconds": round(time.perf_counter() - start, 1)}


def ours_layerwise(config, variables, tokens_BT: np.ndarray) -> np.ndarray:
    """Float32 logits of the loaded (sharded) variables through the model's own modules, one decoder layer at a
    time (each layer's weights sliced out of its stack, applied, dropped), and the head applied shard by shard of
    its vocabulary split: the whole-model `parallel.api.forward` would upcast the 129,280-row head and every
    layer's experts at once, more than this 24 GB machine has beside the 6 GB of FP8 weights. The CI tests run the
    whole-model sharded forward against HF at small widths (tests/test_release_load.py)."""
    import jax
    import jax.numpy as jnp

    from dsv3_jax.model.layers import RMSNorm
    from dsv3_jax.model.transformer import DecoderLayer, head_logits

    sys.path.insert(0, os.path.join(REPO, "tests"))
    from hf_reference import layer_variables

    params = variables["params"]
    x_BTD = jnp.take(params["embed_tokens"], jnp.asarray(tokens_BT), axis=0).astype(jnp.float32)
    positions_BT = jnp.arange(tokens_BT.shape[1])[None].repeat(tokens_BT.shape[0], 0)
    for i in range(config.num_hidden_layers):
        layer, use_moe = layer_variables(config, variables, i)
        x_BTD, _ = DecoderLayer(config, use_moe).apply(layer, x_BTD, positions_BT)
        x_BTD = jax.block_until_ready(x_BTD)
        del layer
    h_BTD = RMSNorm(config, config.hidden_size).apply({"params": params["final_norm"]}, x_BTD)
    head = params["lm_head"]
    parts = {}  # vocabulary start → one shard holding those columns (all rows)
    for sh in head.addressable_shards:
        if sh.index[0] != slice(None):
            raise SystemExit("the head must be split over its vocabulary only")
        parts.setdefault(sh.index[1].start or 0, sh)
    out = [np.asarray(head_logits(jax.device_put(h_BTD, sh.device), sh.data)) for _, sh in sorted(parts.items())]
    return np.concatenate(out, axis=-1)


def ours_child(directory: str, count: int, out: str, layout_name: str, weights: str) -> dict:
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")  # float32 means float32 (as in the test suite)
    import dsv3_jax as d
    from dsv3_jax.parallel import api as sa
    from dsv3_jax.parallel import get_layout, make_mesh

    layout = get_layout(layout_name)
    mesh = make_mesh(layout)
    stored = d.ModelConfig.from_hf_config(directory)
    start = time.perf_counter()
    config, variables = d.load_pretrained(directory, weights=weights,
                                          shardings=sa.variable_shardings(stored, layout, mesh))
    loaded = time.perf_counter() - start
    run = config.replace(dtype="float32", fp8_impl="weight_only")
    np.save(out, ours_layerwise(run, variables, tokens(directory, count)).astype(np.float32))
    return {"load_seconds": round(loaded, 1), "forward_seconds": round(time.perf_counter() - start - loaded, 1)}


def _status_gb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 / 1e9 for line in f if line.startswith("VmHWM"))


def _run(args: list[str]) -> dict:
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{args[:2]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(ours: np.ndarray, ref: np.ndarray) -> dict:
    err = np.abs(ours.astype(np.float64) - ref)
    scale = float(np.abs(ref).max())
    return {"max_abs_err": float(err.max()), "max_abs_logit": scale, "relative": float(err.max() / scale),
            "argmax_agree": float(np.mean(ours.argmax(-1) == ref.argmax(-1)))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", default="/tmp/dsv3_release_parity")
    p.add_argument("--layers", type=int, default=2, help="decoder layers (1 dense + the rest MoE) besides MTP")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--layout", default="gpu-8-infer")
    p.add_argument("--tokens", type=int, default=8)
    p.add_argument("--weights", nargs="+", default=["fp8", "bf16"], choices=["fp8", "bf16", "fp32"])
    p.add_argument("--reuse-reference", action="store_true", help="reuse HF logits saved in --dir by an earlier run")
    p.add_argument("--child", choices=("hf", "hf-bf16", "ours"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        row = (hf_child(args.dir, args.tokens, args.out, args.child == "hf-bf16") if args.child != "ours" else
               ours_child(args.dir, args.tokens, args.out, args.layout, args.weights[0]))
        print(json.dumps({**row, "peak_rss_GB": round(_status_gb(), 2)}))
        return 0
    if not os.path.isfile(os.path.join(args.dir, "config.json")):
        sys.path.insert(0, HERE)
        from release_load_memory import build

        print(f"building {args.dir} ...", flush=True)
        build(args.dir, args.layers, args.experts)
    common = ["--dir", args.dir, "--tokens", str(args.tokens)]
    refs, rows = {}, {"tokens": args.tokens, "layout": args.layout}
    for kind in ["hf"] + (["hf-bf16"] if "bf16" in args.weights else []):
        path = os.path.join(args.dir, f"{kind}_logits.npy")
        reuse = args.reuse_reference and os.path.isfile(path) and np.load(path).shape[1] == args.tokens
        rows[kind] = {"reused": path} if reuse else _run(["--child", kind, *common, "--out", path])
        refs[kind] = np.load(path)
        print(f"{kind} layer by layer: {rows[kind]}", flush=True)
    for weights in args.weights:
        path = os.path.join(args.dir, f"ours_{weights}.npy")
        row = _run(["--child", "ours", *common, "--out", path, "--layout", args.layout, "--weights", weights])
        ours = np.load(path)
        reference = "hf-bf16" if weights == "bf16" else "hf"
        row.update(reference=reference, **compare(ours, refs[reference]), tolerance=TOLERANCE)
        row["ok"] = row["relative"] <= TOLERANCE
        if weights == "bf16":
            row["vs_exact_weights"] = compare(ours, refs["hf"])
        rows[weights] = row
        print(f"ours, weights {weights}: {row}", flush=True)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(rows, f, indent=2)
    return 0 if all(rows[w]["ok"] for w in args.weights) else 1


if __name__ == "__main__":
    sys.exit(main())
