"""LSQ, LSQ+ and PACT (methods/lsq.py, methods/pact.py, harness/quant/learned.py).

Gradients against the papers' closed forms, element by element; initialization; and the QAT
methods through the harness's own machinery: the eval fast path, the all-active check, inspect,
the packed export, and a short QAT run against rtn on the embedded default.
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from brevitas.graph.calibrate import calibration_mode
from brevitas.nn import QuantIdentity
from mlflow import MlflowClient

import methods
from harness import models, runner, train
from harness.config import base_config, load_suite
from harness.data import synthetic
from harness.data.davis import DavisDataset
from harness.evaluate import vos
from harness.inspect import inspect
from harness.quant import state
from harness.quant.export import export, load
from harness.quant.fastpath import act_quant
from harness.quant.learned import LsqActStep, LsqWeightStep, PactClip
from harness.quant.lsc import LscActClip, LscWeightClip
from harness.quant.policy import QuantPolicy
from harness.quant.swap import quant_layers
from harness.report import report


def _identity(quant, data=None) -> QuantIdentity:
    """A calibrated activation quantizer in training mode."""
    m = QuantIdentity(act_quant=quant, return_quant_tensor=False)
    with torch.no_grad(), calibration_mode(m):
        m(torch.randn(1000, generator=torch.Generator().manual_seed(0)) if data is None else data)
    return m.train()


def _parts(m):
    tq = m.act_quant.fused_activation_quant_proxy.tensor_quant
    return tq.scaling_impl, tq.zero_point_impl


def _per_element_grads(m, x, param):
    """d out_i / d param and d out_i / d x_i, one backward per element."""
    d_param, d_x = [], []
    for i in range(x.numel()):
        xi = x.clone().requires_grad_(True)
        param.grad = None
        m(xi)[i].backward()
        d_param.append(param.grad.item())
        d_x.append(xi.grad[i].item())
    return torch.tensor(d_param), torch.tensor(d_x)


def test_lsq_activation_step_gradient_is_the_closed_form():
    # 4-bit signed: Qn = -8, Qp = 7. Step 0.1: v = x / s covers clipped low, clipped high, the
    # sliver [Qp, Qp + 0.5) (clipped in the paper; Brevitas's round-then-clamp counts it inside),
    # and inside.
    m = _identity(methods.get("lsq").act_quant(4))
    step, _ = _parts(m)
    with torch.no_grad():
        step.value.fill_(0.1)
    x = torch.tensor([-1.0, -0.83, 0.95, 0.72, 0.234, -0.356, 0.049])
    d_s, d_x = _per_element_grads(m, x, step.value)
    v = x / 0.1
    closed = torch.where(v <= -8, -8.0, torch.where(v >= 7, 7.0, torch.round(v) - v))
    g = 1 / math.sqrt(x.numel() * 7)
    assert torch.allclose(d_s, closed * g, atol=1e-5)
    assert d_x.tolist() == [0, 0, 0, 0, 1, 1, 1]
    assert torch.allclose(m(x), torch.clamp(torch.round(v), -8, 7) * 0.1)


def test_lsq_weight_step_gradient_per_channel():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 3))
    from harness.quant import swap

    swap.quantize(model, [_linear_decision()], methods.get("lsq"))
    layer = model[0]
    w = layer.weight.detach().clone()
    step = layer.weight_quant.tensor_quant.scaling_impl
    assert isinstance(step, LsqWeightStep)
    wq = layer.quant_weight().value  # the first call initializes the step from the weights
    qp = 1  # 2-bit signed, full range: codes -2..1
    assert torch.allclose(step.value.detach().reshape(-1), 2 * w.abs().mean(1) / math.sqrt(qp))
    upstream = torch.randn(3, 6)
    (wq * upstream).sum().backward()
    s = step.value.detach()
    v = w / s
    closed = torch.where(v <= -2, -2.0, torch.where(v >= 1, 1.0, torch.round(v) - v))
    g = 1 / math.sqrt(6 * qp)
    assert torch.allclose(step.value.grad, (closed * upstream).sum(1, keepdim=True) * g, atol=1e-5)


def _linear_decision():
    from harness.quant.policy import Decision

    return Decision("0", "Linear", 21, True, weight_bits=2, act_bits=8)


def test_lsq_plus_offset_and_step_gradients():
    # Unsigned 4-bit with offset beta: x_hat = clamp(round((x - beta) / s), 0, 15) * s + beta.
    m = _identity(methods.get("lsq", plus=True).act_quant(4))
    step, offset = _parts(m)
    m(torch.zeros(3))  # the offset takes its MSE initialization on first use
    assert offset.initialized and offset.value.item() < 0  # calibration data are N(0, 1)
    with torch.no_grad():
        step.value.fill_(0.1)
        offset.value.fill_(-0.3)
    x = torch.tensor([-1.0, 1.3, 1.26, 0.234, -0.12, 0.5])
    v = (x + 0.3) / 0.1
    assert torch.allclose(m(x), torch.clamp(torch.round(v), 0, 15) * 0.1 - 0.3, atol=1e-6)
    g = 1 / math.sqrt(x.numel() * 15)
    d_s, _ = _per_element_grads(m, x, step.value)
    d_beta, _ = _per_element_grads(m, x, offset.value)
    clipped = (v <= 0) | (v >= 15)
    assert torch.allclose(d_s, torch.where(v <= 0, 0.0, torch.where(v >= 15, 15.0, torch.round(v) - v)) * g, atol=1e-5)
    assert torch.allclose(d_beta, clipped.float() * g, atol=1e-6)


def test_pact_alpha_gradient_and_penalty():
    method = methods.get("pact", alpha_l2=0.01)
    m = _identity(method.act_quant(4))
    clip, _ = _parts(m)
    assert isinstance(clip, PactClip)
    with torch.no_grad():
        clip.value.fill_(0.7)
    x = torch.tensor([-1.0, 0.83, 0.69, 0.234, -0.356, -0.71])
    d_alpha, d_x = _per_element_grads(m, x, clip.value)
    # PACT: 1 above alpha, -1 below -alpha, 0 inside (no LSQ-like term from the rounding)
    assert d_alpha.tolist() == [-1, 1, 0, 0, 0, -1]
    assert d_x.tolist() == [0, 0, 1, 1, 1, 0]
    # symmetric narrow codes -7..7 with step alpha / 7
    assert torch.allclose(m(x), torch.clamp(torch.round(x / 0.1), -7, 7) * 0.1)
    clip.value.grad = None
    penalty = method.loss_terms(m)["alpha_l2"]
    assert penalty.item() == pytest.approx(0.01 * 0.49)
    penalty.backward()
    assert clip.value.grad.item() == pytest.approx(2 * 0.01 * 0.7)


def test_activation_steps_start_from_calibration_statistics():
    data = torch.randn(4000, generator=torch.Generator().manual_seed(1)) * 3
    lsq, _ = _parts(_identity(methods.get("lsq").act_quant(4), data))
    assert lsq.value.item() == pytest.approx(2 * data.abs().mean().item() / math.sqrt(7), rel=1e-5)
    by_max, _ = _parts(_identity(methods.get("lsq", step_init="max").act_quant(4), data))
    assert by_max.value.item() == pytest.approx(data.abs().max().item() / 7, rel=1e-5)
    pact, _ = _parts(_identity(methods.get("pact").act_quant(4), data))
    assert pact.value.item() == pytest.approx(data.abs().max().item(), rel=1e-6)


@pytest.mark.parametrize("bad", [{"step_init": "mean"}, {"plus": "yes"}, {"alpha_init": -1}, {"alpha_l2": "a"}])
def test_bad_parameters_are_one_line_errors(bad):
    name = "pact" if any(k.startswith("alpha") for k in bad) else "lsq"
    with pytest.raises(Exception, match=rf"method\.{next(iter(bad))}: ") as e:
        methods.get(name, **bad)
    assert "\n" not in str(e.value)


# --- on the embedded default ------------------------------------------------------------------


@pytest.fixture(scope="module")
def davis(tmp_path_factory):
    root = synthetic.generate(tmp_path_factory.mktemp("data") / "davis", sequences=4, frames=4, size=(160, 96), seed=5)
    return DavisDataset(root, "train"), DavisDataset(root, "val")


def _trained(name, w, a, davis, **params):
    """The embedded default, quantized by `name`, calibrated, and trained for 3 small steps."""
    torch.manual_seed(0)
    model = models.build("sam2_small", device="cpu")
    method = methods.get(name, **params)
    feed = lambda m, frames=4: vos.run_frames(m, davis[0], frames)  # noqa: E731  (VRC asks for its own count)
    ctx = methods.ptq(method, model, QuantPolicy(weight_bits=w, act_bits=a), feed)
    cfg = base_config(None, [f"method.name={name}", "train.steps=3", "train.batch_size=1", "train.frames=2"])
    before = {k: p.detach().clone() for k, p in state.quantizer_parameters(model).items()}
    train.fit(model, cfg, train.train_data(cfg, lambda d: davis[0]), method=method, progress=False)
    moved = [k for k, p in state.quantizer_parameters(model).items() if not torch.equal(p, before[k])]
    return model, method, ctx.decisions, moved


def _predict(model, ds):
    seq = ds.sequences[0]
    return vos.predict_sequence(model, ds, seq)


@pytest.mark.parametrize(
    "name,w,a,params",
    [("lsq", 2, 8, {}), ("lsq", 4, 4, {"plus": True}), ("pact", 4, 4, {}), ("qsam2", 2, 8, {})],
)
def test_qat_model_exports_evaluates_and_reloads_exactly(name, w, a, params, davis, tmp_path):
    model, method, decisions, moved = _trained(name, w, a, davis, **params)
    assert moved  # training reached the quantizers' own parameters
    kinds = {type(m) for m in model.modules()}
    assert {"lsq": {LsqWeightStep, LsqActStep}, "pact": {PactClip}, "qsam2": {LscWeightClip, LscActClip}}[name] <= kinds
    state.check_all_active(model, decisions)
    # The eval fast path gives Brevitas's own values for these quantizers.
    x = torch.randn(2, 50, 32)
    for qname, (kind, q) in list(state.quantizers(model).items())[:40]:
        proxy = getattr(q, "act_quant", q)
        if kind != "weight" and hasattr(proxy, "fused_activation_quant_proxy"):
            with torch.no_grad():
                assert torch.equal(act_quant(proxy, x), proxy(x).value), qname
    preds = _predict(model, davis[1])
    meta = {
        "model": {"name": "sam2_small", "checkpoint": None, "image_size": 128},
        "quant": {"weight_bits": w, "act_bits": a},
        "method": {"name": name, **method.params},
    }
    export(model, tmp_path / "q.pt", meta, decisions)
    loaded = load(tmp_path / "q.pt", methods.from_config(meta["method"]))
    assert set(quant_layers(loaded)) == set(quant_layers(model))
    state.check_all_active(loaded, decisions)
    again = _predict(loaded, davis[1])
    assert preds[1:].any() and np.array_equal(preds, again)  # tracked masks, not empty ones


def test_inspect_shows_the_qat_methods_plan():
    cfg = base_config(None, ["method.name=lsq", "quant.weight_bits=2"])
    report = inspect(cfg)
    quantized = [r for r in report["rows"] if r["quantized"] and r["kind"] != "Attention"]
    assert quantized and all(r["weight_bits"] == 2 for r in quantized)


QAT_SUITE = """
name: qat_short
base:
  data:
    eval: {kind: synthetic, split: val}
    calib: {kind: synthetic, split: train, frames: 8}
    synthetic: {sequences: 8, frames: 6, size: 256x144, seed: 0}
  quant: {weight_bits: 2, act_bits: 8}
  train:
    steps: 8
    batch_size: 2
    frames: 3
    lr: 2.0e-5
    quant_lr: 2.0e-3
    objectives: {supervised: 1.0, distill_mask: 1.0}
    data: {kind: stream, size: 256x144}
matrix:
  method.name: [rtn, lsq, qsam2]
report:
  table: {rows: method.name, cols: quant.wa}
  figures: [{name: train_curve, runs: {method.name: lsq}}]
"""


@pytest.mark.e2e
def test_short_lsq_w2a8_run_beats_rtn_w2a8(tmp_path):
    """A suite through the runner: 8 QAT steps of LSQ against min-max PTQ at W2A8, and its report."""
    path = tmp_path / "qat_short.yaml"
    path.write_text(QAT_SUITE)
    results = tmp_path / "results"
    summaries, failed = runner.run_suite(load_suite(str(path)), results)
    assert not failed
    jf = {s["method"]: s["J&F"] for s in summaries}
    print(jf)
    assert jf["lsq"] > jf["rtn"] + 0.1
    # Q-SAM2 through the runner: VRC's per-layer table and averages are in its record.
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    (run,) = [
        r
        for r in client.search_runs([client.get_experiment_by_name("qat_short").experiment_id])
        if r.data.params.get("method.name") == "qsam2"
    ]
    assert run.data.metrics["vrc/std_after"] < run.data.metrics["vrc/std_before"]
    # The re-fit FP model's J&F, before any quantizer: VRC's own effect on the task.
    assert 0 < run.data.metrics["vrc/fp_J_F-mean"] <= 1
    layers = client.download_artifacts(run.info.run_id, "vrc_layers.csv", str(tmp_path))
    assert Path(layers).read_text().startswith("layer,d_in,d_out,images,rows,rank,std_before")
    written = report(load_suite(str(path)), results)
    table = written["table.md"].read_text()
    assert "W2A8" in table and "W8A8" not in table
    assert written["train_curve_train-loss.png"].stat().st_size > 0
