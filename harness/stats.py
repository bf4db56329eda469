"""Seeded cluster bootstrap of per-object scores: a cell's mean and its paired difference to a reference.

The unit resampled is the sequence (COCO: the image), with all of its objects and all of a cell's
seeds together: objects of one sequence share its frames, motion and difficulty, so they are not
independent, and resampling them one by one would give intervals that are too narrow. Seeds are
not resampled: the interval is over the data, and the table says how many seeds each cell has.

Each object's value is first averaged over a cell's seeds. The mean of those values is the mean
over runs of the logged metric (every object weighs the same, as the DAVIS and SA-V summaries
weigh them), and where two cells have the same seeds their per-object difference averages the
differences paired by seed and object, so resampling it is the paired bootstrap.

Resample b draws U sequence indices (U sequences, sorted by name) from one
`numpy.random.default_rng(seed).integers(0, U, size=(B, U))` call; its statistic is the mean over
every object of the drawn sequences. The interval is the 2.5 and 97.5 percentiles (numpy's linear
interpolation) of the B statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from harness.evaluate.metrics import STAT_COLUMNS

RESAMPLES, SEED, LEVEL = 2000, 0, 0.95
# Logged metric -> the per_object.csv columns whose mean over objects it is (mean of the two for
# J&F: (mean J + mean F) / 2 = mean of (J + F) / 2, for DAVIS and for SA-V's objects of all videos).
PER_OBJECT = {"J_F-mean": ("J-mean", "F-mean"), "mIoU": ("iou",), **{c: (c,) for c in STAT_COLUMNS}}
# per_object.csv's (resampling unit, object) columns: VOS evaluators, then COCO's instance evaluator.
KEYS = (("sequence", "object"), ("image_id", "ann_id"))


@dataclass(frozen=True)
class Interval:
    mean: float
    lo: float
    hi: float
    units: int  # sequences (images) resampled

    @property
    def significant(self) -> bool:
        """Whether the interval excludes 0 (read for differences)."""
        return bool(self.lo > 0 or self.hi < 0)


def unit_name(frame: pd.DataFrame) -> str:
    """What one resamples in this per-object frame: "sequences" (video) or "images" (COCO)."""
    return "sequences" if _keys(frame)[0] == "sequence" else "images"


def _keys(frame: pd.DataFrame) -> tuple[str, str]:
    for keys in KEYS:
        if set(keys) <= set(frame.columns):
            return keys
    raise ValueError(f"per-object frame has none of the key columns {KEYS} (columns: {', '.join(frame.columns)})")


def values(frame: pd.DataFrame, metric: str) -> pd.Series | None:
    """One run's per-object values of a logged metric, indexed by (unit, object); None when the
    metric is not a mean over these rows (AP, frames/s, sizes). Objects without a value are left out."""
    columns = PER_OBJECT.get(metric)
    if columns is None or not set(columns) <= set(frame.columns):
        return None
    unit, obj = _keys(frame)
    v = frame[list(columns)].mean(axis=1, skipna=False)
    v.index = pd.MultiIndex.from_arrays([frame[unit], frame[obj]], names=["unit", "object"])
    if v.index.has_duplicates:
        raise ValueError(f"per-object frame lists an object twice: {v.index[v.index.duplicated()][0]}")
    return v.dropna()


def _describe(index: pd.Index) -> str:
    shown = ", ".join("/".join(map(str, k)) for k in list(index)[:3])
    return f"{len(index)} ({shown}{', ...' if len(index) > 3 else ''})"


def same_objects(a: pd.Series, b: pd.Series, what_a: str, what_b: str) -> None:
    """ValueError naming what differs when `a` and `b` do not score the same objects."""
    only_a, only_b = a.index.difference(b.index), b.index.difference(a.index)
    if len(only_a) or len(only_b):
        raise ValueError(
            f"{what_a} and {what_b} scored different objects: only in {what_a} {_describe(only_a)}, "
            f"only in {what_b} {_describe(only_b)}"
        )


def pool(runs: dict[str, pd.Series]) -> pd.Series:
    """Each object's mean over a cell's runs ({label, e.g. "seed 0": values}), which must score the same objects."""
    (first, ref), *rest = runs.items()
    for label, v in rest:
        same_objects(v, ref, label, first)
    return pd.concat(list(runs.values()), axis=1).mean(axis=1).sort_index()


def bootstrap(
    cell: pd.Series, reference: pd.Series | None = None, resamples: int = RESAMPLES, seed: int = SEED, level=LEVEL
) -> Interval:
    """Mean of `cell` (per-object values, indexed by (unit, object)), or with `reference` its mean
    difference to it paired by object, with the percentile interval over resampled units."""
    if reference is not None:
        same_objects(cell, reference, "the cell", "the reference")
        cell = cell - reference.reindex(cell.index)
    if cell.empty:
        raise ValueError("no per-object values to resample")
    codes, units = pd.factorize(cell.index.get_level_values(0), sort=True)
    sums = np.bincount(codes, weights=cell.to_numpy(dtype=float), minlength=len(units))
    counts = np.bincount(codes, minlength=len(units)).astype(float)
    draws = np.random.default_rng(seed).integers(0, len(units), size=(resamples, len(units)))
    # In blocks of about 2^20 draws: COCO's 5000 images would otherwise gather 80 MB at once.
    blocks = np.array_split(draws, max(1, draws.size >> 20))
    stats = np.concatenate([sums[d].sum(axis=1) / counts[d].sum(axis=1) for d in blocks])
    lo, hi = np.percentile(stats, [50 * (1 - level), 50 * (1 + level)])
    return Interval(float(sums.sum() / counts.sum()), float(lo), float(hi), len(units))
