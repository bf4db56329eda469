"""Full precision: the unquantized reference, measured in the same suite as every method."""

from harness.quant.policy import Decision
from methods.base import Method, register


@register("fp")
class FP(Method):
    quantizes = False

    def plan(self, ctx):
        # One decision per module, all FP: evaluation's all-active check then asks for nothing.
        ctx.decisions = [
            Decision(d.name, d.kind, d.params, quantize=False, reason="method fp") for d in super().plan(ctx)
        ]
        return ctx.decisions

    def quantize(self, ctx):
        pass

    def calibrate(self, ctx):
        pass
