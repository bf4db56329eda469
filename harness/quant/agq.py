"""Adaptive Granularity Quantization (AGQ) of PTQ4SAM (Lv et al., "PTQ4SAM: Post-Training Quantization
for Segment Anything", CVPR 2024), for issue 11's ptq4sam method: the log2 quantizer of post-softmax
attention with a per-module granularity tau and scale s, chosen on calibration data.

x_int = round(-tau * log2(x / s)), x_hat = s * 2^(-x_int / tau) for x_int in [0, 2^b - 1], 0 past it.
A larger tau gives finer levels near the top of the range and a shorter reach below it. For each
tau in {1, 2, 4} the scale is searched on a grid and judged by the error that matters downstream,
|| x_hat V - x V ||, not the error of the probabilities themselves; the best (tau, s) is kept.
"""

from __future__ import annotations

import torch
from torch import Tensor

TAUS = (1, 2, 4)


def log2_quantize(x: Tensor, scale: Tensor | float, tau: Tensor | float, bits: int) -> Tensor:
    """The log2 fake-quantized x (no gradient handling: callers add the straight-through estimator)."""
    scale = torch.as_tensor(scale, dtype=x.dtype, device=x.device)  # tau, too, may be a tensor (a module's buffer)
    x_int = torch.round(-tau * torch.log2(x.clamp_min(torch.finfo(x.dtype).tiny) / scale))
    return torch.where(x_int > 2**bits - 1, 0.0, scale * torch.exp2(-x_int.clamp_min(0) / tau))


@torch.no_grad()
def search(
    probs: list[Tensor], values: list[Tensor], bits: int, taus=TAUS, grid: int = 16
) -> tuple[float, float, float]:
    """(tau, scale, error) minimizing sum || x_hat V - x V ||^2 over calibration batches.

    Scale candidates: max(x) * 2^(-k / (2 * grid)) for k in 0..grid-1, from the largest probability
    down half an octave: the top level must reach the probabilities that matter most.
    """
    top = max(float(p.max()) for p in probs)
    best = (float(taus[0]), top, float("inf"))
    for tau in taus:
        for k in range(grid):
            s = top * 2 ** (-k / (2 * grid))
            err = sum(float(((log2_quantize(p, s, tau, bits) - p) @ v).pow(2).sum()) for p, v in zip(probs, values))
            if err < best[2]:
                best = (float(tau), s, err)
    return best
