"""COCO instance segmentation with the sam2 image predictor, scored with mask mIoU and mask AP.

Protocol: box prompts in, one mask per box out, as SAM evaluates COCO; AP is COCO's (Lin et al.,
2014, "Microsoft COCO: Common Objects in Context") computed by pycocotools' COCOeval with
iouType "segm", unchanged (IoU thresholds 0.50:0.05:0.95, 101-point interpolated precision,
at most 100 masks per image, areas small < 32^2 <= medium < 96^2 <= large pixels).

- Every image is encoded once; each box (a ground-truth box, or a detector's box scoring at least
  the threshold) prompts one mask (multimask_output=False) whose logits are thresholded at 0.
- A mask's score is the detector's score for a detector box and the model's predicted IoU for a
  ground-truth box. With ground-truth boxes every instance has exactly one mask, so AP measures
  the masks and how well the model ranks its own masks; a constant score would leave the ranking,
  and so AP, to the order of the annotations in the file.
- mIoU is the mean, over non-crowd ground-truth instances, of the IoU with the mask matched to the
  instance, 0 where none is. A mask prompted by a ground-truth box (its result carries `ann_id`) is
  matched to that instance; other masks are matched greedily in descending score to the unmatched
  instance of their image and category that they overlap most, as COCOeval matches, without its
  IoU threshold.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from harness.data.coco import Box, CocoDataset, as_bytes, encode, read_segmentations
from harness.errors import DatasetError
from harness.evaluate.timing import Clock
from harness.evaluate.vos import autocast
from harness.models import image_predictor
from harness.progress import progress as progress_bar
from harness.quant.fastpath import reset_eval_caches
from harness.quant.state import check_all_active

AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # COCOeval.stats[0:6], in its order
RESULT_KEYS = ("image_id", "category_id", "segmentation", "score", "ann_id")


@torch.inference_mode()
def predict_image(predictor, image: np.ndarray, boxes: list[Box]) -> list[dict]:
    """One result dict per box (see the module docstring for the score); `image` is H x W x 3 RGB."""
    height, width = image.shape[:2]
    xyxy = np.array([[x, y, x + w, y + h] for x, y, w, h in (b.bbox for b in boxes)], dtype=np.float32)
    with autocast(predictor.model.device):
        predictor.set_image(image)
        logits, ious, _ = predictor.predict(box=xyxy, multimask_output=False, return_logits=True)
    # sam2 squeezes the batch axis away when there is one box: restore N x H x W.
    logits, ious = logits.reshape(len(boxes), height, width), ious.reshape(len(boxes))
    results = []
    for box, logit, iou in zip(boxes, logits, ious, strict=True):
        result = {
            "image_id": box.image_id,
            "category_id": box.category_id,
            "segmentation": encode(logit > 0),
            "score": float(iou) if box.score is None else box.score,
        }
        if box.ann_id is not None:
            result["ann_id"] = box.ann_id
        results.append(result)
    return results


def _prompts(dataset: CocoDataset, detections: list[Box] | None, max_images: int | None) -> dict[int, list[Box]]:
    ids = dataset.ids if max_images is None else dataset.ids[:max_images]
    if detections is None:
        return {i: dataset.boxes(i) for i in ids}
    by_image = defaultdict(list)
    for box in detections:
        by_image[box.image_id].append(box)
    return {i: by_image[i] for i in ids}


def _run(model, dataset, detections, max_images, progress: bool):
    """(results, image ids evaluated, the Clock of the images run)."""
    predictor = image_predictor(model)
    prompts = _prompts(dataset, detections, max_images)
    todo = [i for i, boxes in prompts.items() if boxes]  # an image without boxes gives no masks
    clock, results = Clock(), []
    if todo:
        with clock.warm():
            predict_image(predictor, dataset.image(todo[0]), prompts[todo[0]][:1])
    for image_id in progress_bar(todo, desc="evaluate", unit="image", leave=False, enabled=progress):
        image = dataset.image(image_id)  # reading the JPEG is not timed: images/s is the model's
        with clock.timed(1):
            results += predict_image(predictor, image, prompts[image_id])
    return results, list(prompts), clock


def predict(
    model, dataset: CocoDataset, detections: list[Box] | None = None, max_images: int | None = None, progress=False
) -> list[dict]:
    """Masks in the COCO results format for the first `max_images` images (by id; all by default),
    prompted with the ground-truth boxes, or with `detections` (from `coco.read_detections`)."""
    return _run(model, dataset, detections, max_images, progress)[0]


def _load_results(gt: COCO, results: list[dict]) -> COCO:
    # Copies: loadRes writes ids and areas into the entries it is given. No bbox: COCOeval would
    # take its area, not the mask's, for the area ranges.
    anns = [{k: r[k] for k in RESULT_KEYS if k in r} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):
        if anns:
            return gt.loadRes(anns)
        dt = COCO()  # loadRes cannot take an empty list; no masks scores AP 0 where there are instances
        dt.dataset = {"images": gt.dataset["images"], "categories": gt.dataset["categories"], "annotations": []}
        dt.createIndex()
        return dt


def cocoeval_segm(dataset: CocoDataset, results: list[dict], image_ids: list[int] | None = None) -> tuple[dict, str]:
    """COCOeval (iouType "segm") over `image_ids` (all images by default): ({AP, AP50, AP75, APs, APm,
    APl}, the table COCOeval prints). The values are COCOeval's stats[0:6] as they are: -1 where
    no ground truth falls in the area range."""
    gt = dataset.coco()
    evaluator = COCOeval(gt, _load_results(gt, results), iouType="segm")
    if image_ids is not None:
        evaluator.params.imgIds = sorted(image_ids)
    with contextlib.redirect_stdout(io.StringIO()):  # progress lines
        evaluator.evaluate()
        evaluator.accumulate()
    table = io.StringIO()
    with contextlib.redirect_stdout(table):
        evaluator.summarize()
    return dict(zip(AP_KEYS, (float(v) for v in evaluator.stats[: len(AP_KEYS)]), strict=True)), table.getvalue()


def match(dataset: CocoDataset, results: list[dict], image_ids: list[int]) -> pd.DataFrame:
    """One row per non-crowd ground-truth instance of `image_ids`: image_id, ann_id, category_id, area,
    iou with its matched mask (0 if none) and that mask's score (NaN if none); the rule is the
    module docstring's."""
    groups = defaultdict(list)
    for r in results:
        groups[r["image_id"], r["category_id"]].append(r)
    rows = []
    for image_id in sorted(image_ids):
        by_category = defaultdict(list)
        for ann in dataset.instances(image_id):
            if not ann["iscrowd"]:
                by_category[ann["category_id"]].append(ann)
        for category_id, gts in by_category.items():
            dts = sorted(groups[image_id, category_id], key=lambda r: -r["score"])  # stable, as COCOeval's
            ious = np.zeros((len(dts), len(gts)))
            if dts:
                segs = [as_bytes(d["segmentation"]) for d in dts]
                ious[:] = mask_utils.iou(segs, [dataset.rle(g["id"]) for g in gts], [0] * len(gts))
            column = {g["id"]: j for j, g in enumerate(gts)}
            matched = {}  # ground-truth column -> result row
            for i, d in enumerate(dts):
                j = column.get(d.get("ann_id"))
                if j is not None and j not in matched:
                    matched[j] = i
            for i, d in enumerate(dts):
                free = [j for j in range(len(gts)) if j not in matched]
                if "ann_id" in d or not free:
                    continue
                best = max(free, key=lambda j: ious[i, j])
                if ious[i, best] > 0:
                    matched[best] = i
            for j, g in enumerate(gts):
                i = matched.get(j)
                rows.append(
                    dict(
                        image_id=image_id,
                        ann_id=g["id"],
                        category_id=category_id,
                        area=float(g["area"]),
                        iou=0.0 if i is None else float(ious[i, j]),
                        score=float("nan") if i is None else float(dts[i]["score"]),
                    )
                )
    columns = ["image_id", "ann_id", "category_id", "area", "iou", "score"]
    return pd.DataFrame(rows, columns=columns)


def score(dataset: CocoDataset, results: list[dict], image_ids: list[int] | None = None) -> tuple[pd.DataFrame, dict]:
    """(per-instance DataFrame, {mIoU, AP, AP50, AP75, APs, APm, APl, instances, masks}) of `results`."""
    image_ids = dataset.ids if image_ids is None else list(image_ids)
    per_instance = match(dataset, results, image_ids)
    if per_instance.empty:
        raise DatasetError(f"annotations {dataset.path}: no non-crowd instance in the {len(image_ids)} images scored")
    ap, _ = cocoeval_segm(dataset, results, image_ids)
    summary = {"mIoU": float(per_instance["iou"].mean()), **ap}
    scored = set(image_ids)
    summary.update(instances=len(per_instance), masks=sum(r["image_id"] in scored for r in results))
    return per_instance, summary


def evaluate(
    model,
    dataset: CocoDataset,
    detections: list[Box] | None = None,
    max_images: int | None = None,
    decisions=(),
    save: str | Path | None = None,
    progress: bool = True,
) -> tuple[pd.DataFrame, dict]:
    """Predict and score the first `max_images` images (all by default), after checking that every
    quantizer is active (`decisions` as in `vos.evaluate`).

    Returns (per-instance DataFrame, summary): mIoU, AP, AP50, AP75, APs, APm, APl (COCOeval's),
    instances, masks, images, fps (images per second after an untimed warm-up image, model time
    only) and time_warmup_s. With `save`, the masks are written as a COCO results JSON that
    `score_results_file` scores to the same mIoU and AP.
    """
    check_all_active(model, list(decisions))
    reset_eval_caches(model)
    results, image_ids, clock = _run(model, dataset, detections, max_images, progress)
    if save is not None:
        save_results(results, save)
    per_instance, summary = score(dataset, results, image_ids)
    summary.update(images=clock.items, **clock.summary())
    return per_instance, summary


def save_results(results: list[dict], path: str | Path) -> Path:
    """Write masks as a COCO results JSON; `ann_id`, where present, names the prompting instance."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{k: r[k] for k in RESULT_KEYS if k in r} for r in results]))
    return path


def score_results_file(annotations: str | Path, results: str | Path) -> dict:
    """Score a COCO results JSON of masks against a COCO instances JSON over all of its images, as
    `evaluate` scores its own masks: {mIoU, AP, AP50, AP75, APs, APm, APl, instances, masks}."""
    dataset = CocoDataset(annotations)
    return score(dataset, read_segmentations(results, dataset))[1]
