"""Learned quantizer parameters for QAT methods, as Brevitas integer-quant, scaling and zero-point modules.

Methods plug these into Brevitas injectors (`Int8ActPerTensorFloat.let(scaling_impl=LsqActStep,
int_quant=LearnedIntQuant, ...)`), so LSQ, LSQ+ and PACT quantize through the same Quant* layers,
attention quantizers, eval fast path, all-active check and packed export as every other method. A
module that needs its quantizer's scale module (LSQ+'s offset, PACT's int quant) gets it by
constructor injection: Brevitas resolves one tensor_quant with one instance of each dependency, so
`scaling_impl` is the same module the quantizer uses.

Activation modules take part in Brevitas's `calibration_mode` (attributes `counter`,
`collect_stats_steps`, `momentum`, method `init_scale`): the calibration frames initialize them.
Outside calibration mode they initialize from their first training batch (collect_stats_steps=1).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from brevitas.core.quant.int_base import IntQuant
from torch import Tensor

EPS = 1e-8
SAMPLE = 4096  # values kept per calibration batch for LSQ+'s MSE initialization
SAMPLE_MAX = 65536


def int_range(bit_width: int, signed: bool, narrow_range: bool) -> tuple[float, float]:
    """(Qn, Qp) as the lowest and highest integer code, e.g. (-2, 1) for signed 2-bit."""
    bit_width = int(bit_width)
    if not signed:
        return 0.0, float(2**bit_width - 1)
    hi = 2 ** (bit_width - 1) - 1
    return float(-hi if narrow_range else -hi - 1), float(hi)


def grad_scale(t: Tensor, g: float) -> Tensor:
    """`t` in the forward pass, `g` times its gradient in the backward pass (LSQ's gradient scale)."""
    return (t - t * g).detach() + t * g


def _flat_dot(a: Tensor, b: Tensor) -> Tensor:
    return torch.dot(a.reshape(-1), b.reshape(-1).to(a.dtype))


class _FakeQuant(torch.autograd.Function):
    """(clamp(round(x / s + z), Qn, Qp) - z) * s with the LSQ / LSQ+ gradients in closed form.

    v = x / s + z, q the code. Inside the range, rounding passed straight through: d/dx = 1,
    d/ds = q - v, d/dz = 0; clipped: d/dx = 0, d/ds = q - z (LSQ's Qn or Qp when z = 0), d/dz = -s.
    "Inside" is clamp(v) == v: the paper's strict Qn < v < Qp but for v exactly on a bound. One
    fused op each way, with as few passes over the tensor as the gradients allow: Brevitas's chain
    of a dozen elementwise ops (and its round-then-clamp, which counts v in [Qp, Qp + 0.5) as
    inside) made QAT steps 3x FP on the small model, where activations are wide and layers thin.
    Backward keeps x (often kept anyway by the op before) and recomputes v and q from it: keeping
    v, q and the mask cost 9 bytes per element, most of a QAT step's memory at 1024 px.
    """

    @staticmethod
    def _codes(x, scale, zero_point, plain: bool, lo: float, hi: float):
        v = x / scale
        if not plain:
            v = v + zero_point
        clamped = torch.clamp(v, lo, hi)
        return v, clamped, torch.round(clamped)

    @staticmethod
    def forward(ctx, x, scale, zero_point, lo: float, hi: float):
        plain = not zero_point.requires_grad and zero_point.numel() == 1 and float(zero_point) == 0
        _, _, q = _FakeQuant._codes(x, scale, zero_point, plain, lo, hi)
        ctx.save_for_backward(x, scale, zero_point)
        ctx.plain, ctx.lo, ctx.hi = plain, lo, hi
        return q * scale if plain else (q - zero_point) * scale

    @staticmethod
    def backward(ctx, g):
        x, scale, zero_point = ctx.saved_tensors
        v, clamped, q = _FakeQuant._codes(x, scale, zero_point, ctx.plain, ctx.lo, ctx.hi)
        grad_x = g * (clamped == v)
        del clamped
        grad_s = grad_z = None
        if ctx.needs_input_grad[1]:
            if scale.numel() == 1 and ctx.plain:  # sum g * q - sum (g inside) * v, no temporaries
                grad_s = (_flat_dot(g, q) - _flat_dot(grad_x, v)).reshape(scale.shape)
            else:
                grad_s = (g * (q - zero_point) - grad_x * (v - zero_point)).sum_to_size(scale.shape)
        if ctx.needs_input_grad[2]:
            grad_z = ((grad_x - g) * scale).sum_to_size(zero_point.shape)
        return grad_x if ctx.needs_input_grad[0] else None, grad_s, grad_z, None, None


class _ClipFakeQuant(torch.autograd.Function):
    """round(clamp(x / s, Qn, Qp)) * s with s = c / Qp for a learned clip c (per tensor or per output
    channel), and PACT's gradients: d/dx = 1 inside and 0 clipped; a clipped output is q * c / Qp,
    so d/dc = q / Qp there (1 above c, Qn / Qp below the lower bound: -1 for PACT's symmetric
    codes, 0 for unsigned ones) and 0 inside, with no LSQ-like inside term. Backward keeps only
    the side of each element (int8: 1 above the range, -1 below, 0 inside)."""

    @staticmethod
    def forward(ctx, x, clip, scale, lo: float, hi: float):
        v = x / scale
        clamped = torch.clamp(v, lo, hi)
        ctx.save_for_backward(torch.sign(v - clamped).to(torch.int8))
        ctx.lo, ctx.hi, ctx.clip_shape = lo, hi, clip.shape
        return torch.round(clamped) * scale

    @staticmethod
    def backward(ctx, g):
        (over,) = ctx.saved_tensors
        if ctx.lo == -ctx.hi:
            side = over.to(g.dtype)
        else:
            side = (over > 0).to(g.dtype) + (over < 0).to(g.dtype) * (ctx.lo / ctx.hi)
        if len(ctx.clip_shape) == 0 or ctx.clip_shape.numel() == 1:
            grad_c = _flat_dot(g, side).reshape(ctx.clip_shape)
        else:
            grad_c = (g * side).sum_to_size(ctx.clip_shape)
        return g * (over == 0), grad_c, None, None, None


class LearnedIntQuant(IntQuant):
    """Brevitas's IntQuant (same attributes, same eval arithmetic: the fast path and export see no
    difference) whose forward is one fused op with the papers' clamp-then-round gradients."""

    def forward(self, scale: Tensor, zero_point: Tensor, bit_width: Tensor, x: Tensor) -> Tensor:
        lo, hi = int_range(int(bit_width), self.signed, self.narrow_range)
        return _FakeQuant.apply(self.input_view_impl(x), scale, zero_point, lo, hi)


def _reduce_dims(shape, ndim: int) -> list[int]:
    shape = tuple(shape) if len(tuple(shape)) == ndim else (1,) * ndim
    return [d for d in range(ndim) if shape[d] == 1]


class LsqWeightStep(nn.Module):
    """Learned weight step, per output channel: LSQ (Esser et al., ICLR 2020).

    Initialized on the first forward, from the layer's weight (the swap copies the FP weights in
    after building the layer): `lsq` 2 * mean|w| / sqrt(Qp) (the paper), `lsq+` max(|mu - 3 sigma|,
    |mu + 3 sigma|) / 2^(b-1) (LSQ+, Bhalgat et al. 2020), `max` max|w| / Qp (min-max). The gradient
    is scaled by g = 1 / sqrt(N * Qp), N the weights per channel.
    """

    def __init__(self, scaling_shape, bit_width: int, signed: bool, narrow_range: bool, step_init: str = "lsq"):
        super().__init__()
        self.qn, self.qp = int_range(bit_width, signed, narrow_range)
        self.bits, self.step_init = int(bit_width), step_init
        self.value = nn.Parameter(torch.ones(scaling_shape))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def _init(self, w: Tensor) -> None:
        dims = _reduce_dims(self.value.shape, w.dim())
        if self.step_init == "lsq":
            step = 2 * w.abs().mean(dims, keepdim=True) / math.sqrt(self.qp)
        elif self.step_init == "lsq+":
            mu, sigma = w.mean(dims, keepdim=True), w.std(dims, keepdim=True)
            step = torch.maximum((mu - 3 * sigma).abs(), (mu + 3 * sigma).abs()) / 2 ** (self.bits - 1)
        else:
            step = w.abs().amax(dims, keepdim=True) / self.qp
        self.value.copy_(step.reshape(self.value.shape).clamp_min(EPS))
        self.initialized.fill_(True)

    def forward(self, x: Tensor, threshold: Tensor | None = None) -> Tensor:
        if not self.initialized:
            self._init(x.detach())
        step = self.value.clamp_min(EPS)
        if not torch.is_grad_enabled():
            return step
        return grad_scale(step, 1.0 / math.sqrt(x.numel() / self.value.numel() * self.qp))


class _CalibratedAct(nn.Module):
    """Per-tensor activation parameter initialized from statistics of the calibration batches."""

    wants_samples = False

    def __init__(self):
        super().__init__()
        self.counter, self.collect_stats_steps, self.momentum = 0, 1, None
        self.register_buffer("calibrated", torch.zeros((), dtype=torch.bool))
        self.stats: dict[str, Tensor] = {}
        self.samples: list[Tensor] = []

    @torch.no_grad()
    def _collect(self, x: Tensor) -> None:
        x = x.detach().float().reshape(-1)
        new = {"absmean": x.abs().mean(), "absmax": x.abs().max(), "min": x.min(), "max": x.max()}
        if not self.stats:
            self.stats = new
        else:  # a plain average of the batches' mean, an extreme of their extremes
            n = self.counter
            self.stats["absmean"] = (self.stats["absmean"] * n + new["absmean"]) / (n + 1)
            for key, op in (("absmax", torch.maximum), ("min", torch.minimum), ("max", torch.maximum)):
                self.stats[key] = op(self.stats[key], new[key])
        if self.wants_samples and sum(s.numel() for s in self.samples) < SAMPLE_MAX:
            idx = torch.randint(0, x.numel(), (min(SAMPLE, x.numel()),), device=x.device)
            self.samples.append(x[idx])
        self.counter += 1

    def init_scale(self) -> None:
        """Brevitas's calibration_mode calls this on exit; a quantizer that saw no data stays uncalibrated."""
        if 0 < self.counter <= self.collect_stats_steps:
            with torch.no_grad():
                self._init_from_stats()
            self.calibrated.fill_(True)
            self.counter = self.collect_stats_steps + 1
            self.stats, self.samples = {}, []

    def _collecting(self) -> bool:
        if self.training and self.counter < self.collect_stats_steps:
            return True
        if self.counter == self.collect_stats_steps:
            self.init_scale()
        return False

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.calibrated:
            self.counter = self.collect_stats_steps + 1


class LsqActStep(_CalibratedAct):
    """Learned activation step, per tensor: LSQ (Esser et al., ICLR 2020), and LSQ+'s scale.

    `step_init`: `lsq` 2 * mean|x| / sqrt(Qp) (the paper's formula, over the calibration batches),
    `max` max|x| / Qp, `mse` (with LsqOffset, LSQ+ of Bhalgat et al. 2020): scale and offset that
    minimize the squared quantization error of sampled calibration values over shrunk [min, max]
    ranges. Gradient scale g = 1 / sqrt(N * Qp), N the elements of the quantized tensor.
    """

    def __init__(self, bit_width: int, signed: bool, narrow_range: bool, step_init: str = "lsq"):
        super().__init__()
        self.qn, self.qp = int_range(bit_width, signed, narrow_range)
        self.step_init = step_init
        self.wants_samples = step_init == "mse"
        self.value = nn.Parameter(torch.ones(()))
        self.offset_init: Tensor | None = None

    def _init_from_stats(self) -> None:
        s = self.stats
        if self.step_init == "lsq":
            step = 2 * s["absmean"] / math.sqrt(self.qp)
        elif self.step_init == "max":
            step = s["absmax"] / self.qp
        else:
            step, self.offset_init = _mse_range(torch.cat(self.samples), s["min"], s["max"], self.qn, self.qp)
        self.value.copy_(step.clamp_min(EPS))

    def forward(self, x: Tensor, threshold: Tensor | None = None) -> Tensor:
        if self._collecting():
            self._collect(x)
            return (self.stats["absmax"] / self.qp).clamp_min(EPS)
        step = self.value.clamp_min(EPS)
        if not torch.is_grad_enabled():
            return step
        return grad_scale(step, 1.0 / math.sqrt(x.numel() * self.qp))


@torch.no_grad()
def _mse_range(x: Tensor, lo: Tensor, hi: Tensor, qn: float, qp: float, rounds: int = 3, grid: int = 20):
    """(step, offset) of the range [a, b] within [lo, hi] that minimizes mean (x_hat - x)^2.

    Coordinate search: each round tries `grid` shrink factors of one end with the other fixed.
    """
    lo, hi = lo.clone(), hi.clone()
    lo0, hi0 = lo.clone(), hi.clone()

    def err(a, b):
        step = ((b - a) / (qp - qn)).clamp_min(EPS)
        q = torch.clamp(torch.round((x - a) / step + qn), qn, qp)
        return ((q - qn) * step + a - x).pow(2).mean()

    fractions = torch.linspace(0.05, 1.0, grid)
    for _ in range(rounds):
        hi = min((lo + f * (hi0 - lo) for f in fractions), key=lambda b: err(lo, b))
        lo = min((hi + f * (lo0 - hi) for f in fractions), key=lambda a: err(a, hi))
    step = ((hi - lo) / (qp - qn)).clamp_min(EPS)
    return step, lo - qn * step


class LsqOffset(nn.Module):
    """Learned activation offset beta of LSQ+ (Bhalgat et al., CVPR Workshops 2020).

    LSQ+ quantizes x_hat = round(clamp((x - beta) / s, Qn, Qp)) * s + beta; Brevitas computes
    (clamp(round(x / s + z)) - z) * s, which is the same with z = -beta / s. beta is initialized
    with the scale (`LsqActStep` with step_init `mse`) and trained with the same gradient scale.
    """

    def __init__(self, scaling_impl: LsqActStep):
        super().__init__()
        self._owner = [scaling_impl]  # in a list: the step module is registered once, in tensor_quant
        self.value = nn.Parameter(torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def forward(self, x: Tensor, scale: Tensor, bit_width: Tensor) -> Tensor:
        owner = self._owner[0]
        if not self.initialized and owner.calibrated and owner.offset_init is not None:
            with torch.no_grad():
                self.value.copy_(owner.offset_init)
                self.initialized.fill_(True)
        if not owner.calibrated:
            return torch.zeros_like(scale)
        beta = self.value
        if torch.is_grad_enabled():
            beta = grad_scale(beta, 1.0 / math.sqrt(x.numel() * owner.qp))
        return -beta / scale


class PactClip(_CalibratedAct):
    """The learned clip alpha of PACT (Choi et al., 2018), per tensor; returns the step alpha / Qp.

    The step is returned detached: PACT's gradient reaches alpha through `ClipIntQuant` only, as
    1 where x >= alpha (-1 where x <= -alpha for signed inputs) and 0 inside the range. Initialized
    to max|x| over the calibration batches (`alpha_init: max`) or to a constant (the paper: 10).
    """

    def __init__(self, bit_width: int, signed: bool, narrow_range: bool, alpha_init="max"):
        super().__init__()
        self.qn, self.qp = int_range(bit_width, signed, narrow_range)
        if signed and self.qn != -self.qp:
            raise ValueError("PACT's signed clip [-alpha, alpha] needs a narrow (symmetric) code range")
        self.signed, self.alpha_init = signed, alpha_init
        self.value = nn.Parameter(torch.ones(()))

    def _init_from_stats(self) -> None:
        alpha = self.stats["absmax"] if self.alpha_init == "max" else torch.tensor(float(self.alpha_init))
        self.value.copy_(alpha.clamp_min(EPS))

    def forward(self, x: Tensor, threshold: Tensor | None = None) -> Tensor:
        if self._collecting():
            self._collect(x)
            return (self.stats["absmax"] / self.qp).clamp_min(EPS)
        return self.value.detach().clamp_min(EPS) / self.qp

    def clip(self) -> Tensor | None:
        return self.value if self.calibrated else None


class ClipIntQuant(LearnedIntQuant):
    """LearnedIntQuant whose gradient reaches a learned clip: its quantizer's scaling module (PACT's
    PactClip, Q-SAM2's LSC clips; injected), whose `clip()` is the clip with its gradient, or None
    while it has none to learn (uncalibrated)."""

    def __init__(self, narrow_range: bool, signed: bool, input_view_impl: nn.Module, scaling_impl: nn.Module):
        super().__init__(narrow_range=narrow_range, signed=signed, input_view_impl=input_view_impl)
        self._clip = [scaling_impl]  # in a list: the clip module is registered once, in tensor_quant

    def forward(self, scale: Tensor, zero_point: Tensor, bit_width: Tensor, x: Tensor) -> Tensor:
        clip = self._clip[0].clip() if torch.is_grad_enabled() else None
        if clip is None or not clip.requires_grad:
            return super().forward(scale, zero_point, bit_width, x)
        lo, hi = int_range(int(bit_width), self.signed, self.narrow_range)
        return _ClipFakeQuant.apply(self.input_view_impl(x), clip, scale, lo, hi)


def pact_alphas(model: nn.Module) -> list[Tensor]:
    return [m.value for m in model.modules() if isinstance(m, PactClip)]
