"""Activation checkpointing for QAT, exact for quantizers with running statistics.

torch.utils.checkpoint (non-reentrant) drops the tensors a block saves for backward and runs the
block again when backward needs them. That rerun must compute what the first run computed:
- a quantizer that updates a running statistic at each training forward (Q-SAM2's LSC) has moved
  on by the time backward comes (later frames call it again), so the rerun starts from the
  block's buffers as they were at the first run, and the live values are put back after it;
- layers inside checkpointed blocks quantize their weights before the forward
  (harness.quant.swap.weights_once), so both runs read the same quantized weight.
Micro-batches after the first of a step run with `statistics_frozen()`: a running statistic moves
once per step, from the first micro-batch, as it would once for the whole batch.
"""

from __future__ import annotations

import contextlib
import contextvars
import fnmatch
import functools

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

_FROZEN: contextvars.ContextVar[bool] = contextvars.ContextVar("statistics_frozen", default=False)
_INSIDE: contextvars.ContextVar[bool] = contextvars.ContextVar("inside_checkpoint", default=False)

# What `train.checkpoint_blocks` wraps: Hiera's blocks, memory attention's layers, and the two
# modules SAM2Train calls once per frame and object (the memory encoder) or once per click (the
# mask decoder: up to 1 + correction_points passes per corrected frame). At 1024 px each decoder
# pass kept about 0.4 GiB and the memory encoder 0.7 GiB per frame of 3 objects (pact W2A8, hiera_t).
BLOCKS = ["image_encoder.trunk.blocks.*", "memory_attention.layers.*", "sam_mask_decoder", "memory_encoder"]


def statistics_frozen() -> bool:
    return _FROZEN.get()


@contextlib.contextmanager
def _set(var: contextvars.ContextVar, value: bool):
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def frozen_statistics(on: bool = True):
    return _set(_FROZEN, on or _FROZEN.get())


@contextlib.contextmanager
def _rerun(snapshot: list):
    """The block's buffers as at its first run, for the rerun; the live values back afterwards."""
    live = []
    for buf, then in snapshot:
        if not torch.equal(buf, then):
            live.append((buf, buf.clone()))
            buf.copy_(then)
    try:
        with _set(_INSIDE, True):
            yield
    finally:
        for buf, now in live:
            buf.copy_(now)


def run(fn, module: nn.Module, *args, **kwargs):
    """fn(*args, **kwargs), a forward of `module`, under non-reentrant checkpointing."""

    def contexts():
        snapshot = [(b, b.detach().clone()) for b in module.buffers() if b.is_floating_point()]
        return _set(_INSIDE, True), _rerun(snapshot)

    return checkpoint(fn, *args, use_reentrant=False, context_fn=contexts, **kwargs)


def _match(name: str, patterns) -> bool:
    # `*` is one name component: the blocks themselves, not the layers and quantizers inside them
    return any(fnmatch.fnmatchcase(name, p) and name.count(".") == p.count(".") for p in patterns)


@contextlib.contextmanager
def checkpointing(model: nn.Module, blocks: bool = True):
    """Within the block, modules matching BLOCKS (when `blocks`) run checkpointed in forwards with
    autograd on; yields them."""
    wrapped = [m for n, m in model.named_modules() if blocks and _match(n, BLOCKS)]
    for m in wrapped:
        plain = m.forward

        def forward(*args, _plain=plain, m=m, **kwargs):
            if torch.is_grad_enabled() and not _INSIDE.get():
                return run(_plain, m, *args, **kwargs)
            return _plain(*args, **kwargs)

        m.forward = functools.wraps(plain)(forward)
    try:
        yield wrapped
    finally:
        for m in wrapped:
            del m.forward  # back to the class's forward
