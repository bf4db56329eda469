"""Learnable Statistical Clipping (LSC) of Q-SAM2 (Farronato et al., "Q-SAM2: Accurate Quantization
for Segment Anything Model 2", arXiv 2506.09782, 2025), as Brevitas scaling modules.

Our reading of the paper (../shared/METHODS.md): the clip is c = alpha * sigma_hat, sigma_hat a
running statistic of the tensor (`std`, `absmean` or `absmax`) updated once per optimizer step t
as sigma_hat_t = m * sigma_hat_{t-1} + (1 - m) * stat_t, stat_t the mean of stat(x) over the
step's training forward calls (Q-SAM2's `on_step`), so that one momentum means one per-step
momentum in every module, whether a step calls it once (the image encoder) or once per frame
(memory attention, the memory encoder). Within step t the clip uses sigma_hat_{t-1}; m = 0 is
the previous step's own statistic. `update: call` (this harness's first reading) moves sigma_hat
at every training forward call instead.
alpha learned through the clamp with PACT's gradient (harness.quant.learned.ClipIntQuant), step
c / Qp. Weights: per output channel, initialized on the first forward from the layer's weight.
Activations: per tensor, initialized from the calibration batches (sigma_hat: the batches' mean
statistic). alpha starts where the clip equals the min-max range (`alpha_init: max`), at the clip
with the least squared quantization error (`mse`: per channel for weights, on sampled calibration
values for activations), or at a given multiple of sigma_hat. sigma_hat is a buffer: evaluation,
checkpoints and the packed export use the last running value.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from harness.quant.learned import EPS, _CalibratedAct, _reduce_dims, int_range
from harness.quant.recompute import statistics_frozen

STATISTICS = ("std", "absmean", "absmax")
UPDATES = ("step", "call")  # when sigma_hat moves: once per optimizer step, or at every forward call
MSE_GRID = 40  # clip candidates f * max|x|, f in (0, 1]


@torch.no_grad()
def mse_clip(x: Tensor, absmax: Tensor, qn: float, qp: float, dims: list[int] | None = None) -> Tensor:
    """The clip c in {f * max|x|} whose quantizer (step c / Qp, codes Qn..Qp) has the least mean
    squared error on x, over `dims` (None: the whole tensor; else one clip per kept index)."""
    dims = list(range(x.dim())) if dims is None else dims
    best, best_err = absmax.clone(), torch.full_like(absmax, float("inf"))
    for f in torch.linspace(1.0 / MSE_GRID, 1.0, MSE_GRID).tolist():
        c = (absmax * f).clamp_min(EPS)
        s = c / qp
        err = (torch.clamp(torch.round(x / s), qn, qp) * s - x).pow(2).mean(dims, keepdim=True)
        better = err < best_err
        best, best_err = torch.where(better, c, best), torch.where(better, err, best_err)
    return best


def statistic(x: Tensor, name: str, dims: list[int] | None = None) -> Tensor:
    """The tensor's statistic over `dims` (None: all of it), kept dims for broadcasting."""
    dims = list(range(x.dim())) if dims is None else dims
    if name == "std":
        return x.std(dims, keepdim=True, correction=0)
    if name == "absmean":
        return x.abs().mean(dims, keepdim=True)
    return x.abs().amax(dims, keepdim=True)


class _Lsc(nn.Module):
    """What the weight and activation clips share: alpha, sigma_hat, the momentum update and the clip."""

    def _setup(self, shape, bit_width, signed, narrow_range, momentum, stat, alpha_init, update):
        self.qn, self.qp = int_range(bit_width, signed, narrow_range)
        self.lsc_momentum, self.stat, self.alpha_init, self.per_call = (
            float(momentum),
            stat,
            alpha_init,
            update == "call",
        )
        self.alpha = nn.Parameter(torch.ones(shape))
        self.register_buffer("sigma", torch.ones(shape))
        # This step's statistic so far, as buffers so that a checkpointed block's rerun in backward
        # starts from (and puts back) the sum as at its first run (harness.quant.recompute).
        self.register_buffer("step_total", torch.zeros(shape), persistent=False)
        self.register_buffer("step_calls", torch.zeros(()), persistent=False)

    @torch.no_grad()
    def _start(self, sigma: Tensor, absmax: Tensor, x: Tensor, dims: list[int] | None = None) -> None:
        """sigma_hat from the first statistic; alpha so that the clip is max|x|, the MSE-best clip on
        x (a per-channel weight, or sampled calibration values), or a given multiple of sigma_hat."""
        sigma = sigma.reshape(self.sigma.shape).clamp_min(EPS)
        self.sigma.copy_(sigma)
        if self.alpha_init == "max":
            self.alpha.copy_(absmax.reshape(sigma.shape) / sigma)
        elif self.alpha_init == "mse":
            self.alpha.copy_(mse_clip(x, absmax, self.qn, self.qp, dims).reshape(sigma.shape) / sigma)
        else:
            self.alpha.fill_(float(self.alpha_init))

    @torch.no_grad()
    def update(self, x: Tensor, dims: list[int] | None = None) -> None:
        """Adds stat(x) to this step's statistic; `end_step` applies it. Micro-batches after the
        first of a step leave it; a checkpointed block's re-run adds to the sum as it was at the
        first run, and the live sum is put back afterwards (harness.quant.recompute)."""
        if statistics_frozen():
            return
        self.step_total.add_(statistic(x.detach().float(), self.stat, dims).reshape(self.sigma.shape))
        self.step_calls.add_(1)
        if self.per_call:
            self.end_step()

    @torch.no_grad()
    def end_step(self) -> bool:
        """sigma_hat <- m * sigma_hat + (1 - m) * (the mean statistic of this step's calls); whether it moved."""
        if not self.step_calls:
            return False
        self.sigma.mul_(self.lsc_momentum).add_((1 - self.lsc_momentum) * self.step_total / self.step_calls)
        self.step_total.zero_()
        self.step_calls.zero_()
        return True

    def current(self) -> Tensor:
        # A copy of sigma_hat: the buffer is updated in place (DDP broadcasts buffers by identity)
        # after the backward that needs this value.
        return (self.alpha * self.sigma.clone()).clamp_min(EPS)

    def clip(self) -> Tensor | None:
        """The clip with its gradient to alpha (ClipIntQuant), None while there is none to learn."""
        return self.current()

    def step(self) -> Tensor:
        return self.current().detach() / self.qp


def end_step(model: nn.Module) -> int:
    """Apply every LSC statistic of the optimizer step that just ended; returns how many moved."""
    return sum(m.end_step() for m in model.modules() if isinstance(m, _Lsc))


class LscWeightClip(_Lsc):
    """LSC clip of a layer's weight, per output channel (Q-SAM2, Farronato et al. 2025)."""

    def __init__(
        self, scaling_shape, bit_width, signed, narrow_range, lsc_momentum, lsc_stat, lsc_alpha_init, lsc_update="step"
    ):
        super().__init__()
        self._setup(scaling_shape, bit_width, signed, narrow_range, lsc_momentum, lsc_stat, lsc_alpha_init, lsc_update)
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def forward(self, x: Tensor, threshold: Tensor | None = None) -> Tensor:
        w = x.detach()
        dims = _reduce_dims(self.alpha.shape, w.dim())
        if not self.initialized:
            self._start(statistic(w, self.stat, dims), w.abs().amax(dims, keepdim=True), w, dims)
            self.initialized.fill_(True)
        elif self.training and torch.is_grad_enabled():
            self.update(w, dims)
        return self.step()


class LscActClip(_CalibratedAct, _Lsc):
    """LSC clip of an activation, per tensor (Q-SAM2, Farronato et al. 2025); calibrated like the
    harness's other learned activation quantizers (Brevitas's calibration_mode)."""

    def __init__(self, bit_width, signed, narrow_range, lsc_momentum, lsc_stat, lsc_alpha_init, lsc_update="step"):
        super().__init__()
        self._setup((), bit_width, signed, narrow_range, lsc_momentum, lsc_stat, lsc_alpha_init, lsc_update)
        self.wants_samples = lsc_alpha_init == "mse"

    def _collect(self, x: Tensor) -> None:
        now = statistic(x.detach().float(), self.stat).reshape(())
        super()._collect(x)
        n = self.counter - 1
        self.stats["stat"] = now if n == 0 else (self.stats["stat"] * n + now) / (n + 1)

    def _init_from_stats(self) -> None:
        samples = torch.cat(self.samples) if self.samples else torch.zeros(1)
        self._start(self.stats["stat"], self.stats["absmax"], samples)

    def forward(self, x: Tensor, threshold: Tensor | None = None) -> Tensor:
        if self._collecting():
            self._collect(x)
            return (self.stats["absmax"] / self.qp).clamp_min(EPS)
        if self.training and torch.is_grad_enabled() and self.calibrated:
            self.update(x)
        return self.step()

    def clip(self) -> Tensor | None:
        return self.current() if self.calibrated else None
