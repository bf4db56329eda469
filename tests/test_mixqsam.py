"""Mix-QSAM mixed precision (methods/mixqsam.py, harness/quant/mixqsam.py) on the embedded default."""

import math

import numpy as np
import pytest
import torch
from conftest import export_and_reload

import methods
from harness import models
from harness.config import base_config
from harness.data import synthetic
from harness.data.davis import DavisDataset
from harness.errors import ConfigError
from harness.evaluate import vos
from harness.inspect import inspect
from harness.quant import mixqsam, state
from harness.quant.policy import QuantPolicy


@pytest.fixture(scope="module")
def davis(tmp_path_factory):
    root = synthetic.generate(tmp_path_factory.mktemp("data") / "davis", sequences=4, frames=3, size=(128, 96), seed=7)
    return DavisDataset(root, "train"), DavisDataset(root, "val")


def test_synergy_and_kl_by_hand():
    assert mixqsam.synergy([1.0, 1.5, 1.5], eps=0.5) == pytest.approx([math.log(2.0), math.log(3.0)])
    logits = [torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, -2.0]])]
    assert mixqsam.kl(logits, logits) == 0
    p, q = torch.tensor([0.5, 0.5]), torch.sigmoid(torch.tensor([2.0, -2.0]))
    q = q / q.sum()
    expected = float((p * (p / q).log()).sum()) / 2  # the second call matches itself
    assert mixqsam.kl(logits, [logits[1], logits[1]]) == pytest.approx(expected, rel=1e-5)


def test_importance_and_synergy_normalized_per_image_or_pooled_by_hand():
    raw = torch.tensor([[1.0, 10.0], [3.0, 10.0]])  # layers x images
    # per image: [0.5, 1.5] and [1, 1] (each over its mean), averaged; pooled: [5.5, 6.5] / 6.
    assert mixqsam.importance(raw, "per_image") == pytest.approx([0.75, 1.25])
    assert mixqsam.importance(raw, "pooled") == pytest.approx([5.5 / 6, 6.5 / 6])
    # S per image 1 / (1 + 0.5) and 1 / (0 + 0.5), averaged before the log.
    assert mixqsam.synergy_per_image(raw, eps=0.5) == pytest.approx([math.log(1 + (1 / 1.5 + 2) / 2)])
    # An image no removal changes counts every layer alike rather than dividing by zero.
    assert mixqsam.importance(torch.tensor([[0.0, 2.0], [0.0, 6.0]])) == pytest.approx([0.75, 1.25])


def test_mixqsam_plan_meets_both_budgets_and_reloads_exactly(davis, tmp_path):
    torch.manual_seed(0)
    model = models.build("sam2_small", device="cpu")
    method = methods.get("mixqsam", calib_images=2)
    artifacts = {}
    ctx = methods.Context(
        {},
        model,
        QuantPolicy(weight_bits=4, act_bits=4),
        calib_feed=lambda m, frames=2: vos.run_frames(m, davis[0], frames),
    )
    ctx.artifact = artifacts.__setitem__
    method.plan(ctx)
    method.quantize(ctx)
    method.calibrate(ctx)
    state.check_all_active(model, ctx.decisions)
    layers = [d for d in ctx.decisions if d.quantize and d.weight_bits]
    bits = np.array([d.weight_bits for d in layers])
    params = np.array([d.params for d in layers])
    assert set(bits) <= {2, 3, 4, 5, 6} and len(set(bits)) > 1 and all(d.act_bits == d.weight_bits for d in layers)
    assert 0.95 * 4 * params.sum() <= (params * bits).sum() <= 4 * params.sum()
    table = artifacts["bit_map.csv"].splitlines()
    assert table[0] == "layer,params,macs,importance,bits" and len(table) == len(layers) + 1
    macs = np.array([float(r.split(",")[2]) for r in table[1:]])
    assert 0.95 * 16 * macs.sum() <= (macs * bits**2).sum() <= 16 * macs.sum() * (1 + 1e-9)
    preds = vos.predict_sequence(model, davis[1], davis[1].sequences[0])
    loaded = export_and_reload(model, method, ctx.decisions, 4, 4, tmp_path / "q.pt")
    assert np.array_equal(vos.predict_sequence(loaded, davis[1], davis[1].sequences[0]), preds)


@pytest.mark.parametrize("bad", [{"base": "lsq"}, {"candidates": [1, 4]}, {"budget_use": 2}, {"calib_images": 0}])
def test_bad_mixqsam_parameters_are_one_line_errors(bad):
    with pytest.raises(ConfigError, match=rf"method\.{next(iter(bad))}: ") as e:
        methods.get("mixqsam", **bad)
    assert "\n" not in str(e.value)


def test_inspect_shows_the_data_driven_plans(tmp_path):
    tiny = ["data.synthetic.sequences=2", "data.synthetic.frames=3", "data.synthetic.size=96x64", "data.calib.frames=2"]
    cfg = base_config(None, ["method.name=mixqsam", "method.calib_images=1", "quant.weight_bits=4", *tiny])
    rows = [r for r in inspect(cfg, tmp_path)["rows"] if r["quantized"] and r["kind"] != "Attention"]
    assert {r["weight_bits"] for r in rows} <= {2, 3, 4, 5, 6} and len({r["weight_bits"] for r in rows}) > 1
    assert all(r["reason"] == f"mixqsam {r['weight_bits']} bits" for r in rows)
    cfg = base_config(None, ["method.name=qsam2", "method.vrc.calib_images=2", "quant.weight_bits=2", *tiny])
    assert {r["weight_bits"] for r in inspect(cfg, tmp_path)["rows"] if r["quantized"] and r["weight_bits"]} == {2}


def test_mixqsam_over_ptq4sam_quantizers(davis):
    torch.manual_seed(0)
    model = models.build("sam2_small", device="cpu")
    method = methods.get("mixqsam", base="ptq4sam", calib_images=1)
    feed = lambda m, frames=3: vos.run_frames(m, davis[0], frames)  # noqa: E731  (memory needs frame 2+)
    ctx = methods.ptq(method, model, QuantPolicy(weight_bits=4, act_bits=4), feed)
    state.check_all_active(model, ctx.decisions)
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"MseWeightStep", "Log2Quant"} <= kinds  # ptq4sam's quantizers on mixqsam's bits
    assert len({d.weight_bits for d in ctx.decisions if d.quantize and d.weight_bits}) > 1
