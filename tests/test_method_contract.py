"""Every registered method holds to the Method contract (methods.base), on the small model.

plan -> quantize -> calibrate over one Context: one decision per swappable module, every
quantizer active afterwards (fp: the model untouched), optimizer groups made of the model's own
parameters, finite scalar loss terms; and the import rule that keeps dependencies one way.
"""

import ast
import math
import sys
import types
from pathlib import Path

import pytest
import torch

import methods
from harness import models, runner
from harness.config import base_config
from harness.data import synthetic
from harness.data.davis import DavisDataset
from harness.evaluate import vos
from harness.quant import state
from harness.quant.attention import ATTENTION_TYPES
from harness.quant.policy import SWAPPABLE, QuantPolicy
from harness.quant.swap import quant_layers
from harness.tracking import flatten
from methods.fp import FP
from methods.rtn import RTN

ROOT = Path(__file__).resolve().parents[1]
TINY_DATA = [
    "data.synthetic.sequences=2",
    "data.synthetic.frames=3",
    "data.synthetic.size=96x64",
    "data.calib.frames=2",
]


@pytest.fixture(scope="module")
def calib_feed(tmp_path_factory):
    root = synthetic.generate(
        tmp_path_factory.mktemp("data") / "davis", sequences=2, frames=3, size=(96, 64), objects=(1, 1)
    )
    ds = DavisDataset(root, "train")
    return lambda model, frames=2: vos.run_frames(model, ds, frames)


@pytest.mark.parametrize("name", sorted(methods.REGISTRY))
def test_method_contract(name, calib_feed):
    torch.manual_seed(0)
    model = models.build("sam2_small", device="cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    method = methods.get(name)
    ctx = methods.Context({}, model, QuantPolicy(weight_bits=4, act_bits=8), calib_feed=calib_feed)

    decisions = method.plan(ctx)
    assert decisions is ctx.decisions
    swappable = [n for n, m in model.named_modules() if isinstance(m, (*SWAPPABLE, *ATTENTION_TYPES))]
    assert [d.name for d in decisions] == swappable
    method.quantize(ctx)
    method.calibrate(ctx)
    state.check_all_active(model, decisions)
    if method.quantizes:
        assert any(d.quantize for d in decisions) and quant_layers(model)
    else:
        assert not any(d.quantize for d in decisions) and not state.quantizers(model)
        after = dict(model.named_parameters())
        assert after.keys() == before.keys()
        assert all(torch.equal(after[n], p) for n, p in before.items())

    groups = method.param_groups(model)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) and set(ids) <= {id(p) for p in model.parameters()}
    quant_ids = {id(p) for p in state.quantizer_parameters(model).values()}
    assert all(id(p) in quant_ids for g in groups if g["name"] == "quant" for p in g["params"])
    if method.trains:
        assert ids
    for term, value in method.loss_terms(model).items():
        assert isinstance(value, torch.Tensor) and value.numel() == 1, term
        assert math.isfinite(float(value)), term
    # The report's row label comes from the method, from its parameters as the record holds them.
    recorded = flatten({"method": {"name": name, **method.params}})
    assert methods.label(recorded).startswith(name)


def test_default_param_groups_split_layer_parameters_from_quantizer_parameters():
    model = models.build("sam2_small", device="cpu")
    method = methods.get("rtn")
    methods.ptq(method, model, QuantPolicy())
    model_group, quant_group = method.param_groups(model)
    assert (model_group["name"], quant_group["name"]) == ("model", "quant")
    assert quant_group["params"], "calibrated activation scales are parameters"
    layer_params = {
        id(p) for layer in quant_layers(model).values() for p in (layer.weight, layer.bias) if p is not None
    }
    assert layer_params <= {id(p) for p in model_group["params"]}
    everything = {id(p) for g in (model_group, quant_group) for p in g["params"]}
    assert everything == {id(p) for p in model.parameters()}


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            out |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return out


def test_dependencies_point_one_way():
    for path in (ROOT / "methods").glob("*.py"):
        harness = {m for m in _imports(path) if m == "harness" or m.startswith("harness.")}
        allowed = {"harness", "harness.errors", "harness.quant"}
        bad = {m for m in harness if m not in allowed and not m.startswith(("harness.errors.", "harness.quant."))}
        assert not bad, f"{path.name} imports {sorted(bad)}"
    for path in (ROOT / "harness" / "quant").glob("*.py"):
        assert not {m for m in _imports(path) if m.split(".")[0] == "methods"}, path.name


class _Recorded:
    """A training method that records which of its steps the runner calls."""

    trains = True
    calls: list = []

    def plan(self, ctx):
        self.calls.append("plan")
        return super().plan(ctx)

    def quantize(self, ctx):
        self.calls.append("quantize")
        super().quantize(ctx)

    def calibrate(self, ctx):
        self.calls.append("calibrate")
        super().calibrate(ctx)


class _TrainsRTN(_Recorded, RTN):
    pass


class _TrainsFP(_Recorded, FP):
    pass


def _fake_train(ctx, method, on_eval=None):
    method.calls.append("train")
    student = dict(ctx.student.named_parameters())
    teacher = ctx.teacher
    assert teacher is ctx.teacher and teacher is not ctx.student
    # Same FP weights as the student had: same config, same seed, no checkpoint.
    assert all(torch.equal(p, student[n]) and not p.requires_grad for n, p in teacher.named_parameters())
    assert method.param_groups(ctx.student)[0]["params"]
    return {"train/loss": 0.5}


@pytest.mark.parametrize(
    "cls, steps, calls",
    [
        (_TrainsRTN, 2, ["plan", "quantize", "calibrate", "train"]),
        (_TrainsFP, 0, ["plan", "quantize"]),  # no calibration (quantizes nothing), no steps
    ],
)
def test_runner_runs_the_steps_in_order(cls, steps, calls, tmp_path, monkeypatch):
    monkeypatch.setitem(methods.REGISTRY, "recorded", cls)
    monkeypatch.setattr(_Recorded, "calls", [])
    monkeypatch.setitem(sys.modules, "harness.train", types.SimpleNamespace(train=_fake_train))
    cfg = base_config(None, ["method.name=recorded", f"train.steps={steps}", *TINY_DATA])
    metrics = {}
    model, decisions = runner.prepare(cfg, tmp_path, metrics)
    assert _Recorded.calls == calls
    state.check_all_active(model, decisions)
    assert {"time_build_s", "time_plan_s", "time_quantize_s"} <= metrics.keys()
    assert ("time_calibrate_s" in metrics) == ("calibrate" in calls)
    assert ("time_train_s" in metrics) == ("train/loss" in metrics) == ("train" in calls)
    # each step's peak memory beside its time (Linux: the process's peak resident set)
    assert {k[5:-4] for k in metrics if k.startswith("peak_")} == {k[5:-2] for k in metrics if k.startswith("time_")}
    assert all(0 < metrics[k] < 64 for k in metrics if k.startswith("peak_"))
