"""Mix-QSAM mixed-precision PTQ (Ranjan and Savakis, "Mix-QSAM: Mixed-Precision Quantization of the
Segment Anything Model", CVPR Workshops 2025).

`plan` measures each quantized Linear / Conv layer's importance (KL of the mask output with the
layer removed) and the synergy of adjacent layers on `calib_images` calibration frames
(harness.quant.mixqsam; `normalize: per_image` is the paper's order, normalized over layers per
image then averaged, `pooled` this harness's first one), then picks every layer's bits b_i (weights
and layer input alike) from `candidates` (default target - 2 .. target + 2, target =
quant.weight_bits) by maximizing sum Omega_i b_i - `penalty` * sum S_i |b_i - b_{i+1}| under a
parameter-bits budget (target x params) and a BOPs budget (target^2 x MACs), each at least
`budget_use` used, solved exactly (harness.quant.allocate). Attention q/k/v and softmax keep the
policy's bits. The bit map is the run's decisions: logged as the artifact `bit_map.csv`, stored in
the packed export (which reloads it exactly), and quantized by the `base` method's quantizers (rtn
or ptq4sam).
"""

from harness.errors import ConfigError
from harness.quant import allocate, mixqsam
from methods.base import Context, Method, get, register


@register("mixqsam")
class MixQSAM(Method):
    defaults = {
        "base": "rtn",
        "candidates": None,
        "penalty": 0.1,
        "eps": 0.01,
        "budget_use": 0.95,
        "calib_images": 16,
        "normalize": "per_image",
    }

    def __init__(self, **params):
        super().__init__(**params)
        p = self.params
        if p["base"] not in ("rtn", "ptq4sam"):
            raise ConfigError(f"method.base: {p['base']!r}; expected 'rtn' or 'ptq4sam'")
        c = p["candidates"]
        if c is not None and not (isinstance(c, list) and c and all(isinstance(b, int) and 2 <= b <= 16 for b in c)):
            raise ConfigError(f"method.candidates: {c!r}; expected null or a list of bit-widths in 2..16")
        for key, lo, hi in (("penalty", 0, None), ("eps", 0, None), ("budget_use", 0, 1)):
            v = p[key]
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
                raise ConfigError(f"method.{key}: {v!r}; expected a number >= {lo}" + (f" and <= {hi}" if hi else ""))
        if not isinstance(p["calib_images"], int) or isinstance(p["calib_images"], bool) or p["calib_images"] < 1:
            raise ConfigError(f"method.calib_images: {p['calib_images']!r}; expected an integer >= 1")
        if p["normalize"] not in mixqsam.NORMALIZATIONS:
            raise ConfigError(
                f"method.normalize: {p['normalize']!r}; expected one of {', '.join(mixqsam.NORMALIZATIONS)}"
            )
        self.base = get(p["base"])

    def plan(self, ctx: Context) -> list:
        decisions = super().plan(ctx)
        if ctx.calib_feed is None:
            raise ConfigError("method.name: mixqsam plans its bits on calibration data (this run has none)")
        layers = [d for d in decisions if d.quantize and d.weight_bits]
        names, target = [d.name for d in layers], ctx.policy.weight_bits
        candidates = self.params["candidates"] or [b for b in range(target - 2, target + 3) if 2 <= b <= 16]
        n = self.params["calib_images"]
        raw = mixqsam.removal_kl(ctx.student, names, ctx.calib_feed, n)
        omega = mixqsam.importance(raw, self.params["normalize"])
        costs = mixqsam.macs(ctx.student, names, ctx.calib_feed, n)
        if self.params["normalize"] == "per_image":
            synergy = mixqsam.synergy_per_image(raw, self.params["eps"])
        else:
            synergy = mixqsam.synergy(omega, self.params["eps"])
        params = [d.params for d in layers]
        p = self.params
        alloc = allocate.solve(omega, params, costs, synergy, candidates, target, p["penalty"], p["budget_use"])
        rows = ["layer,params,macs,importance,bits"]
        for d, o, m, b in zip(layers, omega, costs, alloc.bits, strict=True):
            d.weight_bits = d.act_bits = b
            d.reason = f"mixqsam {b} bits"
            rows.append(f"{d.name},{d.params},{m:.0f},{o:.6g},{b}")
        ctx.artifact("bit_map.csv", "\n".join(rows) + "\n")
        ctx.log(
            {
                "mixqsam/avg_bits": alloc.param_bits / max(sum(params), 1),
                "mixqsam/param_budget_use": alloc.param_bits / (target * sum(params)),
                "mixqsam/bops_budget_use": alloc.bops / (target**2 * sum(costs)),
            }
        )
        return decisions

    # The base method's quantizers and PTQ steps on the planned bits.
    def weight_quant(self, bits):
        return self.base.weight_quant(bits)

    def act_quant(self, bits):
        return self.base.act_quant(bits)

    def softmax_quant(self, bits, kind):
        return self.base.softmax_quant(bits, kind)

    def quantize(self, ctx: Context) -> None:
        self.base.quantize(ctx)

    def calibrate(self, ctx: Context) -> None:
        self.base.calibrate(ctx)
