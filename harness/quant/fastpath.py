"""Eval-mode shortcuts for Brevitas activation quantizers, bit-identical to Brevitas's own path.

Brevitas runs every activation quantizer through a chain of TorchScript modules with two
`torch.where` clamps; at evaluation, with a calibrated and frozen scale, the same arithmetic is
`(clamp(round(x / s + z), lo, hi) - z) * s`. Done directly, this removed most of the quantized
model's slowdown on CPU (see `qbench bench`). In training the proxy's own quantizer runs without
the QuantTensor Brevitas wraps around its output. Calibration, disabled quantizers, export and
non-default rounding keep Brevitas's path.
"""

from __future__ import annotations

import torch
from brevitas.core.function_wrapper import RoundSte, TensorClamp
from brevitas.core.quant.int_base import IntQuant
from brevitas.function.ops import max_int, min_int
from brevitas.quant_tensor import QuantTensor


def _int_quant(proxy) -> IntQuant | None:
    quants = [m for m in proxy.modules() if isinstance(m, IntQuant)]
    if len(quants) == 1 and isinstance(quants[0].float_to_int_impl, RoundSte):
        if isinstance(quants[0].tensor_clamp_impl, TensorClamp):
            return quants[0]
    return None


def param_versions(module) -> tuple:
    """A cheap key for "this quantizer's tensors changed": in-place updates bump _version.

    The tensor list is taken once (walking a Brevitas quantizer's module tree on every call cost
    more than the layer itself); `reset_eval_caches` drops it with the cached values.
    """
    tensors = module.__dict__.get("_qbench_tensors")
    if tensors is None:
        tensors = module.__dict__["_qbench_tensors"] = [*module.parameters(), *module.buffers()]
    return tuple((t._version, t.data_ptr(), t.dtype) for t in tensors)


def reset_eval_caches(model) -> None:
    """Forget every cached quantized weight and quantizer constant (evaluation starts with this),
    so that changes the keys cannot see (writes through .data, swapped submodules) are picked up."""
    for m in model.modules():
        for attr in ("_qbench_tensors", "_qbench_eval_constants", "_eval_weight_key"):
            m.__dict__.pop(attr, None)


def _constants(proxy):
    key = param_versions(proxy)
    cached = getattr(proxy, "_qbench_eval_constants", None)
    if cached is None or cached[0] != key:
        int_quant = _int_quant(proxy)
        if int_quant is None:
            cached = (key, None)
        else:
            bw = proxy.bit_width()
            lo = float(min_int(int_quant.signed, int_quant.narrow_range, bw))
            hi = float(max_int(int_quant.signed, int_quant.narrow_range, bw))
            zero_point = proxy.zero_point().detach()
            cached = (key, (proxy.scale().detach(), zero_point if zero_point.any() else None, lo, hi))
        proxy._qbench_eval_constants = cached
    return cached[1]


def act_quant(proxy, x: torch.Tensor) -> torch.Tensor:
    """Fake-quantize `x` with a Brevitas activation proxy; returns a plain tensor."""
    if not proxy.is_quant_enabled or proxy.export_mode or isinstance(x, QuantTensor):
        out = proxy(x)  # calibration hooks, export and disabled quantizers: Brevitas's own path
        return out.value if isinstance(out, QuantTensor) else out
    if proxy.training or torch.is_grad_enabled():
        # QAT: the proxy's quantizer without building a QuantTensor around every activation.
        return proxy.fused_activation_quant_proxy(x)[0]
    constants = _constants(proxy)
    if constants is None:
        return proxy.fused_activation_quant_proxy(x)[0]
    return _quantize(x / constants[0], constants)


def act_quant_(proxy, x: torch.Tensor) -> torch.Tensor:
    """act_quant that may overwrite `x` (a temporary of the caller's, e.g. attention probabilities)."""
    if proxy.is_quant_enabled and not (proxy.export_mode or proxy.training or torch.is_grad_enabled()):
        constants = _constants(proxy)
        if constants is not None and x.dtype == torch.result_type(x, constants[0]):
            return _quantize(x.div_(constants[0]), constants)
    return act_quant(proxy, x)


def _quantize(v: torch.Tensor, constants) -> torch.Tensor:
    """(clamp(round(v + z), lo, hi) - z) * s for v = x / s, in place on v: at 1024 px the
    temporaries of the out-of-place chain (one per pass over a 4096-token attention matrix) cost
    more than the arithmetic."""
    scale, zero_point, lo, hi = constants
    if zero_point is None:  # symmetric: skip two elementwise passes (only the sign of a zero may differ)
        return v.round_().clamp_(lo, hi).mul_(scale)
    return v.add_(zero_point).round_().clamp_(lo, hi).sub_(zero_point).mul_(scale)
