"""Ctrl-C in a qbench command. The first one raises KeyboardInterrupt: the run in flight is recorded
as KILLED on the way out and the command exits 130. A second one, while that is written, stops the
process at once (the next invocation closes the record).

Python drops a KeyboardInterrupt raised inside a weakref callback or a __del__ (printing "Exception
ignored in ..."); SQLAlchemy's, on MLflow's writes, caught about one Ctrl-C in three at the start of
a phase, and the work went on. So the interrupt stays pending, such a dropped one is not printed,
and the progress loops (`check`, on every tick) raise it again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

_pending = False


@contextlib.contextmanager
def handled():
    """SIGINT handled as above inside (main thread only; elsewhere Python's default stays)."""
    global _pending
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before, hook = signal.signal(signal.SIGINT, _first), sys.unraisablehook
    sys.unraisablehook = lambda u: None if isinstance(u.exc_value, KeyboardInterrupt) else hook(u)
    try:
        yield
    finally:
        _pending = False
        sys.unraisablehook = hook
        if before is not None:
            signal.signal(signal.SIGINT, before)


def check() -> None:
    """Raise a Ctrl-C that Python dropped on its way."""
    if _pending:
        raise KeyboardInterrupt


def _first(signum, frame):
    global _pending
    _pending = True
    signal.signal(signal.SIGINT, _again)
    raise KeyboardInterrupt


def _again(signum, frame):
    print("interrupted again: stopped at once", file=sys.stderr, flush=True)
    os._exit(130)
