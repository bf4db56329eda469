"""Executors for real: submitit's local cluster and local worker processes record what the local runner
records; a failed run and a killed job are recorded; a bad executor section or option is one line."""

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from harness import cli
from harness.config import load_suite
from harness.data import synthetic
from harness.errors import ConfigError

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
# Two runs that finish and one whose evaluation data has a truncated frame (found in the run, not
# before): FAILED. The file asks for submitit's local cluster, two jobs at a time.
SUITE = """
name: tiny
base:
  data:
    synthetic: {{sequences: 2, frames: 4, size: 96x64, seed: 1}}
    calib: {{frames: 3}}
matrix:
  method.name: [fp, rtn]
include:
  - {{method.name: fp, data.eval.kind: davis, data.eval.root: {bad}}}
executor: {{kind: submitit-local, time: 10, parallelism: 2}}
"""


def start(suite, results, *extra):
    cmd = [sys.executable, "-m", "harness", "suite", str(suite), *extra, "--results", str(results)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def records(results, kind="run"):
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    return client, client.search_runs([exp.experiment_id], f"tags.kind = '{kind}'")


def by_key(results):
    client, runs = records(results)
    out = {}
    for r in runs:
        assert r.data.tags["run_key"] not in out, "one record per run_key"
        out[r.data.tags["run_key"]] = r
    return client, out


def bad_data(tmp_path):
    good = synthetic.generate(tmp_path / "good", sequences=2, frames=4, size=(96, 64), seed=1)
    bad = shutil.copytree(good, tmp_path / "bad")
    seq = (bad / "ImageSets" / "2017" / "val.txt").read_text().split()[0]
    jpg = bad / "JPEGImages" / "480p" / seq / "00002.jpg"
    jpg.write_bytes(jpg.read_bytes()[:300])
    return bad


@pytest.fixture(scope="module")
def three_ways(tmp_path_factory):
    """The same suite run by the local runner, by submitit-local jobs and by two local workers, at once."""
    tmp = tmp_path_factory.mktemp("executors")
    suite = tmp / "tiny.yaml"
    suite.write_text(SUITE.format(bad=bad_data(tmp)))
    ways = {
        "local": ("--executor", "local"),  # the command line wins over the file's executor
        "submitit": (),
        "workers": ("--executor", "local", "--workers", "2"),
    }
    procs = {name: start(suite, tmp / name, *extra) for name, extra in ways.items()}
    errs = {name: proc.communicate(timeout=600)[1] for name, proc in procs.items()}
    return {name: (tmp / name, proc.returncode, errs[name]) for name, proc in procs.items()}


@pytest.mark.e2e
def test_submitit_local_records_what_the_local_runner_records(three_ways):
    (local, code_l, err_l), (sub, code_s, err_s) = three_ways["local"], three_ways["submitit"]
    assert code_l == code_s == 1, (err_l + err_s)[-3000:]  # one run fails in each
    _, mine = by_key(local)
    client, theirs = by_key(sub)
    assert mine.keys() == theirs.keys() and len(mine) == 3
    (parent,) = records(sub, "suite")[1]
    assert parent.data.tags["executor"] == "submitit-local" and parent.info.status == "FINISHED"
    for key, a in mine.items():
        b = theirs[key]
        assert a.info.status == b.info.status, key
        assert a.data.params == b.data.params
        # The same record, but for MLflow's own source tags (the job's entry point is submitit's).
        ours = {k: v for k, v in a.data.tags.items() if not k.startswith("mlflow.")}
        assert ours == {k: v for k, v in b.data.tags.items() if not k.startswith("mlflow.")}
        assert b.data.tags["mlflow.parentRunId"] == parent.info.run_id  # under the submitter's record
        same = {k: v for k, v in a.data.metrics.items() if k != "fps" and not k.startswith(("time_", "peak_"))}
        assert same == {k: b.data.metrics[k] for k in same}, key
        assert {f.path for f in client.list_artifacts(b.info.run_id)} == {
            f.path for f in MlflowClient(f"sqlite:///{local / 'mlflow.db'}").list_artifacts(a.info.run_id)
        }
    assert sum(r.info.status == "FINISHED" for r in theirs.values()) == 2
    assert (sub / "tiny" / "summary.md").read_text().count("| fp |") == 1  # the failed fp run has no row
    assert len(list((sub / "submitit" / "tiny").glob("*_0_log.err"))) == 3  # one job per run
    assert not list((sub / "claims" / "tiny").glob("*.json"))


@pytest.mark.e2e
def test_a_failed_run_through_the_executor_is_recorded(three_ways):
    sub, code, err = three_ways["submitit"]
    assert code == 1 and "FAILED name=fp,kind=davis,root=" in err, err[-3000:]
    client, runs = by_key(sub)
    (failed,) = [r for r in runs.values() if r.info.status == "FAILED"]
    assert "truncated" in failed.data.tags["failure_reason"].lower()
    assert "traceback.txt" in {f.path for f in client.list_artifacts(failed.info.run_id)}
    assert {r.info.status for r in runs.values()} == {"FINISHED", "FAILED"}


@pytest.mark.e2e
def test_two_local_workers_run_each_run_once(three_ways):
    results, code, err = three_ways["workers"]
    assert code == 1 and err.count("FAILED name=fp,kind=davis") == 2, err[-3000:]  # the worker's line, and ours
    _, runs = by_key(results)  # one record per run_key: no run was run twice
    _, local = by_key(three_ways["local"][0])
    assert {k: r.info.status for k, r in runs.items()} == {k: r.info.status for k, r in local.items()}
    assert len(records(results, "suite")[1]) == 2  # one suite record per worker process
    assert (results / "tiny" / "summary.md").read_text().count("| rtn |") == 1


@pytest.mark.e2e
def test_a_killed_job_is_recorded_and_its_claim_released(tmp_path):
    suite = tmp_path / "tiny.yaml"
    suite.write_text(SUITE.format(bad="x").split("include:")[0].replace("[fp, rtn]", "[fp]"))
    results = tmp_path / "results"
    proc = start(suite, results, "--executor", "submitit-local", "--time", "10")
    claims = results / "claims" / "tiny"
    # A record with its tags: Tracker.run tags it just after creating it, and a kill in between
    # leaves a record without a run_key, which nothing can close.
    query = (
        "SELECT count(*) FROM runs JOIN tags ON tags.run_uuid = runs.run_uuid "
        "WHERE tags.key = 'kind' AND tags.value = 'run' AND runs.status = 'RUNNING'"
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            with sqlite3.connect(f"file:{results / 'mlflow.db'}?mode=ro", uri=True) as db:
                if db.execute(query).fetchone()[0] and list(claims.glob("*.json")):
                    break
        except sqlite3.Error:
            pass
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    (claim,) = claims.glob("*.json")
    os.kill(json.loads(claim.read_text())["pid"], signal.SIGKILL)  # the job's process, in its run
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1 and "ended without a result" in err, err[-3000:]
    _, (run,) = records(results)
    assert run.info.status == "KILLED" and "process died" in run.data.tags["failure_reason"]
    assert not list(claims.glob("*.json"))


def test_a_bad_executor_section_is_one_line(tmp_path):
    suite = tmp_path / "tiny.yaml"
    cases = {
        "executor: {kind: slurm, gpus: -1}": "executor.gpus: input should be greater than or equal to 0 (got -1)",
        "executor: {partion: gpu}": "unknown key 'executor.partion'; did you mean 'executor.partition'?",
        "executor: {kind: pbs}": "executor.kind: input should be 'local', 'gpus', 'slurm' or 'submitit-local' (got 'pbs')",
    }
    for section, expected in cases.items():
        suite.write_text(f"name: tiny\n{section}\n")
        with pytest.raises(ConfigError) as e:
            load_suite(str(suite))
        assert str(e.value) == f"{suite}: {expected}", str(e.value)


def test_executor_options_on_the_command_line(tmp_path, capsys):
    suite = tmp_path / "tiny.yaml"
    suite.write_text("name: tiny\nexecutor: {kind: slurm, workers: 3, partition: gpu}\n")

    def error(*args):
        assert cli.main(["suite", str(suite), "--results", str(tmp_path / "r"), *args]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1, lines
        return lines[0]

    assert error("--dry-run") == f"error: {suite}: executor.workers: worker processes are for executor local only " + (
        "(gpus starts one per visible GPU; slurm and submitit-local one job per run)"
    )
    assert "command line: --workers: input should be greater than or equal to 1 (got 0)" in error(
        "--executor", "local", "--workers", "0"
    )
    assert error("--executor", "slurm", "--workers", "2").startswith("error: command line: --workers: worker")
    if shutil.which("sbatch") is None:
        assert (
            error("--workers", "1") == "error: executor slurm: sbatch is not on PATH (submit from a SLURM login node)"
        )
    if not torch.cuda.is_available():
        assert error("--executor", "gpus", "--workers", "1") == (
            "error: executor gpus: no GPU is visible (torch.cuda.device_count() is 0); use --workers N for CPUs"
        )
    assert not (tmp_path / "r").exists()  # nothing started
