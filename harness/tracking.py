"""MLflow tracking on sqlite: one parent run per suite invocation, one child run per RunSpec.

Each child run carries the flattened run config as params, the run_key (hash of the resolved
config) and the package versions as tags, metrics, and artifacts (per-object CSV, ...).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import platform
import subprocess
import time
import traceback
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import mlflow
import torch
from mlflow.tracking import MlflowClient

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


class Tracker:
    def __init__(self, results_dir: str | Path, experiment: str):
        self.results_dir = Path(results_dir).resolve()
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.uri = f"sqlite:///{self.results_dir / 'mlflow.db'}"
        mlflow.set_tracking_uri(self.uri)
        # Two processes starting on a new results folder would both create the schema and the
        # experiment; serialize that with a file lock.
        with open(self.results_dir / ".mlflow.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.client = MlflowClient(self.uri)
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                artifacts = (self.results_dir / "artifacts" / experiment).as_uri()
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifacts)
            else:
                self.experiment_id = exp.experiment_id
        self.experiment = experiment

    def finished(self, key: str):
        """The latest FINISHED child run with this run_key, or None."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.run_key = '{key}' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0] if runs else None

    def mark_killed(self, key: str) -> None:
        """Close RUNNING records of a run whose process died (its claim was stale)."""
        for run in self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.run_key = '{key}' and attributes.status = 'RUNNING'"
        ):
            self.client.set_tag(run.info.run_id, "failure_reason", "process died before the run ended")
            self.client.set_terminated(run.info.run_id, status="KILLED")

    @contextmanager
    def suite(self, name: str, n_runs: int):
        with mlflow.start_run(
            experiment_id=self.experiment_id, run_name=f"{name} {time.strftime('%Y-%m-%d %H:%M:%S')}"
        ):
            mlflow.set_tags({"kind": "suite", "suite": name, "runs": str(n_runs), **environment()})
            yield

    @contextmanager
    def run(self, spec):
        """A child run; an exception marks it FAILED with the reason as a tag, then propagates."""
        with mlflow.start_run(experiment_id=self.experiment_id, run_name=spec.name, nested=True) as run:
            mlflow.set_tags({"kind": "run", "run_key": spec.run_key, "suite": self.experiment, **environment()})
            mlflow.log_params(flatten(spec.config))
            try:
                yield run
            except BaseException as e:
                mlflow.set_tag("failure_reason", f"{type(e).__name__}: {e}"[:5000])
                mlflow.log_text(traceback.format_exc(), "traceback.txt")
                mlflow.end_run(status="KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
                raise
