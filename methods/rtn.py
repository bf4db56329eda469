"""Round-to-nearest min-max post-training quantization (the plain PTQ baseline).

Weights: symmetric per output channel, scale from max |w| (Brevitas's MaxStatsScaling).
Activations: symmetric per tensor, scale from statistics collected over the calibration frames,
either the absolute maximum or a high percentile of |x| (`act_stat`).
"""

from brevitas.core.stats import StatsOp
from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat

from harness.errors import ConfigError
from methods.base import Method, register


@register("rtn")
class RTN(Method):
    defaults = {"vrc": {}, "act_stat": "max", "percentile": 99.999}

    def __init__(self, **params):
        super().__init__(**params)
        if self.params["act_stat"] not in ("max", "percentile"):
            raise ConfigError(f"method.act_stat: {self.params['act_stat']!r}; expected 'max' or 'percentile'")
        if self.params["act_stat"] == "max":
            del self.params["percentile"]  # unused: keep it out of run_key
        else:
            self.params["percentile"] = float(self.params["percentile"])

    def weight_quant(self, bits):
        return Int8WeightPerChannelFloat.let(bit_width=bits)

    def act_quant(self, bits):
        if self.params["act_stat"] == "max":
            return Int8ActPerTensorFloat.let(bit_width=bits, scaling_stats_op=StatsOp.MAX)
        return Int8ActPerTensorFloat.let(bit_width=bits, high_percentile_q=self.params["percentile"])
