"""Model time of an evaluation, the same way for every evaluator: frames/s (or images/s)."""

from __future__ import annotations

import contextlib
import time


class Clock:
    """One untimed warm-up item, then the timed ones. The first forward of a fresh process (lazy
    initialisation, kernel selection, allocator growth) would otherwise count against the rate of
    its first run; reading data and scoring stay outside the timed blocks."""

    def __init__(self):
        self.warmup = self.seconds = 0.0
        self.items = 0

    @contextlib.contextmanager
    def warm(self):
        start = time.perf_counter()
        yield
        self.warmup += time.perf_counter() - start

    @contextlib.contextmanager
    def timed(self, items: int):
        start = time.perf_counter()
        yield
        self.seconds += time.perf_counter() - start
        self.items += items

    def summary(self) -> dict[str, float]:
        """fps: the timed items per second of model time; time_warmup_s: the warm-up's seconds."""
        return {"fps": self.items / self.seconds if self.seconds else float("nan"), "time_warmup_s": self.warmup}
