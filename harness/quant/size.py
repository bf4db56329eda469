"""Model-size accounting: bytes of the packed representation against the same model in BF16.

Packed bytes: b-bit integer codes of each quantized weight (ceil(numel * b / 8) per tensor), one
16-bit scale per output channel, 16-bit activation scales, and every other parameter in BF16.
Buffers (positional caches, Brevitas bookkeeping) are not model weights and are not counted.
"""

from __future__ import annotations

import math

import torch.nn as nn

from harness.quant.swap import quant_layers

BF16 = 2


def _is_quantizer_param(name: str) -> bool:
    return "_quant." in name or name.startswith(("input_quant", "weight_quant", "output_quant"))


def model_size(model: nn.Module) -> dict[str, float]:
    qlayers = quant_layers(model)
    q_weights = {f"{n}.weight" for n in qlayers}
    total = fp_bytes = q_bytes = q_params = 0
    bit_sum = 0.0
    for name, p in model.named_parameters():
        if _is_quantizer_param(name):
            continue
        total += p.numel()
        if name in q_weights:
            layer = qlayers[name[: -len(".weight")]]
            bits = int(layer.weight_quant.bit_width())
            out_channels = p.shape[1] if isinstance(layer, nn.ConvTranspose2d) else p.shape[0]
            q_bytes += math.ceil(p.numel() * bits / 8) + out_channels * BF16
            q_params += p.numel()
            bit_sum += p.numel() * bits
        else:
            fp_bytes += p.numel() * BF16
    act_scales = sum(p.numel() for n, p in model.named_parameters() if _is_quantizer_param(n))
    q_bytes += act_scales * BF16
    packed = q_bytes + fp_bytes
    return {
        "params": total,
        "quantized_params": q_params,
        "quantized_share": q_params / total if total else 0.0,
        "packed_bytes": packed,
        "bf16_bytes": total * BF16,
        "ratio_vs_bf16": total * BF16 / packed,
        "quantized_ratio_vs_bf16": q_params * BF16 / q_bytes if q_bytes else 1.0,
        "bits_per_weight": (bit_sum + (total - q_params) * 16) / total,
    }
