"""The Method interface, the Context a run's steps share, and the registry harness code reaches methods through.

A run is a line of steps over one Context: plan -> quantize -> calibrate (quantizing methods) ->
train (training methods). Methods import harness.errors and harness.quant.* only; the runner
fills the Context with what needs the rest of harness (models, data, tracking, training loop).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
import torch.nn as nn
from brevitas.core.stats import StatsOp
from brevitas.nn import QuantIdentity
from brevitas.quant import Uint8ActPerTensorFloat

from harness.errors import ConfigError
from harness.quant import policy as quant_policy
from harness.quant import swap, vrc
from harness.quant.attention import Log2Quant
from harness.quant.policy import Decision, QuantPolicy
from harness.quant.state import quantizer_parameters

REGISTRY: dict[str, type[Method]] = {}


def _no_log(metrics: dict, step: int | None = None) -> None:
    pass


def _no_artifact(name: str, text: str) -> None:
    pass


@dataclass
class Context:
    """What the steps of one run share. Fields a step does not need may stay None (bench, tests)."""

    cfg: dict
    student: nn.Module
    policy: QuantPolicy
    make_teacher: Callable[[], nn.Module] | None = None
    # calib_feed(model, frames=None) runs the calibration frames (or the first `frames` of them) through a model
    calib_feed: Callable[..., object] | None = None
    train: Callable[[Method], dict] | None = None  # the runner's training loop
    # evaluate_fp(model) -> (logged metric name, value) on the eval set, for a model with no quantizers
    evaluate_fp: Callable[[nn.Module], tuple[str, float]] | None = None
    log: Callable[..., None] = _no_log  # log(metrics, step=None) to the run's record
    artifact: Callable[[str, str], None] = _no_artifact  # artifact(file name, text) to the run's record
    results_dir: Path | None = None
    checkpoint_dir: Path | None = None  # where training checkpoints of this run go (resume)
    decisions: list[Decision] = field(default_factory=list)

    @cached_property
    def teacher(self) -> nn.Module:
        """The FP model, built on first use: most methods never need it, and it costs a model's memory."""
        if self.make_teacher is None:
            raise ConfigError("this run has no FP teacher (Context.make_teacher is not set)")
        return self.make_teacher()


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


def label(run: dict) -> str:
    """The row label of a run (its recorded params, `method.name` among them) by its method's `label`."""
    name = run["method.name"]
    params = {k.removeprefix("method."): v for k, v in run.items() if k.startswith("method.") and v == v}  # NaN: absent
    return REGISTRY[name].label(params) if name in REGISTRY else name


def from_config(cfg: dict) -> Method:
    """The method of a run config's `method` section ({name, parameters...})."""
    params = dict(cfg)
    return get(params.pop("name"), **params)


class Method:
    """A quantization method: its Brevitas quantizers and its steps over a run's Context.

    The defaults are plain min-max PTQ of the policy as written; fp and rtn show them. Subclasses
    declare their parameters in `defaults`; a suite's `method` section sets them (unknown keys
    are an error; a dict-valued default is merged key by key). A method with a `vrc` default takes
    Q-SAM2's Variance-Reduced Calibration in front of its quantizers (`vrc: {enabled: true}`,
    harness.quant.vrc). Custom behaviour belongs in the quantizers (Brevitas scaling implementations),
    so that every method runs through the same swapped layers, the eval fast path and export.
    """

    name = "base"
    quantizes = True
    trains = False
    defaults: dict = {}
    label_keys: tuple[str, ...] = ("vrc.enabled", "vrc.rows")  # the recorded parameters `label` reads

    @staticmethod
    def vrc_label(params: dict) -> str | None:
        """ "VRC", "VRC-img" for its image-level reading (`rows: image_mean`), None when off."""
        if str(params.get("vrc.enabled")) != "True":
            return None
        return "VRC-img" if str(params.get("vrc.rows")) == "image_mean" else "VRC"

    @classmethod
    def label(cls, params: dict) -> str:
        """A report's row label from a run's recorded `method.*` parameters (dotted, as MLflow
        holds them: strings; absent where the run has no such knob): "rtn + VRC"."""
        vrc_part = cls.vrc_label(params)
        return cls.name + (f" + {vrc_part}" if vrc_part else "")

    def __init__(self, **params):
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            expected = ", ".join(sorted(self.defaults)) or "no parameters"
            raise ConfigError(f"method.{unknown[0]}: unknown parameter for method {self.name!r}; expected {expected}")
        self.params = {**self.defaults, **params}
        for key, default in self.defaults.items():
            if isinstance(default, dict) and isinstance(params.get(key), dict):
                self.params[key] = {**default, **params[key]}
        if "vrc" in self.params:
            self.params["vrc"] = vrc.check(self.params["vrc"])
            if not self.params["vrc"]["enabled"]:
                # Off where it is off by default: out of run_key, so runs without VRC stay what they were.
                if self.defaults["vrc"].get("enabled", False):
                    self.params["vrc"] = {"enabled": False}
                else:
                    del self.params["vrc"]

    def weight_quant(self, bits: int):
        raise NotImplementedError

    def act_quant(self, bits: int):
        raise NotImplementedError

    def prob_quant(self, bits: int):
        """Injector of post-softmax probabilities for the uniform kind: unsigned in [0, max]."""
        return Uint8ActPerTensorFloat.let(bit_width=bits, scaling_stats_op=StatsOp.MAX)

    def softmax_quant(self, bits: int, kind: str):
        """Quantizer module of post-softmax probabilities: `prob_quant`'s, or log2."""
        if kind == "log2":
            return Log2Quant(bits)
        return QuantIdentity(act_quant=self.prob_quant(bits), return_quant_tensor=False)

    def calibration_frames(self) -> int:
        """Calibration frames the method asks for by count (its own `calib_images`, VRC's); the
        preflight refuses a run whose data.calib holds fewer."""
        vrc_params = self.params.get("vrc", {})
        asked = [
            self.params.get("calib_images") or 0,
            vrc_params.get("calib_images", 0) if vrc_params.get("enabled") else 0,
        ]
        return max(asked)

    def plan(self, ctx: Context) -> list[Decision]:
        """Per-module choices before the swap (data-dependent bit maps go here); default: the policy."""
        ctx.decisions = quant_policy.plan(ctx.student, ctx.policy)
        return ctx.decisions

    def quantize(self, ctx: Context) -> None:
        if self.params.get("vrc", {}).get("enabled"):
            self.refit(ctx)
        swap.quantize(ctx.student, ctx.decisions, self)

    def refit(self, ctx: Context) -> list[dict]:
        """VRC's re-fit of the FP student's linear layers, before the swap; logs what it did."""
        if ctx.calib_feed is None:
            raise ConfigError("method.vrc: VRC needs calibration data (this run has no calibration feed)")
        bits = {d.name: d.weight_bits for d in ctx.decisions if d.quantize and d.weight_bits}
        rows = vrc.refit(ctx.student, ctx.calib_feed, self.params["vrc"], bits, seed=ctx.cfg.get("seed", 0))
        ctx.log(vrc.summary(rows))
        if ctx.evaluate_fp is not None:
            # The re-fit FP model before any quantizer: what VRC alone costs (or gains) on the task.
            name, value = ctx.evaluate_fp(ctx.student)
            ctx.log({f"vrc/fp_{name}": value})
        ctx.artifact("vrc_layers.csv", vrc.table(rows))
        return rows

    def calibrate(self, ctx: Context) -> None:
        """PTQ initialisation of the quantizers; default: Brevitas's calibration over the calibration feed."""
        swap.calibrate(ctx.student, lambda: ctx.calib_feed(ctx.student))

    def train(self, ctx: Context) -> dict:
        """Runs only when `trains` and train.steps > 0; returns the training metrics."""
        return ctx.train(self)

    def param_groups(self, model: nn.Module) -> list[dict]:
        """Optimizer groups: "model" (weights, biases, norms) and "quant" (scales, clips, offsets)."""
        quant = [p for p in quantizer_parameters(model).values() if p.requires_grad]
        ids = {id(p) for p in quant}
        own = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
        return [{"name": "model", "params": own}, {"name": "quant", "params": quant}]

    def loss_terms(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Extra loss terms added to the training loss (a clip penalty, say), each a scalar."""
        return {}

    def on_step(self, model: nn.Module, step: int) -> None:
        """Called after each optimizer step."""


def ptq(method: Method, model: nn.Module, policy: QuantPolicy, feed=None) -> Context:
    """plan, quantize and, given `feed(model)`, calibrate a model outside a run (bench, tests)."""
    ctx = Context(cfg={}, student=model, policy=policy, calib_feed=feed)
    method.plan(ctx)
    method.quantize(ctx)
    if feed is not None and method.quantizes:
        method.calibrate(ctx)
    return ctx
