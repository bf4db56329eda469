"""MLflow tracking on sqlite: one parent run per suite invocation, one child run per RunSpec.

Each child run carries the flattened run config as params, the run_key (hash of the resolved
config) and the package versions as tags, metrics, and artifacts (per-object CSV, ...).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import platform
import socket
import sqlite3
import subprocess
import time
import traceback
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import mlflow
import torch
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from harness.claims import pid_alive
from harness.errors import ConfigError, Pruned

# MLflow's alembic migrations and its sqlite store log at INFO on every connection.
for _name in ("alembic", "mlflow.store.db.utils"):
    logging.getLogger(_name).setLevel(logging.WARNING)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def flatten(cfg: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and not key.startswith("quant.bits"):
            out.update(flatten(v, f"{key}."))
        else:
            out[key] = v if isinstance(v, (str, int, float, bool)) or v is None else json.dumps(v)
    return {k: str(v) for k, v in out.items()}


def environment() -> dict[str, str]:
    """Versions, the harness's git commit and the device: tags on every record."""
    tags = {"version.python": platform.python_version()}
    for pkg in ("torch", "sam2", "brevitas", "mlflow", "sam2-qbench"):
        try:
            tags[f"version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            tags[f"version.{pkg}"] = "not installed"
    git = ["git", "-C", str(Path(__file__).resolve().parents[1]), "rev-parse", "HEAD"]
    try:
        tags["git_commit"] = subprocess.run(git, capture_output=True, text=True, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        tags["git_commit"] = "unknown"
    if torch.cuda.is_available():
        tags["device"] = torch.cuda.get_device_name()
    else:
        tags["device"] = f"cpu {platform.machine()} ({torch.get_num_threads()} threads)"
    return tags


def check_db(results_dir: Path, experiment: str) -> bool:
    """Whether results/mlflow.db holds MLflow's tables. One error, instead of SQLAlchemy's traceback
    or a silent new database that shows every run as pending, for a file that is not an SQLite
    database, and for an empty or table-less one while the suite's artifacts say it had records."""
    db = results_dir / "mlflow.db"
    if not db.is_file():
        return False
    with open(db, "rb") as f:
        head = f.read(16)
    if head and head != b"SQLite format 3\x00":
        raise ConfigError(f"{db} is not an SQLite database; move it away or choose another --results folder")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
            tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as e:
        raise ConfigError(f"{db} is a damaged SQLite database ({e}); restore it or move it away") from None
    artifacts = results_dir / "artifacts" / experiment
    if "experiments" not in tables and artifacts.is_dir() and any(artifacts.iterdir()):
        what = "empty" if not head else "not an MLflow database (no experiments table)"
        raise ConfigError(
            f"{db} is {what} but {artifacts} holds records of suite {experiment}: restore the database from a "
            "backup, or move both away to start afresh"
        )
    return "experiments" in tables


def died_reason(client: MlflowClient, run) -> str:
    """Why a RUNNING record whose process is gone stopped, as far as the record can tell: the phase
    it was in, its last logged training step and that step's peak memory beside the machine's."""
    tags, metrics = run.data.tags, run.data.metrics
    where = f" in phase {tags['phase']}" if "phase" in tags else ""
    training = tags.get("phase") == "train"
    if training and "train/loss" in metrics:
        last = max(m.step for m in client.get_metric_history(run.info.run_id, "train/loss"))
        where += f" after logged train step {last} of {run.data.params.get('train.steps', '?')}"
    memory = ""
    if training and "train/peak_gib" in metrics:
        total = _mem_total_gib()
        memory = f"; its last logged step peaked at {metrics['train/peak_gib']:.1f} GiB"
        memory += f" of this machine's {total:.1f} GiB" if total else ""
    return (
        f"process died{where} before the run ended, without an exit of its own: a kill signal "
        f"(SIGKILL from the kernel's out-of-memory killer, scancel, a time limit) or the machine stopping{memory}"
    )


def _mem_total_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            return int(f.readline().split()[1]) / 2**20  # MemTotal, kB
    except (OSError, ValueError, IndexError):
        return None


class Tracker:
    def __init__(self, results_dir: str | Path, experiment: str, create: bool = True):
        """With create=False (a dry run) nothing is written: no folder, database or experiment."""
        self.results_dir = Path(results_dir).resolve()
        self.experiment, self.experiment_id = experiment, None
        self.uri = f"sqlite:///{self.results_dir / 'mlflow.db'}"
        if not create:
            if check_db(self.results_dir, experiment):
                self.client = MlflowClient(self.uri)
                exp = self.client.get_experiment_by_name(experiment)
                self.experiment_id = exp.experiment_id if exp else None
            return
        self.results_dir.mkdir(parents=True, exist_ok=True)
        mlflow.set_tracking_uri(self.uri)
        # Two processes starting on a new results folder would both create the schema and the
        # experiment; serialize that with a file lock.
        with open(self.results_dir / ".mlflow.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            check_db(self.results_dir, experiment)
            self.client = MlflowClient(self.uri)
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                artifacts = (self.results_dir / "artifacts" / experiment).as_uri()
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifacts)
            else:
                self.experiment_id = exp.experiment_id

    def latest(self, key: str, since: float = 0, status: str | None = None):
        """The latest record of this run_key started at or after `since` (a time.time()), of this
        status where one is given, or None."""
        if self.experiment_id is None:
            return None
        where = f"tags.run_key = '{key}' and attributes.start_time >= {int(since * 1000)}"
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=where + (f" and attributes.status = '{status}'" if status else ""),
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0] if runs else None

    def finished(self, key: str):
        """The latest FINISHED record of this run_key, or None."""
        return self.latest(key, status="FINISHED")

    def mark_killed(self, key: str) -> None:
        """Close as KILLED the RUNNING records of a run whose process died (its claim was stale),
        with what the record tells of how far it got."""
        query = f"tags.run_key = '{key}' and attributes.status = 'RUNNING'"
        for run in self.client.search_runs([self.experiment_id], filter_string=query):
            self.client.set_tag(run.info.run_id, "failure_reason", died_reason(self.client, run))
            self.client.set_terminated(run.info.run_id, status="KILLED")

    def close_dead_suites(self) -> None:
        """Close as KILLED the RUNNING parent records whose process (on this host) is gone."""
        for run in self.client.search_runs(
            [self.experiment_id], filter_string="tags.kind = 'suite' and attributes.status = 'RUNNING'"
        ):
            tags = run.data.tags
            if tags.get("host") == socket.gethostname() and tags.get("pid", "").isdigit():
                pid = int(tags["pid"])
                if pid != os.getpid() and not pid_alive(pid):
                    self.client.set_tag(run.info.run_id, "failure_reason", "process died before the suite ended")
                    self.client.set_terminated(run.info.run_id, status="KILLED")

    @contextmanager
    def suite(self, name: str, n_runs: int, search: str | None = None):
        """The parent record of a suite invocation (or of a search worker: tag search=<study>)."""
        self.close_dead_suites()
        with mlflow.start_run(
            experiment_id=self.experiment_id, run_name=f"{name} {time.strftime('%Y-%m-%d %H:%M:%S')}"
        ):
            owner = {"pid": str(os.getpid()), "host": socket.gethostname()}  # for close_dead_suites
            mlflow.set_tags({"kind": "suite", "suite": name, "runs": str(n_runs), **owner, **environment()})
            if search is not None:
                mlflow.set_tag("search", search)
            try:
                yield
            except KeyboardInterrupt:
                mlflow.end_run(status="KILLED")  # not FAILED: nothing went wrong with the suite
                raise

    @contextmanager
    def run(self, spec, tags: dict | None = None, parent_run_id: str | None = None):
        """A child run (of the active record, or of `parent_run_id`: a suite record of another process);
        an exception marks it FAILED with the reason as a tag, then propagates."""
        # Tagged as it is created: a kill right after must not leave a record without its run_key.
        tags = {"kind": "run", "run_key": spec.run_key, "suite": self.experiment, **environment(), **(tags or {})}
        if parent_run_id is not None:
            tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        with mlflow.start_run(experiment_id=self.experiment_id, run_name=spec.name, nested=True, tags=tags) as run:
            mlflow.log_params(flatten(spec.config))
            try:
                yield run
            except BaseException as e:
                if isinstance(e, KeyboardInterrupt):
                    phase = self.client.get_run(run.info.run_id).data.tags.get("phase")
                    mlflow.set_tag("failure_reason", "interrupted" + (f" in phase {phase}" if phase else ""))
                else:
                    mlflow.set_tag("failure_reason", f"{type(e).__name__}: {e}"[:5000])
                mlflow.log_text(traceback.format_exc(), "traceback.txt")
                # KILLED, not FAILED, where nothing went wrong with the run: an interrupt, a search's pruner
                killed = isinstance(e, (KeyboardInterrupt, Pruned))
                mlflow.end_run(status="KILLED" if killed else "FAILED")
                raise
