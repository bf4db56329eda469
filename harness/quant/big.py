"""Bimodal Integration (BIG) of PTQ4SAM (Lv et al., "PTQ4SAM: Post-Training Quantization for Segment
Anything", CVPR 2024), for the ptq4sam method.

In the mask decoder's token-to-image attention the key projection's outputs are often bimodal: some
channels sit around +m, others around -m. A kernel density estimate of the flattened keys finds the
two peaks; the sign of each channel's mean is then folded into the rows of both the key and the
query projections (weights and biases). Every q_c k_c product keeps its value, so attention is
unchanged in FP, and the keys become one mode that one per-tensor scale fits. The fold pays only
with an asymmetric key quantizer (ptq4sam's, rtn's default): a symmetric one keeps its scale
max|k| whatever the signs.

Detectors (`big_detector`): `official`, as PTQ4SAM's public code: the density on 128 points, peaks
by `scipy.signal.find_peaks(height=0.01 * sum, distance=32)` (no boundary maxima), bimodal at
exactly 2 peaks, keys of the first calibration frame. `wide`, this harness's first reading: 512
points, a peak is an interior or boundary maximum of at least 5% of the highest, bimodal at 2 or
more peaks, keys of all `calib_images` frames.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from scipy.signal import find_peaks
from scipy.stats import gaussian_kde

DETECTORS = ("official", "wide")
KDE_SAMPLE = 20000  # values drawn for the density estimate
WIDE_GRID, WIDE_FLOOR = 512, 0.05  # `wide`: a peak is at least this share of the highest density


def _density(values: torch.Tensor, points: int, seed: int) -> np.ndarray | None:
    """A Gaussian KDE (Scott's bandwidth) of the values on `points` from min to max; None if constant."""
    x = values.detach().float().reshape(-1).cpu().numpy()
    if len(x) > KDE_SAMPLE:
        x = np.random.default_rng(seed).choice(x, KDE_SAMPLE, replace=False)
    if np.ptp(x) == 0:
        return None
    return gaussian_kde(x)(np.linspace(x.min(), x.max(), points))


def peaks(values: torch.Tensor, detector: str = "official", seed: int = 0) -> int:
    """Peaks of the values' density, counted as the detector does (module docstring)."""
    if detector == "official":
        d = _density(values, 128, seed)
        return 1 if d is None else len(find_peaks(d, height=0.01 * d.sum(), distance=32)[0])
    d = _density(values, WIDE_GRID, seed)
    if d is None:
        return 1
    floor = WIDE_FLOOR * d.max()
    inner = (d[1:-1] > d[:-2]) & (d[1:-1] >= d[2:]) & (d[1:-1] >= floor)
    return int(inner.sum() + (d[0] > d[1] and d[0] >= floor) + (d[-1] > d[-2]))


def bimodal(values: torch.Tensor, detector: str = "official") -> bool:
    n = peaks(values, detector)
    return n == 2 if detector == "official" else n >= 2


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


def integrate(attn: nn.Module, keys: torch.Tensor, detector: str = "official") -> bool:
    """Fold the channel signs into `attn` when its calibration keys are bimodal; returns whether it did."""
    if not bimodal(keys, detector):
        return False
    fold(attn, channel_signs(keys))
    return True
