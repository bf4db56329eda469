"""Quantization policy: which layers of SAM2 get Brevitas quant layers, and with how many bits.

A policy is data (it comes from the suite file's `quant` section). `plan` turns it into one
decision per Linear / Conv2d / ConvTranspose2d of a model, so that what will be quantized can be
inspected and logged before anything is swapped.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch.nn as nn

from harness.errors import ConfigError

SWAPPABLE = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)

DEFAULT_SCOPE = ["image_encoder", "memory_attention", "memory_encoder", "sam_mask_decoder"]
# What the SAM quantization literature (PTQ4SAM, Q-SAM2) keeps in full precision.
DEFAULT_KEEP_FP = [
    "image_encoder.trunk.patch_embed.*",
    "*iou_prediction_head*",
    "*pred_obj_score_head*",
    "*output_hypernetworks_mlps*",
    "*output_upscaling*",
]


@dataclass
class QuantPolicy:
    weight_bits: int = 8
    act_bits: int = 8
    scope: list[str] = field(default_factory=lambda: list(DEFAULT_SCOPE))
    keep_fp: list[str] = field(default_factory=lambda: list(DEFAULT_KEEP_FP))
    # glob -> {"weight_bits": b, "act_bits": b}; later globs win over earlier ones.
    bits: dict[str, dict[str, int]] = field(default_factory=dict)

    def __post_init__(self):
        for key in ("weight_bits", "act_bits"):
            if not 2 <= getattr(self, key) <= 16:
                raise ConfigError(f"quant.{key}: {getattr(self, key)} is out of range; expected 2..16")
        for glob, override in self.bits.items():
            for key, value in override.items():
                if key not in ("weight_bits", "act_bits") or not 2 <= int(value) <= 16:
                    raise ConfigError(f"quant.bits.{glob}.{key}: expected weight_bits or act_bits in 2..16")

    @classmethod
    def from_config(cls, cfg: dict) -> QuantPolicy:
        known = {"weight_bits", "act_bits", "scope", "keep_fp", "bits"}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ConfigError(f"quant.{unknown[0]}: unknown key; expected one of {', '.join(sorted(known))}")
        return cls(**{k: cfg[k] for k in known if cfg.get(k) is not None})


@dataclass
class Decision:
    name: str
    kind: str
    params: int
    quantize: bool
    weight_bits: int | None = None
    act_bits: int | None = None
    reason: str = ""


def _matches(name: str, globs) -> str | None:
    return next((g for g in globs if fnmatch.fnmatchcase(name, g)), None)


def plan(model: nn.Module, policy: QuantPolicy) -> list[Decision]:
    decisions = []
    for name, module in model.named_modules():
        if not isinstance(module, SWAPPABLE):
            continue
        params = sum(p.numel() for p in module.parameters(recurse=False))
        d = Decision(name, type(module).__name__, params, quantize=False)
        in_scope = any(name == s or name.startswith(s + ".") for s in policy.scope)
        kept = _matches(name, policy.keep_fp)
        if not in_scope:
            d.reason = "out of scope"
        elif kept:
            d.reason = f"keep_fp {kept}"
        else:
            d.quantize, d.weight_bits, d.act_bits = True, policy.weight_bits, policy.act_bits
            for glob, override in policy.bits.items():
                if fnmatch.fnmatchcase(name, glob):
                    d.weight_bits = int(override.get("weight_bits", d.weight_bits))
                    d.act_bits = int(override.get("act_bits", d.act_bits))
        decisions.append(d)
    return decisions
