"""Packed export: a quantized model as b-bit integer codes, per-channel scales and its other tensors.

The file is one torch.save dict that torch.load(weights_only=True) reads:
    {"format": "qbench-packed", "version": 1, "meta": meta,
     "layers": {name: {"codes", "bits", "shape", "signed", "narrow", "scale", "zero_point"}},
     "tensors": {state-dict key: tensor}}   # everything but the quantized weights
Codes form one little-endian bit stream: code i holds bits i*b .. i*b+b-1 (LSB first), signed codes
in two's complement, so four 2-bit codes share a byte and 3-bit codes straddle byte boundaries.
A zero point is a code and is stored like one (int8 / uint8); symmetric quantizers have none and
store an empty tensor. harness.quant.size.model_size(model, fp_bytes) counts exactly these bytes.

meta holds the run's model, quant and method sections and `decisions`, the per-module plan the
model was quantized by (Decision fields). `load` rebuilds the model from meta (models.build, then
the swap those decisions ask for, not a fresh plan: a data-dependent plan reloads exactly),
restores the tensors and hands each quantized layer's weight quantizer the stored scale and zero
point: recomputing the scale from the restored weights can be 1 ulp off, the stored one is exact.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from harness import models
from harness.errors import CheckpointError, ConfigError
from harness.quant import swap
from harness.quant.policy import Decision
from harness.quant.size import stored_tensors
from harness.quant.swap import quant_layers

FORMAT, VERSION = "qbench-packed", 2  # 2: meta holds the decisions
FP_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (any shape, signed or not, 1..8 bits) -> uint8 tensor of ceil(numel * bits / 8) bytes."""
    u = (codes.reshape(-1).to(torch.int16) & ((1 << bits) - 1)).numpy().astype(np.uint8)
    stream = np.unpackbits(u[:, None], axis=1, count=bits, bitorder="little")
    return torch.from_numpy(np.packbits(stream, bitorder="little"))


def unpack(packed: torch.Tensor, bits: int, n: int, signed: bool) -> torch.Tensor:
    """Inverse of `pack`: the first n codes as int16."""
    stream = np.unpackbits(packed.numpy(), count=n * bits, bitorder="little").reshape(n, bits)
    u = torch.from_numpy(np.packbits(stream, axis=1, bitorder="little")[:, 0].astype(np.int16))
    return u - ((u >> (bits - 1)) << bits) if signed else u


def _cpu(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.detach().to("cpu", dtype if t.is_floating_point() else t.dtype)


def _pooled(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The same tensors as views of one flat buffer per dtype."""
    # torch.save writes one zip record (header, 64-byte alignment) per storage; ~800 small tensors
    # would cost ~100 KB. Pooled, the file is the data plus the pickled names and shapes.
    out = list(tensors)
    for dtype in {t.dtype for t in tensors}:
        idx = [i for i, t in enumerate(tensors) if t.dtype == dtype]
        flat = torch.cat([tensors[i].reshape(-1) for i in idx])
        for i, part in zip(idx, flat.split([tensors[i].numel() for i in idx])):
            out[i] = part.view(tensors[i].shape)
    return out


def _zero_point_codes(zp: torch.Tensor, signed: bool, name: str) -> torch.Tensor:
    if not zp.any():
        return torch.zeros(0, dtype=torch.int8)
    codes = zp.to(torch.int8 if signed else torch.uint8)
    if not torch.equal(codes.to(zp.dtype), zp):
        raise ConfigError(f"quant: layer {name}'s zero point is not an 8-bit integer; packed export stores one byte")
    return codes.cpu()


@torch.no_grad()
def export(
    model: nn.Module, path: str | Path, meta: dict, decisions: list[Decision], fp_dtype: str = "float32"
) -> None:
    """Write `model` (quantized by `decisions`, calibrated) to `path`; `meta` (model, quant and
    method sections) and the decisions let `load` rebuild it."""
    if fp_dtype not in FP_DTYPES:
        raise ConfigError(f"export.fp_dtype: {fp_dtype!r}; expected one of {', '.join(FP_DTYPES)}")
    meta = {**meta, "decisions": [dataclasses.asdict(d) for d in decisions]}
    json.dumps(meta)  # fails here, not at load time: torch.load(weights_only=True) reads plain data only
    dtype = FP_DTYPES[fp_dtype]
    qlayers = quant_layers(model)
    layers = {}
    for name, layer in qlayers.items():
        qw = layer.quant_weight()
        bits, signed = int(qw.bit_width), bool(qw.signed)
        if not 2 <= bits <= 8:
            raise ConfigError(f"quant.weight_bits: layer {name} has {bits}-bit weights; packed export supports 2..8")
        codes = qw.int()
        layers[name] = {
            "codes": pack(codes.cpu(), bits),
            "bits": bits,
            "shape": list(codes.shape),
            "signed": signed,
            "narrow": bool(layer.weight_quant.is_narrow_range),
            "scale": _cpu(qw.scale, dtype),
            "zero_point": _zero_point_codes(qw.zero_point, signed, name),
        }
    skip = {f"{n}.weight" for n in qlayers}
    tensors = {k: _cpu(t, dtype) for k, t in stored_tensors(model).items() if k not in skip}
    refs = [(d, k) for d in [*layers.values(), tensors] for k, v in d.items() if isinstance(v, torch.Tensor)]
    for (d, k), t in zip(refs, _pooled([d[k] for d, k in refs])):
        d[k] = t
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    # torch.save names the zip's records after the file ("out/data.pkl"): saved through a buffer
    # they are "archive/...", so one model exported twice, under any names, gives identical bytes.
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "version": VERSION, "meta": meta, "layers": layers, "tensors": tensors}, buffer)
    Path(path).write_bytes(buffer.getvalue())


def read(path: str | Path) -> dict:
    """The checked contents of a packed file."""
    path = Path(path)
    ckpt = models.load_torch_file(path, "packed model")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"packed model {path}: expected a {FORMAT!r} file written by harness.quant.export")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"packed model {path}: {FORMAT} version {ckpt.get('version')}; expected {VERSION}")
    parts = {"layers", "tensors"} <= ckpt.keys() and isinstance(ckpt.get("meta"), dict)
    if not parts or not {"model", "quant", "method", "decisions"} <= ckpt["meta"].keys():
        raise CheckpointError(
            f"packed model {path}: expected meta (model, quant, method, decisions), layers and tensors"
        )
    return ckpt


class _Stored(nn.Module):
    """Stands in for a quantizer's scaling / zero-point module: returns the stored tensor."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.register_buffer("value", value, persistent=False)

    def forward(self, *args):
        return self.value


@torch.no_grad()
def load(path: str | Path, method) -> nn.Module:
    """Rebuild the exported model on the CPU, in eval mode, with outputs equal to the exported one's.

    `method`: the file's method (from its meta's method section, through the registry), whose
    quantizers the stored decisions are swapped in with.
    """
    ckpt = read(path)
    meta = ckpt["meta"]
    if method.name != meta["method"]["name"]:
        raise ConfigError(f"packed model {path}: exported with method {meta['method']['name']!r}, not {method.name!r}")
    model = models.build(meta["model"]["name"], image_size=meta["model"].get("image_size"), device="cpu")
    swap.quantize(model, [Decision(**d) for d in meta["decisions"]], method)
    qlayers = quant_layers(model)
    if set(qlayers) != set(ckpt["layers"]):
        diff = sorted(set(qlayers) ^ set(ckpt["layers"]))
        raise CheckpointError(f"packed model {path}: quantized layers differ from its stored decisions: {diff[:3]}")

    state = dict(ckpt["tensors"])
    stored = {}
    for name, rec in ckpt["layers"].items():
        layer = qlayers[name]
        n = int(np.prod(rec["shape"]))
        codes = unpack(rec["codes"], rec["bits"], n, rec["signed"]).reshape(rec["shape"])
        scale = rec["scale"].to(layer.weight.dtype)
        zp = rec["zero_point"].to(layer.weight.dtype) if rec["zero_point"].numel() else scale.new_zeros(())
        # The same float ops Brevitas uses for the fake-quantized weight: (int - zero_point) * scale.
        state[f"{name}.weight"] = (codes.to(scale.dtype) - zp) * scale
        stored[name] = scale, zp
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"packed model {path}: does not match its meta's model: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    # After load_state_dict: Brevitas re-initialises weight quantizers when a state dict is loaded.
    for name, (scale, zp) in stored.items():
        tensor_quant = qlayers[name].weight_quant.tensor_quant
        tensor_quant.scaling_impl, tensor_quant.zero_point_impl = _Stored(scale), _Stored(zp)
    return model.eval()
