"""COCO instance segmentation: the reader, RLE, the generated set, COCOeval on hand-worked cases,
the sam2 image predictor on ground-truth and detector boxes, and one-line errors for bad inputs."""

import json
import shutil

import numpy as np
import pytest

from harness import models
from harness.data import coco, synthetic
from harness.errors import DatasetError
from harness.evaluate import instance


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    return coco.generate(tmp_path_factory.mktemp("coco") / "gen", images=6, size=(160, 96), seed=3)


@pytest.fixture(scope="module")
def dataset(coco_root):
    return coco.CocoDataset(*coco.paths(coco_root))


@pytest.fixture(scope="module")
def model():
    return models.build("sam2_small", device="cpu")


@pytest.fixture(scope="module")
def gt_run(model, dataset, tmp_path_factory):
    saved = tmp_path_factory.mktemp("results") / "gt.json"
    per_instance, summary = instance.evaluate(model, dataset, save=saved, progress=False)
    return per_instance, summary, saved


def _rect(shape, rows, cols):
    mask = np.zeros(shape, dtype=bool)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = True
    return mask


def _hand_made(tmp_path, gt_masks, height=64, width=64):
    """An instances JSON with one image and one category; each mask one annotation (ids 1, 2, ...)."""
    anns = []
    for k, mask in enumerate(gt_masks, start=1):
        rle = coco.encode(mask)
        ys, xs = np.nonzero(mask)
        bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
        anns.append(dict(id=k, image_id=1, category_id=1, segmentation=rle, area=int(mask.sum()), bbox=bbox, iscrowd=0))
    data = dict(
        images=[dict(id=1, file_name="a.jpg", height=height, width=width)],
        annotations=anns,
        categories=[dict(id=1, name="thing")],
    )
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def _results_file(tmp_path, masks_scores, name="results.json"):
    path = tmp_path / name
    rows = [dict(image_id=1, category_id=1, segmentation=coco.encode(m), score=s) for m, s in masks_scores]
    path.write_text(json.dumps(rows))
    return path


def test_perfect_masks_score_ap_one(tmp_path):
    # One small (100 px) and one medium (40 x 40 = 1600 px) instance, no large one: COCOeval gives -1
    # for an area range without ground truth.
    shape = (128, 128)
    small, medium = _rect(shape, (0, 10), (0, 10)), _rect(shape, (50, 90), (50, 90))
    ann = _hand_made(tmp_path, [small, medium], *shape)
    scores = instance.score_results_file(ann, _results_file(tmp_path, [(small, 0.9), (medium, 0.8)]))
    # COCOeval averages 101 interpolated precisions: 1.0 up to the last bit of a float sum.
    for key in ("AP", "AP50", "AP75", "APs", "APm"):
        assert scores[key] == pytest.approx(1.0, abs=1e-12), key
    assert scores["APl"] == -1.0
    assert scores["mIoU"] == 1.0 and scores["instances"] == scores["masks"] == 2


def test_known_iou_counts_up_to_its_threshold(tmp_path):
    # A mask holding 62 of the instance's 100 pixels has IoU 0.62: a true positive at the thresholds
    # 0.50, 0.55, 0.60 (precision 1 at every recall point: AP_t = 1) and a false positive at the
    # seven from 0.65 to 0.95 (AP_t = 0), so AP = 3 / 10.
    gt = _rect((64, 64), (20, 30), (20, 30))
    pred = np.zeros_like(gt)
    pred[np.nonzero(gt)[0][:62], np.nonzero(gt)[1][:62]] = True
    ann = _hand_made(tmp_path, [gt])
    scores = instance.score_results_file(ann, _results_file(tmp_path, [(pred, 0.5)]))
    assert scores["AP"] == pytest.approx(0.3)
    assert scores["AP50"] == pytest.approx(1.0, abs=1e-12) and scores["AP75"] == 0.0
    assert scores["mIoU"] == pytest.approx(0.62)


def test_ranking_and_101_point_interpolation(tmp_path):
    # Two instances A and B; masks in score order: d1 (0.9) overlaps nothing, d2 (0.8) is A exactly,
    # d3 (0.7) has IoU 0.62 with B.
    # t <= 0.60: TP pattern F T T -> recall 0, .5, 1 with precision 0, 1/2, 2/3; interpolated
    #   (max to the right) 2/3 at every one of the 101 recall points: AP_t = 2/3.
    # t >= 0.65: F T F -> recall 0, .5, .5 with precision 0, 1/2, 1/3; interpolated 1/2 at the 51
    #   recall points 0.00..0.50 and 0 above (recall never passes 0.5): AP_t = 51 * 0.5 / 101.
    shape = (64, 64)
    a, b = _rect(shape, (0, 10), (0, 10)), _rect(shape, (20, 30), (20, 30))
    d3 = np.zeros(shape, dtype=bool)
    d3[np.nonzero(b)[0][:62], np.nonzero(b)[1][:62]] = True
    ann = _hand_made(tmp_path, [a, b], *shape)
    results = _results_file(tmp_path, [(_rect(shape, (40, 50), (40, 50)), 0.9), (a, 0.8), (d3, 0.7)])
    scores = instance.score_results_file(ann, results)
    low, high = 2 / 3, 51 * 0.5 / 101
    assert scores["AP50"] == pytest.approx(low)
    assert scores["AP75"] == pytest.approx(high)
    assert scores["AP"] == pytest.approx((3 * low + 7 * high) / 10)
    assert scores["APs"] == pytest.approx(scores["AP"])  # every instance is small (< 32^2 px)
    # mIoU: d1 overlaps nothing and stays unmatched; A gets d2 (1.0), B gets d3 (0.62).
    assert scores["mIoU"] == pytest.approx((1.0 + 0.62) / 2)
    text = instance.cocoeval_segm(coco.CocoDataset(ann), coco.read_segmentations(results, coco.CocoDataset(ann)))[1]
    assert f"IoU=0.50      | area=   all | maxDets=100 ] = {low:.3f}" in text


def test_rle_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) < 0.3
    rle = json.loads(json.dumps(coco.encode(mask)))  # str counts survive JSON
    assert rle["size"] == [37, 53] and isinstance(rle["counts"], str)
    assert np.array_equal(coco.decode(rle), mask)
    assert np.array_equal(coco.decode(coco.encode(np.zeros((4, 5), bool))), np.zeros((4, 5), bool))


def test_generated_set_matches_the_synthetic_frames(coco_root, dataset):
    assert coco.paths(coco_root)[0].is_file() and synthetic.is_complete(coco_root)
    assert dataset.ids == [1, 2, 3, 4, 5, 6]
    for image_id in dataset.ids:
        seq = synthetic.render_sequence(3, image_id - 1, 1, (160, 96), (1, 3))
        image = dataset.image(image_id)
        assert image.shape == (96, 160, 3) and np.abs(image.astype(int) - seq.images[0]).mean() < 8  # JPEG q90
        boxes = dataset.boxes(image_id)
        assert len(boxes) == len(seq.kinds)
        for obj, box in enumerate(boxes, start=1):
            mask = dataset.mask(box.ann_id)
            assert np.array_equal(mask, seq.labels[0] == obj)
            ys, xs = np.nonzero(mask)
            assert box.bbox == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert dataset.annotations[box.ann_id]["area"] == mask.sum()
            assert dataset.categories[box.category_id]["name"] == seq.kinds[obj - 1]
    # train2017, for calibration: the next sequences of the generator, no image shared with val2017
    train = coco.CocoDataset(*coco.paths(coco_root, "train2017"))
    assert train.ids == dataset.ids
    first = synthetic.render_sequence(3, len(dataset.ids), 1, (160, 96), (1, 3)).images[0]
    assert np.abs(train.image(1).astype(int) - first).mean() < 8
    assert not np.array_equal(train.image(1), dataset.image(1))
    with pytest.raises(FileExistsError):
        coco.generate(coco_root, images=1)


def test_ground_truth_boxes(gt_run, dataset, coco_root):
    per_instance, summary, saved = gt_run
    assert summary["instances"] == summary["masks"] == len(dataset.annotations) == len(per_instance)
    assert summary["images"] == 6 and summary["fps"] > 0
    # The small model's box-to-mask IoU on generated data is about 0.7 (0.78 held out in training).
    assert 0.5 < summary["mIoU"] < 1 and 0 < summary["AP"] <= summary["AP50"] <= 1
    results = json.loads(saved.read_text())
    for r in results:  # the recorded IoU is the mask's against its prompt's own instance
        pred, gt = coco.decode(r["segmentation"]), dataset.mask(r["ann_id"])
        row = per_instance.set_index("ann_id").loc[r["ann_id"]]
        assert row["iou"] == pytest.approx((pred & gt).sum() / (pred | gt).sum())
        assert row["score"] == pytest.approx(r["score"])  # the predicted IoU
    # The results file scores to the same numbers as the run that wrote it.
    from_file = instance.score_results_file(coco.paths(coco_root)[0], saved)
    assert from_file == {k: summary[k] for k in from_file}


def test_detector_boxes(model, dataset, gt_run, tmp_path):
    per_gt = gt_run[0].set_index("ann_id")
    anns = sorted(dataset.annotations.values(), key=lambda a: a["id"])
    # Drop a box whose instance is alone in its category on its image, so that no other mask can be
    # matched to it (greedy matching would give it an overlapping mask of its category).
    pairs = [(a["image_id"], a["category_id"]) for a in anns]
    dropped = next(a["id"] for a, pair in zip(anns, pairs) if pairs.count(pair) == 1)
    detections = [
        dict(
            image_id=a["image_id"],
            category_id=a["category_id"],
            bbox=a["bbox"],
            score=0.2 if a["id"] == dropped else 0.9,
        )
        for a in anns
    ]
    path = tmp_path / "detections.json"
    path.write_text(json.dumps(detections))
    boxes = coco.read_detections(path, dataset, score_threshold=0.5)
    assert len(boxes) == len(anns) - 1 and all(b.score == 0.9 and b.ann_id is None for b in boxes)
    per_instance, summary = instance.evaluate(model, dataset, detections=boxes, progress=False)
    assert summary["masks"] == len(anns) - 1 and summary["instances"] == len(anns)
    per_det = per_instance.set_index("ann_id")
    # The box below the threshold prompts nothing, so its instance is missed; every other instance is
    # matched to the mask of its own box, the same prompt as in the ground-truth run.
    assert per_det.loc[dropped, "iou"] == 0 and np.isnan(per_det.loc[dropped, "score"])
    kept = per_det.index != dropped
    assert np.allclose(per_det["iou"][kept], per_gt["iou"][kept], atol=1e-3)
    assert (per_det["score"][kept] == 0.9).all()
    assert summary["mIoU"] == pytest.approx(per_gt["iou"][kept].sum() / len(anns), abs=1e-3)


def _one_line(exc_info, *needles):
    message = str(exc_info.value)
    assert "\n" not in message
    for needle in needles:
        assert str(needle) in message, message


def test_bad_annotations(coco_root, tmp_path):
    ann_path, image_dir = coco.paths(coco_root)
    data = json.loads(ann_path.read_text())

    broken = tmp_path / "malformed.json"
    broken.write_text(ann_path.read_text()[:200])
    with pytest.raises(DatasetError) as e:
        coco.CocoDataset(broken, image_dir)
    _one_line(e, broken, "not valid JSON", "'images'")

    unknown = tmp_path / "unknown_category.json"
    bad = json.loads(json.dumps(data))
    bad["annotations"][2]["category_id"] = 77
    unknown.write_text(json.dumps(bad))
    with pytest.raises(DatasetError) as e:
        coco.CocoDataset(unknown, image_dir)
    _one_line(e, unknown, f"annotation id {bad['annotations'][2]['id']}", "category_id 77")

    no_area = tmp_path / "no_area.json"
    bad = json.loads(json.dumps(data))
    del bad["annotations"][0]["area"]
    no_area.write_text(json.dumps(bad))
    with pytest.raises(DatasetError) as e:
        coco.CocoDataset(no_area, image_dir)
    _one_line(e, no_area, "annotations[0]", "'area'")

    images = tmp_path / "images"
    shutil.copytree(image_dir, images)
    missing = images / data["images"][3]["file_name"]
    missing.unlink()
    with pytest.raises(DatasetError) as e:
        coco.CocoDataset(ann_path, images)
    _one_line(e, missing, "image id 4")


def test_bad_results(dataset, tmp_path):
    det = tmp_path / "det.json"
    good = dict(image_id=1, category_id=1, bbox=[1, 2, 3, 4], score=0.5)
    cases = [
        ("[{", ("not valid JSON", "COCO results list")),
        (json.dumps({"image_id": 1}), ("top level is a dict",)),
        (json.dumps([good, {**good, "image_id": 999}]), ("entry 1", "image_id 999")),
        (json.dumps([{**good, "category_id": 77}]), ("entry 0", "category_id 77")),
        (json.dumps([{k: v for k, v in good.items() if k != "score"}]), ("entry 0", "'score'")),
        (json.dumps([{**good, "bbox": [1, 2, -3, 4]}]), ("entry 0", "bbox [1, 2, -3, 4]")),
    ]
    for text, needles in cases:
        det.write_text(text)
        with pytest.raises(DatasetError) as e:
            coco.read_detections(det, dataset)
        _one_line(e, det, *needles)
    seg = tmp_path / "seg.json"
    seg.write_text(json.dumps([dict(image_id=1, category_id=1, segmentation=coco.encode(np.ones((5, 5))), score=1.0)]))
    with pytest.raises(DatasetError) as e:
        coco.read_segmentations(seg, dataset)
    _one_line(e, seg, "entry 0", "[96, 160]")
