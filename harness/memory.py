"""Peak memory of a piece of work, and where a training forward's memory goes.

CPU: the process's peak resident set (VmHWM), reset before the work through /proc/self/clear_refs
(Linux), so one process can measure several steps one after another. CUDA:
torch.cuda.max_memory_allocated, reset likewise. `saved_for_backward` runs a forward whose tensors
saved for backward are counted, grouped by the module that saved them, and not kept: it tells where
a step's memory would go without needing that memory.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import threading
from collections import defaultdict

import torch
import torch.nn as nn

_STATUS = "/proc/self/status"

try:
    _LIBC = ctypes.CDLL("libc.so.6")
except OSError:
    _LIBC = None


def return_freed() -> None:
    """glibc: hand freed blocks of 128 KiB and more back to the system, so that RSS follows live
    tensors from here on. For measuring only: every large allocation then page-faults afresh
    (fake-quant evaluation at 1024 px ran 1.3x slower with it)."""
    if _LIBC is not None:
        _LIBC.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD, fixed (glibc raises it dynamically otherwise)


def rss_bytes(field: str = "VmRSS") -> int | None:
    try:
        text = open(_STATUS).read()
    except OSError:
        return None
    m = re.search(rf"{field}:\s+(\d+) kB", text)
    return int(m.group(1)) * 1024 if m else None


def available_bytes(device: str = "cpu") -> int | None:
    """Memory work on `device` may use: the CUDA device's total, or the host's available RAM;
    None where this machine cannot tell (no CUDA device here)."""
    if device == "cuda":
        if not torch.cuda.is_available():
            return None
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    try:
        m = re.search(r"MemAvailable:\s+(\d+) kB", open("/proc/meminfo").read())
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


_OPEN: list = []  # the Peaks open now, outermost first: an inner one's reset would hide theirs


class Peak:
    """`with Peak(device) as p: work()`, then p.peak (bytes at the peak) and p.above (bytes above
    what was resident when the block began). None where the platform cannot tell. Nests: a block
    inside another hands its peak out, so the outer one still sees the whole."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.peak = self.above = self.start = None
        self._seen = 0

    def _reading(self) -> int | None:
        return torch.cuda.max_memory_allocated() if self.cuda else rss_bytes("VmHWM")

    def __enter__(self):
        for outer in _OPEN:
            outer._seen = max(outer._seen, (outer._reading() or 0) if outer.cuda == self.cuda else 0)
        _OPEN.append(self)
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            if _LIBC is not None:
                _LIBC.malloc_trim(0)
            with contextlib.suppress(OSError):
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
            self.start = rss_bytes()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        _OPEN.remove(self)
        self.peak = self._reading()
        if self.peak is not None:
            self.peak = max(self.peak, self._seen)
        if self.peak is not None and self.start is not None:
            self.above = self.peak - self.start
        return False


@contextlib.contextmanager
def rss_guard(limit_bytes: int | None, what: str):
    """Stop the process with a one-line message when its RSS passes `limit_bytes` (CPU), rather than
    letting the kernel's OOM killer take it, and this machine's other work, without a word."""
    if not limit_bytes or torch.cuda.is_available() or rss_bytes() is None:
        yield
        return
    done = threading.Event()

    def watch():
        while not done.wait(0.05):
            rss = rss_bytes() or 0
            if rss > limit_bytes:
                gib = f"{rss / 2**30:.1f} GiB passed the limit of {limit_bytes / 2**30:.1f} GiB"
                print(f"{what}: resident memory {gib}", flush=True)
                os._exit(3)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _part(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "image_encoder" and len(parts) > 1:
        return ".".join(parts[:2])
    return parts[0] or "(model)"


@contextlib.contextmanager
def saved_for_backward(model: nn.Module, keep: bool = False):
    """Count the bytes autograd saves for backward inside the block, by (part of the model, class of
    the innermost module). With keep=False the saved tensors are dropped (backward then fails), so
    that a forward too large to train can still be measured. Yields a dict filled on exit."""
    names = {m: n for n, m in model.named_modules()}
    stack: list[nn.Module] = []
    seen: set[int] = set()
    table: dict[tuple[str, str], int] = defaultdict(int)

    def pre(module, args):
        if module in names:
            stack.append(module)

    def post(module, args, out):
        if module in names and stack and stack[-1] is module:
            stack.pop()

    def pack(t):
        if t.layout == torch.strided and t.device.type != "meta":
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in seen:
                seen.add(key)
                where = stack[-1] if stack else model
                table[(_part(names.get(where, "")), type(where).__name__)] += storage.nbytes()
        return t if keep else None

    def unpack(t):
        if t is None:
            raise RuntimeError("saved_for_backward(keep=False) dropped the saved tensors; no backward")
        return t

    h1 = nn.modules.module.register_module_forward_pre_hook(pre)
    h2 = nn.modules.module.register_module_forward_hook(post)
    result: dict = {}
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield result
    finally:
        h1.remove()
        h2.remove()
        result.update(sorted(table.items(), key=lambda kv: -kv[1]))
