"""Semi-supervised video object segmentation with the sam2 video predictor, scored with J&F.

Protocol (DAVIS 2017 semi-supervised): the first frame's ground-truth masks of all objects are the
prompts, the predictor propagates them through the sequence, mask logits are thresholded at 0.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import sam2.sam2_video_predictor
import sam2.utils.misc
import torch
from tqdm.auto import tqdm

from harness.data.davis import DavisDataset, write_palette_png
from harness.evaluate import metrics
from harness.evaluate.timing import Clock
from harness.progress import progress as progress_bar
from harness.quant.fastpath import reset_eval_caches
from harness.quant.state import check_all_active

# sam2 draws a progress bar per sequence for frame loading and for propagation; with hundreds of
# sequences that buries ours (one bar per phase), so silence its bars.
for _mod in (sam2.sam2_video_predictor, sam2.utils.misc):
    _mod.tqdm = functools.partial(tqdm, disable=True)


def autocast(device: torch.device):
    # bf16 autocast only on CUDA, as SAM2's own tools do; CPU runs stay in fp32.
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def predict_sequence(model, dataset: DavisDataset, seq: str, max_frames: int | None = None, bar=None) -> np.ndarray:
    """Predicted id map (T x H x W uint8) for one sequence, prompted with frame 0's ground truth."""
    first = dataset.annotation(seq, dataset.frame_names(seq)[0])
    ids = dataset.object_ids(seq)
    with autocast(model.device):
        state = model.init_state(str(dataset.image_dir(seq)))
        n = state["num_frames"] if max_frames is None else min(max_frames, state["num_frames"])
        pred = np.zeros((n, *first.shape), dtype=np.uint8)
        for obj in ids:
            model.add_new_mask(state, frame_idx=0, obj_id=obj, mask=torch.from_numpy(first == obj))
        for t, obj_ids, logits in model.propagate_in_video(state, max_frame_num_to_track=n - 1):
            fg = (logits[:, 0] > 0).cpu().numpy()
            # Where objects overlap the smaller id wins, as in SAM2's tools/vos_inference.py.
            for k in reversed(np.argsort(obj_ids)):
                pred[t][fg[k]] = obj_ids[k]
            if bar is not None:
                bar.update(1)
    return pred


def run_frames(model, dataset: DavisDataset, frames: int, desc: str = "calibration") -> int:
    """Run the tracker over sequences until `frames` frames are processed (calibration data)."""
    done = 0
    with progress_bar(total=frames, desc=desc, unit="frame", leave=False) as bar:
        for seq in dataset.sequences:
            if done >= frames:
                break
            done += len(predict_sequence(model, dataset, seq, max_frames=frames - done, bar=bar))
    return done


def evaluate(model, dataset: DavisDataset, decisions=(), save_dir=None, progress: bool = True, late=None):
    """J&F over every sequence of `dataset`, after checking that every quantizer is active.

    `decisions` (from the quantization policy) lets the check also catch a module the policy
    quantizes that has no quantizer.

    Returns (per-object DataFrame, summary dict with J&F-mean, J-mean, F-mean, ..., fps, time_warmup_s):
    fps counts every frame after an untimed warm-up frame, whose time is time_warmup_s.
    With `save_dir`, predictions are written as palette PNGs in SAM2's vos_inference layout.
    `late` (a dict) receives {sequence: ids} of objects that appear after the first frame, unscored.
    """
    check_all_active(model, list(decisions))
    reset_eval_caches(model)
    total = sum(len(dataset.frame_names(s)) for s in dataset.sequences)
    clock, scores = Clock(), {}
    with clock.warm():
        predict_sequence(model, dataset, dataset.sequences[0], max_frames=1)
    with progress_bar(total=total, desc="evaluate", unit="frame", leave=False, enabled=progress) as bar:
        for seq in dataset.sequences:
            with clock.timed(len(dataset.frame_names(seq))):
                pred = predict_sequence(model, dataset, seq, bar=bar)
            gt = dataset.annotations(seq)
            scores[seq] = metrics.score_sequence(gt, pred, dataset.object_ids(seq))
            if ids := metrics.late_objects(gt):
                metrics.warn_late(seq, ids)
                if late is not None:
                    late[seq] = ids
            if save_dir is not None:
                for name, ids in zip(dataset.frame_names(seq), pred, strict=True):
                    write_palette_png(f"{save_dir}/{seq}/{name}.png", ids)
    per_object = metrics.per_object_frame(scores)
    return per_object, {**metrics.summarize(per_object), **clock.summary()}
