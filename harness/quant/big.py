"""Bimodal Integration (BIG) of PTQ4SAM (Lv et al., "PTQ4SAM: Post-Training Quantization for Segment
Anything", CVPR 2024), for issue 11's ptq4sam method.

In the mask decoder's token-to-image attention the key projection's outputs are often bimodal: some
channels sit around +m, others around -m. A kernel density estimate of the flattened keys finds the
two peaks; the sign of each channel's mean is then folded into the rows of both the key and the
query projections (weights and biases). Every q_c k_c product keeps its value, so attention is
unchanged in FP, and the keys become one mode that one per-tensor scale fits.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from scipy.stats import gaussian_kde

KDE_SAMPLE = 20000  # values drawn for the density estimate
KDE_GRID = 512
PEAK_FLOOR = 0.05  # a peak counts if its density is at least this share of the highest


def peaks(values: torch.Tensor, seed: int = 0) -> int:
    """Local maxima of a Gaussian KDE of the values (Scott's bandwidth) above PEAK_FLOOR."""
    x = values.detach().float().reshape(-1).cpu().numpy()
    if len(x) > KDE_SAMPLE:
        x = np.random.default_rng(seed).choice(x, KDE_SAMPLE, replace=False)
    if np.ptp(x) == 0:
        return 1
    grid = np.linspace(x.min(), x.max(), KDE_GRID)
    d = gaussian_kde(x)(grid)
    inner = (d[1:-1] > d[:-2]) & (d[1:-1] >= d[2:]) & (d[1:-1] >= PEAK_FLOOR * d.max())
    return int(inner.sum() + (d[0] > d[1] and d[0] >= PEAK_FLOOR * d.max()) + (d[-1] > d[-2]))


def channel_signs(keys: torch.Tensor) -> torch.Tensor:
    """+1 / -1 per channel (last dim): the sign of the channel's mean over all tokens."""
    mean = keys.detach().reshape(-1, keys.shape[-1]).float().mean(0)
    return torch.where(mean < 0, -1.0, 1.0)


@torch.no_grad()
def fold(attn: nn.Module, signs: torch.Tensor) -> None:
    """Multiply the query and key projections' output channels by `signs` (Q K^T unchanged)."""
    for proj in (attn.q_proj, attn.k_proj):
        s = signs.to(proj.weight)
        proj.weight.mul_(s[:, None])
        if proj.bias is not None:
            proj.bias.mul_(s)


def integrate(attn: nn.Module, keys: torch.Tensor) -> bool:
    """Fold the channel signs into `attn` when its calibration keys are bimodal; returns whether it did."""
    if peaks(keys) < 2:
        return False
    fold(attn, channel_signs(keys))
    return True
