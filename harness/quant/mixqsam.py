"""Mix-QSAM's layer importance, cross-layer synergy and layer costs (Ranjan and Savakis, "Mix-QSAM:
Mixed-Precision Quantization of the Segment Anything Model", CVPR Workshops 2025), on the
calibration frames; harness.quant.allocate turns them into a bit map.

- Importance Omega_i: the layer's output is zeroed and the calibration frames run again; the mask
  decoder's low-resolution mask logits of each call (one call per frame and object: an "image")
  become a distribution over pixels (sigmoid, normalized), giving KL(P(Y | all) || P(Y | layer i
  removed)) per layer and image. `normalize: per_image` (the paper's recipe): each image's KLs are
  normalized over the layers, then averaged over the images; `pooled` (this harness's first
  reading): averaged over the images, then normalized. Normalizing divides by the mean over
  layers, so that sum_i Omega_i b_i is on the scale of the number of layers times the bits and the
  synergy penalty (lambda = 0.1) neither vanishes nor dominates.
- Synergy of adjacent layers: the paper's S_lm = 1 / (|I(L_l; Y) - I(L_m; Y)| + eps), averaged over
  images (`per_image`; `pooled`: from the averaged Omega), and S_hat = log(1 + S). We read I(L; Y),
  the information the output loses without layer L, as the normalized importance.
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


NORMALIZATIONS = ("per_image", "pooled")


def kl_per_call(reference: list[Tensor], other: list[Tensor]) -> Tensor:
    """KL(P_reference || P_other) of each decoder call (mean over its masks)."""
    if len(reference) != len(other):
        raise RuntimeError(f"the run with a layer removed made {len(other)} decoder calls, not {len(reference)}")
    values = []
    for a, b in zip(reference, other):
        p, q = _distribution(a), _distribution(b)
        values.append((p * (p.clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum(1).mean())
    return torch.stack(values)


def kl(reference: list[Tensor], other: list[Tensor]) -> float:
    """Mean over decoder calls (and masks) of KL(P_reference || P_other)."""
    return float(kl_per_call(reference, other).mean())


def removal_kl(model: nn.Module, names: list[str], feed, frames: int) -> Tensor:
    """(layers x images) KL of the mask output when each layer's output is zeroed."""
    modules = dict(model.named_modules())
    reference = _decoder_logits(model, feed, frames)
    rows = []
    for name in progress(names, desc="mixqsam importance", unit="layer"):
        hook = modules[name].register_forward_hook(lambda m, i, o: torch.zeros_like(o))
        try:
            rows.append(kl_per_call(reference, _decoder_logits(model, feed, frames)))
        finally:
            hook.remove()
    return torch.stack(rows) if rows else torch.zeros(0, 1)


def _over_layers(x: Tensor) -> Tensor:
    """x divided by its mean over layers (dim 0); where that mean is 0, every layer counts 1."""
    mean = x.mean(0, keepdim=True)
    return torch.where(mean > 0, x / mean.clamp_min(1e-30), torch.ones_like(x))


def importance(raw: Tensor, normalize: str = "per_image") -> list[float]:
    """Omega per layer (mean 1) from `removal_kl`'s matrix (module docstring)."""
    if normalize == "per_image":
        return _over_layers(raw.double()).mean(1).tolist()
    return _over_layers(raw.double().mean(1, keepdim=True))[:, 0].tolist()


def synergy(omega: list[float], eps: float = 1e-2) -> list[float]:
    """S_hat of each adjacent pair (i, i + 1): log(1 + 1 / (|Omega_i - Omega_{i+1}| + eps))."""
    return [float(torch.log1p(torch.tensor(1.0 / (abs(a - b) + eps)))) for a, b in zip(omega, omega[1:])]


def synergy_per_image(raw: Tensor, eps: float = 1e-2) -> list[float]:
    """S_hat of each adjacent pair with S averaged over images: log(1 + mean_t 1 / (|r_it - r_i+1,t| + eps)),
    r the KLs normalized over layers per image."""
    r = _over_layers(raw.double())
    s = (1.0 / ((r[1:] - r[:-1]).abs() + eps)).mean(1)
    return torch.log1p(s).tolist()


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
