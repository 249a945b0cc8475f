"""Named TPU slices for ahead-of-time compilation on a host without a TPU (DESIGN.md §8).

`libtpu` hands out the abstract devices of a real slice (`jax.experimental.topologies.get_topology_desc`), which
is all `jax.jit(...).lower(...).compile()` needs to run the real TPU compiler. A device is what XLA compiles for:
one chip on v5e / v5p / v6e, one TensorCore on v4 and tpu7x as libtpu 0.0.42 lays those slices out (two per chip).

Per-chip figures are the vendors' spec-sheet values (Google Cloud TPU system-architecture pages): peak dense bf16
FLOP/s and HBM bandwidth; a device gets its chip's share. HBM per device is what the TPU compiler reports as
available ("exceeds available HBM (95.74G)", GiB), measured with libtpu 0.0.42 — a little less than the spec.
"""

from __future__ import annotations

import dataclasses
import functools
import os

from dsv3_jax.errors import PlanError

GIB = 1 << 30
EXAMPLE_TOPOLOGIES = ("v4:2x2x1", "v5e:4x4", "v5p:2x2x1", "v5p:4x4x4", "v5p:4x4x8", "v6e:4x4", "tpu7x:2x2x1",
                      "tpu7x:2x2x2")


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """One TPU generation. Per chip: bf16 FLOP/s and HBM bytes/s; per device: the HBM the compiler may use."""

    name: str
    chip_bf16_flops: float
    chip_hbm_bandwidth: float
    device_hbm_gib: float


ACCELERATORS = {  # keyed by jax Device.device_kind
    "TPU v4": Accelerator("v4", 275e12, 1.2288e12, 15.25),
    "TPU v5 lite": Accelerator("v5e", 197e12, 0.819e12, 15.75),
    "TPU v5": Accelerator("v5p", 459e12, 2.765e12, 95.74),
    "TPU v6 lite": Accelerator("v6e", 918e12, 1.64e12, 31.25),
    "TPU7x": Accelerator("tpu7x", 2307e12, 7.37e12, 94.75),
}


@dataclasses.dataclass(frozen=True)
class Target:
    """The abstract devices of a named slice and what each can do."""

    topology: str
    devices: tuple
    accelerator: Accelerator

    @property
    def chips(self) -> int:
        return len({tuple(d.coords) for d in self.devices})

    @property
    def devices_per_chip(self) -> int:
        return len(self.devices) // self.chips

    @property
    def hbm_bytes(self) -> int:
        """HBM one device may use (bytes)."""
        return int(self.accelerator.device_hbm_gib * GIB)

    @property
    def peak_flops(self) -> float:
        """Peak bf16 FLOP/s of one device."""
        return self.accelerator.chip_bf16_flops / self.devices_per_chip

    @property
    def hbm_bandwidth(self) -> float:
        """HBM bytes/s of one device."""
        return self.accelerator.chip_hbm_bandwidth / self.devices_per_chip

    def describe(self) -> str:
        per = f", {self.devices_per_chip} per chip" if self.devices_per_chip > 1 else ""
        return (f"{self.topology}: {len(self.devices)} devices on {self.chips} {self.accelerator.name} chips{per}, "
                f"{self.accelerator.device_hbm_gib:.2f} GiB HBM per device")


# With no TPU attached libtpu warns at start-up that it cannot find this host's TPU type and workers (harmless);
# on a CPU-only host these placeholders quiet it. They describe no slice: topologies are named per call.
_CPU_HOST_ENV = {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1", "TPU_SKIP_MDS_QUERY": "1", "TPU_WORKER_HOSTNAMES": "localhost",
                 "TPU_ACCELERATOR_TYPE": "v5p-8"}


def _topologies():
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        for key, value in _CPU_HOST_ENV.items():
            os.environ.setdefault(key, value)
    else:
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile only: other processes may hold libtpu
    try:
        import libtpu  # noqa: F401  (the TPU compiler; the topology API needs it)
        from jax.experimental import topologies
    except ImportError:
        raise PlanError("compiling for a TPU topology needs libtpu: pip install 'dsv3-jax[tpu]' "
                        "(libtpu==0.0.42.* for jax 0.10.2)") from None
    return topologies


@functools.lru_cache(maxsize=16)
def get_target(topology: str) -> Target:
    """The slice named `topology` ("v5p:4x4x4", "tpu7x:2x2x1", ...); PlanError naming it when libtpu rejects it."""
    if not isinstance(topology, str) or ":" not in topology:
        raise PlanError(f"topology: {topology!r} is not a TPU topology name like {', '.join(EXAMPLE_TOPOLOGIES)}")
    topologies = _topologies()
    try:
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:  # libtpu raises JaxRuntimeError(INVALID_ARGUMENT ...)
        reason = str(e).splitlines()[0].removeprefix("INVALID_ARGUMENT: ")
        raise PlanError(f"topology: {topology!r} is not a TPU slice libtpu knows ({reason}); examples: "
                        f"{', '.join(EXAMPLE_TOPOLOGIES)}") from None
    devices = tuple(desc.devices)
    kind = devices[0].device_kind
    if kind not in ACCELERATORS:
        raise PlanError(f"topology: {topology!r} has devices of kind {kind!r}, which the planner has no figures for "
                        f"(known: {', '.join(ACCELERATORS)})")
    return Target(topology, devices, ACCELERATORS[kind])
