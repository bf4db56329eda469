"""Progress of long phases: a tqdm bar on a terminal; without one (CI, nohup, a cluster job) a log
line when a phase starts and then at a steady interval, since tqdm(disable=None) prints nothing there
and a bar written to a file is one ever-growing line.

QBENCH_PROGRESS_INTERVAL (seconds, default 30) sets the interval.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time

from tqdm.auto import tqdm

from harness.interrupts import check

log = logging.getLogger("qbench")


class _Bar(tqdm):
    def update(self, n=1):
        check()
        return super().update(n)

    def __iter__(self):
        for item in super().__iter__():
            check()
            yield item


class _Lines:
    def __init__(self, iterable, total, desc: str, unit: str, initial: int = 0):
        self.iterable, self.desc, self.unit, self.n, self.postfix = iterable, desc, unit, initial, ""
        self.total = len(iterable) if total is None and hasattr(iterable, "__len__") else total
        self.interval = float(os.environ.get("QBENCH_PROGRESS_INTERVAL", "30"))
        self.start = time.monotonic()
        self.last = self.start
        log.info("%s: %d/%s %s", desc, initial, self.total or "?", unit)

    def update(self, n: int = 1) -> None:
        check()
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            done = f"{self.desc}: {self.n}/{self.total or '?'} {self.unit} after {now - self.start:.0f} s"
            log.info("%s%s", done, self.postfix)

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = "".join(f", {k}={v}" for k, v in values.items())

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def close(self) -> None:
        pass


_quiet = 0


@contextlib.contextmanager
def quiet():
    """No bars or progress lines inside: a phase that repeats another one (Mix-QSAM runs the
    calibration frames once per layer) reports its own progress instead."""
    global _quiet
    _quiet += 1
    try:
        yield
    finally:
        _quiet -= 1


def progress(
    iterable=None, *, total: int | None = None, desc: str, unit: str, enabled: bool = True, leave=True, initial=0
):
    """A tqdm-like bar (iterate over it, or `update(n)` it inside `with`; `set_postfix`)."""
    enabled = enabled and not _quiet
    if not enabled or sys.stderr.isatty():
        return _Bar(iterable, total=total, desc=desc, unit=unit, leave=leave, disable=not enabled, initial=initial)
    return _Lines(iterable, total, desc, unit, initial)
