"""Clean records: a dry run writes nothing, a bad database is one line, a killed invocation's parent
record and scratch folders are cleaned up by the next one, Ctrl-C records KILLED in one line."""

import contextlib
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from harness.data.davis import read_palette_png, write_palette_png
from harness.tracking import Tracker

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
SUITE = """
name: tiny
base:
  data:
    synthetic: {sequences: 2, frames: 4, size: 96x64, seed: 1}
    calib: {frames: 3}
matrix:
  method.name: [fp, rtn]
"""


@pytest.fixture
def suite_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(SUITE)
    return path


def start(suite, results, *extra):
    # SIGINT as in a terminal, even where the test runner was started with it ignored.
    return subprocess.Popen(
        [sys.executable, "-m", "harness", "suite", str(suite), *extra, "--results", str(results)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def runs(results, kind):
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny")
    return [] if exp is None else client.search_runs([exp.experiment_id], f"tags.kind = '{kind}'")


def wait_for_running_child(proc, results, old=()):
    """Until the process has a RUNNING child record (a run in flight) other than the `old` ones."""
    # Plain read-only SQL: an MlflowClient here could race the process creating the schema.
    query = (
        "SELECT count(*) FROM runs JOIN tags ON tags.run_uuid = runs.run_uuid "
        "WHERE tags.key = 'kind' AND tags.value = 'run' AND runs.status = 'RUNNING'"
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            with contextlib.closing(sqlite3.connect(f"file:{results / 'mlflow.db'}?mode=ro", uri=True)) as db:
                if db.execute(query + "".join(f" AND runs.run_uuid != '{r}'" for r in old)).fetchone()[0]:
                    return
        except sqlite3.Error:
            pass  # not created yet, or locked
        time.sleep(0.5)
    raise AssertionError(f"no run in flight: {proc.communicate()[1][-2000:]}")


def files(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_dry_run_writes_nothing(suite_file, tmp_path):
    results = tmp_path / "results"

    def dry_run():
        cmd = [sys.executable, "-m", "harness", "suite", suite_file, "--dry-run", "--results", results]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
        assert proc.returncode == 0, proc.stderr
        return proc

    dry_run()
    assert not results.exists()
    Tracker(results, "other")  # a database from another suite
    before = files(results)
    proc = dry_run()
    assert all(line.split()[1] == "pending" for line in proc.stdout.splitlines()[1:])
    assert files(results) == before  # no experiment, no claims folder


def test_a_broken_database_is_one_line(suite_file, tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    db = results / "mlflow.db"
    db.write_bytes(os.urandom(4096))
    (results / "artifacts" / "tiny" / "0").mkdir(parents=True)  # the suite had records
    db_empty = b""
    cases = {
        os.urandom(4096): f"{db} is not an SQLite database",
        db_empty: f"{db} is empty but {results / 'artifacts' / 'tiny'} holds records",
    }
    for content, expected in cases.items():
        db.write_bytes(content)
        for dry in (["--dry-run"], []):
            proc = subprocess.run(
                [sys.executable, "-m", "harness", "suite", suite_file, *dry, "--results", results],
                capture_output=True,
                text=True,
                env=ENV,
            )
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 2 and len(lines) == 1 and expected in lines[0], proc.stderr[-2000:]
            assert db.read_bytes() == content  # not replaced by a new database


def test_schema_less_database_is_one_line(suite_file, tmp_path):
    results = tmp_path / "results"
    (results / "artifacts" / "tiny" / "0").mkdir(parents=True)
    sqlite3.connect(results / "mlflow.db").execute("CREATE TABLE notes (x)").connection.commit()
    proc = subprocess.run(
        [sys.executable, "-m", "harness", "suite", suite_file, "--dry-run", "--results", results],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert proc.returncode == 2 and "not an MLflow database (no experiments table)" in proc.stderr


@pytest.mark.e2e
def test_sigkill_then_ctrl_c(suite_file, tmp_path):
    results = tmp_path / "results"
    first = start(suite_file, results)
    wait_for_running_child(first, results)
    first.send_signal(signal.SIGKILL)
    first.wait()
    # A tiny run may finish between the poll that saw it running and the kill: the one in flight counts.
    children = runs(results, "run")
    (child,) = [r for r in children if r.info.status == "RUNNING"]
    assert all(r.info.status == "FINISHED" for r in children if r is not child)
    (parent,) = runs(results, "suite")
    assert child.info.status == parent.info.status == "RUNNING"  # what a SIGKILL leaves

    # Scratch folders of a dead process (the one just reaped) and of a live one (this test).
    dead = first.pid
    host = socket.gethostname()
    stale = [results / "tmp" / f"eval-x.tmp-{dead}@{host}", results / "data" / f"synthetic-y.tmp-{dead}@{host}"]
    live = results / "tmp" / f"eval-z.tmp-{os.getpid()}@{host}"
    for folder in [*stale, live]:
        (folder / "sub").mkdir(parents=True)

    second = start(suite_file, results)
    wait_for_running_child(second, results, old=[child.info.run_id])
    assert not any(p.exists() for p in stale) and live.exists()
    # The first invocation's records were closed as KILLED by the second.
    old = {r.info.run_id: r for r in runs(results, "suite") + runs(results, "run")}
    assert old[parent.info.run_id].info.status == "KILLED"
    assert old[child.info.run_id].info.status == "KILLED"

    second.send_signal(signal.SIGINT)
    _, err = second.communicate(timeout=120)
    lines = err.strip().splitlines()
    assert second.returncode == 130, err[-3000:]
    assert lines[-1].startswith("interrupted: qbench suite stopped") and "Traceback" not in err, err[-3000:]
    assert [line for line in lines if not line.startswith(("INFO", "WARNING"))] == lines[-1:], err[-3000:]
    statuses = {r.info.run_id: r.info.status for r in runs(results, "suite") + runs(results, "run")}
    # Nothing is left RUNNING and both invocations' suite records are KILLED. A run of the second
    # may have finished before the SIGINT arrived (tiny runs take seconds): FINISHED, not KILLED.
    assert set(statuses.values()) <= {"KILLED", "FINISHED"}, statuses
    assert all(r.info.status == "KILLED" for r in runs(results, "suite")), statuses
    assert list(statuses.values()).count("KILLED") >= 3, statuses


def test_late_object_in_the_run_record(davis_root, tmp_path):
    root = shutil.copytree(davis_root, tmp_path / "davis")
    seq = (root / "ImageSets" / "2017" / "val.txt").read_text().split()[0]
    png = root / "Annotations" / "480p" / seq / "00002.png"
    ids = read_palette_png(png)
    ids[:4, :4] = 9
    write_palette_png(png, ids)
    suite = tmp_path / "late.yaml"
    suite.write_text(
        f"name: tiny\nbase:\n  data:\n    eval: {{kind: davis, root: {root}, split: val}}\n"
        f"    calib: {{kind: davis, root: {root}, split: train, frames: 2}}\n"
    )
    results = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, "-m", "harness", "suite", suite, "--results", results], capture_output=True, text=True, env=ENV
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count(f"sequence {seq}: object ids [9] appear after the first frame") == 1
    (run,) = runs(results, "run")
    assert run.data.tags["warnings"] == f"{seq}: ids [9] appear after frame 0, not scored"
    assert (results / "artifacts" / "tiny" / run.info.run_id / "artifacts" / "late_objects.json").is_file()
