"""Evaluators by data kind (harness/evaluate/registry.py) through the runner, the summary and the report."""

import json
import subprocess
import sys

import pandas as pd
import pytest

from harness import models, runner
from harness.config import base_config, load_suite
from harness.data import coco, sav, synthetic
from harness.errors import ConfigError
from harness.evaluate import registry
from harness.report import report

COCO_SUITE = """
name: coco_tiny
base:
  quant: {scope: [image_encoder, sam_mask_decoder], weight_bits: 4}
  data:
    eval: {kind: coco, split: val2017}
    calib: {kind: coco, split: train2017, frames: 3}
    synthetic: {sequences: 4, size: 160x96, seed: 2}
matrix:
  method.name: [fp, rtn]
report:
  table: {rows: method.name, cols: quant.weight_bits}
  figures: [{name: bits_vs_metric, metric: ap}]
"""


def test_a_coco_suite_runs_and_reports_miou_and_ap(tmp_path):
    path = tmp_path / "coco_tiny.yaml"
    path.write_text(COCO_SUITE)
    results = tmp_path / "results"
    rows, failed = runner.run_suite(load_suite(str(path)), results)
    assert not failed and len(rows) == 2
    fp, rtn = rows
    assert 0 < rtn["mIoU"] <= 1 and 0 < fp["mIoU"] <= 1 and 0 <= rtn["AP"] <= 1
    summary = (results / "coco_tiny" / "summary.md").read_text()
    assert "| mIoU (%) | AP (%) | AP50 (%)" in summary and "images/s" in summary and "J&F" not in summary
    written = report(load_suite(str(path)), results)
    table = written["table.md"].read_text()
    assert "mIoU (%)" in table  # the evaluator's main metric by default
    # mIoU is a mean over instances: its intervals resample the images (per_object.csv's image_id).
    assert "B = 2000 resamples of the 4 images" in table and "Without intervals" not in table
    assert pd.read_csv(written["table.csv"])[["ci_lo", "ci_hi"]].notna().all(axis=None)
    # AP is not: its table says so and shows mean ± std (the same runs: report sections are no part of run_key).
    path.write_text(COCO_SUITE.replace("cols: quant.weight_bits}", "cols: quant.weight_bits, metric: ap}"))
    ap = report(load_suite(str(path)), results)["table.md"].read_text()
    assert "Without intervals (mean ± std over seeds): every cell (AP is not a mean over objects)." in ap
    assert "bits_vs_metric_ap.png" in written
    assert (results / "data" / "coco-n4-160x96-seed2" / "annotations" / "instances_train2017.json").is_file()


def test_unknown_kinds_and_missing_coco_roots_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="data kind 'kitti' has no evaluator; expected one of coco, davis"):
        registry.get("kitti")
    suite = tmp_path / "s.yaml"
    suite.write_text(f"name: s\nbase:\n  data:\n    eval: {{kind: coco, root: '{tmp_path / 'nowhere'}'}}\n")
    with pytest.raises(ConfigError, match=r"s.yaml: run base: data.eval.root: .*nowhere is not a folder$"):
        runner.preflight(load_suite(str(suite)), tmp_path)


def _qbench(*args):
    proc = subprocess.run([sys.executable, "-m", "harness", *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_eval_coco_scores_a_results_file_as_cocoeval(tmp_path):
    root = coco.generate(tmp_path / "coco", images=3, size=(96, 64), seed=1)
    annotations, _ = coco.paths(root)
    gt = json.loads(annotations.read_text())["annotations"]
    perfect = [{k: a[k] for k in ("image_id", "category_id", "segmentation")} | {"score": 1.0} for a in gt]
    (tmp_path / "perfect.json").write_text(json.dumps(perfect))
    out = json.loads(
        _qbench("eval-coco", "--annotations", annotations, "--results", tmp_path / "perfect.json", "--json")
    )
    assert out["mIoU"] == 1.0 and out["AP"] == pytest.approx(1.0) and out["instances"] == len(gt)


def test_eval_vos_scores_sav_predictions(tmp_path):
    root = sav.generate(tmp_path / "sav", videos=2, frames=13, size=(96, 64), seed=1)
    # the ground truth as predictions: J&F 1
    out = json.loads(_qbench("eval-vos", "--format", "sav", "--root", root, "--results", root, "--json"))
    assert out["J&F-mean"] == 1.0 and out["filled_frames"] == 0


SAV_SUITE = """
name: sav_tiny
base:
  data:
    eval: {kind: sav, split: val}
    calib: {kind: sav, split: train, frames: 4}
    synthetic: {sequences: 2, frames: 9, size: 96x64, seed: 4}
matrix:
  method.name: [fp, rtn]
"""


def test_a_sav_suite_runs_on_generated_videos(tmp_path):
    path = tmp_path / "sav_tiny.yaml"
    path.write_text(SAV_SUITE)
    rows, failed = runner.run_suite(load_suite(str(path)), tmp_path / "results")
    assert not failed and [r["method"] for r in rows] == ["fp", "rtn"]
    assert all(0 < r["J&F"] <= 1 for r in rows)
    root = tmp_path / "results" / "data" / "sav-n2-t9-96x64-seed4"
    assert (root / "sav_val.txt").read_text().split() == ["sav_synth_000", "sav_synth_001"]
    assert (root / "sav_train.txt").read_text().split() == ["sav_synth_002", "sav_synth_003"]


@pytest.mark.parametrize("name,runs", [("coco_4bit", 13), ("sav_2bit", 13)])
def test_real_data_suites_expand_and_validate_on_generated_data(name, runs, tmp_path, monkeypatch):
    models.save_checkpoint(models.build("sam2_small", device="cpu"), tmp_path / "small.pt")
    # enough calibration frames (64) and images for the largest count the suites' methods ask for
    davis = synthetic.generate(tmp_path / "DAVIS", sequences=2, frames=64, size=(96, 64), objects=(1, 1))
    env = {"SAM2_MODEL": "sam2_small", "SAM2_CHECKPOINT": tmp_path / "small.pt", "DAVIS_ROOT": davis}
    env["COCO_ROOT"] = coco.generate(tmp_path / "COCO", images=64, size=(96, 64))
    env["SAV_ROOT"] = sav.generate(tmp_path / "SAV", videos=2, frames=9, size=(96, 64))
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))
    suite = load_suite(name)
    assert len(suite.runs) == runs
    runner.preflight(suite, tmp_path)
    monkeypatch.delenv("SAM2_CHECKPOINT")
    with pytest.raises(ConfigError, match="environment variable SAM2_CHECKPOINT is not set$"):
        load_suite(name)


def test_coco_detector_prompts_come_from_the_data_section(tmp_path):
    root = coco.generate(tmp_path / "coco", images=2, size=(96, 64), seed=1)
    gt = json.loads(coco.paths(root)[0].read_text())["annotations"]
    dets = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": s}
        for a, s in zip(gt, [0.9, 0.2] * len(gt))
    ]
    (tmp_path / "dets.json").write_text(json.dumps(dets))
    cfg = base_config(
        None,
        [
            "data.eval.kind=coco",
            f"data.eval.root={root}",
            "data.eval.split=val2017",
            f"data.eval.detections={tmp_path / 'dets.json'}",
            "data.eval.score_threshold=0.5",
        ],
    )
    assert cfg["data"]["eval"]["score_threshold"] == 0.5 and "detections" not in cfg["data"]["calib"]
    ds = registry.dataset(cfg, "eval", tmp_path)
    assert [b.score for b in ds.detections] == [0.9] * len(ds.detections) and len(ds.detections) == (len(gt) + 1) // 2
