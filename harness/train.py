"""Training loop (QAT / fine-tuning / pretraining). Being written: see issue 7."""

from __future__ import annotations


def train(ctx, method) -> dict:
    """Train `ctx.student` with `method`'s param_groups(), loss_terms() and on_step(); returns metrics."""
    raise NotImplementedError
