"""`qbench bench`: time of the fake-quantized model over the FP model, measured in one run.

Evaluation: two workloads per model, the image path (image encoder + prompt encoder + mask
decoder, through SAM2ImagePredictor with a box) and one video tracking step (a propagated frame
through the video predictor: image encoder, memory attention, mask decoder, memory encoder).
`--train`: one QAT training step (harness.train.fit, SAM2Train forward + loss + backward + AdamW)
of each method over one FP training step of the same model on the same clips.
FP and quantized calls alternate, so both see the same machine load; ratios are of the medians.
`--kernels`: real integer kernels, harness.kernels.
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from tqdm.auto import tqdm

import methods
from harness import memory, models, train
from harness.config import base_config
from harness.data import synthetic
from harness.data.clips import collate
from harness.data.davis import DavisDataset
from harness.evaluate import vos
from harness.quant.policy import QuantPolicy

DEFAULT_MODELS = [("sam2_small", None), ("sam2.1_hiera_t", 512)]


def _image_step(model, image, box):
    predictor = models.image_predictor(model)
    predictor.set_image(image)
    predictor.predict(box=box, multimask_output=False)


def _video_step(model, ds, seq, frames):
    vos.predict_sequence(model, ds, seq, max_frames=frames)


def _timed(fn, *args) -> float:
    _sync()
    start = time.perf_counter()
    fn(*args)
    _sync()
    return time.perf_counter() - start


def _sync():
    if torch.cuda.is_available():  # CUDA work is asynchronous: time what it did, not what it queued
        torch.cuda.synchronize()


def _timed_method(name: str):
    """The method without VRC: VRC changes the weights once, not the work of a step or a frame."""
    off = {"vrc": {"enabled": False}} if "vrc" in methods.REGISTRY[name].defaults else {}
    return methods.get(name, **off)


def bench_model(name, image_size, policy: QuantPolicy, method_name="rtn", repeats=5, frames=4, device="cpu") -> dict:
    torch.manual_seed(0)
    fp = models.build(name, image_size=image_size, device=device)
    q = models.build(name, image_size=image_size, device=device)
    q.load_state_dict(fp.state_dict())
    method = _timed_method(method_name)
    ctx = methods.ptq(method, q, policy)
    with tempfile.TemporaryDirectory() as tmp:
        root = synthetic.generate(f"{tmp}/data", sequences=1, frames=frames, size=(256, 144), seed=0, val_fraction=1.0)
        ds = DavisDataset(root, "val")
        seq = ds.sequences[0]
        image = ds.image(seq, ds.frame_names(seq)[0])
        box = np.array([30, 20, 200, 120])
        ctx.calib_feed = lambda m: (_image_step(m, image, box), _video_step(m, ds, seq, frames))
        method.calibrate(ctx)
        out = {"model": name, "image_size": q.image_size, "device": str(device)}
        for label, step in (
            ("image", lambda m: _image_step(m, image, box)),
            ("video_frame", lambda m: _video_step(m, ds, seq, frames)),
        ):
            times = {"fp": [], "quant": []}
            with torch.inference_mode():
                step(fp), step(q)  # warm-up
                for _ in range(repeats):
                    times["fp"].append(_timed(step, fp))
                    times["quant"].append(_timed(step, q))
            # A video call tracks `frames` frames; report the time of one tracking step.
            per = frames if label == "video_frame" else 1
            fp_s, q_s = statistics.median(times["fp"]) / per, statistics.median(times["quant"]) / per
            out[label] = {"fp_s": fp_s, "quant_s": q_s, "ratio": q_s / fp_s}
    return out


def run(policy: QuantPolicy, model_list=DEFAULT_MODELS, repeats=5, method="rtn", device="cpu") -> list[dict]:
    return [bench_model(name, size, policy, method, repeats=repeats, device=device) for name, size in model_list]


# (method, weight bits, activation bits) of `qbench bench --train`
TRAIN_CASES = [("lsq", 4, 4), ("pact", 4, 8), ("qsam2", 2, 8)]


def bench_train_model(
    name,
    image_size,
    cases=TRAIN_CASES,
    rounds=3,
    batch=4,
    frames=4,
    breakdown=False,
    overrides=(),
    limit=None,
    device="cpu",
) -> dict:
    """Median time and peak memory of one training step per case and of one FP step, in
    alternating rounds (round 0 warms up when there are several). `breakdown`: also the bytes
    saved for backward by one forward, by part of the model and module class (harness.memory)."""
    memory.return_freed()
    process = memory.rss_bytes()  # before any model: what a run's process holds besides them
    base = [f"model.name={name}", "method.name=lsq", "train.steps=2", "train.log_every=1"]
    base += [f"train.batch_size={batch}", f"train.frames={frames}", "train.data.kind=stream"]
    base += [f"model.image_size={image_size}"] if image_size else []
    # Point prompts: every clip's first frame gets its corrective clicks, each one more decoder pass
    base += ["train.prompts.point_prob=1"]
    # Clips of as many objects as a run's clip may hold (train.max_objects): memory grows with them
    objects = base_config(None, [*base, *overrides])["train"]["max_objects"] or 3
    cfg = base_config(None, [*base, f"train.data.objects=[{objects},{objects}]", *overrides])
    data = train.train_data(cfg, None)
    torch.manual_seed(0)
    fp = models.build(name, image_size=image_size, device=device)
    clip = collate([data[10**6]]).to(device)  # calibration: one clip the timed steps never see

    def feed(model):
        view = models.training_view(model, name, image_size, cfg["train"]["prompts"])
        with torch.no_grad():
            view(clip)

    entries = [("fp", fp, None)]
    for method_name, w, a in cases:
        q = models.build(name, image_size=image_size, device=device)
        q.load_state_dict(fp.state_dict())
        method = _timed_method(method_name)
        methods.ptq(method, q, QuantPolicy(weight_bits=w, act_bits=a), feed)
        entries.append((f"{method_name} W{w}A{a}", q, method))
    times = {label: [] for label, _, _ in entries}
    peaks = {label: [] for label, _, _ in entries}
    saved = {}
    warm = int(rounds > 1)
    for r in tqdm(range(rounds + warm), desc=f"bench --train {name}", unit="round", disable=None):
        for label, model, method in entries:
            if breakdown and r == 0:
                saved[label] = _saved_bytes(model, cfg, data, method)
                total = sum(saved[label].values()) / 2**30
                tqdm.write(f"{label}: one forward saves {total:.2f} GiB for backward", file=sys.stderr)
            # Step 1 of each fit allocates the optimizer state: time step 2 only.
            with memory.rss_guard(limit, f"bench --train {label}"), memory.Peak(device) as peak:
                step_s = train.fit(model, cfg, data, method=method, progress=False)["history"][-1]["train/step_s"]
            if r >= warm:
                times[label].append(step_s)
                peaks[label].append(peak.above)
    n = batch * frames
    out = {"model": name, "image_size": fp.image_size, "device": torch.device(device).type}
    out |= {"batch": batch, "frames": frames, "objects": objects}
    out["checkpoint_blocks"] = cfg["train"]["checkpoint_blocks"]
    out["param_bytes"] = sum(p.numel() * p.element_size() for p in fp.parameters())
    out["process_bytes"] = process
    out["cases"] = {}
    for label in times:
        step_s, above = statistics.median(times[label]), max(peaks[label]) if None not in peaks[label] else None
        c = {"step_s": step_s, "step_s_per_frame": step_s / n, "peak_bytes": above}
        c["peak_bytes_per_frame"] = above / n if above is not None else None
        c["ratio"] = step_s / statistics.median(times["fp"])
        fp_peak = out["cases"].get("fp", {}).get("peak_bytes")
        c["peak_ratio"] = above / fp_peak if fp_peak and above is not None else None
        if label in saved:
            c["saved_for_backward"] = saved[label]
        out["cases"][label] = c
    return out


def _saved_bytes(model, cfg, data, method) -> dict:
    """Bytes one training forward saves for backward, by part and module class (not kept)."""
    one = {**cfg, "train": {**cfg["train"], "steps": 1}}
    model = copy.deepcopy(model)  # the step would change the weights
    with memory.saved_for_backward(model) as table:
        try:
            train.fit(model, one, data, method=method, progress=False)
        except RuntimeError as e:
            if "dropped the saved tensors" not in str(e):
                raise
    return {f"{part} {cls}": b for (part, cls), b in table.items()}


def format_train(results: list[dict]) -> str:
    lines = [f"one training step, QAT over FP; torch threads {torch.get_num_threads()}"]
    lines.append("peak: memory above the resident models during the step (CPU: RSS; CUDA: allocated)")
    lines.append("saved for backward: by one forward, outside checkpointed blocks (train.checkpoint_blocks)")
    head = f"{'model':<16} {'size':>5} {'clips':>9} {'case':<12} {'step s':>8} {'s/frame':>8} {'ratio':>6}"
    lines.append(head + f" {'peak GiB':>9} {'GiB/frame':>9} {'ratio':>6}")
    gib = 2**30
    for r in results:
        for case, c in r["cases"].items():
            peak = c["peak_bytes"]
            mem = (
                f" {peak / gib:>9.2f} {c['peak_bytes_per_frame'] / gib:>9.3f} "
                + (f"{c['peak_ratio']:>5.2f}x" if c["peak_ratio"] else f"{'':>6}")
                if peak is not None
                else f" {'n/a':>9}"
            )
            lines.append(
                f"{r['model']:<16} {r['image_size']:>5} {r['batch']:>3}x{r['frames']:<2}fr {case:<12} "
                f"{c['step_s']:>8.2f} {c['step_s_per_frame']:>8.2f} {c['ratio']:>5.2f}x" + mem
            )
            for where, b in list(c.get("saved_for_backward", {}).items())[:8]:
                lines.append(f"{'':<20} saved for backward {b / gib:>7.2f} GiB  {where}")
    return "\n".join(lines)


def format_text(results: list[dict], policy: QuantPolicy, method="rtn") -> str:
    lines = [
        f"{method} W{policy.weight_bits}A{policy.act_bits} (attention {'on' if policy.attention else 'off'}), "
        f"torch threads {torch.get_num_threads()}"
    ]
    lines.append(f"{'model':<16} {'size':>5} {'workload':<12} {'fp ms':>9} {'quant ms':>9} {'ratio':>6}")
    for r in results:
        for label in ("image", "video_frame"):
            w = r[label]
            lines.append(
                f"{r['model']:<16} {r['image_size']:>5} {label:<12} {w['fp_s'] * 1e3:>9.1f} "
                f"{w['quant_s'] * 1e3:>9.1f} {w['ratio']:>5.2f}x"
            )
    return "\n".join(lines)
