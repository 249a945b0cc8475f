"""Accelerator kinds the planner knows: memory, HBM bandwidth, native FP8 support.

Figures are the vendors' spec-sheet values (GB and TB/s are decimal: 1 GB = 10⁹ bytes, 1 TB/s = 10¹² bytes/s):
  - h100-80g: NVIDIA H100 SXM5 datasheet — 80 GB HBM3, 3.35 TB/s, FP8 Tensor Cores.
  - h200-141g: NVIDIA H200 SXM datasheet — 141 GB HBM3e, 4.8 TB/s, FP8 Tensor Cores.
  - h800-80g: NVIDIA H800 SXM5 spec (the export variant of H100 the DeepSeek-V3 report trained on) — 80 GB HBM3,
    3.35 TB/s, FP8 Tensor Cores.
  - a100-80g: NVIDIA A100 80GB SXM datasheet — 80 GB HBM2e, 2,039 GB/s, no FP8 (Ampere).
  - tpu-v5p: Google Cloud TPU v5p system architecture page — 95 GB HBM2e, 2,765 GB/s per chip, no FP8 MXU.
  - tpu-v6e: Google Cloud TPU v6e (Trillium) system architecture page — 32 GB HBM, 1,640 GB/s per chip, no FP8 MXU.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator kind. memory_bytes: HBM capacity (bytes); bandwidth: HBM bandwidth (bytes/s)."""

    name: str
    memory_gb: float  # vendor GB (10⁹ bytes)
    hbm_tb_s: float  # vendor TB/s (10¹² bytes/s)
    native_fp8: bool

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * 1e9)

    @property
    def bandwidth(self) -> float:
        """HBM bandwidth in bytes/s."""
        return self.hbm_tb_s * 1e12


CHIPS: dict[str, Chip] = {chip.name: chip for chip in (
    Chip("h100-80g", 80, 3.35, True),
    Chip("h200-141g", 141, 4.8, True),
    Chip("h800-80g", 80, 3.35, True),
    Chip("a100-80g", 80, 2.039, False),
    Chip("tpu-v5p", 95, 2.765, False),
    Chip("tpu-v6e", 32, 1.64, False),
)}
