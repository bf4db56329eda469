"""`qbench bench`: forward time of the fake-quantized model over the FP model, measured in one run.

Two workloads per model: the image path (image encoder + prompt encoder + mask decoder, through
SAM2ImagePredictor with a box) and one video tracking step (a propagated frame through the video
predictor: image encoder, memory attention, mask decoder, memory encoder). FP and quantized calls
alternate, so both see the same machine load; the ratio is of the medians.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import numpy as np
import torch

import methods
from harness import models
from harness.data import synthetic
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
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def bench_model(name, image_size, policy: QuantPolicy, method_name="rtn", repeats=5, frames=4) -> dict:
    torch.manual_seed(0)
    fp = models.build(name, image_size=image_size, device="cpu")
    q = models.build(name, image_size=image_size, device="cpu")
    q.load_state_dict(fp.state_dict())
    method = methods.get(method_name)
    ctx = methods.ptq(method, q, policy)
    with tempfile.TemporaryDirectory() as tmp:
        root = synthetic.generate(f"{tmp}/data", sequences=1, frames=frames, size=(256, 144), seed=0, val_fraction=1.0)
        ds = DavisDataset(root, "val")
        seq = ds.sequences[0]
        image = ds.image(seq, ds.frame_names(seq)[0])
        box = np.array([30, 20, 200, 120])
        ctx.calib_feed = lambda m: (_image_step(m, image, box), _video_step(m, ds, seq, frames))
        method.calibrate(ctx)
        out = {"model": name, "image_size": q.image_size}
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


def run(policy: QuantPolicy, model_list=DEFAULT_MODELS, repeats=5) -> list[dict]:
    return [bench_model(name, size, policy, repeats=repeats) for name, size in model_list]


def format_text(results: list[dict], policy: QuantPolicy) -> str:
    lines = [
        f"rtn W{policy.weight_bits}A{policy.act_bits} (attention {'on' if policy.attention else 'off'}), "
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
