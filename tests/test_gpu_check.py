"""The GPU check's checks, run on a CPU at the small model's size (CI has no GPU)."""

import json
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.e2e


def test_gpu_check_runs_every_check_and_prints_a_line_for_each(tmp_path):
    cmd = [sys.executable, "-m", "harness.gpu_check", "--device", "cpu", "--model", "sam2_small"]
    proc = subprocess.run([*cmd, "--results", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = {line.split(" (")[0]: line for line in proc.stdout.splitlines() if line[:4] in ("PASS", "FAIL", "SKIP")}
    assert set(lines) == {"PASS eval bench", "PASS train bench", "PASS rehearsal", "SKIP ddp nccl"}, proc.stdout
    assert "rtn W2A8" in lines["PASS eval bench"] and "2 runs recorded" in lines["PASS rehearsal"]
    assert "qsam2 W2A8" in proc.stdout  # the train bench's table
    figures = json.loads((tmp_path / "bench" / "train.json").read_text())
    assert {k.split("/")[2] for k in figures} == {"fp", "lsq", "pact", "qsam2"}
    assert json.loads((tmp_path / "gpu_check.json").read_text())["rehearsal"] == "PASS"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here")
def test_gpu_check_without_cuda_says_so_and_fails():
    proc = subprocess.run([sys.executable, "-m", "harness.gpu_check"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stdout.startswith("FAIL cuda: no CUDA device here"), proc.stdout
