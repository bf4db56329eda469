"""Estimates of a training run's memory and time from `bench --train` figures, and the refusal of a
run that will not fit before any work."""

import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from harness import bench, estimate, runner
from harness.config import base_config, load_suite


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    results = tmp_path_factory.mktemp("est")
    out = bench.bench_train_model("sam2_small", None, [("lsq", 4, 4)], rounds=1, batch=1, frames=2)
    estimate.record(out, results)
    return results, out


def _cfg(*overrides):
    return base_config(None, ["method.name=lsq", "train.steps=10", *overrides])


def test_an_estimate_at_the_benched_clip_is_the_measured_peak_plus_the_resident_models(figures):
    results, out = figures
    lsq = out["cases"]["lsq W4A4"]
    est = estimate.run(_cfg("train.batch_size=1", "train.frames=2"), results)
    assert est["peak_bytes"] == pytest.approx(out["process_bytes"] + out["param_bytes"] + lsq["peak_bytes"])
    assert est["step_s"] == pytest.approx(lsq["step_s"])
    # Two more frames add two frames' share of the peak, less what does not grow with the clip
    longer = estimate.run(_cfg("train.batch_size=1", "train.frames=4"), results)
    per_frame = (lsq["peak_bytes"] - 3 * out["param_bytes"]) / 2
    assert longer["peak_bytes"] - est["peak_bytes"] == pytest.approx(2 * per_frame)
    assert longer["step_s"] == pytest.approx(2 * lsq["step_s"])
    # Benched at train.max_objects (3) objects a clip: a run capped at 1 holds a third as much per frame
    assert out["objects"] == 3
    one = estimate.run(_cfg("train.batch_size=1", "train.frames=2", "train.max_objects=1"), results)
    assert est["peak_bytes"] - one["peak_bytes"] == pytest.approx(2 * per_frame * 2 / 3)
    # A micro-batch holds one clip: memory as one clip, time as the whole batch
    micro = estimate.run(_cfg("train.batch_size=8", "train.micro_batch=1", "train.frames=2"), results)
    assert micro["peak_bytes"] == pytest.approx(est["peak_bytes"]) and micro["step_s"] == pytest.approx(
        8 * est["step_s"]
    )
    teacher = estimate.run(_cfg("train.batch_size=1", "train.frames=2", "train.objectives.distill_mask=1"), results)
    assert teacher["peak_bytes"] - est["peak_bytes"] == out["param_bytes"]


def test_a_cuda_run_with_cpu_figures_only_gets_their_memory_and_is_not_refused_on_them(figures):
    results, out = figures
    cpu = estimate.run(_cfg("train.batch_size=1", "train.frames=2"), results)
    cuda = _cfg("train.batch_size=1", "train.frames=64", "device=cuda")
    est = estimate.run(cuda, results)
    assert est["benched_on"] == "cpu" and est["step_s"] is None
    per_frame = (out["cases"]["lsq W4A4"]["peak_bytes"] - 3 * out["param_bytes"]) / 2
    # the CPU process is not on the GPU
    assert est["peak_bytes"] == pytest.approx(cpu["peak_bytes"] - out["process_bytes"] + 62 * per_frame)
    assert "time not measured" in estimate.describe(est, 10) and "on cpu in fp32" in estimate.describe(est, 10)
    estimate.check(_cfg("device=cuda", "train.frames=100000"), results)  # no refusal on another device's figures


def test_no_estimate_without_figures_for_the_run(figures, tmp_path):
    results, _ = figures
    assert estimate.run(_cfg(), tmp_path) is None  # nothing benched there
    assert estimate.run(_cfg("method.name=pact"), results) is None  # pact not benched
    assert estimate.run(_cfg("train.checkpoint_blocks=false"), results) is None  # benched with it on
    assert estimate.run(_cfg("train.steps=0"), results) is None  # does not train
    assert estimate.run(base_config(None, ["method.name=rtn"]), results) is None


SUITE = """
name: toobig
base:
  data:
    synthetic: {sequences: 2, frames: 3, size: 96x64, seed: 1}
    calib: {frames: 2}
  train: {steps: 1, batch_size: 1000, frames: 8, data: {kind: stream}}
matrix:
  method.name: [lsq, rtn]
"""


def test_a_run_that_will_not_fit_is_warned_in_the_dry_run_and_refused_before_any_work(figures, tmp_path):
    results, _ = figures
    path = tmp_path / "toobig.yaml"
    path.write_text(SUITE)
    cmd = [sys.executable, "-m", "harness", "suite", str(path), "--dry-run", "--results", str(results)]
    dry = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stderr[-1000:]
    assert "est. peak" in next(line for line in dry.stdout.splitlines() if "name=lsq" in line)
    assert "warning: name=lsq will not fit: estimated peak" in dry.stderr
    assert "name=rtn" not in dry.stderr

    rows, failed = runner.run_suite(load_suite(str(path)), results)
    assert [name for name, _ in failed] == ["name=lsq"]
    assert "more than the" in failed[0][1] and "train.memory_check=false" in failed[0][1]
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name("toobig")
    runs = {r.data.tags["run_key"]: r for r in client.search_runs([exp.experiment_id], "tags.kind = 'run'")}
    status = sorted(r.info.status for r in runs.values())
    assert status == ["FAILED", "FINISHED"]  # the suite went on to rtn
    failed_run = next(r for r in runs.values() if r.info.status == "FAILED")
    assert "train/step_s" not in failed_run.data.metrics  # refused before any training step
