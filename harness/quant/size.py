"""Model-size accounting: bytes of the packed representation against the same model in BF16.

Packed bytes: b-bit integer codes of each quantized weight (ceil(numel * b / 8) per tensor), one
scale per output channel, one byte per zero point of an asymmetric weight quantizer (symmetric
ones have none), activation-quantizer scales, and every other stored tensor, each value at
`fp_bytes` (2 = BF16, 4 = float32). This is exactly what harness.quant.export writes: the tensors
of `stored_tensors`, i.e. every parameter and persistent buffer. The one persistent buffer SAM2 has
is model data (the prompt encoder's random Fourier matrix); Brevitas bookkeeping and positional
caches are not persistent and are not counted.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from harness.quant.swap import quant_layers

BF16 = 2


def _is_quantizer_param(name: str) -> bool:
    return "_quant." in name or name.startswith(("input_quant", "weight_quant", "output_quant"))


def stored_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor a packed export holds (quantized weights included, as floats), by state-dict key."""
    # Brevitas leaves never-calibrated activation scales out of state_dict but rewrites half-collected
    # ones there: start from the parameters, let state_dict win.
    return {**{k: p.detach() for k, p in model.named_parameters()}, **model.state_dict()}


@torch.no_grad()
def model_size(model: nn.Module, fp_bytes: int = BF16) -> dict[str, float]:
    q_weights = {f"{n}.weight": layer for n, layer in quant_layers(model).items()}
    total = fp_total = q_bytes = q_params = 0
    bit_sum = 0.0
    for name, t in stored_tensors(model).items():
        width = fp_bytes if t.is_floating_point() else t.element_size()
        if _is_quantizer_param(name):
            q_bytes += t.numel() * width
            continue
        total += t.numel()
        if name in q_weights:
            qw = q_weights[name].quant_weight()
            bits = int(qw.bit_width)
            zero_points = qw.zero_point.numel() if qw.zero_point.any() else 0
            q_bytes += math.ceil(t.numel() * bits / 8) + qw.scale.numel() * fp_bytes + zero_points
            q_params += t.numel()
            bit_sum += t.numel() * bits
        else:
            fp_total += t.numel() * width
    packed = q_bytes + fp_total
    return {
        "params": total,
        "quantized_params": q_params,
        "quantized_share": q_params / total if total else 0.0,
        "packed_bytes": packed,
        "bf16_bytes": total * BF16,
        "ratio_vs_bf16": total * BF16 / packed,
        "quantized_ratio_vs_bf16": q_params * BF16 / q_bytes if q_bytes else 1.0,
        "bits_per_weight": (bit_sum + (total - q_params) * fp_bytes * 8) / total,
    }
