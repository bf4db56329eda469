"""Where a suite's runs run: this process, several local processes, or submitit jobs (SLURM).

Every executor runs a run the same way (runner.run_claimed: claim -> child MLflow record ->
run_one), so a record does not depend on where it ran:

- local: runner.run_suite in this process; with workers > 1, that many `qbench suite` processes on
  one results folder, sharing the runs out through their claims (harness/claims.py).
- gpus: one such worker process per visible GPU, each seeing only its own (CUDA_VISIBLE_DEVICES).
- slurm / submitit-local: this process (the submitter) runs the preflight, opens the suite record,
  submits one job per pending run (or one job array) and waits for them; each job re-loads the
  suite from its file with the same overrides, finds its run by run_key and runs it with its
  record under the submitter's suite record. submitit-local starts each job as a process here:
  the same path without a cluster, for tests.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import mlflow

from harness.claims import Claims, clean_scratch, pid_alive
from harness.config import Suite, load_suite
from harness.errors import ConfigError
from harness.schema import ExecutorCfg, validate

log = logging.getLogger("qbench")


def resolve(suite: Suite, cli: dict) -> ExecutorCfg:
    """The suite file's executor section with the command line's options (not None) over it."""
    given = {k: v for k, v in cli.items() if v is not None}
    validate(ExecutorCfg, given, "command line", prefix="--")  # a bad option is named as typed
    cfg = ExecutorCfg(**{**suite.executor, **given})
    if cfg.kind != "local" and cfg.workers != 1:
        where = "command line: --workers" if "workers" in given else f"{suite.path}: executor.workers"
        raise ConfigError(
            f"{where}: worker processes are for executor local only (gpus starts one per visible GPU; "
            "slurm and submitit-local one job per run)"
        )
    return cfg


def run(
    suite: Suite, results_dir: str | Path, overrides: list[str], cfg: ExecutorCfg, attempted_since: float | None = None
) -> tuple[list[dict], list[tuple[str, str]]]:
    """Run the suite with this executor: (summary rows, failures), as runner.run_suite returns them.
    `attempted_since`: a worker's (see runner.run_suite)."""
    from harness import runner

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and (cfg.kind != "local" or cfg.workers > 1):
        raise ConfigError(f"executor {cfg.kind}: under torchrun only the local executor with one worker runs")
    if cfg.kind == "local" and cfg.workers == 1:
        return runner.run_suite(suite, results_dir, attempted_since)
    if cfg.kind == "local":
        return workers(suite, results_dir, overrides, cfg.workers)
    if cfg.kind == "gpus":
        return workers(suite, results_dir, overrides, None, visible_gpus())
    return submit(suite, results_dir, overrides, cfg)


# --- local worker processes ------------------------------------------------------------------------


def visible_gpus() -> list[str]:
    """The GPUs this process sees, as CUDA_VISIBLE_DEVICES entries (one per worker)."""
    import torch

    n = torch.cuda.device_count()
    if n == 0:
        raise ConfigError("executor gpus: no GPU is visible (torch.cuda.device_count() is 0); use --workers N for CPUs")
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return listed[:n] if listed else [str(i) for i in range(n)]


def worker_env(n: int) -> dict:
    """The environment of one of `n` worker processes on this machine: each gets its share of the
    CPU threads unless OMP_NUM_THREADS is set (torch's default, every core each, oversubscribes)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    return env


def workers(
    suite: Suite, results_dir: str | Path, overrides: list[str], n: int | None, gpus: list[str] | None = None
) -> tuple[list[dict], list[tuple[str, str]]]:
    """`n` processes of the ordinary suite loop (or one per GPU of `gpus`) on one results folder."""
    from harness import runner
    from harness.tracking import Tracker

    runner.preflight(suite, results_dir)  # once, here, rather than one error per worker
    tracker = Tracker(results_dir, suite.name)  # the database and experiment before the workers start
    cmd = [sys.executable, "-m", "harness", "suite", str(suite.path.resolve()), *overrides]
    start, procs = time.time(), []
    cmd += ["--results", str(results_dir), "--executor", "local", "--workers", "1", "--attempted-since", str(start)]
    count = len(gpus) if gpus is not None else n
    for i in range(count):
        env = worker_env(count)
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i]
        # Its own session: a Ctrl-C in the terminal reaches the workers once, forwarded below, not twice.
        procs.append(subprocess.Popen(cmd, env=env, start_new_session=True))
    what = f"GPUs {','.join(gpus)}" if gpus is not None else "CPU"
    log.info("suite %s: %d worker processes (%s), pids %s", suite.name, len(procs), what, [p.pid for p in procs])
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:  # each worker records its run in flight as KILLED
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
        for p in procs:
            p.wait()
        raise
    failed = _failed_since(suite, tracker, start)
    for i, code in enumerate(codes):
        if code not in (0, 1):  # 1: some of its runs failed, listed from their records
            failed.append((f"worker {i}", f"exited with status {code}"))
    rows = runner.summary_rows(suite, tracker)
    runner.write_summary(rows, Path(results_dir) / suite.name / "summary.md", suite)
    return rows, failed


def _failed_since(suite: Suite, tracker, start: float) -> list[tuple[str, str]]:
    """(name, reason) of the runs not FINISHED whose latest record since `start` is FAILED."""
    failed = []
    for spec in suite.runs:
        if tracker.finished(spec.run_key) is None and (run := tracker.latest(spec.run_key, start)):
            if run.info.status == "FAILED":
                failed.append((spec.name, run.data.tags.get("failure_reason", "no reason recorded")))
    return failed


# --- submitit jobs ---------------------------------------------------------------------------------


def _job(suite_path: str, overrides: list[str], results_dir: str, run_key: str, parent_run_id: str):
    """One submitit job: the run of `suite_path` with this run_key, as the local runner runs it."""
    from harness import runner
    from harness.tracking import Tracker

    # What `qbench` sets up for the local runner (harness/cli.py), for the same logs.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("qbench").setLevel(logging.INFO)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="fast_hadamard_transform package not found")
    suite = load_suite(suite_path, overrides)
    spec = next((s for s in suite.runs if s.run_key == run_key), None)
    if spec is None:
        raise ConfigError(
            f"{suite_path}: no run has run_key {run_key} here: the suite file changed since it was submitted, "
            f"or this job resolves another device ({suite.runs[0].config['device'] if suite.runs else '?'})"
        )
    results = Path(results_dir)
    tracker = Tracker(results, suite.name)
    claims = Claims(results / "claims" / suite.name)
    return runner.run_claimed(spec, suite.name, results, tracker, claims, parent_run_id=parent_run_id)


def job_overrides(suite: Suite, overrides: list[str], cfg: ExecutorCfg) -> list[str]:
    """The overrides the jobs load the suite with: the device of a job is the one its resources give
    (cuda with gpus > 0), not the submitter's (a login node without GPUs), so that the submitter and
    the jobs compute the same run_keys. A device set on the command line or in the suite file stays."""
    from harness.config import read_suite_file

    raw = read_suite_file(suite.path)
    explicit = (
        any(o.startswith("device=") for o in overrides)
        or "device" in raw.base
        or "device" in raw.matrix
        or any("device" in extra for extra in raw.include)
    )
    return list(overrides) if explicit else [*overrides, f"device={'cuda' if cfg.gpus else 'cpu'}"]


def executor(suite: Suite, results_dir: Path, cfg: ExecutorCfg):
    """submitit's executor for this suite: SLURM, or its local cluster."""
    import submitit

    folder = Path(cfg.log_folder) if cfg.log_folder else results_dir / "submitit" / suite.name
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm" if cfg.kind == "slurm" else "local")
    ex.update_parameters(
        name=f"qbench-{suite.name}",
        timeout_min=cfg.time,
        gpus_per_node=cfg.gpus,
        mem_gb=cfg.mem,
        cpus_per_task=cfg.cpus,
        slurm_partition=cfg.partition,
        slurm_array_parallelism=cfg.parallelism if cfg.array else None,
    )
    return ex


def submit(
    suite: Suite, results_dir: str | Path, overrides: list[str], cfg: ExecutorCfg
) -> tuple[list[dict], list[tuple[str, str]]]:
    """Submit one job per pending run, wait for them, write the summary."""
    from harness import runner
    from harness.progress import progress
    from harness.tracking import Tracker

    if cfg.kind == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError("executor slurm: sbatch is not on PATH (submit from a SLURM login node)")
    overrides = job_overrides(suite, overrides, cfg)
    suite = load_suite(str(suite.path), overrides)  # the runs as the jobs will see them
    runner.preflight(suite, results_dir)
    results_dir = Path(results_dir).resolve()
    for path in clean_scratch(results_dir):
        log.info("removed %s, left by a process that died", path)
    ex = executor(suite, results_dir, cfg)
    tracker = Tracker(results_dir, suite.name)
    claims = Claims(results_dir / "claims" / suite.name)
    failed, running = [], {}
    with tracker.suite(suite.name, len(suite.runs)):
        parent = mlflow.active_run().info.run_id
        mlflow.set_tag("executor", cfg.kind)
        queue = []
        for spec in suite.runs:
            state = "finished" if tracker.finished(spec.run_key) else "busy" if claims.owner(spec.run_key) else None
            if state:
                log.info("skip %s (run_key %s %s)", spec.name, spec.run_key, state)
            else:
                queue.append(spec)
        args = [str(suite.path.resolve()), overrides, str(results_dir)]
        # A job array throttles itself (slurm_array_parallelism); otherwise at most `parallelism` in flight.
        limit = len(queue) if (cfg.kind == "slurm" and cfg.array) or not cfg.parallelism else cfg.parallelism
        poll = 15.0 if cfg.kind == "slurm" else 0.5
        with progress(total=len(queue), desc=f"suite {suite.name} ({cfg.kind})", unit="run") as bar:
            try:
                if cfg.kind == "slurm" and cfg.array:
                    with ex.batch():
                        batch = [(ex.submit(_job, *args, s.run_key, parent), s) for s in queue]
                    running.update({job: (spec, time.time()) for job, spec in batch})
                    queue = []
                    if batch:
                        job = batch[0][0]
                        log.info("submitted %d runs as job array %s; logs: %s", len(batch), job.job_id, ex.folder)
                while queue or running:
                    while queue and len(running) < limit:
                        spec = queue.pop(0)
                        job = ex.submit(_job, *args, spec.run_key, parent)
                        running[job] = (spec, time.time())
                        log.info("submitted %s as job %s; logs: %s", spec.name, job.job_id, job.paths.stderr)
                    for job in [j for j in running if j.done()]:
                        spec, submitted = running.pop(job)
                        reason = _outcome(job, spec, submitted, tracker, claims)
                        if reason is not None:
                            failed.append((spec.name, reason))
                        bar.update(1)
                        bar.set_postfix(failed=len(failed))
                    time.sleep(poll if running else 0)
            except KeyboardInterrupt:  # the jobs stop too; each records its run in flight as KILLED
                for job in running:
                    job.cancel(check=False)
                raise
    rows = runner.summary_rows(suite, tracker)
    runner.write_summary(rows, results_dir / suite.name / "summary.md", suite)
    return rows, failed


def _outcome(job, spec, submitted: float, tracker, claims: Claims) -> str | None:
    """The failure reason of a job that has ended, or None: its run was done or skipped."""
    from submitit.core.utils import FailedJobError, UncompletedJobError

    try:
        outcome, reason = job.result()
    except (FailedJobError, UncompletedJobError) as e:
        if isinstance(e, FailedJobError):  # raised in the job, outside the run: its traceback's last line
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            end = next((i for i, line in enumerate(lines) if line.startswith("You can check full logs")), len(lines))
            cause = next((line for line in reversed(lines[:end]) if not set(line) <= {"-"}), "FailedJobError")
        else:  # no result at all: the process was killed (scancel, time limit, memory, a signal)
            state = job.state  # SLURM's: TIMEOUT, OUT_OF_MEMORY, CANCELLED, ...; a local job's says nothing
            cause = "its process was killed (a signal, scancel, the time or memory limit)"
            cause += f", state {state}" if state not in ("FINISHED", "RUNNING", "UNKNOWN") else ""
        reason = f"job {job.job_id} ended without a result: {cause}; log: {job.paths.stderr}"
        log.error("run %s: %s", spec.name, reason)
        if tracker.finished(spec.run_key) is None:
            _close_dead_job(spec.run_key, submitted, tracker, claims)
        return reason
    return reason if outcome == "failed" else None


def _close_dead_job(key: str, submitted: float, tracker, claims: Claims) -> None:
    """Release the claim of a job that ended inside its run, and close its record as KILLED, as the
    next local invocation would; a claim from another host would otherwise hold the run for a day."""
    path = claims.folder / f"{key}.json"
    with claims.locked():  # no process claims the run between the check and the record's closing
        owner = claims.owner(key)  # None: no claim, or a stale one (its process, on this host, is gone)
        if owner is not None and (
            owner.get("time", 0) < submitted or owner.get("host") == socket.gethostname() and pid_alive(owner["pid"])
        ):
            return  # another process holds it and runs it
        path.unlink(missing_ok=True)  # the job's: written after it was submitted, by a process now gone
        tracker.mark_killed(key)
