"""Module swap: replace the layers a policy selects with Brevitas Quant* layers, in place.

fx tracing fails on SAM2, so graph-mode quantization does not apply; swapping modules by name
keeps every layer its own quantizer instances.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from brevitas.graph.calibrate import calibration_mode
from brevitas.nn import QuantConv2d, QuantConvTranspose2d, QuantLinear
from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer

from harness.quant.policy import Decision, QuantPolicy, plan


class _CastInput:
    # SAM2's video predictor keeps memory features in bfloat16 even on CPU; plain nn layers accept
    # them under autocast only, Brevitas layers never: cast to the weight's dtype first.
    def forward(self, x, *args, **kwargs):
        if x.dtype != self.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.weight.dtype)
        return super().forward(x, *args, **kwargs)


class QLinear(_CastInput, QuantLinear):
    pass


class QConv2d(_CastInput, QuantConv2d):
    pass


class QConvTranspose2d(_CastInput, QuantConvTranspose2d):
    pass


def _quant_layer(module: nn.Module, weight_quant, act_quant, d: Decision) -> nn.Module:
    kw = dict(
        bias=module.bias is not None,
        weight_quant=weight_quant,
        input_quant=act_quant,
        device=module.weight.device,
        dtype=module.weight.dtype,
    )
    if isinstance(module, nn.Linear):
        q = QLinear(module.in_features, module.out_features, **kw)
    else:
        conv = dict(
            kernel_size=module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            padding_mode=module.padding_mode,
        )
        if isinstance(module, nn.ConvTranspose2d):
            q = QConvTranspose2d(
                module.in_channels, module.out_channels, output_padding=module.output_padding, **conv, **kw
            )
        else:
            q = QConv2d(module.in_channels, module.out_channels, **conv, **kw)
    with torch.no_grad():
        q.weight.copy_(module.weight)
        if module.bias is not None:
            q.bias.copy_(module.bias)
    q.train(module.training)
    return q


def quantize(model: nn.Module, policy: QuantPolicy, weight_quant, act_quant) -> list[Decision]:
    """Swap every layer the policy selects; returns all decisions (quantized and kept in FP).

    `weight_quant(bits)` and `act_quant(bits)` give the Brevitas injector for a layer.
    """
    decisions = plan(model, policy)
    for d in decisions:
        if d.quantize:
            parent_name, _, child = d.name.rpartition(".")
            parent = model.get_submodule(parent_name)
            old = getattr(parent, child)
            setattr(parent, child, _quant_layer(old, weight_quant(d.weight_bits), act_quant(d.act_bits), d))
    return decisions


def quant_layers(model: nn.Module) -> dict[str, QuantWeightBiasInputOutputLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantWeightBiasInputOutputLayer)}


def calibrate(model: nn.Module, feed) -> None:
    """Collect activation statistics with Brevitas's calibration mode while `feed()` runs data."""
    was_training = model.training
    with torch.no_grad(), calibration_mode(model):
        feed()
    model.train(was_training)
