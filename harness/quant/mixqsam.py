"""Mix-QSAM's layer importance, cross-layer synergy and layer costs (Ranjan and Savakis, "Mix-QSAM:
Mixed-Precision Quantization of the Segment Anything Model", CVPR Workshops 2025), on the
calibration frames; harness.quant.allocate turns them into a bit map.

- Importance Omega_i: the layer's output is zeroed and the calibration frames run again; the mask
  decoder's low-resolution mask logits of each call become a distribution over pixels
  (sigmoid, normalized), and Omega_i is the mean over calls of KL(P(Y | all) || P(Y | layer i
  removed)). Our normalization: Omega / mean(Omega), so that sum_i Omega_i b_i is on the scale of
  the number of layers times the bits and the synergy penalty (lambda = 0.1) neither vanishes nor
  dominates.
- Synergy of adjacent layers: the paper's S_lm = 1 / (|I(L_l; Y) - I(L_m; Y)| + eps), averaged, and
  S_hat = log(1 + S). We read I(L; Y), the information the output loses without layer L, as Omega.
- Costs: parameters, and MACs per frame (output positions x weights per position, measured on the
  calibration frames).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from harness.progress import progress, quiet


def _decoder_logits(model: nn.Module, feed, frames: int) -> list[Tensor]:
    out: list[Tensor] = []
    hook = model.sam_mask_decoder.register_forward_hook(lambda m, i, o: out.append(o[0].detach().float()))
    try:
        with torch.no_grad(), quiet():
            feed(model, frames)
    finally:
        hook.remove()
    return out


def _distribution(logits: Tensor) -> Tensor:
    p = torch.sigmoid(logits).flatten(1)
    return p / p.sum(1, keepdim=True).clamp_min(1e-12)


def kl(reference: list[Tensor], other: list[Tensor]) -> float:
    """Mean over decoder calls (and masks) of KL(P_reference || P_other)."""
    if len(reference) != len(other):
        raise RuntimeError(f"the run with a layer removed made {len(other)} decoder calls, not {len(reference)}")
    values = []
    for a, b in zip(reference, other):
        p, q = _distribution(a), _distribution(b)
        values.append((p * (p.clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum(1).mean())
    return float(torch.stack(values).mean())


def importance(model: nn.Module, names: list[str], feed, frames: int) -> list[float]:
    """Omega per layer (mean 1): the KL of the mask output when the layer's output is zeroed."""
    modules = dict(model.named_modules())
    reference = _decoder_logits(model, feed, frames)
    raw = []
    for name in progress(names, desc="mixqsam importance", unit="layer"):
        hook = modules[name].register_forward_hook(lambda m, i, o: torch.zeros_like(o))
        try:
            raw.append(kl(reference, _decoder_logits(model, feed, frames)))
        finally:
            hook.remove()
    mean = sum(raw) / len(raw) if raw else 1.0
    return [r / mean if mean > 0 else 1.0 for r in raw]


def synergy(omega: list[float], eps: float = 1e-2) -> list[float]:
    """S_hat of each adjacent pair (i, i + 1): log(1 + 1 / (|Omega_i - Omega_{i+1}| + eps))."""
    return [float(torch.log1p(torch.tensor(1.0 / (abs(a - b) + eps)))) for a, b in zip(omega, omega[1:])]


def macs(model: nn.Module, names: list[str], feed, frames: int) -> list[float]:
    """Multiply-accumulates per calibration frame of each layer (weights x positions)."""
    modules = dict(model.named_modules())
    total = {n: 0.0 for n in names}

    def count(name):
        def hook(m, i, o):
            weight = m.weight.numel()
            if isinstance(m, nn.Linear):
                positions = o.numel() / m.out_features
            elif isinstance(m, nn.ConvTranspose2d):
                positions = i[0].numel() / m.in_channels
            else:
                positions = o.numel() / m.out_channels
            total[name] += weight * positions

        return hook

    hooks = [modules[n].register_forward_hook(count(n)) for n in names]
    try:
        with torch.no_grad():
            done = feed(model, frames)
    finally:
        for h in hooks:
            h.remove()
    return [total[n] / max(int(done or frames), 1) for n in names]
