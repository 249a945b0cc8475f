"""Compile the real programs ahead of time for a named TPU slice, on a CPU host: what XLA says each chip needs.

Programs (abstract inputs only — nothing is allocated; the TPU compiler runs through libtpu, `plan.targets`):
  - "prefill": B prompts of T tokens through the latent-cache model (absorbed attention), as `infer.generate`
    prefills — `prefill_chunk` tokens per step against a T-slot cache, last-position logits [B,V] and the filled
    cache out;
  - "decode": one step of B sequences over a T-slot latent cache (the "cache" collection an input, donated);
  - "train": one `train.step` step on B × T (remat "full", AdamW with a bf16 first moment, MTP, the sequence-wise
    balance loss, the bias hook), the state donated.
Weights: inference "bf16" or "fp8" (the FP8 recipe's linear weights as `QuantArray`s), training fp32 masters.
Variables come from `model.api.abstract_variables`, their shardings from the layout (`parallel.api`); the training
state is `jax.eval_shape` of `train.step.init_state`.

Per device (one chip, or one TensorCore where libtpu exposes two per chip) it reports XLA's `memory_analysis()`:
argument, output, temporary and aliased bytes — total = argument + output + temp − alias — against the HBM the
compiler may use, beside the planner's figure for the same program (`plan.programs.program_memory`). FLOPs and
bytes per step come from `cost_analysis()`, scaled to the whole program by `plan.costs` (XLA counts each loop body
once); the roofline bound max(FLOPs / peak, bytes / HBM bandwidth) is an estimate, not a measurement.

Errors are PlanErrors in words: an unknown topology, a layout that does not divide the slice, and a program that
does not fit (XLA's RESOURCE_EXHAUSTED reworded with its per-device figure and the shortfall).
"""

from __future__ import annotations

import dataclasses
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from dsv3_jax.config import ModelConfig
from dsv3_jax.errors import PlanError, ShardingError
from dsv3_jax.model.api import abstract_variables
from dsv3_jax.model.axes import CACHE_COLLECTION
from dsv3_jax.model.transformer import Transformer
from dsv3_jax.parallel import api as parallel_api
from dsv3_jax.parallel.rules import Layout, get_layout, make_mesh
from dsv3_jax.plan import planner
from dsv3_jax.plan.costs import program_counts
from dsv3_jax.plan.programs import PROGRAMS, program_memory
from dsv3_jax.plan.targets import GIB, Target, get_target
from dsv3_jax.quant.fp8 import quantize_params
from dsv3_jax.train.step import TrainConfig, init_state, jit_train_step, make_optimizer, make_train_step

WEIGHTS = ("bf16", "fp8")
DEFAULT_PREFILL_CHUNK = 4096


@dataclasses.dataclass(frozen=True)
class Program:
    """What to compile: program kind, batch × sequence (decode: cache slots), inference weights, prefill chunk."""

    kind: str
    batch: int
    seq: int
    weights: str = "bf16"
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK

    def __post_init__(self):
        if self.kind not in PROGRAMS:
            raise PlanError(f"program: {self.kind!r} is not one of {', '.join(PROGRAMS)}")
        if self.weights not in WEIGHTS:
            raise PlanError(f"weights: {self.weights!r} is not one of {', '.join(WEIGHTS)} for a compiled program")
        for name in ("batch", "seq", "prefill_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise PlanError(f"{name}: must be a positive integer, got {value!r}")

    @property
    def chunk(self) -> int:
        """Prefill tokens per step (the whole prompt when it is shorter than prefill_chunk)."""
        chunk = min(self.prefill_chunk, self.seq)
        if self.seq % chunk:
            raise PlanError(f"prefill_chunk: {self.prefill_chunk} does not divide seq={self.seq}")
        return chunk

    @property
    def step_tokens(self) -> int:
        """Tokens per sequence one step of the program processes: a prefill chunk, 1 in decode, T in training."""
        return {"prefill": self.chunk, "decode": 1}.get(self.kind, self.seq)

    @property
    def tokens(self) -> int:
        """Tokens one run processes (decode: one per sequence)."""
        return self.batch * (1 if self.kind == "decode" else self.seq)


@dataclasses.dataclass
class AotResult:
    """XLA's per-device figures for one compiled program, the planner's beside them, and the cost estimate."""

    program: str
    config_name: str
    layers: int
    batch: int
    seq: int
    weights: str
    topology: str
    layout: str
    mesh: dict[str, int]
    devices: int
    chips: int
    hbm_bytes: int
    fits: bool
    xla: dict[str, int]  # argument / output / temp / alias / total (bytes per device); {} when it did not fit
    planner_breakdown: dict[str, int]
    planner_total: int
    compile_s: float
    oom: str | None = None  # XLA's words when it did not fit
    oom_need: int | None = None  # ... and the bytes per device it said it needed
    flops_xla: float | None = None  # cost_analysis(), loop bodies once (per device)
    bytes_xla: float | None = None
    flops_per_device: float | None = None  # XLA's FLOPs scaled to the whole program (plan.costs)
    bytes_per_device: float | None = None  # the traced program's matmul operands + results, loops counted (plan.costs)
    model_flops_per_token: float | None = None  # planner.flops_per_token (the model's math)
    roofline_s: float | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def xla_total(self) -> int | None:
        return self.xla.get("total")

    @property
    def tokens(self) -> int:
        return self.batch * (1 if self.program == "decode" else self.seq)

    @property
    def flops_per_token(self) -> float | None:
        """XLA's FLOPs (loop-scaled) per token processed, all devices."""
        return None if self.flops_per_device is None else self.flops_per_device * self.devices / self.tokens

    @property
    def tokens_per_s(self) -> float | None:
        """Tokens per second at the roofline bound (an upper bound: no communication, perfect overlap)."""
        return None if not self.roofline_s else self.tokens / self.roofline_s

    @property
    def model_tflops_per_chip(self) -> float | None:
        """The model's FLOPs (planner formula) per second per chip at the roofline bound."""
        if not self.roofline_s or self.model_flops_per_token is None:
            return None
        return self.model_flops_per_token * self.tokens / self.chips / self.roofline_s / 1e12

    @property
    def xla_need(self) -> int | None:
        """Bytes per device XLA needs: its total, or what it said it needed when it ran out of HBM."""
        return self.xla_total or self.oom_need

    @property
    def ratio(self) -> float | None:
        """Planner total / XLA's need (1.0 = exact)."""
        return self.planner_total / self.xla_need if self.xla_need else None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(xla_total=self.xla_total, xla_need=self.xla_need, ratio=self.ratio,
                   flops_per_token=self.flops_per_token, tokens_per_s=self.tokens_per_s,
                   model_tflops_per_chip=self.model_tflops_per_chip)
        return out

    def table(self) -> str:
        """Two-column text for the terminal (GiB = 2³⁰ bytes, as XLA prints)."""
        rows = [("program", f"{self.program} {self.config_name} ({self.layers} layers, {self.weights}), batch "
                            f"{self.batch} × {'cache ' if self.program == 'decode' else ''}{self.seq}"),
                ("target", f"{self.topology}: {self.devices} devices ({self.chips} chips), "
                           f"{gib(self.hbm_bytes)} HBM per device"),
                ("layout", f"{self.layout} {self.mesh}"),
                ("compile", f"{self.compile_s:.1f} s")]
        if self.xla:
            rows += [(f"XLA per device: {k}", gib(v)) for k, v in self.xla.items()]
        else:
            rows.append(("XLA", self.oom or "no figures"))
        rows += [(f"planner: {k}", gib(v)) for k, v in self.planner_breakdown.items()]
        ratio = f" (planner / XLA {self.ratio:.3f})" if self.ratio else ""
        rows.append(("planner total", gib(self.planner_total) + ratio))
        rows.append(("fits", "yes" if self.fits else "NO"))
        if self.flops_per_device is not None:
            rows += [("FLOPs / device / step (est.)", f"{self.flops_per_device:.3e} (XLA, loop bodies once: "
                                                      f"{self.flops_xla:.3e})"),
                     ("matmul bytes / device / step", f"{self.bytes_per_device:.3e} (XLA bytes accessed, loop "
                                                      f"bodies once: {self.bytes_xla:.3e})"),
                     ("FLOPs / token (est.; model)", f"{self.flops_per_token:.3e}; {self.model_flops_per_token:.3e}"),
                     ("roofline bound (estimate)", f"{self.roofline_s * 1e3:,.1f} ms per step, "
                                                   f"{self.tokens_per_s:,.0f} tokens/s")]
        width = max(len(k) for k, _ in rows)
        return "\n".join([f"{k:<{width}}  {v}" for k, v in rows] + [f"note: {n}" for n in self.notes])


def gib(nbytes: float) -> str:
    return f"{nbytes / GIB:,.2f} GiB"


# ---------------------------------------------------------------- configs, layouts, abstract inputs


def with_layers(config: ModelConfig, layers: int | None) -> ModelConfig:
    """`config` with `layers` decoder layers at the same widths (None: unchanged); at least one MoE layer is kept
    when layers > 1 (dense layers = min(first_k_dense_replace, layers - 1))."""
    if layers is None:
        return config
    if not isinstance(layers, int) or layers <= 0:
        raise PlanError(f"layers: must be a positive integer, got {layers!r}")
    return config.replace(num_hidden_layers=layers, first_k_dense_replace=min(config.first_k_dense_replace,
                                                                               max(layers - 1, 0)))


def program_config(config: ModelConfig, program: Program) -> ModelConfig:
    """Run-time settings of the compiled program: bf16 compute; inference weights bf16 (FP8: bf16 before
    quantisation), training fp32 masters with remat "full"."""
    if program.kind == "train":
        return config.replace(dtype="bfloat16", param_dtype="float32", remat_policy="full")
    return config.replace(dtype="bfloat16", param_dtype="bfloat16")


def _mesh(layout: Layout, target: Target):
    try:
        return make_mesh(layout, target.devices)
    except ShardingError as e:
        raise PlanError(f"layout: {e} (topology {target.topology} has {len(target.devices)} devices)") from None


def abstract_inference_variables(config: ModelConfig, weights: str):
    variables = abstract_variables(config)
    if weights == "fp8":
        variables["params"] = jax.eval_shape(quantize_params, variables["params"])
    return variables


def _with_shardings(tree, shardings):
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _cache_shardings(cache, layout: Layout, mesh):
    """The latent cache [..., B, S, C] split over the batch's mesh axes."""
    batch = parallel_api.batch_axes(layout) or None
    return jax.tree_util.tree_map(
        lambda a: NamedSharding(mesh, PartitionSpec(*([None] * (a.ndim - 3)), batch)), cache)


# ---------------------------------------------------------------- the programs


def _abstract_cache(model: Transformer, batch: int):
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((batch, 1), jnp.int32),
                                               method=Transformer.hidden_states))
    return shapes[CACHE_COLLECTION]


def prefill_fn(config: ModelConfig, program: Program):
    """(variables, tokens [B,T]) → (last-position logits [B,V] float32, filled cache), chunk by chunk."""
    model = Transformer(config, cache_len=program.seq)
    chunk = program.chunk

    def prefill(variables, tokens_BT):
        b, t = tokens_BT.shape
        cache = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), _abstract_cache(model, b))

        def step(cache, i):
            tokens_BC = jax.lax.dynamic_slice_in_dim(tokens_BT, i * chunk, chunk, axis=1)
            positions_BC = jnp.broadcast_to(i * chunk + jnp.arange(chunk, dtype=jnp.int32), (b, chunk))
            h_BCD, state = model.apply({**variables, CACHE_COLLECTION: cache}, tokens_BC, positions_BC,
                                       method=Transformer.hidden_states, mutable=[CACHE_COLLECTION])
            return state[CACHE_COLLECTION], h_BCD[:, -1]

        cache, h_last_OBD = jax.lax.scan(step, cache, jnp.arange(t // chunk))
        logits_BV = model.apply(variables, h_last_OBD[-1][:, None], method=Transformer.logits)[:, 0]
        return logits_BV, cache

    return prefill


def decode_fn(config: ModelConfig, program: Program):
    """(variables, cache, tokens [B,1], positions [B,1]) → (logits [B,V] float32, updated cache)."""
    model = Transformer(config, cache_len=program.seq)

    def decode(variables, cache, tokens_B1, positions_B1):
        (logits_B1V, _), state = model.apply({**variables, CACHE_COLLECTION: cache}, tokens_B1, positions_B1,
                                             mutable=[CACHE_COLLECTION])
        return logits_B1V[:, 0], state[CACHE_COLLECTION]

    return decode


def train_config(program: Program) -> TrainConfig:
    """The compiled training step's settings: report defaults (MTP λ 0.3, balance α 1e-4, γ 1e-3, bf16 m)."""
    return TrainConfig(batch_size=program.batch, seq_len=program.seq, moment_dtype="bfloat16")


def _jitted(config: ModelConfig, program: Program, layout: Layout, mesh):
    """(jitted function with shardings, its abstract args) for the program under the layout. Built outside the
    layout's context: abstract values only, nothing placed on the (abstract) devices."""
    tokens = parallel_api.batch_sharding(layout, mesh)
    if program.kind == "train":
        tc = train_config(program)
        optimizer = make_optimizer(tc)
        state = jax.eval_shape(lambda v: init_state(v, optimizer), abstract_variables(config))
        sh = parallel_api.variable_shardings(config, layout, mesh, {"params": state.params, "router": state.router})
        st_sh = parallel_api.state_shardings(optimizer, state, sh["params"], sh["router"], mesh)
        fn = jit_train_step(make_train_step(config, tc, optimizer), st_sh, tokens)
        ids = jax.ShapeDtypeStruct((program.batch, program.seq), jnp.int32)
        args = (state, {"inputs": ids, "targets": ids})
    else:
        variables = abstract_inference_variables(config, program.weights)
        var_sh = parallel_api.variable_shardings(config, layout, mesh, variables)
        model = Transformer(config, cache_len=program.seq)
        if program.kind == "prefill":
            ids = jax.ShapeDtypeStruct((program.batch, program.seq), jnp.int32)
            fn = jax.jit(prefill_fn(config, program), in_shardings=(var_sh, tokens))
            args = (variables, ids)
        else:
            cache = _abstract_cache(model, program.batch)
            cache_sh = _cache_shardings(cache, layout, mesh)
            ids = jax.ShapeDtypeStruct((program.batch, 1), jnp.int32)
            fn = jax.jit(decode_fn(config, program), in_shardings=(var_sh, cache_sh, tokens, tokens),
                         out_shardings=(None, cache_sh), donate_argnums=1)
            args = (variables, cache, ids, ids)
    return fn, args


# ---------------------------------------------------------------- compiling, and XLA's words


_OOM = re.compile(r"RESOURCE_EXHAUSTED: (?P<what>[^\n]*?)(?:\n|$)")
_OOM_FIGURES = re.compile(r"\((?P<need>[\d.]+)(?P<unit>[KMGT])\)[^(]*available HBM \([\d.]+[KMGT]\)")
_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _oom_message(error: Exception) -> tuple[str, int | None] | None:
    """(one-line reason, bytes XLA needed per device or None) when `error` is the compiler running out of HBM."""
    text = str(error)
    match = _OOM.search(text)
    if match is None:
        return None
    figures = _OOM_FIGURES.search(text)
    need = int(float(figures["need"]) * _UNITS[figures["unit"]]) if figures else None
    return match["what"].strip(), need


def _memory(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    out = {"argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes, "temp": m.temp_size_in_bytes,
           "alias": m.alias_size_in_bytes}
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def _cost(compiled) -> tuple[float, float]:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def _check_divides(config: ModelConfig, program: Program, layout: Layout, mesh) -> None:
    try:
        parallel_api.check_divisible(config, layout, mesh, program.batch, program.step_tokens)
    except ShardingError as e:
        raise PlanError(f"layout: {e}") from None


def compile_program(config: ModelConfig, program: Program, topology: str, layout_name: str, *,
                    layers: int | None = None, config_name: str = "deepseek-v3-671b",
                    costs: bool = True) -> AotResult:
    """Compile `program` for the slice `topology` under `layout_name`; XLA's and the planner's per-device figures.

    A program that does not fit comes back with fits=False and XLA's words in `oom` (`require_fit` raises).
    """
    target = get_target(topology)
    try:
        layout = get_layout(layout_name)
    except ShardingError as e:
        raise PlanError(f"layout: {e}") from None
    mesh = _mesh(layout, target)
    config = program_config(with_layers(config, layers), program)
    _check_divides(config, program, layout, mesh)
    plan_parts = program_memory(config, program.kind, program.batch, program.seq, layout=layout_name,
                                        chips=len(target.devices), weights=program.weights,
                                        prefill_chunk=program.chunk if program.kind == "prefill" else None)
    result = AotResult(
        program=program.kind, config_name=config_name, layers=config.num_hidden_layers, batch=program.batch,
        seq=program.seq, weights="fp32 masters" if program.kind == "train" else program.weights,
        topology=topology, layout=layout_name, mesh=dict(mesh.shape), devices=len(target.devices),
        chips=target.chips, hbm_bytes=target.hbm_bytes, fits=False, xla={}, planner_breakdown=plan_parts,
        planner_total=sum(plan_parts.values()), compile_s=0.0)
    start = time.perf_counter()
    fn, args = _jitted(config, program, layout, mesh)
    # The production program: default matmul precision whatever this process set (the test suite raises it to
    # "highest" for CPU parity; the TPU's grouped-GEMM kernel then fails on bf16 operands).
    with parallel_api.activate(layout, mesh), jax.default_matmul_precision("default"):
        lowered = fn.lower(*args)
        try:
            compiled = lowered.compile()
        except Exception as e:  # XLA raises JaxRuntimeError; anything but running out of HBM is re-raised
            oom = _oom_message(e)
            if oom is None:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise PlanError(f"XLA could not compile {program.kind} for {topology} under layout "
                                f"{layout_name!r}: {first}") from e
            result.compile_s = time.perf_counter() - start
            result.oom, result.oom_need = oom
            return result
        result.compile_s = time.perf_counter() - start
        result.xla = _memory(compiled)
        result.fits = result.xla["total"] <= target.hbm_bytes
        if costs:
            _add_costs(result, compiled, fn, args, config, program, target)
    return result


def _add_costs(result: AotResult, compiled, fn, args, config: ModelConfig, program: Program,
               target: Target) -> None:
    """FLOPs per device per step (XLA's, scaled by the loop trip counts), matmul bytes (traced: XLA's bytes
    accessed counts the whole stacked operand of a layer loop's sliced fusions, so scaling it by trip counts
    overstates the traffic about layers-fold) and the roofline bound max(FLOPs / peak, bytes / HBM bandwidth)."""
    flops, nbytes = _cost(compiled)
    counts = program_counts(fn, *args, devices=len(target.devices))
    result.flops_xla, result.bytes_xla = flops, nbytes
    result.flops_per_device = flops * counts.flops_factor
    result.bytes_per_device = counts.bytes_run
    result.roofline_s = max(result.flops_per_device / target.peak_flops,
                            result.bytes_per_device / target.hbm_bandwidth)
    seq = program.seq
    per_token = planner.flops_per_token(config, seq)
    result.model_flops_per_token = float(per_token["train" if program.kind == "train" else
                                               "decode" if program.kind == "decode" else "forward"])


def require_fit(result: AotResult) -> AotResult:
    """`result`, or a PlanError in words when the program does not fit its devices' HBM."""
    if result.fits:
        return result
    planner_words = f"the planner counts {gib(result.planner_total)}"
    if result.xla:
        short = result.xla["total"] - result.hbm_bytes
        raise PlanError(f"{result.program} does not fit {result.topology} under layout {result.layout!r}: XLA needs "
                        f"{gib(result.xla['total'])} per device, {gib(result.hbm_bytes)} available (short by "
                        f"{gib(short)}); {planner_words}")
    short = f" (short by {gib(result.oom_need - result.hbm_bytes)})" if result.oom_need else ""
    raise PlanError(f"{result.program} does not fit {result.topology} under layout {result.layout!r}: XLA: "
                    f"{result.oom}{short}; {planner_words} per device")
