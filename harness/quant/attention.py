"""Quantized attention: the q, k, v inputs of the attention matmuls and the post-softmax probabilities.

SAM2's three attention types (Hiera's MultiScaleAttention, the two-way transformer's Attention and
memory attention's RoPEAttention) each call `F.scaled_dot_product_attention` once per forward, after
their own projections, pooling and rotary embedding. Rather than copying their forwards, a quantized
attention module runs its original forward under a TorchFunctionMode that routes that one call to
an explicit softmax(q k^T) v with this module's own quantizers; no scale is shared between modules.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from brevitas.nn import QuantIdentity
from sam2.modeling.backbones.hieradet import MultiScaleAttention
from sam2.modeling.sam.transformer import Attention
from torch.overrides import TorchFunctionMode

from harness.quant.agq import log2_quantize
from harness.quant.fastpath import act_quant, act_quant_

ATTENTION_TYPES = (MultiScaleAttention, Attention)
CHUNK = 1 << 22  # attention probabilities computed at once in evaluation (16 MB of fp32)


class Log2Quant(nn.Module):
    """Log2 quantizer of post-softmax probabilities, the base form of PTQ4SAM's AGQ (Lv et al., CVPR 2024).

    x_int = round(-tau * log2(x / s)), x_hat = s * 2^(-x_int / tau) for x_int in [0, 2^b - 1], and 0
    for entries past the range (harness.quant.agq.log2_quantize); straight-through gradient. tau and
    s are buffers, so a per-module choice (AGQ's search) is saved with the model and its export.
    `needs_fit`: tau and s are to be fitted (AGQ), and the all-active check refuses the quantizer
    until `fitted` is set; otherwise s = 1 (probabilities are at most 1) and tau as given.
    """

    def __init__(self, bits: int, tau: float = 1.0, needs_fit: bool = False):
        super().__init__()
        self.bits, self.needs_fit = bits, needs_fit
        self.register_buffer("tau", torch.tensor(float(tau)))
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("fitted", torch.tensor(not needs_fit))
        self.disable_quant = False

    @property
    def is_quant_enabled(self) -> bool:
        return not self.disable_quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disable_quant:
            return x
        x_hat = log2_quantize(x, self.scale.to(x.dtype), self.tau.to(x.dtype), self.bits)
        return x + (x_hat - x).detach()

    def extra_repr(self) -> str:
        return f"bits={self.bits}, tau={float(self.tau):g}"


class _RouteSDPA(TorchFunctionMode):
    def __init__(self, owner):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self.owner.quant_sdpa(*args, **kwargs)
        return func(*args, **kwargs)


class QuantAttentionMixin:
    """Mixed into an attention module's class in place; its parameters and state-dict keys stay."""

    def forward(self, *args, **kwargs):
        with _RouteSDPA(self):
            return super().forward(*args, **kwargs)

    def quant_sdpa(self, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None or is_causal or enable_gqa:
            raise NotImplementedError("quantized attention supports plain (unmasked) attention only, as SAM2 uses")
        q, k, v = (act_quant(m.act_quant, t) for m, t in ((self.q_quant, q), (self.k_quant, k), (self.v_quant, v)))
        scale = scale if scale is not None else 1 / math.sqrt(q.shape[-1])
        sm, record = self.softmax_quant, getattr(self, "agq_record", None)  # AGQ's search (harness.quant.ptq4sam)
        observed = record is not None or _observing(sm)  # calibration sees whole matrices, as before
        if not observed and not _quantizes(sm):  # nothing to quantize in between: the fused kernel
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
        if not observed and not torch.is_grad_enabled() and not sm.training:
            # Evaluation: probabilities a block of queries at a time, quantized in place, so that a
            # 4096-token attention never holds its whole (heads x tokens x tokens) matrix in fp32.
            rows = max(1, CHUNK // max(1, k.shape[-2] * q[..., 0, 0].numel()))
            return torch.cat(
                [self._attend(q[..., i : i + rows, :], k, v, scale, sm) for i in range(0, q.shape[-2], rows)], -2
            )
        probs = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
        if record is not None:
            record(probs, v)
        probs = act_quant(sm.act_quant, probs) if isinstance(sm, QuantIdentity) else sm(probs)
        if dropout_p:
            probs = F.dropout(probs, dropout_p)
        return probs @ v

    @staticmethod
    def _attend(q, k, v, scale, sm):
        probs = torch.softmax((q @ k.transpose(-2, -1)).mul_(scale), dim=-1)
        return (act_quant_(sm.act_quant, probs) if isinstance(sm, QuantIdentity) else sm(probs)) @ v


def _quantizes(sm: nn.Module) -> bool:
    return sm.act_quant.is_quant_enabled if isinstance(sm, QuantIdentity) else sm.is_quant_enabled


def _observing(sm: nn.Module) -> bool:
    """Brevitas's calibration mode: the quantizer collects statistics of each call."""
    return isinstance(sm, QuantIdentity) and getattr(sm.act_quant, "observer_only", False)


_CLASSES: dict[type, type] = {}


def quantize_attention(module: nn.Module, qkv_quant, softmax_quant: nn.Module) -> None:
    """Give `module` its own q/k/v quantizers (Brevitas injector `qkv_quant`) and `softmax_quant`."""
    cls = type(module)
    if cls not in _CLASSES:
        # One subclass per attention class, registered here so that pickling can find it by name.
        _CLASSES[cls] = type(f"Quant{cls.__name__}", (QuantAttentionMixin, cls), {"__module__": __name__})
        globals()[_CLASSES[cls].__name__] = _CLASSES[cls]
    module.__class__ = _CLASSES[cls]
    device = next(module.parameters()).device
    for name in ("q_quant", "k_quant", "v_quant"):
        setattr(module, name, QuantIdentity(act_quant=qkv_quant, return_quant_tensor=False).to(device))
    module.softmax_quant = softmax_quant.to(device)
    for name in ("q_quant", "k_quant", "v_quant", "softmax_quant"):
        getattr(module, name).train(module.training)  # new modules start in training mode
