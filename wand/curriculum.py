"""The WAND curriculum: window W(t), soft-mask penalty tau(t) and learning rate lr(t) over training.

Paper (WAND.md section 2): W shrinks from W_start = 128 to the target (32 at 25 Hz, 64 at 50 Hz)
on a cosine over one epoch, W(t) = W_start - a(t) (W_start - W_target) with a(t) = (1 - cos(pi t/T))/2;
the penalty on out-of-window keys, ``scores - tau(t) * M``, grows on a log scale from leaky to
about a hard mask; AdamW, peak lr 1e-5, 3% linear warmup then cosine decay.

The tau endpoints are not published: ours are tau 0.5 (out-of-window keys keep most of their weight
and their gradients) to 1e4 (exp(-1e4) = 0: the hard mask). With ``tau_end=None`` the soft mask is
off and every step uses the hard mask of W(t).

``hold_fraction`` (ours, default 0: the paper's schedule) ends the window and tau schedule that
fraction of the steps early and holds the target W at tau_end (the hard mask) for the rest (the lr
keeps its cosine over all steps). Why: on the cosine the target is reached only in the last steps,
when the lr is near 0, so a short fine-tune barely trains at the window it is served with (issue 26:
300-step IndexTTS students stopped on 91% of rows with the paper's schedule, 99% trained at the
target from step 0).

``Curriculum.stages(n)`` cuts the global schedule into n contiguous step ranges; every value
depends only on the global step, so running the stages one after another (with resumes at stage
boundaries) follows exactly the unsplit schedule.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = ["Curriculum", "Stage", "StepValues"]


@dataclass(frozen=True)
class StepValues:
    step: int
    window: int
    tau: float | None  # None: hard mask
    lr: float


@dataclass(frozen=True)
class Stage:
    index: int  # 1-based
    start: int  # first global step (inclusive)
    end: int  # last global step (exclusive)

    @property
    def steps(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class Curriculum:
    total_steps: int
    window_start: int = 128
    window_target: int = 32
    tau_start: float = 0.5
    tau_end: float | None = 1e4
    lr: float = 1e-5
    warmup_fraction: float = 0.03
    min_lr_ratio: float = 0.0
    hold_fraction: float = 0.0  # the last steps at the target W and tau_end (0: the paper's schedule)

    def __post_init__(self):
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if self.window_target < 1:
            raise ValueError(f"window_target must be >= 1, got {self.window_target}")
        if self.window_target > self.window_start:
            raise ValueError(f"window_target ({self.window_target}) must be <= window_start ({self.window_start})")
        if self.tau_end is not None and not 0 < self.tau_start <= self.tau_end:
            raise ValueError(f"need 0 < tau_start <= tau_end, got {self.tau_start}, {self.tau_end}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.hold_fraction < 1:
            raise ValueError(f"hold_fraction must be in [0, 1), got {self.hold_fraction}")

    def progress(self, step: int) -> float:
        """a(t) in [0, 1]: 0 at the first step, 1 at the last step of the schedule (the last step of
        training less the hold) and after it, cosine in between."""
        span = self.total_steps - int(round(self.hold_fraction * self.total_steps))
        if span <= 1:
            return 1.0
        fraction = min(max(step, 0), span - 1) / (span - 1)
        return 0.5 * (1.0 - math.cos(math.pi * fraction))

    def window(self, step: int) -> int:
        a = self.progress(step)
        return int(round(self.window_start - a * (self.window_start - self.window_target)))

    def tau(self, step: int) -> float | None:
        if self.tau_end is None:
            return None
        a = self.progress(step)
        return math.exp(math.log(self.tau_start) + a * (math.log(self.tau_end) - math.log(self.tau_start)))

    def learning_rate(self, step: int) -> float:
        warmup = max(1, int(round(self.warmup_fraction * self.total_steps))) if self.warmup_fraction > 0 else 0
        if step < warmup:
            return self.lr * (step + 1) / warmup
        span = max(1, self.total_steps - warmup)
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine)

    def at(self, step: int) -> StepValues:
        return StepValues(step, self.window(step), self.tau(step), self.learning_rate(step))

    def stages(self, count: int) -> list[Stage]:
        """Split [0, total_steps) into ``count`` contiguous stages of near-equal length."""
        if count < 1:
            raise ValueError(f"stages must be >= 1, got {count}")
        if count > self.total_steps:
            raise ValueError(f"stages ({count}) cannot exceed total_steps ({self.total_steps})")
        bounds = [round(i * self.total_steps / count) for i in range(count + 1)]
        return [Stage(i + 1, bounds[i], bounds[i + 1]) for i in range(count)]

    def schedule(self, stage: Stage | None = None) -> list[StepValues]:
        steps = range(self.total_steps) if stage is None else range(stage.start, stage.end)
        return [self.at(s) for s in steps]

    def to_dict(self) -> dict:
        return asdict(self)
