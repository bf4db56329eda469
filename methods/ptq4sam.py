"""PTQ4SAM-style post-training quantization (Lv et al., "PTQ4SAM: Post-Training Quantization for
Segment Anything", CVPR 2024).

- BIG (`big`): in the mask decoder's token-to-image attentions, keys found bimodal (a kernel
  density estimate with two peaks; `big_detector: official` is the public code's rule on the first
  calibration frame, `wide` this harness's first one, harness.quant.big) have each channel's sign
  folded into the key and query projections before quantization; FP outputs are unchanged, and
  the asymmetric key quantizer then fits one mode.
- AGQ (`agq`): every quantized attention's post-softmax probabilities get a log2 quantizer whose
  granularity tau (from `taus`) and scale (in [0.01, 1] x max, the public code's bounds) are
  searched on the calibration frames against || x_hat V - x V ||. This replaces the policy's
  softmax quantizer kind; an attention the calibration frames never reach is an error.
- Weights per output channel, symmetric, with the range searched by MSE (`weight_range: mse`; `max`
  is rtn's); activations per tensor, asymmetric (rtn's min-max with a zero point, or a percentile).
- `calib_images` frames (the paper: 32) feed BIG, AGQ and reconstruction; Brevitas's activation
  calibration uses the run's `data.calib.frames`.
- Optional block reconstruction after calibration (`recon: {enabled: true}`, the paper's BRECQ /
  QDrop step; harness.quant.reconstruct): block by block (`recon.blocks`, default the image
  encoder's Hiera blocks and the mask decoder's two-way layers), the block's activation quantizer
  steps (not the weights' steps, not AdaRound's rounding) are learned for `recon.iters` Adam
  steps at `recon.lr` (relative: on log(step)) so that its outputs match the FP
  teacher's on the calibration frames, with QDrop's drop (`recon.drop_prob`) inside the block
  during those steps only. Per-block output errors before and after go to the artifact
  `recon.csv` and their means to the run's metrics (recon/...). Off by default, and then absent
  from the parameters, so that the run_key of runs without it stays what it was.

Every quantizer is active at evaluation, as the harness checks for every method (the paper's
public code left half of its activation quantizers disabled there, a QDrop drop probability left
at 0.5); here the drop exists only as hooks inside the reconstruction loop.
"""

from brevitas.quant import Int8WeightPerChannelFloat

from harness.errors import ConfigError
from harness.quant import agq, big, reconstruct
from harness.quant.attention import Log2Quant
from harness.quant.ptq4sam import MseWeightStep, integrate_bimodal, search_granularity
from methods.base import Context, register
from methods.rtn import RTN


@register("ptq4sam")
class PTQ4SAM(RTN):
    defaults = {
        **{k: v for k, v in RTN.defaults.items() if k != "vrc"},
        "big": True,
        "big_detector": "official",
        "agq": True,
        "taus": list(agq.TAUS),
        "weight_range": "mse",
        "calib_images": 32,
        "recon": {},
    }

    def __init__(self, **params):
        super().__init__(**params)
        p = self.params
        for key in ("big", "agq"):
            if not isinstance(p[key], bool):
                raise ConfigError(f"method.{key}: {p[key]!r}; expected true or false")
        if p["big_detector"] not in big.DETECTORS:
            raise ConfigError(f"method.big_detector: {p['big_detector']!r}; expected one of {', '.join(big.DETECTORS)}")
        if not (isinstance(p["taus"], list) and p["taus"] and all(isinstance(t, int) and t > 0 for t in p["taus"])):
            raise ConfigError(f"method.taus: {p['taus']!r}; expected a list of positive integers, e.g. [1, 2, 4]")
        if p["weight_range"] not in ("mse", "max"):
            raise ConfigError(f"method.weight_range: {p['weight_range']!r}; expected 'mse' or 'max'")
        if not isinstance(p["calib_images"], int) or isinstance(p["calib_images"], bool) or p["calib_images"] < 1:
            raise ConfigError(f"method.calib_images: {p['calib_images']!r}; expected an integer >= 1")
        p["recon"] = reconstruct.check(p["recon"])
        if not p["recon"]["enabled"]:
            del p["recon"]  # off: out of run_key, so runs without reconstruction stay what they were

    def weight_quant(self, bits):
        if self.params["weight_range"] == "max":
            return super().weight_quant(bits)
        return Int8WeightPerChannelFloat.let(bit_width=bits, scaling_impl=MseWeightStep)

    def softmax_quant(self, bits, kind):
        return Log2Quant(bits, needs_fit=True) if self.params["agq"] else super().softmax_quant(bits, kind)

    def quantize(self, ctx: Context) -> None:
        if self.params["big"]:
            if ctx.calib_feed is None:
                raise ConfigError("method.big: BIG needs calibration data (this run has no calibration feed)")
            p = self.params
            folded = integrate_bimodal(ctx.student, ctx.calib_feed, p["calib_images"], p["big_detector"])
            ctx.log({"big/bimodal_modules": float(sum(folded.values())), "big/modules": float(len(folded))})
        super().quantize(ctx)

    def calibrate(self, ctx: Context) -> None:
        super().calibrate(ctx)
        if self.params["agq"] and ctx.calib_feed is not None:
            chosen = search_granularity(ctx.student, ctx.calib_feed, self.params["calib_images"], self.params["taus"])
            lines = ["module,tau,scale,error"] + [f"{n},{t:g},{s:.6g},{e:.6g}" for n, (t, s, e) in chosen.items()]
            ctx.artifact("agq.csv", "\n".join(lines) + "\n")
            if chosen:
                taus = [t for t, _, _ in chosen.values()]
                ctx.log({f"agq/tau{t}_modules": float(taus.count(t)) for t in self.params["taus"]})
        if "recon" in self.params:
            self.reconstruct(ctx)

    def reconstruct(self, ctx: Context) -> list[dict]:
        """Block reconstruction against the FP teacher (harness.quant.reconstruct); logs what it did."""
        if ctx.calib_feed is None:
            raise ConfigError("method.recon: reconstruction needs calibration data (this run has no calibration feed)")
        built = "teacher" in ctx.__dict__
        rows = reconstruct.reconstruct(
            ctx.student,
            ctx.teacher,
            ctx.calib_feed,
            self.params["calib_images"],
            self.params["recon"],
            seed=ctx.cfg.get("seed", 0),
        )
        if not built:  # built here for this step only: free its memory before evaluation
            del ctx.__dict__["teacher"]
        ctx.artifact("recon.csv", reconstruct.table(rows))
        ctx.log(reconstruct.summary(rows))
        return rows
