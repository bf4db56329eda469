"""Honest timing: frames/s after an untimed warm-up frame; progress lines without a terminal."""

import json
import os
import subprocess
import sys

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}

FIRST_AND_SECOND = """
import json, sys
from harness import models
from harness.data.davis import DavisDataset
from harness.evaluate import vos
model, ds = models.build("sam2_small", device="cpu"), DavisDataset(sys.argv[1], "val")
print(json.dumps([vos.evaluate(model, ds, progress=False)[1] for _ in range(2)]))
"""


def test_first_evaluation_of_a_fresh_process_is_timed_after_a_warm_up(davis_root):
    proc = subprocess.run(
        [sys.executable, "-c", FIRST_AND_SECOND, str(davis_root)], capture_output=True, text=True, env=ENV
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, second = json.loads(proc.stdout)
    assert first["time_warmup_s"] > 0 and second["time_warmup_s"] > 0
    # Same model, same frames: the first run's frames/s is not burdened by the process's first forward.
    assert first["fps"] > 0.5 * second["fps"], (first["fps"], second["fps"])
    assert {k: v for k, v in first.items() if k not in ("fps", "time_warmup_s")} == {
        k: v for k, v in second.items() if k not in ("fps", "time_warmup_s")
    }


def test_progress_lines_without_a_terminal(tmp_path):
    # stderr is a pipe here, as under CI or nohup: log lines instead of a bar or of nothing.
    proc = subprocess.run(
        [sys.executable, "-m", "harness", "make-data", "--out", tmp_path / "d", "--sequences", "3", "--frames", "2"],
        capture_output=True,
        text=True,
        env={**ENV, "QBENCH_PROGRESS_INTERVAL": "0"},
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "synthetic DAVIS" in line]
    assert lines[0] == "INFO qbench: synthetic DAVIS: 0/3 sequence"
    assert [line.split(": ", 2)[2].split(" after")[0] for line in lines[1:]] == [
        "1/3 sequence",
        "2/3 sequence",
        "3/3 sequence",
    ]
    assert "\r" not in proc.stderr
