"""Broken inputs on real files: each is one line naming the file and what was expected, exit 2,
before any run and in a dry run, and nothing is recorded."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from harness import models
from harness.data.davis import DavisDataset, read_palette_png, write_palette_png
from harness.errors import CheckpointError, DatasetError
from harness.evaluate.scoring import score_results_folder

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def qbench(*args):
    proc = subprocess.run([sys.executable, "-m", "harness", *map(str, args)], capture_output=True, text=True, env=ENV)
    return proc.returncode, proc.stdout, proc.stderr


def one_line_error(rc, err):
    assert rc == 2, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    return lines[0]


@pytest.fixture
def data(davis_root, tmp_path):
    """A private copy of the generated dataset, free to damage."""
    return shutil.copytree(davis_root, tmp_path / "davis")


def val_seq(root):
    return (root / "ImageSets" / "2017" / "val.txt").read_text().split()[0]


def suite(tmp_path, root, extra=""):
    path = tmp_path / "broken.yaml"
    path.write_text(
        "name: broken\nbase:\n"
        f"  data:\n    eval: {{kind: davis, root: {root}, split: val}}\n"
        f"    calib: {{kind: davis, root: {root}, split: train, frames: 2}}\n{extra}"
    )
    return path


def test_removed_jpeg_and_png_are_named(data):
    seq = val_seq(data)
    DavisDataset(data).check()
    (data / "JPEGImages" / "480p" / seq / "00002.jpg").unlink()
    with pytest.raises(
        DatasetError, match=rf"sequence '{seq}': frame .*{seq}/00002\.jpg does not exist but its annotation"
    ):
        DavisDataset(data).check()
    shutil.copy(data / "JPEGImages" / "480p" / seq / "00001.jpg", data / "JPEGImages" / "480p" / seq / "00002.jpg")
    (data / "Annotations" / "480p" / seq / "00003.png").unlink()
    with pytest.raises(DatasetError, match=rf"annotation .*{seq}/00003\.png does not exist but its frame does"):
        DavisDataset(data).check()


def test_truncated_png_is_named(data):
    png = data / "Annotations" / "480p" / val_seq(data) / "00001.png"
    png.write_bytes(png.read_bytes()[: png.stat().st_size // 2])
    with pytest.raises(DatasetError, match=rf"{png} is not a readable PNG"):
        DavisDataset(data).check()


def test_suite_with_a_removed_jpeg_fails_before_any_run(data, tmp_path):
    seq = val_seq(data)
    (data / "JPEGImages" / "480p" / seq / "00003.jpg").unlink()
    for dry in (["--dry-run"], []):
        results = tmp_path / f"results{len(dry)}"
        line = one_line_error(*qbench("suite", suite(tmp_path, data), *dry, "--results", results)[::2])
        assert "data.eval" in line and f"{seq}/00003.jpg does not exist" in line
        assert not results.exists()  # nothing recorded, nothing prepared
    (data / "ImageSets" / "2017" / "val.txt").rename(data / "ImageSets" / "2017" / "valid.txt")
    line = one_line_error(*qbench("suite", suite(tmp_path, data), "--dry-run", "--results", tmp_path / "r")[::2])
    assert "data.eval" in line and "val.txt does not exist; available splits: train, valid" in line


def test_suite_checkpoint_errors_before_any_run(data, tmp_path):
    random_bytes = tmp_path / "random.pt"
    random_bytes.write_bytes(np.random.default_rng(0).bytes(4096))
    sd = models.build("sam2_small", models.RANDOM, device="cpu").state_dict()
    name = next(k for k in sd if k.endswith("weight") and sd[k].ndim == 2)
    sd.pop(next(iter(sd)))
    sd[name] = torch.zeros(3, 3)
    sd["extra.weight"] = torch.zeros(1)
    mismatch = tmp_path / "mismatch.pt"
    torch.save({"model": sd}, mismatch)
    cases = {
        "model: {name: no_such_model}": "unknown model 'no_such_model'",
        f"model: {{name: sam2_small, checkpoint: {random_bytes}}}": f"{random_bytes} is not a readable torch file",
        f"model: {{name: sam2_small, checkpoint: {mismatch}}}": f"1 missing keys: .*1 unexpected keys: extra.weight; "
        f"1 shape mismatches: {name} \\(3, 3\\)",
    }
    for model, expected in cases.items():
        path = suite(tmp_path, data, f"  {model}\n")
        line = one_line_error(*qbench("suite", path, "--dry-run", "--results", tmp_path / "r")[::2])
        assert re.search(expected, line), line
        assert "weights_only" not in line
    assert not (tmp_path / "r").exists()
    with pytest.raises(CheckpointError, match="shape mismatches"):
        models.check("sam2_small", mismatch)


def test_make_data_bad_size_and_empty_suite(tmp_path):
    line = one_line_error(*qbench("make-data", "--out", tmp_path / "d", "--size", "64by64")[::2])
    assert "'64by64'" in line and "WIDTHxHEIGHT" in line
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    line = one_line_error(*qbench("suite", empty, "--results", tmp_path / "r")[::2])
    assert str(empty) in line and "empty" in line
    assert not (tmp_path / "r").exists()


def predictions(root, out):
    """Predictions equal to the ground truth, in the layout eval-vos reads."""
    for seq in DavisDataset(root).sequences:
        shutil.copytree(root / "Annotations" / "480p" / seq, out / seq)
    return out


def test_eval_vos_missing_predictions(davis_root, tmp_path):
    pred = predictions(davis_root, tmp_path / "pred")
    seq = val_seq(davis_root)
    (pred / seq / "00002.png").unlink()
    (pred / seq / "00003.png").unlink()
    line = one_line_error(*qbench("eval-vos", "--davis-root", davis_root, "--results", pred)[::2])
    assert f"sequence '{seq}'" in line and "00002.png, 00003.png" in line and "--allow-missing" in line
    rc, out, err = qbench("eval-vos", "--davis-root", davis_root, "--results", pred, "--allow-missing", "--json")
    assert rc == 0, err
    assert "2 missing prediction frames scored as empty" in err
    got = json.loads(out)
    report = {}
    _, summary = score_results_folder(davis_root, pred, allow_missing=True, report=report)
    assert got["filled_frames"] == report["filled"] == 2
    # Full precision: the printed values are the scorer's floats exactly.
    assert {k: got[k] for k in summary} == summary and summary["J&F-mean"] < 1


def test_late_object_is_not_scored_and_warned_once(davis_root, tmp_path, caplog):
    root = shutil.copytree(davis_root, tmp_path / "davis")
    seq = val_seq(root)
    for t in (2, 3):  # object 9 appears in frame 2 and stays: one warning for the sequence
        png = root / "Annotations" / "480p" / seq / f"{t:05d}.png"
        ids = read_palette_png(png)
        ids[:4, :4] = 9
        write_palette_png(png, ids)
    pred = predictions(root, tmp_path / "pred")
    report = {}
    with caplog.at_level("WARNING", logger="qbench"):
        df, summary = score_results_folder(root, pred, report=report)
    assert report["late"] == {seq: [9]}
    assert 9 not in df["object"].tolist() and summary["J&F-mean"] == 1.0
    warnings = [r.getMessage() for r in caplog.records if "appear after the first frame" in r.getMessage()]
    assert warnings == [f"sequence {seq}: object ids [9] appear after the first frame; not scored (DAVIS protocol)"]
    rc, out, err = qbench("eval-vos", "--davis-root", root, "--results", pred, "--json")
    assert rc == 0 and json.loads(out)["late_objects"] == {seq: [9]} and err.count("object ids [9]") == 1


def test_calibration_count_above_the_calibration_data_fails_before_any_run(data, tmp_path):
    """ptq4sam's calib_images (and VRC's, Mix-QSAM's) against the frames data.calib holds: 2 train
    sequences of 5 frames here."""
    cases = {
        "method: {name: ptq4sam, calib_images: 11}": 11,
        "method: {name: qsam2, vrc: {calib_images: 12}}": 12,
        "method: {name: mixqsam, calib_images: 13}": 13,
    }
    for method, asked in cases.items():
        for dry in (["--dry-run"], []):
            results = tmp_path / f"results{len(dry)}"
            line = one_line_error(
                *qbench("suite", suite(tmp_path, data, f"  {method}\n"), *dry, "--results", results)[::2]
            )
            assert "run " in line and f"{asked} calibration frames asked for, data.calib has 10" in line, line
            assert not results.exists()
    ok = suite(tmp_path, data, "  method: {name: ptq4sam, calib_images: 10}\n")
    rc, out, err = qbench("suite", ok, "--dry-run", "--results", tmp_path / "r")
    assert rc == 0, err[-2000:]
