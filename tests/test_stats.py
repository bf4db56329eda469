"""The cluster bootstrap of harness/stats.py on hand-made per-object values, against a resampling
written out here pair by pair, a closed form, and the evaluators' own per-object frames."""

import numpy as np
import pandas as pd
import pytest
import torch

from harness import models, stats
from harness.data import sav as sav_data
from harness.evaluate import sav


def per_object(values: dict[str, list[float]]) -> pd.Series:
    """{sequence: [value of object 1, 2, ...]} as stats' (unit, object) Series."""
    rows = [(seq, obj + 1, v) for seq, vs in values.items() for obj, v in enumerate(vs)]
    index = pd.MultiIndex.from_tuples([r[:2] for r in rows], names=["unit", "object"])
    return pd.Series([r[2] for r in rows], index=index)


REFERENCE = {"s0": [0.8, 0.6], "s1": [0.7], "s2": [0.9, 0.5, 0.4], "s3": [0.65]}


def test_a_constant_difference_has_an_interval_of_zero_width_at_it():
    ref = per_object(REFERENCE)
    cell = ref - 0.05  # every object 5 points lower: every resample's mean difference is -0.05
    iv = stats.bootstrap(cell, ref)
    assert iv.mean == pytest.approx(-0.05) and iv.lo == pytest.approx(-0.05) and iv.hi == pytest.approx(-0.05)
    assert iv.significant and iv.units == 4


def test_differences_symmetric_around_zero_include_it():
    ref = per_object({"s0": [0.5], "s1": [0.5], "s2": [0.5], "s3": [0.5]})
    cell = per_object({"s0": [0.6], "s1": [0.4], "s2": [0.6], "s3": [0.4]})
    iv = stats.bootstrap(cell, ref)
    # Resampled means of four draws from {+0.1, -0.1}: multiples of 0.05 from -0.1 to 0.1.
    assert iv.mean == pytest.approx(0) and iv.lo == pytest.approx(-0.1) and iv.hi == pytest.approx(0.1)
    assert not iv.significant


def test_the_paired_bootstrap_is_the_resampling_written_out_pair_by_pair():
    """Two seeds each side: the statistic of a resample is the mean, over every (seed, object) of the
    drawn sequences, of the cell's value minus the reference's for that seed and object."""
    rng = np.random.default_rng(7)
    sizes = {f"s{i}": int(n) for i, n in enumerate(rng.integers(1, 5, size=9))}
    runs = {
        side: {seed: {s: list(rng.uniform(0, 1, n)) for s, n in sizes.items()} for seed in (0, 1)}
        for side in ("cell", "ref")
    }
    B = 300
    draws = np.random.default_rng(11).integers(0, len(sizes), size=(B, len(sizes)))
    names = sorted(sizes)
    means = []
    for row in draws:
        pairs = [
            runs["cell"][seed][names[u]][o] - runs["ref"][seed][names[u]][o]
            for u in row
            for seed in (0, 1)
            for o in range(sizes[names[u]])
        ]
        means.append(np.mean(pairs))
    lo, hi = np.percentile(means, [2.5, 97.5])

    def pooled(side):
        return stats.pool({f"seed {seed}": per_object(v) for seed, v in runs[side].items()})

    iv = stats.bootstrap(pooled("cell"), pooled("ref"), resamples=B, seed=11)
    every = [runs["cell"][sd][s][o] - runs["ref"][sd][s][o] for s in names for sd in (0, 1) for o in range(sizes[s])]
    assert iv.mean == pytest.approx(np.mean(every), abs=1e-12)
    assert iv.lo == pytest.approx(lo, abs=1e-12) and iv.hi == pytest.approx(hi, abs=1e-12)
    # Without a reference: the cell's own mean and interval, the same draws.
    own = stats.bootstrap(pooled("cell"), resamples=B, seed=11)
    assert own.lo < own.mean < own.hi and own.mean == pytest.approx(pooled("cell").mean())


def test_the_interval_is_about_the_closed_form_standard_error():
    # One object per sequence: the bootstrap standard error of a mean is the plug-in sd / sqrt(U),
    # and for 200 values the resampled means are close to normal, so the 95% interval spans ~3.92 of it.
    x = np.random.default_rng(3).normal(0.6, 0.1, size=200)
    iv = stats.bootstrap(per_object({f"s{i:03d}": [v] for i, v in enumerate(x)}))
    se = x.std(ddof=0) / np.sqrt(len(x))
    assert iv.hi - iv.lo == pytest.approx(2 * 1.96 * se, rel=0.08)
    assert iv.mean == pytest.approx(x.mean())


def test_other_objects_than_the_reference_are_an_error_naming_them():
    ref = per_object(REFERENCE)
    cell = per_object({**REFERENCE, "s1": [0.7, 0.2]})
    with pytest.raises(ValueError, match=r"scored different objects: only in the cell 1 \(s1/2\), only in the ref"):
        stats.bootstrap(cell, ref)
    with pytest.raises(ValueError, match=r"seed 1 and seed 0 scored different objects: only in seed 1 1 \(s1/2\)"):
        stats.pool({"seed 0": ref, "seed 1": cell})


def test_values_of_the_evaluators_per_object_frames():
    vos = pd.DataFrame({"sequence": ["a", "a", "b"], "object": [1, 2, 1], "J-mean": [0.5, 0.7, 0.9]})
    vos["F-mean"] = [0.7, 0.9, 0.9]
    assert stats.values(vos, "J_F-mean").tolist() == pytest.approx([0.6, 0.8, 0.9])
    assert stats.values(vos, "J-mean").index.tolist() == [("a", 1), ("a", 2), ("b", 1)]
    assert stats.values(vos, "fps") is None and stats.unit_name(vos) == "sequences"
    coco = pd.DataFrame({"image_id": [3, 3, 5], "ann_id": [10, 11, 12], "iou": [0.2, 0.4, 0.9], "score": 0.5})
    assert stats.values(coco, "mIoU").to_dict() == {(3, 10): 0.2, (3, 11): 0.4, (5, 12): 0.9}
    assert stats.values(coco, "AP") is None and stats.unit_name(coco) == "images"


def test_sav_per_object_values_average_to_its_summary(tmp_path):
    """SA-V pools the objects of all videos: its J&F is still the mean of the per-object (J + F) / 2."""
    root = sav_data.generate(tmp_path / "sav", videos=3, frames=13, size=(96, 64), seed=1)
    torch.set_num_threads(1)  # a tiny model: one thread is faster than two on a busy machine
    try:
        model = models.build("sam2_small", device="cpu")
        frame, summary = sav.evaluate(model, sav_data.SavDataset(root), progress=False)
    finally:
        torch.set_num_threads(2)
    assert stats.values(frame, "J_F-mean").mean() == pytest.approx(summary["J&F-mean"], abs=1e-12)
    assert stats.bootstrap(stats.values(frame, "J_F-mean")).units == 3
