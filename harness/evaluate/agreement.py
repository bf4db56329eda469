"""Agreement with the FP model: a quantized run's predictions scored against the FP model's
predictions on the same prompts, as if those were the ground truth. It tells "quantization changed
the answer" apart from "the task is hard", and it needs no labels.

- Video (DAVIS layout, generated videos, SA-V): J&F by the evaluator's own scoring code, the FP
  model's masks in the place of the annotations: DAVIS's frames 1..T-2 of the objects of the first
  annotated frame (no void region: it marks uncertain annotation, not an uncertain FP mask), SA-V's
  annotated frames but the first and last of each object, counted as SAM2's SA-V evaluator counts
  them (an object the FP model never segments on a scored frame is not scored).
- COCO: the mask IoU of each prompt's mask with the FP model's mask of the same prompt (1 where both
  are empty), averaged over prompts.

The FP predictions are made once per key (`key`: what determines them) and kept under
<results>/fp_predictions/<key>/ (`predictions/` as the evaluator writes them with save_dir, and
`key.json`: what the key hashes and the FP model's own scores). A folder is written under a temporary
name and renamed when complete, under a lock, so a killed run never leaves half a cache and two
processes make it once.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import os
import shutil
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pycocotools import mask as mask_utils

from harness import models
from harness.claims import scratch_suffix
from harness.data.coco import as_bytes
from harness.data.davis import read_palette_png
from harness.data.sav import read_binary_png
from harness.errors import DatasetError
from harness.evaluate import metrics

CACHE = "fp_predictions"  # under the results folder
VERSION = 1  # of what a cache holds and how it is made: a new version makes new keys


def _file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        return {"path": str(path), "missing": True}
    st = path.stat()
    return {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def payload(cfg: dict, results_dir: str | Path) -> dict:
    """What determines the FP model's predictions on a run config's eval data: the model (name, its
    config file's content, the weights: shipped sha256, a file's path, size and mtime, or random from
    the seed), the image size, the eval data section (with `data.synthetic` where it is generated, the
    folder where it is not), a detector's prompts file, the device and the versions of torch and sam2."""
    m, d = cfg["model"], cfg["data"]["eval"]
    weights_file = models.resolve_checkpoint(m["name"], m["checkpoint"])
    if weights_file is None:
        weights = {"random": True, "seed": cfg["seed"]}  # drawn from the run's seed (runner.context)
    elif m["checkpoint"] is None and m.get("weights_sha256"):
        weights = {"sha256": m["weights_sha256"]}
    else:
        weights = _file(weights_file)
    config = models.config_path(m["name"])
    data = dict(d)
    if d["root"] is None or d["kind"] == "synthetic":
        data["synthetic"] = cfg["data"]["synthetic"]
    if d["root"] is not None:
        data["root"] = str(Path(d["root"]).resolve())
    if d.get("detections"):
        data["detections"] = _file(d["detections"])
    device = cfg["device"] or "cpu"
    if device.startswith("cuda") and torch.cuda.is_available():
        device = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return {
        "version": VERSION,
        "model": {
            "name": m["name"],
            "config_sha256": hashlib.sha256(Path(config).read_bytes()).hexdigest(),
            "image_size": m["image_size"],
            "weights": weights,
        },
        "data": data,
        "device": device,
        "versions": {"torch": torch.__version__, "sam2": _version("sam2")},
    }


def key(cfg: dict, results_dir: str | Path) -> str:
    """The FP predictions' cache key of a run config (16 hex digits of the sha256 of `payload`)."""
    text = json.dumps(payload(cfg, results_dir), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def folder(results_dir: str | Path, cache_key: str) -> Path:
    return Path(results_dir) / CACHE / cache_key


def cached(results_dir: str | Path, cache_key: str) -> Path | None:
    """The cache folder of `cache_key`, or None; a folder of that name is complete (it is renamed into place)."""
    path = folder(results_dir, cache_key)
    return path if path.is_dir() else None


def fill(results_dir: str | Path, cache_key: str, about: dict, predict: Callable[[Path], dict]) -> tuple[Path, bool]:
    """The cache folder of `cache_key`, made by `predict(folder)` (which writes the FP predictions
    there and returns the FP model's scores) unless complete: (folder, whether this call made it).

    Under a lock per key, so a second process waits and reuses; written under a temporary name and
    renamed, so a killed process leaves only a temporary folder, which the next fill removes."""
    root = Path(results_dir) / CACHE
    root.mkdir(parents=True, exist_ok=True)
    final = root / cache_key
    with open(root / f"{cache_key}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():
            return final, False
        for stale in root.glob(f"{cache_key}.tmp-*"):  # under the lock: left by a process that died
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f"{cache_key}{scratch_suffix()}"
        tmp.mkdir()
        try:
            (tmp / "predictions").mkdir()
            scores = predict(tmp / "predictions")
            (tmp / "key.json").write_text(json.dumps({"key": cache_key, **about, "fp_scores": scores}, indent=1))
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final, True


def _damaged(path: Path, fp_dir: Path) -> DatasetError:
    return DatasetError(
        f"FP prediction {path} does not exist: the cache {fp_dir.parent} is damaged; remove it to make it again"
    )


def score_vos(dataset, fp_dir: str | Path, pred_dir: str | Path) -> tuple[pd.DataFrame, dict]:
    """J&F (DAVIS 2017 protocol, harness.evaluate.metrics) of palette PNG predictions
    (<pred_dir>/<sequence>/<frame>.png) against the FP model's in the same layout: (per-object
    DataFrame, summary as metrics.summarize's; {} where no object could be scored)."""
    fp_dir, pred_dir, scores = Path(fp_dir), Path(pred_dir), {}
    for seq in dataset.sequences:
        ref, pred = [], []
        for name in dataset.frame_names(seq):
            path = fp_dir / seq / f"{name}.png"
            if not path.is_file():
                raise _damaged(path, fp_dir)
            ref.append(read_palette_png(path))
            mine = pred_dir / seq / f"{name}.png"
            pred.append(read_palette_png(mine) if mine.is_file() else np.zeros_like(ref[-1]))
        if any(p.shape != r.shape for p, r in zip(pred, ref, strict=True)):
            raise DatasetError(
                f"sequence {seq!r}: predictions in {pred_dir} and FP predictions in {fp_dir} differ in size"
            )
        scores[seq] = metrics.score_sequence(np.stack(ref), np.stack(pred), dataset.object_ids(seq))
    per_object = metrics.per_object_frame(scores)
    return per_object, metrics.summarize(per_object) if len(per_object) else {}


def score_sav(dataset, fp_dir: str | Path, pred_dir: str | Path) -> tuple[pd.DataFrame, dict]:
    """J&F (SAM2's SA-V evaluator's counting, harness.evaluate.sav) of per-object PNG predictions
    (<pred_dir>/<video>/<object>/<frame>.png) against the FP model's in the same layout."""
    from harness.evaluate import sav

    fp_dir, pred_dir = Path(fp_dir), Path(pred_dir)

    def reader(root: Path, what: str):
        def read(video: str, obj: str, frame: str) -> np.ndarray:
            path = root / video / obj / f"{frame}.png"
            if root == fp_dir and not path.is_file():
                raise _damaged(path, fp_dir)
            return read_binary_png(path, dataset.frame_size(video), what=what)

        return read

    per_object = sav.per_object_scores(
        dataset, reader(pred_dir, "prediction"), read_gt=reader(fp_dir, "FP prediction"), what="FP prediction"
    )
    return per_object, metrics.summarize(per_object) if len(per_object) else {}


def _coco_results(path: Path) -> dict[int, list[dict]]:
    by_image = defaultdict(list)
    for r in json.loads(path.read_text()):
        by_image[r["image_id"]].append(r)  # in prompt order: instance.predict keeps it
    return by_image


def score_coco(dataset, fp_dir: str | Path, pred_dir: str | Path) -> tuple[pd.DataFrame, dict]:
    """Mask IoU of each prompt's mask (coco_results.json, as instance.evaluate saves it) with the FP
    model's mask of the same prompt (the same image, the same place in its prompts); 1 where both are
    empty. Returns (one row per prompt: image_id, prompt, category_id, ann_id where prompted by a
    ground-truth box, iou; {mIoU: their mean})."""
    fp_dir, pred_dir = Path(fp_dir), Path(pred_dir)
    if not (fp_dir / "coco_results.json").is_file():
        raise _damaged(fp_dir / "coco_results.json", fp_dir)
    ref, pred = _coco_results(fp_dir / "coco_results.json"), _coco_results(pred_dir / "coco_results.json")
    if set(ref) != set(pred) or any(len(ref[i]) != len(pred[i]) for i in ref):
        raise DatasetError(f"predictions in {pred_dir} and FP predictions in {fp_dir} do not answer the same prompts")
    rows = []
    for image_id in sorted(ref):
        for k, (a, b) in enumerate(zip(ref[image_id], pred[image_id], strict=True)):
            if a["category_id"] != b["category_id"] or a.get("ann_id") != b.get("ann_id"):
                raise DatasetError(f"image {image_id}, prompt {k}: predictions and FP predictions differ in prompt")
            fp_rle, rle = as_bytes(a["segmentation"]), as_bytes(b["segmentation"])
            if mask_utils.area(fp_rle) == 0 and mask_utils.area(rle) == 0:
                iou = 1.0
            else:
                iou = float(mask_utils.iou([rle], [fp_rle], [0])[0, 0])
            row = dict(image_id=image_id, prompt=k, category_id=a["category_id"], ann_id=a.get("ann_id"), iou=iou)
            rows.append(row)
    per_prompt = pd.DataFrame(rows, columns=["image_id", "prompt", "category_id", "ann_id", "iou"])
    if per_prompt["ann_id"].isna().any():  # a detector's boxes: no instance names the prompt
        per_prompt = per_prompt.drop(columns="ann_id")
    else:
        per_prompt["ann_id"] = per_prompt["ann_id"].astype(int)
    return per_prompt, ({"mIoU": float(per_prompt["iou"].mean())} if len(per_prompt) else {})
