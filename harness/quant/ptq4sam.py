"""PTQ4SAM's calibration steps (Lv et al., "PTQ4SAM: Post-Training Quantization for Segment Anything",
CVPR 2024) on a SAM2 model: bimodal integration in the mask decoder (harness.quant.big), the AGQ
search of every quantized attention's log2 softmax quantizer (harness.quant.agq), and per-channel
weight ranges searched by MSE.
"""

from __future__ import annotations

import fnmatch

import torch
import torch.nn as nn
from torch import Tensor

from harness.errors import ConfigError
from harness.quant import agq, big
from harness.quant.attention import Log2Quant, QuantAttentionMixin
from harness.quant.learned import EPS, _reduce_dims, int_range
from harness.quant.lsc import mse_clip

# The mask decoder's token-to-image attentions: keys are projected image tokens, where PTQ4SAM
# found the bimodal channels.
BIG_TARGETS = "sam_mask_decoder.*token_to_image"
# Kept per attention call for the search: a few (window, head) slices and query rows of each; at
# 1024 px Hiera's windowed attention has ~1000 windows a call, global attention 4096 keys a row.
AGQ_SLICES, AGQ_ROWS = 4, 128


class MseWeightStep(nn.Module):
    """Weight step per output channel: the clip with the least squared quantization error of the
    channel (a grid of fractions of max|w|), divided by Qp. Set on the first forward, then fixed."""

    def __init__(self, scaling_shape, bit_width: int, signed: bool, narrow_range: bool):
        super().__init__()
        self.qn, self.qp = int_range(bit_width, signed, narrow_range)
        self.register_buffer("value", torch.ones(scaling_shape))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def forward(self, x: Tensor, threshold: Tensor | None = None) -> Tensor:
        if not self.initialized:
            with torch.no_grad():
                w = x.detach()
                dims = _reduce_dims(self.value.shape, w.dim())
                clip = mse_clip(w, w.abs().amax(dims, keepdim=True), self.qn, self.qp, dims)
                self.value.copy_((clip / self.qp).reshape(self.value.shape).clamp_min(EPS))
                self.initialized.fill_(True)
        return self.value


@torch.no_grad()
def integrate_bimodal(model: nn.Module, feed, frames: int, detector: str = "official") -> dict[str, bool]:
    """BIG on the mask decoder's token-to-image attentions, from their keys on `frames` calibration
    frames (the official detector: the first frame only); FP outputs are unchanged. Returns {module: folded}."""
    frames = 1 if detector == "official" else frames
    targets = {n: m for n, m in model.named_modules() if fnmatch.fnmatchcase(n, BIG_TARGETS)}
    keys: dict[str, list[Tensor]] = {n: [] for n in targets}
    hooks = [
        m.k_proj.register_forward_hook(
            lambda mod, inp, out, n=n: keys[n].append(out.detach().reshape(-1, out.shape[-1]))
        )
        for n, m in targets.items()
    ]
    try:
        feed(model, frames)
    finally:
        for h in hooks:
            h.remove()
    return {n: bool(keys[n]) and big.integrate(m, torch.cat(keys[n]), detector) for n, m in targets.items()}


@torch.no_grad()
def search_granularity(model: nn.Module, feed, frames: int, taus=agq.TAUS, seed: int = 0) -> dict[str, tuple]:
    """AGQ: for every quantized attention with a log2 softmax quantizer, the (tau, scale) with the least
    || x_hat V - x V || on `frames` calibration frames, set in the quantizer. Returns {module: (tau, scale, error)}."""
    gen = torch.Generator().manual_seed(seed)
    modules = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, QuantAttentionMixin) and isinstance(m.softmax_quant, Log2Quant)
    }
    seen: dict[str, tuple[list, list]] = {n: ([], []) for n in modules}

    def recorder(name):
        def record(probs, v):
            p = probs.reshape(-1, *probs.shape[-2:])
            values = v.expand(*probs.shape[:-2], *v.shape[-2:]).reshape(-1, *v.shape[-2:])
            slices = torch.randperm(p.shape[0], generator=gen)[:AGQ_SLICES].to(p.device)
            rows = torch.randperm(p.shape[1], generator=gen)[:AGQ_ROWS].to(p.device)
            seen[name][0].append(p[slices][:, rows].float().cpu())
            seen[name][1].append(values[slices].float().cpu())

        return record

    for n, m in modules.items():
        m.agq_record = recorder(n)
    try:
        feed(model, frames)
    finally:
        for m in modules.values():
            m.agq_record = None
    unreached = [n for n in modules if not seen[n][0]]
    if unreached:
        more = f" (+{len(unreached) - 1} more)" if len(unreached) > 1 else ""
        raise ConfigError(
            f"method.agq: attention {unreached[0]}{more} never ran on the {frames} calibration frames, so AGQ "
            "cannot fit its log2 quantizer; give data.calib frames that reach it (video clips for memory "
            "attention), or leave it out of quant.scope"
        )
    out = {}
    for n, m in modules.items():
        probs, values = seen[n]
        tau, scale, err = agq.search(probs, values, m.softmax_quant.bits, taus)
        m.softmax_quant.tau.fill_(tau)
        m.softmax_quant.scale.fill_(scale)
        m.softmax_quant.fitted.fill_(True)
        out[n] = (tau, scale, err)
    return out
