"""DAVIS J&F metrics. Every expected value is worked out by hand in the comment next to it."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from harness.errors import DatasetError
from harness.evaluate import metrics
from harness.evaluate.scoring import score_results_folder


def mask(shape, *boxes):
    """Boolean mask with the given (row0, row1, col0, col1) half-open boxes set."""
    m = np.zeros(shape, dtype=bool)
    for r0, r1, c0, c1 in boxes:
        m[r0:r1, c0:c1] = True
    return m


def dot(r, c, shape=(100, 100)):
    return mask(shape, (r, r + 1, c, c + 1))


def pixels(m):
    return {(int(r), int(c)) for r, c in zip(*np.nonzero(m), strict=True)}


# ---------------------------------------------------------------- J


def test_jaccard_empty_cases():
    obj = mask((4, 4), (1, 3, 1, 3))
    empty = np.zeros((4, 4), dtype=bool)
    assert metrics.jaccard(obj, empty) == 0.0  # |P∩G| = 0, |P∪G| = 4
    assert metrics.jaccard(empty, obj) == 0.0  # |P∩G| = 0, |P∪G| = 4
    assert metrics.jaccard(empty, empty) == 1.0  # empty union -> 1 by definition


def test_jaccard_one_pixel_and_half_overlap():
    assert metrics.jaccard(dot(5, 5), dot(5, 5)) == 1.0
    assert metrics.jaccard(dot(5, 5), dot(5, 6)) == 0.0  # 0 / 2
    # Two 2x4 rectangles, cols 0-3 and cols 2-5: overlap 2x2 = 4, union 8 + 8 - 4 = 12 -> 1/3.
    gt, pred = mask((4, 8), (0, 2, 0, 4)), mask((4, 8), (0, 2, 2, 6))
    assert metrics.jaccard(gt, pred) == pytest.approx(1 / 3)


def test_jaccard_ignores_void():
    gt = mask((4, 4), (0, 2, 0, 2))  # 4 pixels
    pred = mask((4, 4), (0, 2, 0, 3))  # the 4 gt pixels + 2 in column 2
    void = mask((4, 4), (0, 4, 2, 3))  # column 2
    assert metrics.jaccard(gt, pred) == pytest.approx(4 / 6)
    assert metrics.jaccard(gt, pred, void) == 1.0  # column 2 removed: 4 / 4


# ---------------------------------------------------------------- boundary map


def test_boundary_of_one_pixel_is_the_2x2_block_towards_the_origin():
    # A pixel is boundary when its E, S or SE neighbour differs: (2,2) itself (E is 0), (2,1) (E is
    # the object), (1,2) (S is the object) and (1,1) (SE is the object).
    assert pixels(metrics.boundary_map(dot(2, 2, (5, 5)))) == {(1, 1), (1, 2), (2, 1), (2, 2)}


def test_boundary_image_border_is_not_an_edge():
    assert not metrics.boundary_map(np.ones((4, 4), dtype=bool)).any()
    # Object in the bottom-right 2x2 of a 4x4 image. Row 1: (1,1) SE is object, (1,2) and (1,3) S is
    # object. (2,1) E is object; (3,1) on the last row compares only E, which is object. The object
    # pixels (2,2), (2,3), (3,2), (3,3) all equal their in-image E/S/SE neighbours: not boundary.
    corner = mask((4, 4), (2, 4, 2, 4))
    assert pixels(metrics.boundary_map(corner)) == {(1, 1), (1, 2), (1, 3), (2, 1), (3, 1)}
    # Object in the top-left 2x2: (0,1) and (1,1) have E background, (1,0) has S background;
    # (0,0) has E, S, SE all object; no background pixel has the object to its E/S/SE.
    assert pixels(metrics.boundary_map(mask((4, 4), (0, 2, 0, 2)))) == {(0, 1), (1, 0), (1, 1)}


# ---------------------------------------------------------------- F


def test_tolerance_radius():
    assert metrics.tolerance_radius((100, 100)) == 2  # ceil(0.008 * 141.42) = ceil(1.131) = 2
    assert metrics.tolerance_radius((480, 854)) == 8  # ceil(0.008 * 979.6) = ceil(7.84) = 8
    assert metrics.tolerance_radius((100, 100), bound_th=3) == 3  # >= 1: absolute


def test_f_identical_and_empty():
    sq = mask((100, 100), (40, 60, 40, 60))
    empty = np.zeros((100, 100), dtype=bool)
    assert metrics.f_measure(sq, sq) == 1.0  # P = R = 1
    assert metrics.f_measure(empty, empty) == 1.0  # both boundaries empty: P = R = 1
    assert metrics.f_measure(sq, empty) == 0.0  # P = 1, R = 0 -> 2*1*0 / 1 = 0
    assert metrics.f_measure(empty, sq) == 0.0  # P = 0, R = 1 -> 0


def test_f_one_pixel_within_and_beyond_tolerance():
    # 100x100 image: r = 2, disk offsets dy² + dx² <= 4. Boundary of a dot at (r, c) is rows r-1..r,
    # cols c-1..c.
    g = dot(50, 50)  # boundary rows 49-50, cols 49-50
    assert metrics.f_measure(g, dot(50, 50)) == 1.0
    # Shift 2 right: pred boundary cols 51-52, each within 2 columns of col 49/50 -> P = R = 1.
    assert metrics.f_measure(g, dot(50, 52)) == 1.0
    # Shift 3 right: pred cols 52-53; col 52 is 2 from col 50 (match), col 53 is 3 away -> P = 2/4.
    # Likewise gt col 50 matches, col 49 does not -> R = 2/4. F = 2 * .25 / 1 = 0.5.
    assert metrics.f_measure(g, dot(50, 53)) == pytest.approx(0.5)
    # Shift 5 right: nearest pair is 3 columns apart -> P = R = 0 -> F = 0.
    assert metrics.f_measure(g, dot(50, 55)) == 0.0
    # Diagonal (2, 2): pred boundary {51,52}x{51,52}, gt {49,50}x{49,50}. Only (51,51)-(50,50) are
    # within the disk (1 + 1 = 2 <= 4); (51,52)-(50,50) gives 1 + 4 = 5 > 4. P = R = 1/4, F = 1/4.
    assert metrics.f_measure(g, dot(52, 52)) == pytest.approx(0.25)
    # An absolute tolerance of 3 pixels matches the 3-pixel shift entirely.
    assert metrics.f_measure(g, dot(50, 53), bound_th=3) == 1.0


def test_f_square_shifted_by_one_pixel():
    # A square's boundary is the ring of the square grown by one row/column up and left; shifting the
    # square by 1 shifts the ring by 1, so every ring pixel is within 1 <= r = 2 of the other ring.
    sq = mask((100, 100), (40, 60, 40, 60))
    assert metrics.f_measure(sq, np.roll(sq, 1, axis=1)) == 1.0
    assert metrics.f_measure(sq, np.roll(sq, 1, axis=0)) == 1.0


def test_f_mask_touching_the_border():
    # Object = right half of a 100x100 image. Its boundary is only column 49 (background whose E is
    # the object); right and bottom border rows/cols are not edges. Predicting columns 49-99 puts the
    # boundary at column 48, 1 pixel away -> F = 1. Predicting columns 53-99 puts it at column 52,
    # 3 away -> nothing matches -> F = 0.
    gt = mask((100, 100), (0, 100, 50, 100))
    assert pixels(metrics.boundary_map(gt)) == {(r, 49) for r in range(100)}
    assert metrics.f_measure(gt, mask((100, 100), (0, 100, 49, 100))) == 1.0
    assert metrics.f_measure(gt, mask((100, 100), (0, 100, 53, 100))) == 0.0


def test_f_ignores_void():
    sq = mask((100, 100), (40, 60, 40, 60))
    blob = mask((100, 100), (0, 10, 0, 10))
    void = blob.copy()
    assert metrics.f_measure(sq, sq | blob) < 1.0  # the blob adds unmatched predicted boundary
    assert metrics.f_measure(sq, sq | blob, void) == 1.0  # removed as void: identical masks


# ---------------------------------------------------------------- sequences and statistics


def two_object_sequence(t=5):
    frame = np.zeros((20, 20), dtype=np.uint8)
    frame[2:8, 2:8] = 1
    frame[12:18, 12:18] = 2
    frame[0, :] = 255  # void row: neither an object nor background
    return np.stack([frame] * t)


def test_score_sequence_skips_first_and_last_frame():
    gt = two_object_sequence()
    pred = np.where(gt == 255, 0, gt).astype(np.uint8)
    pred[0] = 0  # wrong only in frames 0 and T-1, which are not scored
    pred[-1] = 2
    pred[1:-1, 19, 0] = 7  # an id the ground truth does not have: ignored
    scores = metrics.score_sequence(gt, pred)
    assert sorted(scores) == [1, 2]  # 0 and 255 are not objects
    for obj in (1, 2):
        np.testing.assert_array_equal(scores[obj]["J"], [1, 1, 1])  # frames 1, 2, 3
        np.testing.assert_array_equal(scores[obj]["F"], [1, 1, 1])


def test_score_sequence_missing_frames_are_empty():
    gt = two_object_sequence()
    scores = metrics.score_sequence(gt, gt[:3])  # frames 3 and 4 missing; 3 is scored
    np.testing.assert_array_equal(scores[1]["J"], [1, 1, 0])
    np.testing.assert_array_equal(scores[1]["F"], [1, 1, 0])  # empty prediction: P = 1, R = 0


def test_object_stats():
    v = [1.0, 0.9, 0.8, 0.6, 0.5, 0.4, 0.2, 0.0]
    # mean = 4.4 / 8 = 0.55; recall: 1, .9, .8, .6 are > 0.5 (0.5 is not) -> 4/8.
    # Bins: round(linspace(0, 7, 5)) = round(0, 1.75, 3.5, 5.25, 7) = 0, 2, 4, 5, 7 (halves up);
    # first bin v[0..2] -> 0.9, last bin v[5..7] -> 0.2; decay = 0.7.
    stats = metrics.object_stats(np.array(v))
    assert stats == pytest.approx({"mean": 0.55, "recall": 0.5, "decay": 0.7})
    # n = 4: edges round(0, .75, 1.5, 2.25, 3) = 0, 1, 2, 2, 3 -> bins v[0..1] and v[2..3].
    assert metrics.object_stats(np.array([1.0, 1.0, 0.0, 0.0]))["decay"] == 1.0
    assert metrics.object_stats(np.array([0.3]))["decay"] == 0.0  # one frame is both bins


def test_summary_averages_objects_not_frames():
    scores = {
        "a": {1: {"J": np.ones(4), "F": np.ones(4)}},
        "b": {1: {"J": np.zeros(2), "F": np.array([1.0, 0.0])}},
    }
    df = metrics.per_object_frame(scores)
    assert list(df.columns) == ["sequence", "object", *metrics.STAT_COLUMNS, "frames"]
    assert df["frames"].tolist() == [4, 2]
    summary = metrics.summarize(df)
    # J: object means 1 and 0 -> 0.5 (frame-weighted would be 4/6). F: 1 and 0.5 -> 0.75.
    # J&F = (0.5 + 0.75) / 2 = 0.625. Recall: J 1 and 0 -> 0.5; F 1 and 0.5 -> 0.75.
    # Decay: a is flat (0). b with n = 2: edges round(0, .25, .5, .75, 1) = 0, 0, 1, 1, 1, bins v[0]
    # and v[1]: J 0 - 0 = 0, F 1 - 0 = 1 -> F-decay (0 + 1) / 2 = 0.5.
    assert summary == pytest.approx(
        {
            "J&F-mean": 0.625,
            "J-mean": 0.5,
            "J-recall": 0.5,
            "J-decay": 0.0,
            "F-mean": 0.75,
            "F-recall": 0.75,
            "F-decay": 0.5,
        }
    )
    assert list(summary)[0] == "J&F-mean"


# ---------------------------------------------------------------- results folder


def write_png(path, ids, mode="P"):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(ids, mode="L")
    if mode == "P":
        img = img.convert("P")  # 'L' -> 'P' keeps the values as palette indices
        img.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    img.save(path)


SQUARES = {"seqa": {1: (10, 30, 10, 30), 2: (60, 80, 60, 80)}, "seqb": {1: (40, 60, 40, 60)}}
FRAMES = {"seqa": 5, "seqb": 4}


def gt_frame(seq):
    ids = np.zeros((100, 100), dtype=np.uint8)  # 100x100: tolerance r = 2
    for obj, (r0, r1, c0, c1) in SQUARES[seq].items():
        ids[r0:r1, c0:c1] = obj
    if seq == "seqb":
        ids[0:5, :] = 255
    return ids


@pytest.fixture
def davis(tmp_path):
    root = tmp_path / "davis"
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / "val.txt").write_text("seqa\nseqb\n")
    for seq, n in FRAMES.items():
        jpg_dir = root / "JPEGImages" / "480p" / seq
        jpg_dir.mkdir(parents=True)
        for t in range(n):
            Image.new("RGB", (100, 100)).save(jpg_dir / f"{t:05d}.jpg")
            write_png(root / "Annotations" / "480p" / seq / f"{t:05d}.png", gt_frame(seq))
    return root


def write_results(root, edit=lambda seq, t, ids: ids, mode="P"):
    for seq, n in FRAMES.items():
        for t in range(n):
            ids = np.where(gt_frame(seq) == 255, 0, gt_frame(seq)).astype(np.uint8)
            write_png(root / seq / f"{t:05d}.png", edit(seq, t, ids), mode)
    return root


def test_results_equal_to_ground_truth(davis, tmp_path):
    df, summary = score_results_folder(davis, write_results(tmp_path / "res"))
    assert df[["sequence", "object", "frames"]].values.tolist() == [["seqa", 1, 3], ["seqa", 2, 3], ["seqb", 1, 2]]
    assert summary["J&F-mean"] == 1.0


def test_results_dropped_object(davis, tmp_path):
    def drop(seq, t, ids):
        if seq == "seqa" and 0 < t < 4:
            ids[ids == 2] = 0
        return ids

    df, summary = score_results_folder(davis, write_results(tmp_path / "res", drop))
    # seqa object 2: J = 0 and F = 0 in all scored frames; the other two objects are perfect.
    # J-mean = F-mean = J&F = (1 + 0 + 1) / 3 = 2/3, recalls 2/3 as well, decays 0.
    assert df.loc[1, ["J-mean", "F-mean"]].tolist() == [0.0, 0.0]
    assert summary == pytest.approx(
        {
            "J&F-mean": 2 / 3,
            "J-mean": 2 / 3,
            "J-recall": 2 / 3,
            "J-decay": 0.0,
            "F-mean": 2 / 3,
            "F-recall": 2 / 3,
            "F-decay": 0.0,
        }
    )


def test_results_shifted_mask_void_and_unknown_ids_in_mode_l(davis, tmp_path):
    def shift(seq, t, ids):
        if seq == "seqb":
            ids = np.roll(ids, 1, axis=1)  # object cols 41-60 instead of 40-59
            ids[0:5, 0:50] = 1  # inside the void rows: ignored
            ids[90:95, 0:5] = 9  # not an object: ignored
        return ids

    _, summary = score_results_folder(davis, write_results(tmp_path / "res", shift, mode="L"))
    # seqb object 1: overlap 20x19 = 380, union 400 + 400 - 380 = 420 -> J = 19/21; F = 1 (shift of 1
    # <= r = 2). J-mean = (1 + 1 + 19/21) / 3 = 61/63; F-mean = 1; J&F = (61/63 + 1) / 2 = 62/63.
    assert summary["J-mean"] == pytest.approx(61 / 63)
    assert summary["F-mean"] == 1.0
    assert summary["J&F-mean"] == pytest.approx(62 / 63)
    assert summary["J-recall"] == 1.0  # 19/21 > 0.5


def test_results_missing_frame_is_empty(davis, tmp_path):
    res = write_results(tmp_path / "res")
    (res / "seqa" / "00003.png").unlink()
    with pytest.raises(
        DatasetError, match=r"sequence 'seqa': 1 of 3 scored prediction frames missing .*first 00003\.png"
    ):
        score_results_folder(davis, res, sequences=["seqa"])
    df, _ = score_results_folder(davis, res, sequences=["seqa"], allow_missing=True)
    # Both seqa objects: J = F = [1, 1, 0] over frames 1-3 -> means 2/3; decay: n = 3, edges
    # round(0, .5, 1, 1.5, 2) = 0, 1, 1, 2, 2 -> first bin v[0..1] = 1, last bin v[2] = 0 -> 1.
    assert df["J-mean"].tolist() == pytest.approx([2 / 3, 2 / 3])
    assert df["F-decay"].tolist() == [1.0, 1.0]


def test_results_with_only_the_scored_frames_score_as_with_all(davis, tmp_path):
    def shift(seq, t, ids):
        return np.roll(ids, t, axis=1)  # a different error on every frame

    full = write_results(tmp_path / "all", shift)
    part = write_results(tmp_path / "scored", shift)
    for seq in ("seqa", "seqb"):
        names = sorted(p.name for p in (part / seq).iterdir())
        (part / seq / names[0]).unlink()  # the given first mask and the last frame are never read
        (part / seq / names[-1]).unlink()
    df_all, all_frames = score_results_folder(davis, full)
    df_part, scored_only = score_results_folder(davis, part)
    assert scored_only == all_frames and 0 < all_frames["J&F-mean"] < 1
    pd.testing.assert_frame_equal(df_part, df_all)


def test_results_missing_sequence_folder(davis, tmp_path):
    res = write_results(tmp_path / "res")
    for png in (res / "seqb").iterdir():
        png.unlink()
    (res / "seqb").rmdir()
    with pytest.raises(DatasetError, match="seqb") as err:
        score_results_folder(davis, res)
    assert "\n" not in str(err.value)


def test_results_wrong_size(davis, tmp_path):
    res = write_results(tmp_path / "res")
    write_png(res / "seqa" / "00002.png", np.zeros((50, 80), dtype=np.uint8))
    with pytest.raises(DatasetError, match=r"00002\.png.*80x50.*100x100"):
        score_results_folder(davis, res)


def test_summarize_rejects_nothing():
    with pytest.raises(ValueError):
        metrics.summarize(pd.DataFrame(columns=["sequence", "object", *metrics.STAT_COLUMNS, "frames"]))
