"""Fixed activation ranges from calibration statistics: the min-max quantizer of the PTQ baselines.

Per tensor, asymmetric by default: the range [min(lo, 0), max(hi, 0)] maps onto the unsigned codes
0..2^b - 1 with an integer zero point, so that a one-sided input (after GELU: about [-0.17, 4.4])
spends its codes where its values are (../shared/METHODS.md; PTQ4SAM's public code quantizes
activations the same way). Symmetric: max(|lo|, |hi|) / Qp on signed codes. `act_stat`:

- `max`: lo and hi are the extremes over all calibration batches (the maximum, as the name says);
- `mean_max`: the mean over batches of each batch's extremes (what Brevitas's calibration of
  `StatsOp.MAX` gives: per-batch maxima 1, 2, 10, 1 make a range of 3.5, not 10).

A batch is one forward call of the quantizer (the calibration feed runs one frame at a time).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from harness.quant.learned import EPS, _CalibratedAct, int_range

ACT_STATS = ("max", "mean_max")


class RangeActScale(_CalibratedAct):
    """Scale of a fixed per-tensor range (and, asymmetric, its zero point for RangeActOffset)."""

    def __init__(self, bit_width: int, signed: bool, narrow_range: bool, act_stat: str = "max"):
        super().__init__()
        if act_stat not in ACT_STATS:
            raise ValueError(f"act_stat {act_stat!r}; expected one of {ACT_STATS}")
        self.qn, self.qp = int_range(bit_width, signed, narrow_range)
        self.signed, self.act_stat = signed, act_stat
        # A parameter, as Brevitas's calibrated scales are: block reconstruction learns it (ptq4sam's
        # recon); no method trains it.
        self.value = nn.Parameter(torch.ones(()))
        self.register_buffer("zero_point", torch.zeros(()))

    @torch.no_grad()
    def _collect(self, x: Tensor) -> None:
        lo, hi = torch.aminmax(x.detach().float())
        if not self.stats:
            self.stats = {"lo": lo, "hi": hi, "lo_sum": lo, "hi_sum": hi}
        else:
            s = self.stats
            s["lo"], s["hi"] = torch.minimum(s["lo"], lo), torch.maximum(s["hi"], hi)
            s["lo_sum"], s["hi_sum"] = s["lo_sum"] + lo, s["hi_sum"] + hi
        self.counter += 1

    def _range(self) -> tuple[Tensor, Tensor]:
        s = self.stats
        if self.act_stat == "max":
            return s["lo"], s["hi"]
        return s["lo_sum"] / self.counter, s["hi_sum"] / self.counter

    def _init_from_stats(self) -> None:
        lo, hi = self._range()
        lo, hi = lo.clamp_max(0), hi.clamp_min(0)  # zero stays exactly representable
        if self.signed:
            self.value.copy_((torch.maximum(-lo, hi) / self.qp).clamp_min(EPS))
            return
        scale = ((hi - lo) / (self.qp - self.qn)).clamp_min(EPS)
        self.value.copy_(scale)
        self.zero_point.copy_(torch.round(-lo / scale))

    def forward(self, x: Tensor, threshold: Tensor | None = None) -> Tensor:
        if self._collecting():
            self._collect(x)
            lo, hi = self._range()
            return (torch.maximum(-lo, hi) / self.qp).clamp_min(EPS)
        return self.value.clamp_min(EPS)


class RangeActOffset(nn.Module):
    """Zero point of RangeActScale's asymmetric range, in Brevitas's convention (codes round(x / s + z))."""

    def __init__(self, scaling_impl: RangeActScale):
        super().__init__()
        self._owner = [scaling_impl]  # in a list: the scale module is registered once, in tensor_quant

    def forward(self, x: Tensor, scale: Tensor, bit_width: Tensor) -> Tensor:
        owner = self._owner[0]
        return owner.zero_point.to(scale) if owner.calibrated else torch.zeros_like(scale)
