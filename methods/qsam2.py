"""Q-SAM2 (Farronato et al., "Q-SAM2: Accurate Quantization for Segment Anything Model 2", arXiv
2506.09782, 2025): Variance-Reduced Calibration (VRC) and Learnable Statistical Clipping (LSC).

- `qsam2_vrc`: VRC alone as post-training quantization: the image encoder's linear layers re-fit
  in closed form from the calibration frames (harness.quant.vrc), then rtn's min-max quantizers.
- `qsam2`: VRC as initialization, then QAT with LSC clips (harness.quant.lsc): weights per output
  channel and activations (layer inputs, attention q/k/v, post-softmax probabilities) per tensor,
  clip = alpha * running statistic with momentum `lsc.momentum` (updated once per optimizer step;
  `lsc.update: call` moves it at every forward call, this harness's first reading), alpha learned with PACT's clip
  gradient at `lsc.lr` (None: train.quant_lr). Where LSC is switched off (`lsc.weights`,
  `lsc.acts`), that tensor gets rtn's min-max quantizer, not learned (the weights still train):
  the parts ablation (VRC only, LSC only, both) changes one thing at a time.

Weights use the full signed code range (2-bit: -2..1, as LSQ). The paper's text gives the idea,
not every constant; the knobs and their defaults are ours (../shared/METHODS.md).
"""

from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat, Uint8ActPerTensorFloat

from harness.errors import ConfigError
from harness.quant.learned import ClipIntQuant, LearnedIntQuant
from harness.quant.lsc import STATISTICS, UPDATES, LscActClip, LscWeightClip, end_step
from methods.base import Method, register
from methods.rtn import RTN, range_act

LSC_DEFAULTS = {
    "weights": True,
    "acts": True,
    "momentum": 0.9,
    "stat": "std",
    "alpha_init": "mse",
    "lr": None,
    "update": "step",
}


def _check_lsc(p) -> dict:
    if not isinstance(p, dict):
        raise ConfigError(f"method.lsc: {p!r}; expected a mapping of LSC settings ({', '.join(LSC_DEFAULTS)})")
    unknown = sorted(set(p) - set(LSC_DEFAULTS))
    if unknown:
        raise ConfigError(f"method.lsc.{unknown[0]}: unknown LSC setting; expected one of {', '.join(LSC_DEFAULTS)}")
    p = {**LSC_DEFAULTS, **p}

    def num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    checks = {
        "weights": (lambda v: isinstance(v, bool), "true or false"),
        "acts": (lambda v: isinstance(v, bool), "true or false"),
        "momentum": (lambda v: num(v) and 0 <= v < 1, "a number in [0, 1)"),
        "stat": (lambda v: v in STATISTICS, " or ".join(map(repr, STATISTICS))),
        "alpha_init": (lambda v: v in ("max", "mse") or (num(v) and v > 0), "'max', 'mse' or a number > 0"),
        "lr": (lambda v: v is None or (num(v) and v > 0), "null or a number > 0"),
        "update": (lambda v: v in UPDATES, " or ".join(map(repr, UPDATES))),
    }
    for key, (ok, expected) in checks.items():
        if not ok(p[key]):
            raise ConfigError(f"method.lsc.{key}: {p[key]!r}; expected {expected}")
    return p


@register("qsam2_vrc")
class QSam2Vrc(RTN):
    """VRC alone, as post-training quantization with rtn's quantizers (Farronato et al. 2025)."""

    defaults = {**RTN.defaults, "vrc": {"enabled": True}}


@register("qsam2")
class QSam2(Method):
    """VRC initialization + LSC quantization-aware training (Farronato et al. 2025)."""

    trains = True
    defaults = {"vrc": {"enabled": True}, "lsc": {}}
    label_keys = ("vrc.enabled", "vrc.rows", "lsc.weights", "lsc.acts")

    @classmethod
    def label(cls, params: dict) -> str:
        """The Q-SAM2 parts a run uses: "qsam2 (VRC+LSC)", "qsam2 (LSC-W)", "qsam2 (min-max QAT)"."""
        vrc = [v for v in [cls.vrc_label(params)] if v]
        lsc = [p for p, key in (("W", "lsc.weights"), ("A", "lsc.acts")) if str(params.get(key)) == "True"]
        parts = vrc + (["LSC"] if len(lsc) == 2 else [f"LSC-{p}" for p in lsc])
        return f"qsam2 ({'+'.join(parts) or 'min-max QAT'})"

    def __init__(self, **params):
        super().__init__(**params)
        self.params["lsc"] = _check_lsc(self.params["lsc"])

    def _lsc(self):
        p = self.params["lsc"]
        return {
            "lsc_momentum": float(p["momentum"]),
            "lsc_stat": p["stat"],
            "lsc_alpha_init": p["alpha_init"],
            "lsc_update": p["update"],
        }

    def weight_quant(self, bits):
        if not self.params["lsc"]["weights"]:
            return Int8WeightPerChannelFloat.let(bit_width=bits, int_quant=LearnedIntQuant)
        return Int8WeightPerChannelFloat.let(
            bit_width=bits, narrow_range=False, scaling_impl=LscWeightClip, int_quant=ClipIntQuant, **self._lsc()
        )

    def _act(self, bits, signed):
        if not self.params["lsc"]["acts"]:
            return range_act(bits, signed=False)  # rtn's: asymmetric min-max
        base = Int8ActPerTensorFloat if signed else Uint8ActPerTensorFloat
        return base.let(
            bit_width=bits, narrow_range=False, scaling_impl=LscActClip, int_quant=ClipIntQuant, **self._lsc()
        )

    def act_quant(self, bits):
        return self._act(bits, signed=True)

    def prob_quant(self, bits):
        return self._act(bits, signed=False)

    def on_step(self, model, step):
        end_step(model)  # LSC's running statistics move once per optimizer step

    def param_groups(self, model):
        """The layers' own parameters, and the LSC alphas; rtn's scales (LSC switched off) stay fixed."""
        clips = [m.alpha for m in model.modules() if isinstance(m, (LscWeightClip, LscActClip))]
        quant = {"name": "quant", "params": clips}
        if self.params["lsc"]["lr"] is not None:
            quant["lr"] = float(self.params["lsc"]["lr"])
        model_group = super().param_groups(model)[0]
        return [model_group, quant]
