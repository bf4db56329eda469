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
from harness.evaluate.metrics import per_object_frame, score_sequence, summarize


def _read_prediction(path: Path, shape: tuple[int, int]) -> np.ndarray:
    # A frame the run did not write is an empty prediction, as a missing object id would be.
    if not path.exists():
        return np.zeros(shape, dtype=np.uint8)
    ids = read_palette_png(path)
    if ids.shape != shape:
        raise DatasetError(
            f"prediction {path} is {ids.shape[1]}x{ids.shape[0]} (WxH) but its ground truth is {shape[1]}x{shape[0]}"
        )
    return ids


def score_results_folder(
    davis_root, results_dir, split: str = "val", resolution: str = "480p", sequences=None
) -> tuple[pd.DataFrame, dict]:
    """Per-object J/F statistics and the dataset summary (J&F-mean, ...) of a results folder."""
    dataset = DavisDataset(davis_root, split=split, resolution=resolution, sequences=sequences)
    results_dir = Path(results_dir)
    scores = {}
    for seq in dataset.sequences:
        seq_dir = results_dir / seq
        if not seq_dir.is_dir():
            raise DatasetError(f"predictions folder {seq_dir} for sequence {seq!r} does not exist")
        gt = dataset.annotations(seq)
        pred = np.stack([_read_prediction(seq_dir / f"{name}.png", gt.shape[1:]) for name in dataset.frame_names(seq)])
        scores[seq] = score_sequence(gt, pred)
    per_object = per_object_frame(scores)
    return per_object, summarize(per_object)
