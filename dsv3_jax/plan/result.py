"""`Plan`: every figure the planner derives for one config, layout and chip, as a dataclass with a text table."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class Plan:
    """Every figure the planner derives. Bytes unless the name says otherwise; *_per_device: one chip."""

    config_name: str
    mode: str
    weights: str
    batch: int
    seq: int
    chip: str
    chips: int  # chips the per-device figures are for
    layout: str
    mesh: dict[str, int]
    params_total: int
    params_active: int
    params_mtp: int
    weight_elements: int  # main + MTP as held in memory (no duplicated embedding/head)
    scale_elements: int  # FP8 block scales (0 unless weights == "fp8")
    checkpoint_weight_elements: int  # HF checkpoint (MTP carries its own embedding/head copies)
    checkpoint_scale_elements: int
    weight_bytes: int  # all weights (main + MTP), values + scales
    weight_bytes_by_dtype: dict[str, int]
    kv_bytes_per_token: int  # latent MLA cache, all layers
    kv_naive_bytes_per_token: int  # per-head K/V cache, for comparison
    kv_cache_bytes: int  # batch × seq, whole deployment
    flops_per_token_forward: int
    flops_per_token_train: int
    flops_per_token_decode: int
    moment_dtype: str
    remat: str
    moe_impl: str
    breakdown_per_device: dict[str, int]  # what the fit test adds up
    activation_bytes_none: int | None  # training only, per device
    activation_bytes_full: int | None
    total_per_device: int
    chip_memory_bytes: int
    headroom: float
    fits: bool
    min_chips: int | None
    native_fp8: bool
    decode_tokens_per_s_bound: float | None
    notes: list[str]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return dataclasses.asdict(self)

    def _storage(self) -> str:
        return f"weights {self.weights}" if self.mode == "infer" else "fp32 master weights"

    def table(self) -> str:
        """A two-column text table for the terminal (GB = 10⁹ bytes)."""
        rows: list[tuple[str, str]] = [
            ("config", f"{self.config_name} ({self.mode}, {self._storage()}, batch {self.batch} × seq {self.seq})"),
            ("chip", f"{self.chip} ({gb(self.chip_memory_bytes)}, native fp8 {'yes' if self.native_fp8 else 'no'})"),
            ("placement", f"{self.chips} chips, layout {self.layout}, mesh {self.mesh}"),
            ("parameters total / active / MTP",
             f"{self.params_total:,} / {self.params_active:,} / {self.params_mtp:,}"),
            ("weight / scale elements", f"{self.weight_elements:,} / {self.scale_elements:,}"),
            ("checkpoint weight / scale elements",
             f"{self.checkpoint_weight_elements:,} / {self.checkpoint_scale_elements:,}"),
            ("weight bytes (all chips)", gb(self.weight_bytes) + "  " + ", ".join(
                f"{k} {gb(v)}" for k, v in self.weight_bytes_by_dtype.items() if v)),
            ("KV cache / token (latent; naive)",
             f"{self.kv_bytes_per_token:,} B; {self.kv_naive_bytes_per_token:,} B"),
            ("FLOPs / token fwd / train / decode", f"{self.flops_per_token_forward:.3e} / "
             f"{self.flops_per_token_train:.3e} / {self.flops_per_token_decode:.3e}"),
        ]
        if self.mode == "infer":
            rows.append(("KV cache batch × seq (all chips)", gb(self.kv_cache_bytes)))
        rows += [(f"  per device: {k}", gb(v)) for k, v in self.breakdown_per_device.items()]
        if self.activation_bytes_none is not None:
            rows.append(("  activations remat none / full", f"{gb(self.activation_bytes_none)} / "
                         f"{gb(self.activation_bytes_full or 0)}"))
        rows += [
            ("per device total", f"{gb(self.total_per_device)} of {gb(self.chip_memory_bytes)} "
             f"(headroom {self.headroom:.0%}): {'fits' if self.fits else 'does NOT fit'}"),
            ("minimum chips", "none up to the search limit" if self.min_chips is None else f"{self.min_chips}"),
        ]
        if self.decode_tokens_per_s_bound is not None:
            rows.append(("decode tokens/s bound (HBM)", f"{self.decode_tokens_per_s_bound:,.0f}"))
        width = max(len(k) for k, _ in rows)
        lines = [f"{k:<{width}}  {v}" for k, v in rows]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:,.2f} GB"
