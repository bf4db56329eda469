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
    grid: int | None = None,
    refine: int = 20,
    low: float = LOW,
) -> tuple[float, float, float]:
    """(tau, scale, error) minimizing sum || x_hat V - x V ||^2 over calibration batches.

    The scale is searched over [low * max(x), max(x)] (LOW: the bounds of PTQ4SAM's public search):
    `grid` log-spaced candidates from max(x) down (default 32 per octave, the first form's density:
    the error is far from smooth in the scale, its levels repeat every 2^(1/tau)), then `refine`
    golden-section steps (in log scale) between the best candidate's neighbours; the best scale
    evaluated is kept. A flat attention (no
    probability near its maximum) needs a scale far below the top, which a range of half an octave
    (this function's first form) could not reach.
    """
    top = max(float(p.max()) for p in probs)
    tried: dict[tuple[float, float], float] = {}

    def err(log_s: float, tau) -> float:
        key = (float(tau), log_s)
        if key not in tried:
            s = math.exp(log_s) if log_s else top
            tried[key] = sum(
                float(((log2_quantize(p, s, tau, bits) - p) @ v).pow(2).sum()) for p, v in zip(probs, values)
            )
        return tried[key]

    golden = (math.sqrt(5) - 1) / 2
    grid = grid or math.ceil(32 * math.log2(1 / low)) + 1
    for tau in taus:
        # log(scale / top): 0 is the top itself, exactly
        logs = [math.log(low) * k / (grid - 1) for k in range(grid)]
        k = min(range(grid), key=lambda i: err(logs[i], tau))
        a, b = logs[min(k + 1, grid - 1)], logs[max(k - 1, 0)]
        c, d = b - golden * (b - a), a + golden * (b - a)
        for _ in range(refine):
            if err(c, tau) < err(d, tau):
                b, d = d, c
                c = b - golden * (b - a)
            else:
                a, c = c, d
                d = a + golden * (b - a)
    (tau, log_s), e = min(tried.items(), key=lambda kv: kv[1])
    return tau, (math.exp(log_s) * top if log_s else top), e
