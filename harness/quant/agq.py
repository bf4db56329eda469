"""Adaptive Granularity Quantization (AGQ) of PTQ4SAM (Lv et al., "PTQ4SAM: Post-Training Quantization
for Segment Anything", CVPR 2024), for the ptq4sam method: the log2 quantizer of post-softmax
attention with a per-module granularity tau and scale s, chosen on calibration data.

x_int = round(-tau * log2(x / s)), x_hat = s * 2^(-x_int / tau) for x_int in [0, 2^b - 1], 0 past it.
A larger tau gives finer levels near the top of the range and a shorter reach below it. For each
tau in {1, 2, 4} the scale is searched on a grid and judged by the error that matters downstream,
|| x_hat V - x V ||, not the error of the probabilities themselves; the best (tau, s) is kept.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

TAUS = (1, 2, 4)
LOW = 0.01  # the lowest scale searched, as a share of the calibration maximum


def log2_quantize(x: Tensor, scale: Tensor | float, tau: Tensor | float, bits: int) -> Tensor:
    """The log2 fake-quantized x (no gradient handling: callers add the straight-through estimator)."""
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)  # tau, too, may be a tensor (a module's buffer)
    x_int = torch.round(-tau * torch.log2(x.clamp_min(torch.finfo(x.dtype).tiny) / scale))
    return torch.where(x_int > 2**bits - 1, 0.0, scale * torch.exp2(-x_int.clamp_min(0) / tau))


@torch.no_grad()
def search(
    probs: list[Tensor],
    values: list[Tensor],
    bits: int,
    taus=TAUS,
    grid: int = 48,
    refine: int = 12,
    low: float = LOW,
) -> tuple[float, float, float]:
    """(tau, scale, error) minimizing sum || x_hat V - x V ||^2 over calibration batches.

    The scale is searched over [low * max(x), max(x)] (LOW: the bounds of PTQ4SAM's public search): `grid`
    log-spaced candidates from max(x) down, then `refine` more between the best one's neighbours.
    A flat attention (no probability near its maximum) needs a scale far below the top, which a
    range of half an octave (this function's first form) could not reach.
    """
    top = max(float(p.max()) for p in probs)

    def err(s, tau):
        return sum(float(((log2_quantize(p, s, tau, bits) - p) @ v).pow(2).sum()) for p, v in zip(probs, values))

    best = (float(taus[0]), top, float("inf"))
    for tau in taus:
        logs = [math.log(top) + math.log(low) * k / (grid - 1) for k in range(grid)]
        errs = [err(math.exp(x), tau) for x in logs]
        k = min(range(grid), key=errs.__getitem__)
        lo, hi = logs[min(k + 1, grid - 1)], logs[max(k - 1, 0)]
        for x in [lo + (hi - lo) * (i + 1) / (refine + 1) for i in range(refine)]:
            logs.append(x)
            errs.append(err(math.exp(x), tau))
        k = min(range(len(errs)), key=errs.__getitem__)
        if errs[k] < best[2]:
            best = (float(tau), math.exp(logs[k]) if k else top, errs[k])
    return best
