"""Quantization policy: which parts of SAM2 get Brevitas quantizers, and with how many bits.

A policy is data (it comes from the suite file's `quant` section). `plan` turns it into one
decision per Linear / Conv2d / ConvTranspose2d and per attention module of a model, so that what
will be quantized can be inspected and logged before anything is swapped.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch.nn as nn

from harness.errors import ConfigError
from harness.quant.attention import ATTENTION_TYPES

SWAPPABLE = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)
BIT_KEYS = ("weight_bits", "act_bits", "qkv_bits", "softmax_bits")

# Parts a scope entry can name: the four the papers quantize (the default), and the prompt
# encoder's mask downscaling convs and the object-pointer projections, which a user may add.
PARTS = [
    "image_encoder.trunk",
    "image_encoder.neck",
    "memory_attention",
    "memory_encoder",
    "sam_mask_decoder",
    "sam_prompt_encoder",
    "obj_ptr_proj",
    "obj_ptr_tpos_proj",
    "mask_downsample",
]
DEFAULT_SCOPE = ["image_encoder", "memory_attention", "memory_encoder", "sam_mask_decoder"]
# What the SAM quantization literature (PTQ4SAM, Q-SAM2) keeps in full precision. Positional
# embeddings and norms are not Linear / Conv layers, so they are never swapped.
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
    # Attention: q/k/v matmul inputs and post-softmax probabilities (None: act_bits).
    attention: bool = True
    qkv_bits: int | None = None
    softmax_bits: int | None = None
    softmax_quant: str = "uniform"
    # Mixed precision: module name or glob -> {weight_bits, act_bits, qkv_bits, softmax_bits};
    # later entries win over earlier ones. Exact names must exist in the model.
    bits: dict[str, dict[str, int]] = field(default_factory=dict)

    def __post_init__(self):
        self.bits = {g: {k: v for k, v in o.items() if v is not None} for g, o in self.bits.items()}
        self.qkv_bits = self.qkv_bits or self.act_bits
        self.softmax_bits = self.softmax_bits or self.act_bits
        for key in BIT_KEYS:
            if not 2 <= getattr(self, key) <= 16:
                raise ConfigError(f"quant.{key}: {getattr(self, key)} is out of range; expected 2..16")
        if self.softmax_quant not in ("uniform", "log2"):
            raise ConfigError(f"quant.softmax_quant: {self.softmax_quant!r}; expected 'uniform' or 'log2'")
        for glob, override in self.bits.items():
            for key, value in override.items():
                if key not in BIT_KEYS or not isinstance(value, int) or not 2 <= value <= 16:
                    raise ConfigError(f"quant.bits.{glob}.{key}: expected one of {', '.join(BIT_KEYS)} in 2..16")

    @classmethod
    def from_config(cls, cfg: dict) -> QuantPolicy:
        known = {
            "weight_bits",
            "act_bits",
            "scope",
            "keep_fp",
            "bits",
            "attention",
            "qkv_bits",
            "softmax_bits",
            "softmax_quant",
        }
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
    act_bits: int | None = None  # layer input; for attention, the q/k/v inputs
    softmax_bits: int | None = None
    softmax_quant: str | None = None  # attention: "uniform" | "log2"
    reason: str = ""


def _matches(name: str, globs) -> str | None:
    return next((g for g in globs if fnmatch.fnmatchcase(name, g)), None)


def plan(model: nn.Module, policy: QuantPolicy) -> list[Decision]:
    names = {name for name, _ in model.named_modules()}
    for scope in policy.scope:
        if scope not in names:
            raise ConfigError(f"quant.scope: {scope!r} is not a submodule of the model; expected some of {PARTS}")
    for key in policy.bits:
        if not any(c in key for c in "*?[") and key not in names:
            raise ConfigError(f"quant.bits.{key}: no module of that name in the model")
    decisions = []
    for name, module in model.named_modules():
        attention = isinstance(module, ATTENTION_TYPES)
        if not (attention or isinstance(module, SWAPPABLE)):
            continue
        params = 0 if attention else sum(p.numel() for p in module.parameters(recurse=False))
        d = Decision(name, "Attention" if attention else type(module).__name__, params, quantize=False)
        in_scope = any(name == s or name.startswith(s + ".") for s in policy.scope)
        kept = _matches(name, policy.keep_fp)
        if not in_scope:
            d.reason = "out of scope"
        elif kept:
            d.reason = f"keep_fp {kept}"
        elif attention and not policy.attention:
            d.reason = "quant.attention is off"
        elif attention:
            d.quantize, d.act_bits, d.softmax_bits = True, policy.qkv_bits, policy.softmax_bits
            d.softmax_quant = policy.softmax_quant
        else:
            d.quantize, d.weight_bits, d.act_bits = True, policy.weight_bits, policy.act_bits
        if d.quantize:
            for glob, override in policy.bits.items():
                if fnmatch.fnmatchcase(name, glob):
                    if attention:
                        d.act_bits = override.get("qkv_bits", d.act_bits)
                        d.softmax_bits = override.get("softmax_bits", d.softmax_bits)
                    else:
                        d.weight_bits = override.get("weight_bits", d.weight_bits)
                        d.act_bits = override.get("act_bits", d.act_bits)
        decisions.append(d)
    return decisions
