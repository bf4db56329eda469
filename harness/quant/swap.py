"""Module swap: replace the layers a policy selects with Brevitas Quant* layers, in place.

fx tracing fails on SAM2, so graph-mode quantization does not apply; swapping modules by name
keeps every layer its own quantizer instances.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
from brevitas.core.scaling.standalone import ParameterFromRuntimeStatsScaling
from brevitas.graph.calibrate import calibration_mode
from brevitas.nn import QuantConv2d, QuantConvTranspose2d, QuantLinear
from brevitas.nn.quant_layer import QuantWeightBiasInputOutputLayer
from brevitas.quant_tensor import QuantTensor

from harness.quant.attention import quantize_attention
from harness.quant.fastpath import act_quant, param_versions
from harness.quant.policy import Decision


class _FastQuantLayer:
    """Brevitas Quant* layer with three changes, all invisible in the outputs.

    SAM2's video predictor keeps memory features in bfloat16 even on CPU; plain nn layers accept
    them under autocast only, Brevitas layers never: inputs are cast to the weight's dtype first.
    In eval mode the fake-quantized weight depends only on the weight and its quantizer, so it is
    computed once and reused (Brevitas re-quantizes it at every call, which made quantized
    evaluation several times slower than FP); it is recomputed when either changes. With autograd
    on (QAT), the layer computes what Brevitas's QuantTensor path computes, without its per-call
    bookkeeping, and inside `weights_once` quantizes its weight once per forward. The input
    quantizer takes the shortcut of harness.quant.fastpath.
    """

    def forward(self, x):
        if x.dtype != self.weight.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.weight.dtype)
        if _brevitas_path(self):
            return super().forward(x)
        if self.training or torch.is_grad_enabled():
            # QAT, reconstruction: the cached weight is detached, so quantize it with autograd on;
            # the values Brevitas's QuantTensor path gives, without its per-call bookkeeping.
            w = self.__dict__.get("_forward_weight")
            if w is None:
                w = self.quant_weight()
                w = w.value if isinstance(w, QuantTensor) else w
                if self.__dict__.get("_share_weight"):
                    self.__dict__["_forward_weight"] = w
            return self.inner_forward_impl(act_quant(self.input_quant, x), w, self.bias)
        return self.inner_forward_impl(act_quant(self.input_quant, x), self._eval_weight(), self.bias)

    def _eval_weight(self) -> torch.Tensor:
        key = (
            self.weight._version,
            self.weight.data_ptr(),
            self.weight_quant.is_quant_enabled,
            param_versions(self.weight_quant),
        )
        if getattr(self, "_eval_weight_key", None) != key:
            w = self.quant_weight()
            self._eval_weight_cache = (w.value if isinstance(w, QuantTensor) else w).detach()
            self._eval_weight_key = key
        return self._eval_weight_cache


def _brevitas_path(layer) -> bool:
    return layer.export_mode or layer.output_quant.is_quant_enabled or layer.bias_quant.is_quant_enabled


class QLinear(_FastQuantLayer, QuantLinear):
    pass


class QConv2d(_FastQuantLayer, QuantConv2d):
    pass


class QConvTranspose2d(_FastQuantLayer, QuantConvTranspose2d):
    pass


def _quant_layer(module: nn.Module, weight_quant, act_quant) -> nn.Module:
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


@contextlib.contextmanager
def weights_once(model: nn.Module, eager: list[nn.Module] = ()):
    """Within the block, each quantized layer fake-quantizes its weight on first use and reuses it.

    One training forward of SAM2 calls the decoder's layers once per frame and corrective click,
    and re-quantizing the same weight each time was a large part of a QAT step. The weights do
    not change inside a forward (the optimizer steps after backward), so this is exact; the
    shared tensor stays in the autograd graph, and is dropped on exit. Layers inside the `eager`
    modules quantize their weight on entry: a checkpointed block (harness.quant.recompute) runs
    twice, and both runs must read one quantized weight made outside it.
    """
    layers = list(quant_layers(model).values())
    for layer in layers:
        layer.__dict__["_share_weight"] = True
    for block in eager:
        for layer in quant_layers(block).values():
            if layer.__dict__.get("_forward_weight") is None and not _brevitas_path(layer):
                w = layer.quant_weight()
                layer.__dict__["_forward_weight"] = w.value if isinstance(w, QuantTensor) else w
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("_share_weight", None)
            layer.__dict__.pop("_forward_weight", None)


def quantize(model: nn.Module, decisions: list[Decision], method) -> None:
    """Swap every module the decisions quantize (a plan, or the decisions stored in a packed file).

    `method.weight_quant(bits)`, `method.act_quant(bits)` give a layer's Brevitas injectors and
    `method.softmax_quant(bits, kind)` an attention module's probability quantizer.
    """
    for d in decisions:
        if d.quantize and d.kind == "Attention":
            attn = model.get_submodule(d.name)
            softmax = method.softmax_quant(d.softmax_bits, d.softmax_quant or "uniform")
            quantize_attention(attn, method.act_quant(d.act_bits), softmax)
        elif d.quantize:
            parent_name, _, child = d.name.rpartition(".")
            parent = model.get_submodule(parent_name)
            old = getattr(parent, child)
            setattr(parent, child, _quant_layer(old, method.weight_quant(d.weight_bits), method.act_quant(d.act_bits)))


def quant_layers(model: nn.Module) -> dict[str, QuantWeightBiasInputOutputLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantWeightBiasInputOutputLayer)}


def collects_stats(module: nn.Module) -> bool:
    """A quantizer part initialized from runtime statistics (Brevitas's or harness.quant.learned's)."""
    return isinstance(module, ParameterFromRuntimeStatsScaling) or (
        hasattr(module, "collect_stats_steps") and hasattr(module, "counter") and hasattr(module, "init_scale")
    )


def calibrate(model: nn.Module, feed) -> None:
    """Collect activation statistics with Brevitas's calibration mode while `feed()` runs data.

    Brevitas finalizes every quantizer on exit, also those that saw no data; those are marked
    `calibration_starved` so that the all-active check refuses to evaluate them.
    """
    was_training = model.training
    with torch.no_grad(), calibration_mode(model):
        feed()
        starved = [m for m in model.modules() if collects_stats(m) and m.counter == 0]
    for m in starved:
        m.calibration_starved = True
    model.train(was_training)
