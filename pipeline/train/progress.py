"""Progress lines a person can follow in `ray job logs -f`: at a steady interval, not per step."""

from __future__ import annotations

import time
from typing import Callable

__all__ = ["Progress"]


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """``update`` returns a line at the first step, every ``interval`` seconds and at the last step
    of [start, end): stage, step / total, tokens/s, W, tau, loss and an ETA from the mean step time
    since this (re)start."""

    def __init__(self, label: str, start: int, end: int, total: int, interval: float = 30.0,
                 clock: Callable[[], float] = time.monotonic):
        self.label, self.start, self.end, self.total, self.interval, self.clock = label, start, end, total, interval, clock
        self.began = clock()
        self.last: float | None = None
        self.tokens = 0

    def update(self, step: int, loss: float, window: int, tau: float | None, tokens: int) -> str | None:
        """Call after step ``step`` (global index) trained ``tokens`` tokens."""
        now = self.clock()
        self.tokens += tokens
        done = step + 1 - self.start
        if self.last is not None and now - self.last < self.interval and step + 1 < self.end:
            return None
        self.last = now
        elapsed = max(now - self.began, 1e-9)
        eta = (self.end - step - 1) * elapsed / done
        soft = "hard" if tau is None else f"{tau:.3g}"
        return (f"{self.label}: step {step + 1}/{self.total} ({100 * (step + 1) / self.total:.0f}% of the run; "
                f"this stage {done}/{self.end - self.start}) | {self.tokens / elapsed:,.0f} tokens/s | W={window} "
                f"tau={soft} | loss {loss:.4f} | stage ETA {_duration(eta)}")
