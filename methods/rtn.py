"""Round-to-nearest min-max post-training quantization (the plain PTQ baseline).

Weights: symmetric per output channel, scale from max |w| (Brevitas's MaxStatsScaling).
Activations: per tensor, from statistics collected over the calibration frames
(harness.quant.ranges). `act_range: asymmetric` (the default) maps [min, max] onto unsigned codes
with a zero point, as ../shared/METHODS.md asks where a tensor is not centred (after GELU or
softmax) and as PTQ4SAM's public code does; `symmetric` uses max|x| on signed codes. `act_stat`:
`max` the extremes over all calibration frames, `mean_max` the mean of each frame's extremes
(Brevitas's running reading, this baseline's default before), `percentile` a high percentile of
each frame (Brevitas's percentile scaling; asymmetric: the low percentile 100 - p, too).
"""

from brevitas.quant import (
    Int8ActPerTensorFloat,
    Int8WeightPerChannelFloat,
    ShiftedUint8ActPerTensorFloat,
    Uint8ActPerTensorFloat,
)

from harness.errors import ConfigError
from harness.quant.learned import LearnedIntQuant
from harness.quant.ranges import ACT_STATS, RangeActOffset, RangeActScale
from methods.base import Method, register

RANGES = ("asymmetric", "symmetric")


def range_act(bits: int, signed: bool, act_stat: str = "max"):
    """A fixed calibrated range: signed symmetric, or unsigned with a zero point."""
    if signed:
        return Int8ActPerTensorFloat.let(
            bit_width=bits, scaling_impl=RangeActScale, act_stat=act_stat, int_quant=LearnedIntQuant
        )
    return Uint8ActPerTensorFloat.let(
        bit_width=bits,
        scaling_impl=RangeActScale,
        zero_point_impl=RangeActOffset,
        act_stat=act_stat,
        int_quant=LearnedIntQuant,
    )


@register("rtn")
class RTN(Method):
    defaults = {"vrc": {}, "act_stat": "max", "act_range": "asymmetric", "percentile": 99.999}
    label_keys = (*Method.label_keys, "act_stat", "act_range")

    @classmethod
    def label(cls, params: dict) -> str:
        """The base label, and the activation range where it is not the default: "rtn (symmetric, mean_max)"."""
        shown = [
            str(params[k])
            for k in ("act_range", "act_stat")
            if str(params.get(k)) not in ("nan", "None", str(cls.defaults[k]))
        ]
        return super().label(params) + (f" ({', '.join(shown)})" if shown else "")

    def __init__(self, **params):
        super().__init__(**params)
        stats = (*ACT_STATS, "percentile")
        if self.params["act_stat"] not in stats:
            raise ConfigError(f"method.act_stat: {self.params['act_stat']!r}; expected one of {', '.join(stats)}")
        if self.params["act_range"] not in RANGES:
            raise ConfigError(f"method.act_range: {self.params['act_range']!r}; expected one of {', '.join(RANGES)}")
        if self.params["act_stat"] != "percentile":
            del self.params["percentile"]  # unused: keep it out of run_key
        else:
            self.params["percentile"] = float(self.params["percentile"])

    def weight_quant(self, bits):
        return Int8WeightPerChannelFloat.let(bit_width=bits)

    def act_quant(self, bits):
        signed = self.params["act_range"] == "symmetric"
        if self.params["act_stat"] != "percentile":
            return range_act(bits, signed, self.params["act_stat"])
        p = self.params["percentile"]
        if signed:
            return Int8ActPerTensorFloat.let(bit_width=bits, high_percentile_q=p)
        return ShiftedUint8ActPerTensorFloat.let(bit_width=bits, high_percentile_q=p, low_percentile_q=100 - p)

    def prob_quant(self, bits):
        """Post-softmax probabilities: [0, max] on unsigned codes, max by `act_stat`."""
        stat = self.params["act_stat"] if self.params["act_stat"] != "percentile" else "max"
        return range_act(bits, signed=False, act_stat=stat)
