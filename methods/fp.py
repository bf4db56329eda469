"""Full precision: the unquantized reference, measured in the same suite as every method."""

from methods.base import Method, register


@register("fp")
class FP(Method):
    quantizes = False

    def quantize(self, model, policy):
        return []

    def calibrate(self, model, feed):
        pass
