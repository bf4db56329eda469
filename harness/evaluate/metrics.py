"""DAVIS 2017 semi-supervised metrics: region similarity J and contour accuracy F.

Follows the official davis2017-evaluation protocol so that numbers are comparable with published
ones: objects are the ids of the first ground-truth frame, the first and last frame are not scored,
pixels marked void (255) in the ground truth count for neither mask, and dataset means are taken
over objects (every object weighs the same, however many frames it has).
"""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

VOID_ID = 255
STAT_COLUMNS = ["J-mean", "J-recall", "J-decay", "F-mean", "F-recall", "F-decay"]


def _drop_void(gt, pred, void):
    gt, pred = np.asarray(gt, dtype=bool), np.asarray(pred, dtype=bool)
    if gt.shape != pred.shape:
        raise ValueError(f"mask shapes differ: ground truth {gt.shape}, prediction {pred.shape}")
    if void is not None:
        keep = ~np.asarray(void, dtype=bool)
        gt, pred = gt & keep, pred & keep
    return gt, pred


def jaccard(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None) -> float:
    """Intersection over union of two boolean H x W masks; 1 when both are empty."""
    gt, pred = _drop_void(gt, pred, void)
    union = np.count_nonzero(gt | pred)
    return 1.0 if union == 0 else np.count_nonzero(gt & pred) / union


def boundary_map(mask: np.ndarray) -> np.ndarray:
    """Pixels whose value differs from their east, south or south-east neighbour.

    This is the official seg2bmap at the mask's own resolution: the boundary sits half a pixel
    towards the origin, so it includes background pixels left of / above an object. Beyond the
    last row and column the mask is taken to repeat itself, so the image border is never an edge
    (a mask covering the whole image has no boundary), exactly as the official special-casing of
    the last row, the last column and the bottom-right corner.
    """
    mask = np.asarray(mask, dtype=bool)
    ext = np.pad(mask, ((0, 1), (0, 1)), mode="edge")
    return (ext[:-1, 1:] != mask) | (ext[1:, :-1] != mask) | (ext[1:, 1:] != mask)


def tolerance_radius(shape: tuple[int, int], bound_th: float = 0.008) -> int:
    """Matching radius in pixels: a fraction of the image diagonal, or an absolute count if >= 1."""
    if bound_th >= 1:
        return int(math.ceil(bound_th))
    return int(math.ceil(bound_th * math.hypot(*shape)))


def _share_within(points: np.ndarray, targets: np.ndarray, radius: int) -> float:
    dist, _ = cKDTree(targets).query(points, distance_upper_bound=radius + 0.5)
    return np.count_nonzero(dist <= radius) / len(points)


def f_measure(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None, bound_th: float = 0.008) -> float:
    """Boundary F-measure of two boolean H x W masks, boundaries matched within a disk of tolerance."""
    gt, pred = _drop_void(gt, pred, void)
    b_gt, b_pred = boundary_map(gt), boundary_map(pred)
    n_gt, n_pred = np.count_nonzero(b_gt), np.count_nonzero(b_pred)
    if n_gt == 0 or n_pred == 0:
        # Both empty: P = R = 1. One empty: (P, R) is (1, 0) or (0, 1), so F = 0.
        return 1.0 if n_gt == n_pred else 0.0
    # Matching within a disk of radius r is the official dilation test, but only boundary pixels
    # are ever tested, so a nearest-neighbour query costs per boundary pixel instead of per image
    # pixel. Squared pixel distances are integers, so `<= r` is exact.
    r = tolerance_radius(gt.shape, bound_th)
    pts_gt, pts_pred = np.argwhere(b_gt), np.argwhere(b_pred)
    precision = _share_within(pts_pred, pts_gt, r)
    recall = _share_within(pts_gt, pts_pred, r)
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def score_sequence(
    gt: np.ndarray, pred: np.ndarray, object_ids: list[int] | None = None
) -> dict[int, dict[str, np.ndarray]]:
    """Per object, J and F for frames 1 .. T-2 of a T x H x W ground-truth / predicted id map pair.

    A prediction with fewer frames than the ground truth is treated as empty in the missing frames
    (a run that stopped early is penalised rather than rejected); predicted ids that are not
    ground-truth objects are never looked at.
    """
    gt, pred = np.asarray(gt), np.asarray(pred)
    if gt.ndim != 3 or pred.ndim != 3 or gt.shape[1:] != pred.shape[1:] or len(pred) > len(gt):
        raise ValueError(f"score_sequence: ground truth {gt.shape} and prediction {pred.shape} do not match")
    if object_ids is None:
        object_ids = [int(i) for i in np.unique(gt[0]) if i not in (0, VOID_ID)]
    frames = range(1, len(gt) - 1)
    out = {o: {"J": np.zeros(len(frames)), "F": np.zeros(len(frames))} for o in object_ids}
    for k, t in enumerate(frames):
        void = gt[t] == VOID_ID
        void = void if void.any() else None
        for o in object_ids:
            g = gt[t] == o
            p = pred[t] == o if t < len(pred) else np.zeros_like(g)
            out[o]["J"][k] = jaccard(g, p, void)
            out[o]["F"][k] = f_measure(g, p, void)
    return out


def late_objects(gt: np.ndarray) -> list[int]:
    """Ids that appear after the first ground-truth frame but not in it: DAVIS does not score them."""
    first = set(np.unique(gt[0]).tolist()) | {0, VOID_ID}
    return [int(i) for i in np.unique(gt[1:]) if int(i) not in first]


def warn_late(seq: str, ids: list[int]) -> None:
    logging.getLogger("qbench").warning(
        "sequence %s: object ids %s appear after the first frame; not scored (DAVIS protocol)", seq, ids
    )


def object_stats(values: np.ndarray) -> dict:
    """Mean, recall (share of frames above 0.5) and decay of one object's per-frame values.

    Decay uses the official bins: edges round(linspace(0, n-1, 5)) with halves rounded up, and each
    bin includes its right edge, so neighbouring bins share a frame. Decay = mean(first) - mean(last).
    """
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return {"mean": math.nan, "recall": math.nan, "decay": math.nan}
    edges = np.floor(np.linspace(0, v.size - 1, 5) + 0.5).astype(int)
    decay = v[edges[0] : edges[1] + 1].mean() - v[edges[3] : edges[4] + 1].mean()
    return {"mean": float(v.mean()), "recall": float(np.mean(v > 0.5)), "decay": float(decay)}


def per_object_frame(scores: dict[str, dict[int, dict]]) -> pd.DataFrame:
    """One row per (sequence, object) from {sequence: score_sequence(...)}."""
    rows = []
    for seq, objects in scores.items():
        for obj, values in objects.items():
            row = {"sequence": seq, "object": int(obj)}
            for metric in ("J", "F"):
                for stat, value in object_stats(values[metric]).items():
                    row[f"{metric}-{stat}"] = value
            row["frames"] = len(values["J"])
            rows.append(row)
    return pd.DataFrame(rows, columns=["sequence", "object", *STAT_COLUMNS, "frames"])


def summarize(per_object: pd.DataFrame) -> dict[str, float]:
    """Dataset summary: every statistic averaged over objects, J&F-mean = (J-mean + F-mean) / 2."""
    if per_object.empty:
        raise ValueError("summarize: no objects were scored")
    stats = {c: float(per_object[c].mean()) for c in STAT_COLUMNS}
    return {"J&F-mean": (stats["J-mean"] + stats["F-mean"]) / 2, **stats}
