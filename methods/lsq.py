"""LSQ and LSQ+: quantization-aware training with learned step sizes.

LSQ (Esser et al., "Learned Step Size Quantization", ICLR 2020): a learned step per output
channel for weights and per tensor for activations (layer inputs, attention q/k/v and the
post-softmax probabilities), gradients scaled by g = 1 / sqrt(N * Qp), straight-through rounding
after clamping. Step initialization 2 * mean|x| / sqrt(Qp) (`step_init: lsq`, the paper's; for
activations averaged over the calibration batches) or from the calibration maximum (`max`).
Post-softmax probabilities always start from their maximum: 2 * mean|p| / sqrt(Qp) with mean p =
1 / tokens would clip nearly every attention peak.

LSQ+ (`plus: true`; Bhalgat et al., "LSQ+: Improving low-bit quantization through learnable
offsets and better initialization", CVPR Workshops 2020): activations asymmetric (unsigned codes)
with a learned offset beta, scale and offset initialized by minimizing the calibration MSE, and
weight steps initialized to max(|mu - 3 sigma|, |mu + 3 sigma|) / 2^(b-1).

Weights are signed with the full code range (2-bit: -2..1), as in the paper. Trained with the
harness's loop (harness.train): weights at train.lr, steps and offsets at train.quant_lr.
"""

from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat

from harness.errors import ConfigError
from harness.quant.learned import LearnedIntQuant, LsqActStep, LsqOffset, LsqWeightStep
from methods.base import Method, register


@register("lsq")
class LSQ(Method):
    trains = True
    defaults = {"vrc": {}, "plus": False, "step_init": "lsq"}

    def __init__(self, **params):
        super().__init__(**params)
        if self.params["step_init"] not in ("lsq", "max"):
            raise ConfigError(f"method.step_init: {self.params['step_init']!r}; expected 'lsq' or 'max'")
        if not isinstance(self.params["plus"], bool):
            raise ConfigError(f"method.plus: {self.params['plus']!r}; expected true or false")
        if self.params["plus"]:
            del self.params["step_init"]  # LSQ+ has its own initialization: keep it out of run_key

    def weight_quant(self, bits):
        init = "lsq+" if self.params["plus"] else self.params["step_init"]
        return Int8WeightPerChannelFloat.let(
            bit_width=bits,
            narrow_range=False,
            scaling_impl=LsqWeightStep,
            step_init=init,
            int_quant=LearnedIntQuant,
        )

    def _act(self, bits, signed, step_init):
        quant = Int8ActPerTensorFloat.let(
            bit_width=bits,
            signed=signed,
            narrow_range=False,
            scaling_impl=LsqActStep,
            step_init=step_init,
            int_quant=LearnedIntQuant,
        )
        return quant.let(zero_point_impl=LsqOffset) if step_init == "mse" else quant

    def act_quant(self, bits):
        if self.params["plus"]:
            return self._act(bits, signed=False, step_init="mse")
        return self._act(bits, signed=True, step_init=self.params["step_init"])

    def prob_quant(self, bits):
        return self._act(bits, signed=False, step_init="max")
