"""SA-V semi-supervised VOS with the sam2 video predictor, scored as SAM2's own SA-V evaluator scores it
(Ravi et al., 2024, "SAM 2: Segment Anything in Images and Videos", SA-V val/test).

Inference follows facebookresearch/sam2 tools/vos_inference.py run with --per_obj_png_file, the SA-V recipe
of its tools/README.md:
- every object folder's mask on the first annotated frame is that object's prompt, an empty mask included.
  The recipe assumes that every object to track is on frame 0 (true of SA-V) and prompts all folders there,
  so an object that only appears later is tracked from an empty prompt and never prompted again (SAM2
  prompts such objects on their own first frame only with --track_object_appearing_later_in_video, a mode
  for LVOS and YouTube-VOS that it does not use for SA-V);
- each object's mask is its own logits > 0 with no overlap resolution: the recipe sets
  non_overlap_masks=false because SA-V objects may overlap;
- propagation runs forward from the prompt frame over the 24 fps frames. SAM2 goes on to the last frame;
  here it stops at the last annotated frame, which changes no score (tracking is causal).

Scoring follows sav_dataset/utils/sav_benchmark.py (VideoEvaluator, Evaluator, benchmark):
- per object, its annotated frames minus the first and the last (skip_first_and_last, the SA-V default);
  predictions on frames without ground truth are never read;
- J is the IoU (1 when both masks are empty) and F the davis2017-evaluation boundary F-measure: seg2bmap
  boundaries matched within a disk of radius ceil(0.008 x image diagonal). harness.evaluate.metrics'
  jaccard and f_measure compute exactly these, with the same tolerance;
- an object's frames count from the first scored frame on which its ground truth or its prediction is
  non-empty, because SAM2's Evaluator only accumulates an object id once either mask has shown it. An
  object whose ground truth is empty on every scored frame has no score there (SAM2's evaluator fails an
  assertion on it): here it is left out, logged, and listed in `report["unscored"]`;
- J and F of an object are means over its frames; the dataset's J and F are means over all objects of all
  videos (each object weighs the same), J&F = (J + F) / 2. SAM2 prints them x 100; the harness keeps 0..1.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from harness.data.davis import write_palette_png
from harness.data.sav import ANNOTATIONS, SavDataset, read_binary_png
from harness.errors import DatasetError
from harness.evaluate import metrics
from harness.evaluate.timing import Clock
from harness.evaluate.vos import autocast  # also silences sam2's own progress bars
from harness.progress import progress as progress_bar
from harness.quant.fastpath import reset_eval_caches
from harness.quant.state import check_all_active

Masks = dict[str, dict[str, np.ndarray]]  # object folder -> frame name -> H x W bool


def scored_frames(dataset: SavDataset, video: str) -> list[str]:
    """The annotated frames that are scored: all but the first and the last."""
    return dataset.annotated_frames(video)[1:-1]


def score_object(gt: Iterable[np.ndarray], pred: Iterable[np.ndarray]) -> dict[str, np.ndarray] | None:
    """Per-frame J and F of one object over its scored frames, counted as SAM2's Evaluator counts them
    (from the first frame on which either mask is non-empty); None if its ground truth is always empty."""
    j, f, gt_seen = [], [], False
    for g, p in zip(gt, pred, strict=True):
        if not j and not g.any() and not p.any():
            continue
        gt_seen = gt_seen or bool(g.any())
        j.append(metrics.jaccard(g, p))
        f.append(metrics.f_measure(g, p))
    return {"J": np.array(j), "F": np.array(f)} if gt_seen else None


def per_object_scores(
    dataset: SavDataset,
    read_pred: Callable[[str, str, str], np.ndarray],
    report: dict | None = None,
    read_gt: Callable[[str, str, str], np.ndarray] | None = None,
    what: str = "ground truth",
) -> pd.DataFrame:
    """Per-object J/F statistics of the masks `read_pred(video, object, frame)` gives, scored against
    the ground truth or against `read_gt` (the FP model's masks, harness.evaluate.agreement); an
    object whose reference is empty on every scored frame is left out (named in report["unscored"])."""
    read_gt = read_gt or dataset.mask
    scores, unscored = {}, []
    for video in dataset.videos:
        frames, scores[video] = scored_frames(dataset, video), {}
        for obj in dataset.object_ids(video):
            gt = (read_gt(video, obj, t) for t in frames)
            values = score_object(gt, (read_pred(video, obj, t) for t in frames))
            if values is None:
                unscored.append(f"{video}/{obj}")
            else:
                scores[video][int(obj)] = values
    if unscored:
        logging.getLogger("qbench").warning(
            "SA-V: %d objects have an empty %s on every scored frame and are not scored: %s",
            len(unscored),
            what,
            ", ".join(unscored[:10]),
        )
    if report is not None:
        report["unscored"] = unscored
    return metrics.per_object_frame(scores)


def _score(dataset: SavDataset, read_pred: Callable[[str, str, str], np.ndarray], report: dict | None):
    per_object = per_object_scores(dataset, read_pred, report)
    if per_object.empty:
        raise DatasetError(
            f"SA-V {dataset.root}: no object could be scored (each needs a non-empty ground-truth mask on an "
            "annotated frame other than its first and last)"
        )
    return per_object, metrics.summarize(per_object)


def score_folder(
    dataset: SavDataset, pred_root: str | Path, allow_missing: bool = False, report: dict | None = None
) -> tuple[pd.DataFrame, dict]:
    """Per-object J/F statistics and the summary (J&F-mean, J-mean, F-mean, ...) of predictions in the SA-V
    layout, <pred_root>/<video>/<object>/<frame>.png (a pred_root holding Annotations_6fps/ works too).

    Every scored frame of every object of every video needs a prediction; a missing one is an error
    naming it, or with `allow_missing` an empty mask, counted in `report["filled"]`.
    """
    pred_root = Path(pred_root)
    if not pred_root.is_dir():
        raise DatasetError(f"SA-V predictions folder {pred_root} does not exist")
    if (pred_root / ANNOTATIONS).is_dir():
        pred_root = pred_root / ANNOTATIONS
    filled = 0
    for video in dataset.videos:
        wanted = [(o, t) for o in dataset.object_ids(video) for t in scored_frames(dataset, video)]
        missing = [f"{o}/{t}.png" for o, t in wanted if not (pred_root / video / o / f"{t}.png").is_file()]
        if missing and not allow_missing:
            raise DatasetError(
                f"SA-V video {video!r}: {len(missing)} of {len(wanted)} predicted masks missing under "
                f"{pred_root / video}, first {missing[0]}; allow_missing scores them as empty"
            )
        filled += len(missing)

    def read(video: str, obj: str, frame: str) -> np.ndarray:
        path = pred_root / video / obj / f"{frame}.png"
        shape = dataset.frame_size(video)
        if allow_missing and not path.is_file():
            return np.zeros(shape, dtype=bool)
        return read_binary_png(path, shape, what="prediction")

    per_object, summary = _score(dataset, read, report)
    if report is not None:
        report["filled"] = filled
    return per_object, summary


def tracked_range(dataset: SavDataset, video: str) -> tuple[int, int]:
    # Predictor frame indices of the first and last annotated frames (both inclusive).
    index = {name: k for k, name in enumerate(dataset.frame_names(video))}
    annotated = dataset.annotated_frames(video)
    return index[annotated[0]], index[annotated[-1]]


@torch.inference_mode()
def predict_video(model, dataset: SavDataset, video: str, max_frames: int | None = None, bar=None) -> Masks:
    """Predicted masks {object folder: {annotated frame: H x W bool}} of one video, every object prompted
    with its mask on the first annotated frame (see the module docstring), masks = logits > 0 per object.

    Only annotated frames are kept: SA-V videos run to hundreds of full-resolution frames per object.
    `max_frames` stops after that many tracked frames (a warm-up).
    """
    first, last = tracked_range(dataset, video)
    n = last - first + 1 if max_frames is None else min(max_frames, last - first + 1)
    names = dataset.frame_names(video)
    annotated = set(dataset.annotated_frames(video))
    objects = {int(o): o for o in dataset.object_ids(video)}
    pred: Masks = {o: {} for o in objects.values()}
    overlap = getattr(model, "non_overlap_masks", False)
    model.non_overlap_masks = False
    try:
        with autocast(model.device):
            state = model.init_state(str(dataset.image_dir(video)))
            for obj_id, obj in objects.items():
                prompt = torch.from_numpy(dataset.mask(video, obj, names[first]))
                model.add_new_mask(state, frame_idx=first, obj_id=obj_id, mask=prompt)
            for t, obj_ids, logits in model.propagate_in_video(
                state, start_frame_idx=first, max_frame_num_to_track=n - 1
            ):
                if names[t] in annotated:
                    fg = (logits[:, 0] > 0).cpu().numpy()
                    for k, obj_id in enumerate(obj_ids):
                        pred[objects[obj_id]][names[t]] = fg[k]
                if bar is not None:
                    bar.update(1)
    finally:
        model.non_overlap_masks = overlap
    return pred


def write_predictions(out: str | Path, video: str, pred: Masks) -> None:
    """Write masks as SAM2's vos_inference --per_obj_png_file does: <out>/<video>/<object>/<frame>.png, 0/1."""
    for obj, frames in pred.items():
        for frame, mask in frames.items():
            write_palette_png(Path(out) / video / obj / f"{frame}.png", mask.astype(np.uint8))


def evaluate(model, dataset: SavDataset, decisions=(), save_dir=None, progress: bool = True, report=None):
    """Predict and score every video of `dataset`, after checking that every quantizer is active.

    Returns (per-object DataFrame, summary with J&F-mean, J-mean, F-mean, ..., fps, time_warmup_s): fps
    counts the tracked frames (24 fps, first to last annotated) after one untimed warm-up frame.
    With `save_dir`, predictions are written in the SA-V layout (annotated frames), which score_folder
    scores to the same numbers. `report` receives "unscored" (see the module docstring).
    """
    check_all_active(model, list(decisions))
    reset_eval_caches(model)
    total = sum(b - a + 1 for a, b in (tracked_range(dataset, v) for v in dataset.videos))
    clock, preds = Clock(), {}
    with clock.warm():
        predict_video(model, dataset, dataset.videos[0], max_frames=1)
    with progress_bar(total=total, desc="evaluate SA-V", unit="frame", leave=False, enabled=progress) as bar:
        for video in dataset.videos:
            first, last = tracked_range(dataset, video)
            with clock.timed(last - first + 1):
                preds[video] = predict_video(model, dataset, video, bar=bar)
            if save_dir is not None:
                write_predictions(save_dir, video, preds[video])
    per_object, summary = _score(dataset, lambda v, o, t: preds[v][o][t], report)
    return per_object, {**summary, **clock.summary()}
