"""`nox -s gpu_check` (`python -m harness.gpu_check`): the GPU path in one call, one pass / fail line
per check and every figure printed.

On CUDA (bf16 autocast, as runs use it), at sam2.1_hiera_t and 1024 px: the evaluation bench (rtn
W2A8 over FP), the train bench (FP, LSQ W4A4, PACT W4A8, Q-SAM2 W2A8; one 2-frame clip; its figures
kept for the dry run's estimates), the rehearsal (suites/rehearse_real.yaml, rtn and qsam2, 2 steps)
on a random-weight checkpoint and a generated 854x480 DAVIS root, and a 2-step LSQ suite under
torchrun on NCCL with 2 processes where 2 GPUs exist. `--device cpu --model sam2_small` runs the
same checks on a CPU at the small model's size: how the tests hold this file without a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from harness import bench, estimate, models, runner
from harness.config import load_suite
from harness.data import synthetic
from harness.quant.policy import QuantPolicy

DDP_SUITE = """name: gpu_check_ddp
base:
  model: {{name: {model}, checkpoint: {ckpt}, image_size: {size}}}
  data:
    eval: {{kind: davis, root: {davis}, split: val}}
    calib: {{kind: davis, root: {davis}, split: train, frames: 2}}
  quant: {{weight_bits: 4, act_bits: 8}}
  train: {{steps: 2, batch_size: 2, micro_batch: 1, frames: 2, data: {{kind: davis, root: {davis}, split: train}}}}
seeds: [0]
matrix:
  method.name: [lsq]
"""


def _eval(model, size, device) -> tuple[bool, str]:
    r = bench.run(QuantPolicy(weight_bits=2, act_bits=8), [(model, size)], repeats=2, device=device)[0]
    text = ", ".join(
        f"{k} {r[k]['fp_s']:.3f} s FP, {r[k]['quant_s']:.3f} s rtn W2A8 ({r[k]['ratio']:.2f}x)"
        for k in ("image", "video_frame")
    )
    return all(math.isfinite(r[k]["ratio"]) for k in ("image", "video_frame")), text


def _train(model, size, device, results) -> tuple[bool, str]:
    r = bench.bench_train_model(model, size, bench.TRAIN_CASES, rounds=1, batch=1, frames=2, device=device)
    estimate.record(r, results)
    print(bench.format_train([r]))
    ok = all(c["peak_bytes"] is not None and math.isfinite(c["step_s"]) for c in r["cases"].values())
    return ok, f"figures kept in {estimate.path(results)}"


def _inputs(model, size, tmp: Path) -> tuple[Path, Path]:
    ckpt = tmp / f"{model}_random.pt"
    models.save_checkpoint(models.build(model, models.RANDOM, size, device="cpu"), ckpt)
    frame = (854, 480) if size and size >= 512 else (192, 108)
    davis = synthetic.generate(tmp / "davis", sequences=2, frames=5, size=frame)
    return ckpt, davis


def _rehearsal(model, size, ckpt, davis, results) -> tuple[bool, str]:
    os.environ["REHEARSE_CHECKPOINT"], os.environ["REHEARSE_DAVIS"] = str(ckpt), str(davis)
    overrides = [f"model.name={model}"] + ([f"model.image_size={size}"] if size else [])
    suite = load_suite("rehearse_real", overrides)
    runs = [s for s in suite.runs if s.config["method"]["name"] in ("rtn", "qsam2")]
    start = time.time()
    rows, failed = runner.run_suite(dataclasses.replace(suite, runs=runs), results)
    text = f"{len(rows)} runs recorded in {time.time() - start:.0f} s" + "".join(
        f"; FAILED {n}: {r}" for n, r in failed
    )
    return not failed and len(rows) == len(runs), text


def _ddp(model, size, ckpt, davis, results) -> tuple[bool | None, str]:
    if torch.cuda.device_count() < 2:
        return None, f"{torch.cuda.device_count()} GPU(s): DDP needs 2"
    path = Path(results) / "gpu_check_ddp.yaml"
    path.write_text(DDP_SUITE.format(model=model, ckpt=ckpt, size=size or "null", davis=davis))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "harness", "suite", str(path)]
    start = time.time()
    proc = subprocess.run([*cmd, "--results", str(results)], capture_output=True, text=True)
    tail = (proc.stderr.strip().splitlines() or [""])[-1]
    return proc.returncode == 0, f"exit {proc.returncode} in {time.time() - start:.0f} s; {tail}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--model", default="sam2.1_hiera_t")
    p.add_argument("--image-size", type=int, default=1024)
    p.add_argument("--results", default="results/gpu_check")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("FAIL cuda: no CUDA device here (torch.cuda.is_available() is False)")
        return 1
    size = None if args.model == "sam2_small" else args.image_size
    what = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"gpu_check on {what}: {args.model} at {size or 'its'} px, torch {torch.__version__}")
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    outcome = {}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, davis = _inputs(args.model, size, Path(tmp))
        checks = {
            "eval bench": lambda: _eval(args.model, size, args.device),
            "train bench": lambda: _train(args.model, size, args.device, results),
            "rehearsal": lambda: _rehearsal(args.model, size, ckpt, davis, results),
            "ddp nccl": lambda: _ddp(args.model, size, ckpt, davis, results),
        }
        for name, check in checks.items():
            start = time.time()
            try:
                ok, text = check()
            except Exception as e:  # a check that breaks is that check's FAIL, and the others still run
                ok, text = False, f"{type(e).__name__}: {e}"
            word = {True: "PASS", False: "FAIL", None: "SKIP"}[ok]
            print(f"{word} {name} ({time.time() - start:.0f} s): {text}", flush=True)
            outcome[name] = word
    (results / "gpu_check.json").write_text(json.dumps(outcome, indent=1))
    return 0 if "FAIL" not in outcome.values() else 1


if __name__ == "__main__":
    sys.exit(main())
