"""Progress of a long job: a tqdm bar on a terminal, plain log lines (with the rate and an ETA) otherwise.

The trainer, `supmae-eval` and `supmae-embed` all report through `Progress` (a counter the job advances) or
`track` (an iterable wrapped in one), so a job behaves the same whether it runs in a terminal, a log file
or a CI job.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


class Progress:
    """A tqdm bar over the whole run on a terminal; plain log lines (every `interval_s`) otherwise."""

    def __init__(
        self,
        mode: str,
        total: int,
        initial: int = 0,
        enabled: bool = True,
        interval_s: float = 30.0,
        unit: str = "step",
        desc: str | None = None,
    ):
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "log"
        self.mode = mode if enabled else "none"
        self.total, self.step, self.interval = total, initial, interval_s
        self.unit, self.desc = unit, desc
        self.bar = None
        self.last_print = 0.0
        self.t0, self.step0 = time.perf_counter(), initial
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(
                total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True, file=sys.stderr
            )

    def update(self, step: int, info: dict) -> None:
        n, self.step = step - self.step, step
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix_str(_fmt(info), refresh=False)
        elif self.mode == "log":
            now = time.perf_counter()
            if now - self.last_print >= self.interval or step >= self.total:
                self.last_print = now
                rate = (step - self.step0) / max(now - self.t0, 1e-9)
                eta = (self.total - step) / rate if rate > 0 else float("nan")
                what = _fmt(info) or f"{rate:.1f} {self.unit}/s"  # a bare counter (track) shows its rate
                head = f"{self.desc}: " if self.desc else ""
                print(
                    f"{head}{self.unit} {step}/{self.total} | {what} | eta {_hms(eta)}",
                    file=sys.stderr,
                    flush=True,
                )

    def message(self, text: str) -> None:
        if self.mode == "none":
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt(info: dict) -> str:
    parts = []
    for k, v in info.items():
        if isinstance(v, float):
            parts.append(f"{k} {v:.3g}" if k == "lr" else f"{k} {v:.4f}" if abs(v) < 100 else f"{k} {v:.0f}")
        else:
            parts.append(f"{k} {v}")
    return " | ".join(parts)


def _hms(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def track(
    iterable: Iterable[T], *, total: int, desc: str, enabled: bool = True, unit: str = "batch"
) -> Iterator[T]:
    """Yield from `iterable`, advancing a `Progress` (mode "auto") by one per item; closed at the end."""
    progress = Progress("auto", total, enabled=enabled, unit=unit, desc=desc)
    try:
        for i, item in enumerate(iterable, 1):
            yield item
            progress.update(i, {})
    finally:
        progress.close()
