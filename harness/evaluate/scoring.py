"""Score a folder of predicted masks against DAVIS 2017 ground truth.

The folder layout is the one SAM2's tools/vos_inference.py writes: <results_dir>/<sequence>/<frame>.png,
each PNG holding object ids as palette indices ('L' PNGs with the same values are accepted too).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from harness.data.davis import DavisDataset, read_palette_png
from harness.errors import DatasetError
from harness.evaluate.metrics import late_objects, per_object_frame, score_sequence, summarize, warn_late


def _read_prediction(path: Path, shape: tuple[int, int]) -> np.ndarray:
    # A frame not written (the unscored first and last, or a scored one under allow_missing) is empty.
    if not path.exists():
        return np.zeros(shape, dtype=np.uint8)
    ids = read_palette_png(path)
    if ids.shape != shape:
        raise DatasetError(
            f"prediction {path} is {ids.shape[1]}x{ids.shape[0]} (WxH) but its ground truth is {shape[1]}x{shape[0]}"
        )
    return ids


def score_results_folder(
    davis_root,
    results_dir,
    split: str = "val",
    resolution: str = "480p",
    sequences=None,
    allow_missing: bool = False,
    report: dict | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Per-object J/F statistics and the dataset summary (J&F-mean, ...) of a results folder.

    Only the scored frames need a prediction: DAVIS 2017's semi-supervised protocol (the official
    davis2017-evaluation reads frames [1:-1]) never reads the first frame (the given mask) or the
    last. A missing scored frame is an error naming it; with `allow_missing` it is scored as empty.
    `report` (a dict) receives "filled" (the number of frames scored as empty) and "late"
    ({sequence: ids} of objects that appear after the first frame, which are not scored).
    """
    dataset = DavisDataset(davis_root, split=split, resolution=resolution, sequences=sequences)
    dataset.check()
    results_dir = Path(results_dir)
    scores, filled, late = {}, 0, {}
    for seq in dataset.sequences:
        seq_dir = results_dir / seq
        if not seq_dir.is_dir() and not allow_missing:
            raise DatasetError(f"predictions folder {seq_dir} for sequence {seq!r} does not exist")
        names = dataset.frame_names(seq)
        scored = names[1:-1]
        missing = [n for n in scored if not (seq_dir / f"{n}.png").is_file()]
        if missing and not allow_missing:
            raise DatasetError(
                f"sequence {seq!r}: {len(missing)} of {len(scored)} scored prediction frames missing in {seq_dir}, "
                f"first {', '.join(m + '.png' for m in missing[:5])}; --allow-missing scores them as empty"
            )
        filled += len(missing)
        gt = dataset.annotations(seq)
        pred = np.stack([_read_prediction(seq_dir / f"{name}.png", gt.shape[1:]) for name in names])
        scores[seq] = score_sequence(gt, pred)
        if ids := late_objects(gt):
            warn_late(seq, ids)
            late[seq] = ids
    if report is not None:
        report.update(filled=filled, late=late)
    per_object = per_object_frame(scores)
    return per_object, summarize(per_object)
