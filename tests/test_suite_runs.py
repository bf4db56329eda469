"""Running suites for real: resume after SIGKILL, failure records, two processes at once, determinism."""

import math
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from harness import models
from harness.data import synthetic
from harness.errors import NonFiniteError
from harness.runner import check_finite

SUITE = """
name: tiny
base:
  data:
    synthetic: {sequences: 2, frames: 4, size: 96x64, seed: 1}
    calib: {frames: 3}
matrix:
  method.name: [fp, rtn]
  quant.weight_bits: [8, 4]
"""


@pytest.fixture(scope="module")
def suite_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("suite") / "tiny.yaml"
    path.write_text(SUITE)
    return path


def start(suite, results, *extra):
    cmd = [sys.executable, "-m", "harness", "suite", str(suite), *extra, "--results", str(results)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def child_runs(results, suite="tiny"):
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name(suite)
    return client, client.search_runs([exp.experiment_id], "tags.kind = 'run'")


def finished_metrics(results):
    _, runs = child_runs(results)
    keys = [r.data.tags["run_key"] for r in runs if r.info.status == "FINISHED"]
    assert len(keys) == len(set(keys)) == 3, "exactly one FINISHED record per run_key"
    return {r.data.tags["run_key"]: r.data.metrics for r in runs if r.info.status == "FINISHED"}


@pytest.fixture(scope="module")
def killed_and_resumed(suite_file, tmp_path_factory):
    results = tmp_path_factory.mktemp("killed")
    proc = start(suite_file, results)
    claims = results / "claims" / "tiny"
    deadline = time.time() + 240
    # Kill while a run other than the first is in flight (a record is RUNNING and its claim is held).
    killed_key = None
    while time.time() < deadline and killed_key is None:
        if (results / "mlflow.db").exists() and claims.is_dir() and list(claims.glob("*.json")):
            _, runs = child_runs(results)
            running = [r.data.tags["run_key"] for r in runs if r.info.status == "RUNNING"]
            if running and any(r.info.status == "FINISHED" for r in runs):
                proc.send_signal(signal.SIGKILL)
                killed_key = running[0]
        time.sleep(0.2)
    proc.wait()
    if killed_key is None:
        pytest.fail("the suite never reached its second run")
    assert (claims / f"{killed_key}.json").exists()
    _, runs = child_runs(results)
    finished_before = {r.data.tags["run_key"] for r in runs if r.info.status == "FINISHED"}
    resumed = start(suite_file, results)
    out, err = resumed.communicate(timeout=300)
    return results, killed_key, finished_before, resumed.returncode, out, err


@pytest.mark.e2e
def test_resume_after_sigkill(killed_and_resumed):
    results, killed_key, finished_before, code, out, err = killed_and_resumed
    assert code == 0, err[-2000:]
    assert killed_key not in finished_before
    client, runs = child_runs(results)
    by_key = {}
    for r in runs:
        by_key.setdefault(r.data.tags["run_key"], []).append(r)
    # The runs finished before the kill were skipped: still one record each.
    assert all(len(by_key[k]) == 1 for k in finished_before)
    # The killed run: its record is closed as KILLED with a reason, and a new record FINISHED.
    statuses = sorted(r.info.status for r in by_key[killed_key])
    assert statuses == ["FINISHED", "KILLED"]
    killed = next(r for r in by_key[killed_key] if r.info.status == "KILLED")
    assert "process died" in killed.data.tags["failure_reason"]
    finished_metrics(results)
    assert not list((results / "claims" / "tiny").glob("*.json"))


@pytest.mark.e2e
def test_two_processes_run_each_run_once(suite_file, tmp_path, killed_and_resumed):
    a, b = start(suite_file, tmp_path), start(suite_file, tmp_path)
    for p in (a, b):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    _, runs = child_runs(tmp_path)
    assert len(runs) == 3  # no run was started twice
    metrics = finished_metrics(tmp_path)
    # Determinism: the same suite and seeds on CPU give identical metrics (timings aside).
    other = finished_metrics(killed_and_resumed[0])
    assert metrics.keys() == other.keys()
    for key, m in metrics.items():
        same = {k: v for k, v in m.items() if k != "fps" and not k.startswith(("time_", "peak_"))}
        assert same == {k: other[key][k] for k in same}, key


@pytest.mark.e2e
def test_dry_run_lists_run_keys_and_status(suite_file, killed_and_resumed):
    results = killed_and_resumed[0]
    proc = subprocess.run(
        [sys.executable, "-m", "harness", "suite", str(suite_file), "--dry-run", "--results", str(results)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0
    lines = [line.split() for line in proc.stdout.splitlines()[1:]]
    assert sorted(line[0] for line in lines) == sorted(finished_metrics(results))
    assert all(line[1] == "FINISHED" for line in lines)
    fresh = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness",
            "suite",
            str(suite_file),
            "--dry-run",
            "quant.act_bits=6",
            "--results",
            str(results),
        ],
        capture_output=True,
        text=True,
    )
    # Changing act_bits changes the rtn runs only; fp quantizes nothing and stays finished.
    assert sorted(line.split()[1] for line in fresh.stdout.splitlines()[1:]) == ["FINISHED", "pending", "pending"]


@pytest.mark.e2e
def test_failed_run_is_recorded_and_the_suite_goes_on(tmp_path):
    good = synthetic.generate(tmp_path / "good", sequences=2, frames=4, size=(96, 64), seed=1)
    bad = shutil.copytree(good, tmp_path / "bad")
    seq = (bad / "ImageSets" / "2017" / "val.txt").read_text().split()[0]
    jpg = bad / "JPEGImages" / "480p" / seq / "00002.jpg"
    jpg.write_bytes(jpg.read_bytes()[:300])  # truncated: found only when the frame is decoded, in the run
    suite = tmp_path / "ckpts.yaml"
    suite.write_text(
        SUITE.replace("name: tiny", "name: ckpts")
        .replace("    calib:", "    eval: {kind: davis, split: val}\n    calib:")
        .replace(
            "matrix:\n  method.name: [fp, rtn]\n  quant.weight_bits: [8, 4]\n",
            f"matrix:\n  data.eval.root: [{bad}, {good}]\n",
        )
    )
    proc = start(suite, tmp_path / "r")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-2000:]
    assert "FAILED root=" in err
    client, runs = child_runs(tmp_path / "r", "ckpts")
    status = {r.data.params["data.eval.root"]: r for r in runs}
    assert status[str(good)].info.status == "FINISHED"
    failed = status[str(bad)]
    assert failed.info.status == "FAILED"
    assert "truncated" in failed.data.tags["failure_reason"].lower()
    trace = client.download_artifacts(failed.info.run_id, "traceback.txt", str(tmp_path))
    assert "Traceback" in open(trace).read()
    # A checkpoint that does not match its config is caught before any work: exit 2, nothing recorded.
    sd = models.build("sam2_small", device="cpu").state_dict()
    sd["obj_ptr_proj.layers.0.weight"] = torch.zeros(3, 3)
    torch.save({"model": sd}, tmp_path / "bad.pt")
    proc = subprocess.run(
        [sys.executable, "-m", "harness", "suite", str(suite), f"model.checkpoint={tmp_path / 'bad.pt'}"]
        + ["--results", str(tmp_path / "r3")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "shape mismatches: obj_ptr_proj.layers.0.weight (3, 3)" in proc.stderr
    assert not (tmp_path / "r3").exists()
    # A missing checkpoint is caught before any work: exit 2, nothing recorded.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "harness",
            "suite",
            str(suite),
            "model.checkpoint=/nope.pt",
            "--results",
            str(tmp_path / "r2"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "model.checkpoint: /nope.pt does not exist" in proc.stderr
    assert not (tmp_path / "r2").exists()


def test_non_finite_values_fail_a_run():
    check_finite({"J_F-mean": 0.5, "fps": 3.0})
    with pytest.raises(NonFiniteError, match="J_F-mean"):
        check_finite({"J_F-mean": math.nan, "fps": 3.0})
    with pytest.raises(NonFiniteError, match="loss"):
        check_finite({"loss": math.inf})
