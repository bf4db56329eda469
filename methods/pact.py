"""PACT: parameterized clipping activation (Choi et al., "PACT: Parameterized Clipping Activation
for Quantized Neural Networks", arXiv 1805.06085, 2018).

Activations (layer inputs, attention q/k/v, post-softmax probabilities) are clipped to a learned
alpha per tensor, [-alpha, alpha] for signed inputs (symmetric codes) and [0, alpha] for the
probabilities, then quantized uniformly with step alpha / Qp. alpha gets PACT's gradient exactly
(1 where x >= alpha, -1 where x <= -alpha, 0 inside), not the LSQ-like inside term Brevitas's
learned thresholds add; the L2 penalty `alpha_l2` * sum(alpha^2) joins the training loss.
alpha starts at the calibration max |x| (`alpha_init: max`) or a constant (the paper uses 10).

Weights: per-output-channel min-max (the rtn baseline's scale, max|w| / Qp, straight-through to
the FP weights), not the paper's DoReFa weights, so that PACT differs from rtn only in its
activations.
"""

import torch
from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat

from harness.errors import ConfigError
from harness.quant.learned import ClipIntQuant, LearnedIntQuant, PactClip, pact_alphas
from methods.base import Method, register


@register("pact")
class PACT(Method):
    trains = True
    defaults = {"vrc": {}, "alpha_init": "max", "alpha_l2": 2e-4}

    def __init__(self, **params):
        super().__init__(**params)
        init = self.params["alpha_init"]
        if init != "max" and not (isinstance(init, (int, float)) and init > 0):
            raise ConfigError(f"method.alpha_init: {init!r}; expected 'max' or a positive number")
        if not isinstance(self.params["alpha_l2"], (int, float)) or self.params["alpha_l2"] < 0:
            raise ConfigError(f"method.alpha_l2: {self.params['alpha_l2']!r}; expected a number >= 0")

    def weight_quant(self, bits):
        # rtn's quantizer, through the fused fake-quant op (a QAT step calls it on every forward)
        return Int8WeightPerChannelFloat.let(bit_width=bits, int_quant=LearnedIntQuant)

    def _act(self, bits, signed):
        return Int8ActPerTensorFloat.let(
            bit_width=bits,
            signed=signed,
            narrow_range=signed,
            scaling_impl=PactClip,
            alpha_init=self.params["alpha_init"],
            int_quant=ClipIntQuant,
        )

    def act_quant(self, bits):
        return self._act(bits, signed=True)

    def prob_quant(self, bits):
        return self._act(bits, signed=False)

    def loss_terms(self, model):
        alphas = pact_alphas(model)
        if not alphas or not self.params["alpha_l2"]:
            return {}
        return {"alpha_l2": self.params["alpha_l2"] * torch.stack([a.pow(2) for a in alphas]).sum()}
