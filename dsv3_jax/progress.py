"""A dependency-free progress line for long jobs (training, conversion): rate, ETA, and a few named figures."""

from __future__ import annotations

import sys
import time


class Progress:
    """Prints `label  done/total  rate  eta  extra` in place on a TTY, or as a line every `every` updates."""

    def __init__(self, total: float, label: str = "", unit: str = "it", every: int = 10, stream=None):
        self.total, self.label, self.unit, self.every = total, label, unit, every
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = time.perf_counter()
        self.done, self.updates = 0.0, 0

    def update(self, amount: float = 1, **figures: object) -> None:
        self.done += amount
        self.updates += 1
        if self.tty or self.updates % self.every == 0 or self.done >= self.total:
            self._print(figures)

    def _print(self, figures: dict) -> None:
        elapsed = time.perf_counter() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        extra = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items())
        line = (f"{self.label} {self.done:,.0f}/{self.total:,.0f} {self.unit}  {_human(rate)} {self.unit}/s  "
                f"eta {eta:5.0f}s  {extra}")
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _human(value: float) -> str:
    for unit in ("", "k", "M", "G"):
        if abs(value) < 1000:
            return f"{value:.1f}{unit}"
        value /= 1000
    return f"{value:.1f}T"
