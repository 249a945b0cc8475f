"""The real TPU compiler on this CPU host (libtpu, DESIGN.md §8): programs compiled for an abstract v5p slice, the
planner's per-device memory against XLA's, implementation choices that follow the compile target, and bad input
in words. libtpu is a test extra: this module fails (does not skip) when it is missing.

CI compiles a 2-layer model at the 671B widths (1 dense + 1 MoE layer, MTP) for v5p:2x2x1 (decode, and prefill under
`infer-ep`; the sequence-sharded 8K prefill is `slow`); the full 61-layer programs are `slow` (and `python
experiments/aot_compile.py` regenerates the README table).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import libtpu  # noqa: F401  (a test extra: fail loudly, never skip, when the TPU compiler is missing)
import numpy as np
import pytest
from jax.sharding import Mesh

from dsv3_jax import ModelConfig
from dsv3_jax.cli import plan as plan_cli
from dsv3_jax.errors import PlanError
from dsv3_jax.model.moe.dispatch import resolve_impl
from dsv3_jax.plan import aot
from dsv3_jax.plan.costs import program_counts
from dsv3_jax.plan.targets import get_target

V3 = ModelConfig.from_preset("deepseek-v3-671b")
TOLERANCE = 0.15  # planner per-device total within ±15% of XLA's


def _agree(result: aot.AotResult) -> None:
    print(f"\n{result.table()}")
    assert result.fits and result.xla["total"] > 0
    assert abs(result.ratio - 1.0) < TOLERANCE, f"planner / XLA = {result.ratio:.3f}"


# ---------------------------------------------------------------- implementation follows the compile target


def test_moe_auto_picks_ragged_when_compiling_for_tpu():
    """The host is a CPU, but a program traced under a mesh of TPU devices gets the TPU dispatch."""
    assert jax.default_backend() == "cpu"
    assert resolve_impl("auto") == "blocks"
    tpu = Mesh(np.asarray(get_target("v5p:2x2x1").devices), ("expert",))
    with jax.set_mesh(tpu):
        assert resolve_impl("auto") == "ragged"
        seen = []
        jax.jit(lambda x: (seen.append(resolve_impl("auto")), x)[1]).trace(jax.ShapeDtypeStruct((4,), np.float32))
        assert seen == ["ragged"]
    with jax.set_mesh(Mesh(np.asarray(jax.devices()[:1]), ("expert",))):
        assert resolve_impl("auto") == "blocks"
    assert resolve_impl("dense") == "dense"


def test_target_figures():
    v5p, tpu7x = get_target("v5p:4x4x4"), get_target("tpu7x:2x2x1")
    assert (len(v5p.devices), v5p.chips, v5p.devices_per_chip) == (64, 64, 1)
    assert (len(tpu7x.devices), tpu7x.chips, tpu7x.devices_per_chip) == (8, 4, 2)  # two TensorCores per chip
    assert v5p.hbm_bytes == int(95.74 * 2**30) and v5p.peak_flops == 459e12


# ---------------------------------------------------------------- planner vs XLA (671B widths, 2 layers)


@pytest.mark.parametrize(("program", "batch", "seq", "layout"), [
    ("decode", 8, 4096, "infer-ep"), ("prefill", 4, 512, "infer-ep"),
    # one long prompt, its chunks' tokens over the devices: the suite's longest test (~150 s on 2 cores), so `slow`;
    # the 61-layer 128K prompt below covers the same layout
    pytest.param("prefill", 1, 8192, "infer-ep-seq", marks=pytest.mark.slow),
])
def test_planner_agrees_with_xla_at_671b_widths(program, batch, seq, layout):
    result = aot.compile_program(V3, aot.Program(program, batch, seq, "bf16", 2048), "v5p:2x2x1", layout, layers=2,
                                 costs=False)
    _agree(result)


@pytest.mark.slow
@pytest.mark.parametrize(("program", "weights", "batch", "seq", "topology", "layout", "chunk"), [
    ("prefill", "bf16", 16, 4096, "v5p:4x4x4", "infer-ep-tp4", 4096),
    ("decode", "fp8", 32, 32768, "tpu7x:2x2x2", "infer-ep", 4096),
    ("prefill", "fp8", 1, 131072, "tpu7x:2x2x2", "infer-ep-seq", 4096),  # 128K prompt
    ("decode", "fp8", 16, 131072, "tpu7x:2x2x2", "infer-ep", 4096),  # a 131,072-slot cache per sequence
    ("train", "bf16", 256, 4096, "v5p:4x8x8", "train-fsdp-ep64", 4096),
])
def test_full_671b_programs_fit_where_the_planner_says(program, weights, batch, seq, topology, layout, chunk):
    config = V3.replace(fp8_impl="weight_only") if weights == "fp8" else V3
    result = aot.compile_program(config, aot.Program(program, batch, seq, weights, chunk), topology, layout)
    _agree(result)
    assert result.flops_per_token > result.model_flops_per_token * 0.5 and result.roofline_s > 0


# ---------------------------------------------------------------- loop-aware cost counts (plan.costs)


def test_cost_counts_scale_loops_and_skip_only_constant_branches():
    x = jnp.ones((64, 64), jnp.float32)
    one = 2 * 64**3
    scanned = program_counts(lambda x: jax.lax.scan(lambda c, _: (c @ x, None), x, None, length=4)[0], x)
    assert (scanned.flops_once, scanned.flops_run) == (one, 4 * one)
    # the skipped expert-parallel overflow round: its other branch only builds zeros → not run
    zeros = program_counts(lambda x: jax.lax.cond(x.sum() > 0, lambda c: c @ c, jnp.zeros_like, x), x)
    assert (zeros.flops_once, zeros.flops_run) == (one, 0)
    # blockwise attention skipping a masked key block passes its carry through → counted as computed
    carry = program_counts(lambda x: jax.lax.cond(x.sum() > 0, lambda c: c @ c, lambda c: c, x), x)
    assert (carry.flops_once, carry.flops_run) == (one, one)
    # a shard_map body is per device already; outside it, global shapes are divided by the devices
    assert program_counts(lambda x: x @ x, x, devices=4).flops_run == one / 4


# ---------------------------------------------------------------- bad input, in words


def test_unknown_topology_names_it():
    with pytest.raises(PlanError, match=r"topology: 'v9:2x2'.*Invalid TPU"):
        get_target("v9:2x2")
    with pytest.raises(PlanError, match=r"topology: 'v5p'.*like v4:2x2x1"):
        get_target("v5p")


def test_layout_that_does_not_divide_the_slice():
    with pytest.raises(PlanError, match=r"layout: .*'cpu-8'.*topology v5p:2x2x1 has 4 devices"):
        aot.compile_program(V3, aot.Program("decode", 8, 512), "v5p:2x2x1", "cpu-8", layers=2)
    with pytest.raises(PlanError, match=r"layout: .*batch=3"):
        aot.compile_program(V3, aot.Program("decode", 3, 512), "v5p:2x2x1", "infer-ep", layers=2)
    with pytest.raises(PlanError, match=r"layout: .*sequence \(tokens per step\)=6 .*size 4"):
        aot.compile_program(V3, aot.Program("prefill", 1, 6, prefill_chunk=6), "v5p:2x2x1", "infer-ep-seq", layers=2)
    with pytest.raises(PlanError, match="program"):
        aot.Program("serve", 1, 1)
    with pytest.raises(PlanError, match="prefill_chunk"):
        _ = aot.Program("prefill", 1, 1000, prefill_chunk=300).chunk


def test_program_that_does_not_fit_gives_the_figure_and_shortfall(capsys):
    """A 1-layer model at the 671B widths with a 4M-slot cache on v5e (15.75 GiB per device)."""
    program = aot.Program("decode", 4, 1 << 22, "bf16")
    result = aot.compile_program(V3, program, "v5e:2x2", "infer-ep", layers=1, costs=False)
    assert not result.fits and result.oom and result.oom_need > result.hbm_bytes
    with pytest.raises(PlanError, match=r"decode does not fit v5e:2x2 .*available HBM.*short by [\d.]+ GiB"):
        aot.require_fit(result)
    code = plan_cli.main(["deepseek-v3-671b", "--compile", "v5e:2x2", "--mesh", "infer-ep", "--program", "decode",
                          "--batch", "4", "--seq", str(1 << 22), "--weights", "bf16", "--layers", "1"])
    captured = capsys.readouterr()
    assert code == 2 and "short by" in captured.err and "Traceback" not in captured.err
    assert "XLA" in captured.out  # the figures are printed before the error


def test_cli_reports_unknown_topology_without_a_traceback(capsys):
    assert plan_cli.main(["deepseek-v3-671b", "--compile", "v9:2x2", "--mesh", "infer-ep"]) == 2
    err = capsys.readouterr().err
    assert "topology" in err and "Traceback" not in err
    assert plan_cli.main(["deepseek-v3-671b", "--compile", "v5p:2x2x1"]) == 2
    assert "--mesh" in capsys.readouterr().err
