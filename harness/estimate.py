"""A training run's peak memory and step time, estimated from `qbench bench --train` figures.

`bench --train` records what it measured in <results>/bench/train.json, one entry per model,
image size, device, method and checkpoint_blocks setting: the peak memory of a step above the
resident models, its time, the clip it ran (clips x frames, and train.max_objects objects each),
the model's parameter bytes and the versions, commit and device it ran on.
A run's estimate splits the step's peak into what does not grow with the clip (gradients and
AdamW's two moments: 3x the parameter bytes) and a per-frame rest, scales the rest to the frames
a rank holds at once (train.micro_batch x train.frames; its whole share when micro_batch is 0)
and to the run's objects per clip (train.max_objects against the benched clips'),
and adds the resident models (student, and the FP teacher when a distillation term is on) and,
on a CPU, the process that was resident before the models. Time scales with the frames of a step.
Only measured figures are used: a run with none for its model has no estimate. A CUDA run with
figures from a CPU only gets a memory estimate from them, marked so and never refused on: the CPU
ran fp32 where CUDA runs bf16 autocast (most saved activations half the size), and a CPU's step
time says nothing of a GPU's. Any estimate is only as good as the benched step: the bench prompts
with points (corrective clicks on the first frame); a step that also corrects a second frame
holds more (docs/real-size.md).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import methods
from harness import memory, models, tracking
from harness.errors import OutOfMemory

GIB = 2**30


def path(results_dir: str | Path) -> Path:
    return Path(results_dir) / "bench" / "train.json"


def device_type(cfg: dict) -> str:
    """'cpu' or 'cuda' of a run config's device ('cuda:1' is 'cuda')."""
    return str(cfg["device"]).split(":")[0]


def key(model: str, image_size, device: str, method: str, checkpoint_blocks: bool) -> str:
    return f"{model}@{image_size}/{device}/{method}/checkpoint_blocks={str(checkpoint_blocks).lower()}"


def record(result: dict, results_dir: str | Path) -> Path:
    """Add one `bench.bench_train_model` result to the figures the estimates read."""
    p = path(results_dir)
    table = json.loads(p.read_text()) if p.is_file() else {}
    n = result["batch"] * result["frames"]
    env = tracking.environment()  # versions, commit and device the figures came from
    for label, c in result["cases"].items():
        if c["peak_bytes"] is None:
            continue
        k = key(result["model"], result["image_size"], result["device"], label.split()[0], result["checkpoint_blocks"])
        table[k] = {
            "clip": f"{result['batch']}x{result['frames']}",
            "frames": n,
            "objects": result["objects"],
            "peak_bytes": c["peak_bytes"],
            "step_s": c["step_s"],
            "param_bytes": result["param_bytes"],
            "process_bytes": result["process_bytes"],
            "environment": env,
        }
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
    tmp.replace(p)  # a reader never sees half a file
    return p


def run(cfg: dict, results_dir: str | Path) -> dict | None:
    """{'peak_bytes', 'step_s' (None from another device's figures), 'from', 'benched_on'} for a run
    that trains, or None without figures for it."""
    t = cfg["train"]
    if not t["steps"] or not methods.from_config(cfg["method"]).trains:
        return None
    p = path(results_dir)
    if not p.is_file():
        return None
    m, device, method = cfg["model"], device_type(cfg), cfg["method"]["name"]
    size = models.load_config(m["name"], m["image_size"]).model.image_size
    table = json.loads(p.read_text())
    entry = table.get(key(m["name"], size, device, method, t["checkpoint_blocks"]))
    from_cpu = entry is None and device == "cuda"
    if from_cpu:
        entry = table.get(key(m["name"], size, "cpu", method, t["checkpoint_blocks"]))
    if entry is None:
        return None
    share = t["batch_size"]  # one process; a DDP rank holds less
    in_memory = (min(t.get("micro_batch", 0), share) or share) * t["frames"]
    fixed = 3 * entry["param_bytes"]
    objects = t["max_objects"] or entry["objects"]  # 0 (all): as many as were benched
    per_frame = max(entry["peak_bytes"] - fixed, 0) / entry["frames"] * objects / entry["objects"]
    o = t["objectives"]
    copies = 1 + (o["distill_mask"] > 0 or o["distill_feat"] > 0)
    resident = copies * entry["param_bytes"] + (entry["process_bytes"] if device == "cpu" else 0)
    return {
        "peak_bytes": resident + fixed + per_frame * in_memory,
        "step_s": None if from_cpu else entry["step_s"] / entry["frames"] * share * t["frames"],
        "from": f"bench --train {method}, {entry['clip']} clips of {entry['objects']} objects"
        + (" on cpu in fp32, not on cuda" if from_cpu else "")
        + ("; more objects per clip cost more" if not t["max_objects"] else ""),
        "benched_on": "cpu" if from_cpu else device,
    }


def describe(est: dict | None, steps: int) -> str:
    if est is None:
        return "no estimate"
    if est["step_s"] is None:
        return f"est. peak {est['peak_bytes'] / GIB:.1f} GiB, time not measured ({est['from']})"
    hours = est["step_s"] * steps / 3600
    return f"est. peak {est['peak_bytes'] / GIB:.1f} GiB, {est['step_s']:.0f} s/step, {hours:.1f} h ({est['from']})"


def fits(est: dict | None, device: str) -> tuple[bool, int | None]:
    """(whether the estimate fits, the memory it is held against); True without either. CPU: the
    host's available RAM plus what this process holds already (the estimate counts it)."""
    have = memory.available_bytes(device)
    if have is not None and device == "cpu":
        have += memory.rss_bytes() or 0
    return (est is None or have is None or est["peak_bytes"] <= have), have


def check(cfg: dict, results_dir: str | Path) -> None:
    """Refuse, before any work, a training run whose estimate does not fit (train.memory_check)."""
    if not cfg["train"].get("memory_check", True):
        return
    est, device = run(cfg, results_dir), device_type(cfg)
    if est is not None and est["benched_on"] != device:
        return  # another device's figures: the dry run prints them, too rough to refuse a run on
    ok, have = fits(est, device)
    if not ok:
        raise OutOfMemory(
            f"train: {describe(est, cfg['train']['steps'])}, more than the {have / GIB:.1f} GiB available; "
            "lower train.micro_batch or train.frames (or set train.memory_check=false)"
        )
