"""Faults at real size (issue 21), a benchmark you run, not a CI test (docs/real-size.md):

    python tests/rehearse_faults.py resume [--results DIR]
    python tests/rehearse_faults.py search [--results DIR]

resume: suites/rehearse_resume.yaml run straight through, then again in a second results folder,
SIGKILLed while it writes its step-2 checkpoint and invoked again; prints each command's exit
status, the records they left and how far apart the two runs' final weights are (L2).
search: suites/rehearse_search.yaml, SIGKILLed in the training step of its first trial and
invoked again; prints the exit statuses and every Optuna trial and MLflow record it left.
Inputs as for rehearse_real (qbench make-checkpoint / make-data into results/rehearse/).
"""

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import optuna
import torch

ROOT = Path(__file__).resolve().parents[1]


def start(args: list[str], log: Path) -> subprocess.Popen:
    print("$ qbench", " ".join(args), flush=True)
    return subprocess.Popen(
        [sys.executable, "-m", "harness", *args], cwd=ROOT, stderr=open(log, "w"), stdout=subprocess.DEVNULL
    )


def finish(proc: subprocess.Popen) -> int:
    rc = proc.wait()
    print(f"  exit status {rc}", flush=True)
    return rc


def records(results: Path) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{results / 'mlflow.db'}")
    for run in mlflow.search_runs(search_all_experiments=True, output_format="list", order_by=["start_time"]):
        tags = run.data.tags
        name, reason = tags.get("mlflow.runName", ""), tags.get("failure_reason", "")
        print(f"  record {name!r}: {run.info.status}" + (f" ({reason})" if reason else ""))


def wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 3600) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit(f"{what}: not seen (exit status {proc.poll()})")
        time.sleep(0.005)


def resume(results: Path, suite_file: str) -> None:
    suite = ["suite", suite_file]
    straight, killed = results / "straight", results / "killed"
    finish(start([*suite, "--results", str(straight)], results / "straight.log"))
    records(straight)

    proc = start([*suite, "--results", str(killed)], results / "killed.log")
    folder = killed / "checkpoints" / "rehearse_resume"

    def writing_step_2() -> bool:  # last.pt (step 1) is complete and step 2's temporary file is open
        return any(folder.glob("*/last.tmp-*")) and any(folder.glob("*/last.pt"))

    wait_for(writing_step_2, proc, "the step-2 checkpoint write")
    os.kill(proc.pid, signal.SIGKILL)
    finish(proc)
    ckpt = next(folder.glob("*/last.pt"))
    print(f"  left: {ckpt.name} at step {torch.load(ckpt, weights_only=False)['step']}", flush=True)
    records(killed)
    finish(start([*suite, "--results", str(killed)], results / "resumed.log"))
    print("  " + next(line for line in open(results / "resumed.log") if "resuming from" in line).strip())
    records(killed)

    a = torch.load(next((straight / "checkpoints").glob("*/*/last.pt")), weights_only=False)
    b = torch.load(ckpt, weights_only=False)
    diff = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    # At real size two uninterrupted runs differ too (2-thread CPU sums): compare the distance with theirs.
    l2 = sum((a["model"][k] - b["model"][k]).double().norm() ** 2 for k in diff if a["model"][k].is_floating_point())
    print(
        f"  steps {a['step']} and {b['step']}; {len(diff)} of {len(a['model'])} tensors differ, L2 {float(l2) ** 0.5:.4f}"
    )
    losses = [[h["train/loss"] for h in s["history"]] for s in (a, b)]
    print(f"  losses straight {losses[0]}, killed and resumed {losses[1]}")


def search(results: Path, suite_file: str) -> None:
    args = ["search", suite_file, "--results", str(results)]
    proc = start(args, results / "search.log")

    def training() -> bool:
        return "train: 0/1 step" in (results / "search.log").read_text()

    wait_for(training, proc, "the first trial's training step")
    time.sleep(20)  # inside the step
    os.kill(proc.pid, signal.SIGKILL)
    finish(proc)
    trials(results)
    finish(start(args, results / "resumed.log"))
    trials(results)
    records(results)


def trials(results: Path) -> None:
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(next((results / "searches").glob("*.journal"))))
    )
    for t in optuna.load_study(study_name="rehearse_search", storage=storage).trials:
        attrs = {k: v for k, v in t.user_attrs.items() if k in ("retry_of", "base", "run_key")}
        print(f"  trial {t.number}: {t.state.name} values={t.values} params={t.params} {attrs}")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("case", choices=["resume", "search"])
    p.add_argument("--results", default="results/rehearse/faults")
    p.add_argument("--suite", help="another suite file of the same name (rehearse_resume or rehearse_search)")
    a = p.parse_args()
    out = (ROOT / a.results / a.case).resolve()
    out.mkdir(parents=True, exist_ok=True)
    {"resume": resume, "search": search}[a.case](out, a.suite or f"rehearse_{a.case}")
