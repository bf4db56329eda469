"""The Method interface and the registry that harness code reaches methods through."""

from __future__ import annotations

from brevitas.core.stats import StatsOp
from brevitas.nn import QuantIdentity
from brevitas.quant import Uint8ActPerTensorFloat

from harness.errors import ConfigError
from harness.quant import swap
from harness.quant.attention import Log2Quant
from harness.quant.policy import Decision, QuantPolicy

REGISTRY: dict[str, type[Method]] = {}


def register(name: str):
    def deco(cls):
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return deco


def get(name: str, **params) -> Method:
    if name not in REGISTRY:
        raise ConfigError(f"method.name: unknown method {name!r}; expected one of {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name](**params)


def from_config(cfg: dict) -> Method:
    """The method of a run config's `method` section ({name, parameters...})."""
    params = dict(cfg)
    return get(params.pop("name"), **params)


class Method:
    """A quantization method: which Brevitas quantizers, how to calibrate, whether it trains.

    Subclasses declare their parameters as class attributes in `defaults`; a suite's `method`
    section sets them (unknown keys are an error).
    """

    name = "base"
    quantizes = True
    trains = False
    defaults: dict = {}

    def __init__(self, **params):
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            expected = ", ".join(sorted(self.defaults)) or "no parameters"
            raise ConfigError(f"method.{unknown[0]}: unknown parameter for method {self.name!r}; expected {expected}")
        self.params = {**self.defaults, **params}

    def weight_quant(self, bits: int):
        raise NotImplementedError

    def act_quant(self, bits: int):
        raise NotImplementedError

    def softmax_quant(self, bits: int, kind: str):
        """Quantizer module of post-softmax probabilities: unsigned uniform in [0, max] or log2."""
        if kind == "log2":
            return Log2Quant(bits)
        act_quant = Uint8ActPerTensorFloat.let(bit_width=bits, scaling_stats_op=StatsOp.MAX)
        return QuantIdentity(act_quant=act_quant, return_quant_tensor=False)

    def quantize(self, model, policy: QuantPolicy) -> list[Decision]:
        return swap.quantize(model, policy, self)

    def calibrate(self, model, feed) -> None:
        """`feed()` runs the calibration frames through `model`."""
        swap.calibrate(model, feed)
