"""Quantizer state: list, enable and disable quantizers per module, and check that all are active.

Every evaluation calls `check_all_active`: a model evaluated with some quantizer left disabled or
never calibrated reports optimistic numbers (a published SAM PTQ codebase evaluated with half of
its layer-input quantizers disabled), so that must fail loudly instead.
"""

from __future__ import annotations

import fnmatch

import torch.nn as nn
from brevitas.proxy.quant_proxy import QuantProxyFromInjector

from harness.errors import QBenchError
from harness.quant.attention import Log2Quant, QuantAttentionMixin
from harness.quant.policy import Decision
from harness.quant.swap import collects_stats, quant_layers

KINDS = ("weight", "act", "attention")


class QuantStateError(QBenchError):
    """A model is not fully quantized as its policy asked."""


def quantizers(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """Every quantizer of the model: "module.quantizer" -> (kind, quantizer)."""
    out = {}
    for name, layer in quant_layers(model).items():
        out[f"{name}.weight_quant"] = ("weight", layer.weight_quant)
        out[f"{name}.input_quant"] = ("act", layer.input_quant)
    for name, module in model.named_modules():
        if isinstance(module, QuantAttentionMixin):
            for q in ("q_quant", "k_quant", "v_quant", "softmax_quant"):
                out[f"{name}.{q}"] = ("attention", getattr(module, q))
    return out


def _proxy(quantizer: nn.Module) -> nn.Module:
    # A QuantIdentity keeps its enable flag on its act_quant proxy.
    return getattr(quantizer, "act_quant", quantizer)


def set_enabled(model: nn.Module, enabled: bool, kinds=KINDS, modules: str = "*") -> int:
    """Enable or disable the quantizers of `kinds` in modules matching the glob; returns how many."""
    count = 0
    for name, (kind, quantizer) in quantizers(model).items():
        if kind in kinds and fnmatch.fnmatchcase(name.rsplit(".", 1)[0], modules):
            _proxy(quantizer).disable_quant = not enabled
            count += 1
    return count


def _uncalibrated(quantizer: nn.Module) -> bool:
    return any(
        collects_stats(m) and (m.counter <= m.collect_stats_steps or getattr(m, "calibration_starved", False))
        for m in quantizer.modules()
    )


def _bits(quantizer: nn.Module) -> int:
    return quantizer.bits if isinstance(quantizer, Log2Quant) else int(_proxy(quantizer).bit_width())


def _expected_bits(d: Decision) -> dict[str, int | None]:
    """The bit-width each quantizer of a decided module should have, by quantizer name."""
    if d.kind == "Attention":
        return {"q_quant": d.act_bits, "k_quant": d.act_bits, "v_quant": d.act_bits, "softmax_quant": d.softmax_bits}
    return {"weight_quant": d.weight_bits, "input_quant": d.act_bits}


def check_all_active(model: nn.Module, decisions: list[Decision]) -> None:
    """Raise unless the model is in eval mode and every module the policy quantizes has all its
    quantizers enabled, calibrated (a log2 quantizer that is to be fitted: fitted) and at the
    bit-width its decision gives."""
    training = [name or "the model" for name, m in model.named_modules() if m.training]
    if training:
        raise QuantStateError(
            f"{training[0]} (+{len(training) - 1} more modules) is in training mode: dropout and running "
            "statistics would change its outputs; call model.eval() before evaluating"
        )
    found = quantizers(model)
    modules = {name.rsplit(".", 1)[0] for name in found}
    problems = [f"{d.name} is not quantized" for d in decisions if d.quantize and d.name not in modules]
    for name, (_, quantizer) in found.items():
        if not _proxy(quantizer).is_quant_enabled:
            problems.append(f"{name} is disabled")
        elif _uncalibrated(quantizer):
            problems.append(f"{name} was never calibrated")
        elif isinstance(quantizer, Log2Quant) and not bool(quantizer.fitted):
            problems.append(f"{name} was never fitted")
    for d in decisions:
        if not d.quantize or d.name not in modules:
            continue
        for q, bits in _expected_bits(d).items():
            quantizer = found.get(f"{d.name}.{q}", (None, None))[1]
            if quantizer is not None and bits is not None and _proxy(quantizer).is_quant_enabled:
                if _bits(quantizer) != bits:
                    problems.append(f"{d.name}.{q} has {_bits(quantizer)} bits, its decision {bits}")
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise QuantStateError(f"{len(problems)} quantizers not active: {'; '.join(problems[:3])}{more}")


def quantizer_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters that belong to quantizers (learned scales, clips, offsets), by name.

    A quantizer is a Brevitas proxy (a layer's weight_quant / input_quant / output_quant, a
    QuantIdentity's act_quant) or one of an attention module's q/k/v/softmax quantizers (Log2Quant
    is not Brevitas). A layer's own weight and bias are not quantizer parameters.
    """
    owners = [q for _, q in quantizers(model).values()]
    owners += [m for m in model.modules() if isinstance(m, QuantProxyFromInjector)]
    ids = {id(p) for m in owners for p in m.parameters()}
    return {name: p for name, p in model.named_parameters() if id(p) in ids}
