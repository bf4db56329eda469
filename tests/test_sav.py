"""SA-V reading and scoring (harness/data/sav.py, harness/evaluate/sav.py). Expected scores are worked out
by hand in the comments: J and F of an object are means over its scored frames, the summary a mean over
objects, and an empty prediction against a non-empty ground truth scores J = F = 0."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from harness import models
from harness.data import sav as data
from harness.data import synthetic
from harness.data.davis import write_palette_png
from harness.errors import DatasetError
from harness.evaluate import sav

SHAPE = (48, 64)  # H, W of the hand-made videos


def box(r0, r1, c0, c1):
    m = np.zeros(SHAPE, dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


def write_png(path, mask):
    write_palette_png(path, np.asarray(mask, dtype=np.uint8))


def write_video(root, video, objects, frames=21):
    """A hand-made SA-V video: grey JPEGs with each object's first mask drawn in, and {obj: {t: mask}} PNGs."""
    img = np.full((*SHAPE, 3), 90, dtype=np.uint8)
    for masks in objects.values():
        img[next(iter(masks.values()))] = 220
    (root / data.IMAGES / video).mkdir(parents=True)
    for t in range(frames):
        Image.fromarray(img).save(root / data.IMAGES / video / f"{t:05d}.jpg")
    for obj, masks in objects.items():
        for t, mask in masks.items():
            write_png(root / data.ANNOTATIONS / video / obj / f"{t:05d}.png", mask)
    return root


def one_line(exc_info, *parts):
    msg = str(exc_info.value)
    assert "\n" not in msg
    for part in parts:
        assert str(part) in msg, msg
    return msg


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    # 17 frames: annotated 0, 4, 8, 12, 16, of which 4, 8 and 12 are scored.
    return data.generate(tmp_path_factory.mktemp("sav") / "sav", videos=2, frames=17, size=(128, 96), seed=1)


@pytest.fixture()
def one_thread():
    # conftest asks for 2 threads; on a busy 2-core machine this tiny model then runs ~50x slower
    # (threads waiting on each other) than on one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def predictions(generated, tmp_path):
    """Predictions equal to the ground truth, in the layout SAM2's vos_inference --per_obj_png_file writes."""
    return shutil.copytree(generated / data.ANNOTATIONS, tmp_path / "pred")


def test_generate_writes_the_sav_layout(generated):
    ds = data.SavDataset(generated, "sav_val.txt")
    ds.check()
    assert ds.videos == ["sav_synth_000", "sav_synth_001"] == data.SavDataset(generated).videos
    video = ds.videos[0]
    assert ds.frame_names(video) == [f"{t:05d}" for t in range(17)]
    assert ds.annotated_frames(video) == ["00000", "00004", "00008", "00012", "00016"]
    assert sav.scored_frames(ds, video) == ["00004", "00008", "00012"]
    assert ds.frame_size(video) == (96, 128)
    # Object folder 000 is the renderer's label 1, one binary PNG per annotated frame.
    labels = synthetic.render_sequence(1, 0, 17, (128, 96), (1, 3)).labels
    assert ds.object_ids(video) == [f"{i:03d}" for i in range(labels.max())]
    assert np.array_equal(ds.mask(video, "000", "00008"), labels[8] == 1)
    assert not (generated / data.ANNOTATIONS / video / "000" / "00001.png").exists()


def test_predictions_equal_to_ground_truth_score_one(generated, predictions):
    ds = data.SavDataset(generated)
    report = {}
    per_object, summary = sav.score_folder(ds, predictions, report=report)
    assert summary["J&F-mean"] == summary["J-mean"] == summary["F-mean"] == 1.0
    assert (per_object["frames"] == 3).all() and report == {"unscored": [], "filled": 0}
    # The dataset root works as the predictions folder too (its Annotations_6fps is used).
    assert sav.score_folder(ds, generated)[1]["J&F-mean"] == 1.0


def test_one_scored_frame_emptied(generated, predictions):
    ds = data.SavDataset(generated)
    video = ds.videos[0]
    assert ds.mask(video, "000", "00008").any()  # so the emptied prediction scores J = F = 0 there
    write_png(predictions / video / "000" / "00008.png", np.zeros((96, 128)))
    per_object, summary = sav.score_folder(ds, predictions)
    n = len(per_object)
    # That object: frames (1, 0, 1) -> 2/3 for J and F; every other object 1; the mean over n objects is
    # 1 - (1/3) / n.
    row = per_object[(per_object["sequence"] == video) & (per_object["object"] == 0)].iloc[0]
    assert row["J-mean"] == pytest.approx(2 / 3) and row["F-mean"] == pytest.approx(2 / 3)
    for key in ("J&F-mean", "J-mean", "F-mean"):
        assert summary[key] == pytest.approx(1 - 1 / (3 * n))


def test_first_and_last_annotated_frames_are_not_scored(generated, predictions):
    ds = data.SavDataset(generated)
    first, *_, last = ds.annotated_frames(ds.videos[0])
    for path in predictions.rglob("*.png"):
        if path.stem == first:
            write_png(path, ~data.read_binary_png(path))  # inverted
        elif path.stem == last:
            path.unlink()  # never read
    assert sav.score_folder(ds, predictions)[1]["J&F-mean"] == 1.0


def test_object_counts_from_the_first_frame_either_mask_shows_it(tmp_path):
    # Object 000 is hidden on annotated frames 4 and 8 and back from 12; scored frames are 4, 8, 12, 16.
    # SAM2's Evaluator counts an object's frames only from the first one where its ground truth or its
    # prediction is non-empty. Object 001 is empty on every scored frame: SAM2 cannot score it.
    seen, gone = box(10, 30, 10, 40), np.zeros(SHAPE, dtype=bool)
    gt = {t: seen if t in (0, 12, 16, 20) else gone for t in range(0, 21, 4)}
    root = write_video(tmp_path / "gt", "v", {"000": gt, "001": {t: box(0, 5, 0, 5) if t == 0 else gone for t in gt}})
    ds = data.SavDataset(root)

    def score(false_positive_at=None):
        pred = shutil.copytree(root / data.ANNOTATIONS, tmp_path / f"pred{false_positive_at}")
        if false_positive_at is not None:
            write_png(pred / "v" / "000" / f"{false_positive_at:05d}.png", box(40, 45, 40, 45))
        report = {}
        per_object, summary = sav.score_folder(ds, pred, report=report)
        assert report["unscored"] == ["v/001"] and list(per_object["object"]) == [0]
        return int(per_object["frames"].iloc[0]), summary["J-mean"], summary["F-mean"]

    assert score() == (2, 1.0, 1.0)  # frames 12, 16
    assert score(8) == (3, pytest.approx(2 / 3), pytest.approx(2 / 3))  # frames 8 (J = F = 0), 12, 16
    # From frame 4 (J = F = 0); frame 8 is empty in both masks, J = F = 1: (0 + 1 + 1 + 1) / 4.
    assert score(4) == (4, 0.75, 0.75)


def test_missing_predictions(generated, predictions):
    ds = data.SavDataset(generated)
    video = ds.videos[1]
    (predictions / video / "000" / "00012.png").unlink()
    with pytest.raises(DatasetError) as err:
        sav.score_folder(ds, predictions)
    one_line(err, predictions / video, "000/00012.png", "1 of")
    report = {}
    per_object, _ = sav.score_folder(ds, predictions, allow_missing=True, report=report)
    assert report["filled"] == 1
    row = per_object[(per_object["sequence"] == video) & (per_object["object"] == 0)].iloc[0]
    assert ds.mask(video, "000", "00012").any() and row["J-mean"] == pytest.approx(2 / 3)
    shutil.rmtree(predictions / video)
    with pytest.raises(DatasetError) as err:
        sav.score_folder(ds, predictions)
    one_line(err, predictions / video)
    with pytest.raises(DatasetError) as err:
        sav.score_folder(ds, predictions / "nowhere")
    one_line(err, predictions / "nowhere")


@pytest.mark.parametrize(
    "damage, expect",
    [
        (lambda p: np.zeros((10, 10)), "is 10x10 (WxH) but the video is 128x96"),
        (lambda p: np.stack([np.zeros((96, 128))] * 3, axis=-1), "3 channels"),
        (lambda p: np.arange(96 * 128).reshape(96, 128) % 3, "not binary: 3 distinct values"),
    ],
)
def test_bad_prediction_png(generated, predictions, damage, expect):
    path = predictions / "sav_synth_000" / "000" / "00004.png"
    Image.fromarray(damage(path).astype(np.uint8)).save(path)
    with pytest.raises(DatasetError) as err:
        sav.score_folder(data.SavDataset(generated), predictions)
    one_line(err, path, expect)


def _remove_frame(root):
    (root / data.ANNOTATIONS / "v" / "001" / "00008.png").unlink()
    return root / data.ANNOTATIONS / "v" / "001", "lacks 00008.png, which object 000 has"


def _remove_jpegs(root):
    shutil.rmtree(root / data.IMAGES / "v")
    return root / data.IMAGES / "v", "does not exist"


def _remove_one_jpeg(root):
    (root / data.IMAGES / "v" / "00004.jpg").unlink()
    return root / data.IMAGES / "v" / "00004.jpg", "has no frame"


def _name_object(root):
    (root / data.ANNOTATIONS / "v" / "001").rename(root / data.ANNOTATIONS / "v" / "hand")
    return root / data.ANNOTATIONS / "v" / "hand", "not named by an integer"


def _three_values(root):
    path = root / data.ANNOTATIONS / "v" / "000" / "00004.png"
    Image.fromarray(np.arange(SHAPE[0] * SHAPE[1], dtype=np.uint8).reshape(SHAPE) % 3).save(path)
    return path, "not binary"


def _wrong_size(root):
    path = root / data.ANNOTATIONS / "v" / "001" / "00012.png"
    write_png(path, np.ones((SHAPE[0] // 2, SHAPE[1])))
    return path, "is 64x24 (WxH) but the video is 64x48"


def _not_a_png(root):
    path = root / data.ANNOTATIONS / "v" / "000" / "00000.png"
    path.write_text("not an image")
    return path, "not a readable PNG"


@pytest.mark.parametrize(
    "damage", [_remove_frame, _remove_jpegs, _remove_one_jpeg, _name_object, _three_values, _wrong_size, _not_a_png]
)
def test_bad_dataset_is_one_line_naming_the_path(tmp_path, damage):
    masks = {t: box(5, 20, 5, 20) for t in range(0, 21, 4)}
    root = write_video(tmp_path / "sav", "v", {"000": masks, "001": masks})
    data.SavDataset(root).check()
    path, what = damage(root)
    with pytest.raises(DatasetError) as err:
        data.SavDataset(root).check()
    one_line(err, path, what)


def test_bad_root_and_split(tmp_path):
    with pytest.raises(DatasetError) as err:
        data.SavDataset(tmp_path / "none")
    one_line(err, tmp_path / "none")
    root = write_video(tmp_path / "sav", "v", {"000": {0: box(5, 20, 5, 20)}})
    (root / "sav_val.txt").write_text("v\nw\n")
    with pytest.raises(DatasetError) as err:
        data.SavDataset(root, "sav_val.txt")
    one_line(err, root / data.IMAGES / "w", "does not exist")
    with pytest.raises(DatasetError) as err:
        data.SavDataset(root, "sav_test.txt")
    one_line(err, root / "sav_test.txt")
    with pytest.raises(DatasetError) as err:
        data.SavDataset(root, videos=["x"])
    one_line(err, "'x'", root / data.ANNOTATIONS)
    shutil.rmtree(root / data.ANNOTATIONS)
    with pytest.raises(DatasetError) as err:
        data.SavDataset(root)
    one_line(err, root / data.ANNOTATIONS)


def test_evaluate_with_the_embedded_model(generated, tmp_path, one_thread):
    model = models.build("sam2_small", device="cpu")
    ds = data.SavDataset(generated)
    per_object, summary = sav.evaluate(model, ds, save_dir=tmp_path / "pred", progress=False)
    # The trained small model tracks the generated objects (0.6 when written); an empty prediction scores 0.
    assert 0.3 < summary["J&F-mean"] < 1.0 and summary["fps"] > 0
    assert len(per_object) == sum(len(ds.object_ids(v)) for v in ds.videos)
    # Saved predictions are the annotated frames in the SA-V layout and score to the same numbers.
    saved = sorted(p.relative_to(tmp_path / "pred").as_posix() for p in (tmp_path / "pred").rglob("*.png"))
    expected = sorted(f"{v}/{o}/{t}.png" for v in ds.videos for o in ds.object_ids(v) for t in ds.annotated_frames(v))
    assert saved == expected
    rescored, again = sav.score_folder(ds, tmp_path / "pred")
    assert again == {k: v for k, v in summary.items() if k in again}
    assert rescored.equals(per_object)


def test_object_absent_on_the_prompt_frame_is_tracked_from_an_empty_prompt(tmp_path, one_thread):
    # SAM2's SA-V recipe prompts every object folder on the first annotated frame, an empty mask included.
    later = {t: box(30, 40, 40, 55) if t else np.zeros(SHAPE, dtype=bool) for t in range(0, 9, 4)}
    root = write_video(tmp_path / "sav", "v", {"000": {t: box(5, 25, 5, 30) for t in (0, 4, 8)}, "001": later}, 9)
    pred = sav.predict_video(models.build("sam2_small", device="cpu"), data.SavDataset(root), "v")
    assert {o: sorted(f) for o, f in pred.items()} == {o: ["00000", "00004", "00008"] for o in ("000", "001")}
    assert pred["000"]["00004"].any() and not any(m.any() for m in pred["001"].values())
