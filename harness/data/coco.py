"""Reader for COCO instance annotations (Lin et al., 2014, "Microsoft COCO: Common Objects in Context"),
used unchanged for the real val2017 download and for the generated set below:

    <root>/annotations/instances_val2017.json   {"images": [...], "annotations": [...], "categories": [...]}
    <root>/val2017/000000000139.jpg ...         (each image's `file_name`)

Everything COCOeval will need is checked on load, so that a bad file fails at once with one line
naming the file, the entry and what was expected, not deep inside pycocotools with a KeyError.
Also here: reading results files in the COCO results format (detector boxes to prompt with, or
segmentations to score), RLE helpers, and `generate`, which writes a COCO-format set from the
synthetic generator's frames for tests and the embedded default.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from harness.claims import scratch_suffix
from harness.data import synthetic
from harness.errors import DatasetError

SPLITS = ("val2017", "train2017")  # what `generate` writes: calibrate on train, evaluate on val
IMAGE_KEYS = ("id", "file_name", "height", "width")
ANNOTATION_KEYS = ("id", "image_id", "category_id", "segmentation", "area", "bbox", "iscrowd")
TOP_LEVEL = ("images", "annotations", "categories")


class Box(NamedTuple):
    """A box prompt: `bbox` is COCO's [x, y, width, height] in pixels."""

    image_id: int
    category_id: int
    bbox: list[float]
    score: float | None = None  # the detector's score; None for a ground-truth box
    ann_id: int | None = None  # the ground-truth annotation the box came from, if it did


def paths(root: str | Path, split: str = "val2017") -> tuple[Path, Path]:
    """(annotations JSON, image folder) of a split of a COCO root in the 2017 layout
    (annotations/instances_<split>.json, <split>/), as COCO ships it and `generate` writes it."""
    root = Path(root)
    return root / "annotations" / f"instances_{split}.json", root / split


def encode(mask: np.ndarray) -> dict:
    """H x W boolean mask -> compressed RLE with `counts` as str, ready for JSON (COCO's results format)."""
    rle = mask_utils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def as_bytes(rle: dict) -> dict:
    """A compressed RLE as pycocotools' C functions take it: counts as bytes (JSON holds them as str)."""
    counts = rle["counts"]
    return {"size": list(rle["size"]), "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


def decode(rle: dict) -> np.ndarray:
    """Compressed RLE (counts str or bytes) -> H x W boolean mask."""
    return mask_utils.decode(as_bytes(rle)) > 0


def _read_json(path: Path, what: str, expected: str):
    if not path.is_file():
        raise DatasetError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"{what} {path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); expected {expected}"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{what} {path} is not readable ({type(e).__name__}); expected {expected}") from None


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _known(key, table: dict) -> bool:
    return isinstance(key, int) and key in table  # ids are integers; a list would not even hash


def _is_polygon(value) -> bool:
    return isinstance(value, list) and len(value) >= 4 and len(value) % 2 == 0 and all(map(_is_number, value))


def _is_box(value) -> bool:
    return isinstance(value, list) and len(value) == 4 and all(map(_is_number, value)) and min(value[2:]) >= 0


class CocoDataset:
    """A COCO instances file and its image folder; images are read lazily, only when asked for.

    `image_dir` may be None for scoring results, which needs the annotations only.
    """

    def __init__(self, annotations: str | Path, image_dir: str | Path | None = None) -> None:
        self.path = Path(annotations)
        self.image_dir = None if image_dir is None else Path(image_dir)
        expected = "a COCO instances file: an object with 'images', 'annotations' and 'categories' lists"
        data = _read_json(self.path, "annotations", expected)
        missing = [k for k in TOP_LEVEL if not isinstance(data, dict) or not isinstance(data.get(k), list)]
        if missing:
            raise DatasetError(f"annotations {self.path}: no {missing[0]!r} list at the top level; expected {expected}")
        self.categories = self._index(data["categories"], "categories", ("id", "name"))
        self.images = self._index(data["images"], "images", IMAGE_KEYS)
        for img in self.images.values():
            sizes = (img["height"], img["width"])
            if not all(isinstance(v, int) and v > 0 for v in sizes) or not isinstance(img["file_name"], str):
                raise DatasetError(
                    f"annotations {self.path}: image id {img['id']} has file_name {img['file_name']!r}, height, "
                    f"width {sizes}; expected a file name and positive integers"
                )
        self.annotations = self._index(data["annotations"], "annotations", ANNOTATION_KEYS)
        self._by_image = defaultdict(list)
        for ann in self.annotations.values():
            self._check_annotation(ann)
            self._by_image[ann["image_id"]].append(ann)
        if self.image_dir is not None:
            if not self.image_dir.is_dir():
                raise DatasetError(f"image folder {self.image_dir} does not exist (images of {self.path})")
            for img in self.images.values():
                if not (self.image_dir / img["file_name"]).is_file():
                    path = self.image_dir / img["file_name"]
                    raise DatasetError(f"image {path} does not exist (image id {img['id']} in {self.path})")
        self.data = data

    def _index(self, entries: list, key: str, required: tuple[str, ...]) -> dict[int, dict]:
        out = {}
        for n, entry in enumerate(entries):
            lacking = [k for k in required if not isinstance(entry, dict) or k not in entry]
            if lacking:
                raise DatasetError(
                    f"annotations {self.path}: {key}[{n}] has no {lacking[0]!r}; expected keys {', '.join(required)}"
                )
            if not isinstance(entry["id"], int) or entry["id"] in out:
                raise DatasetError(f"annotations {self.path}: {key}[{n}] id {entry['id']!r} is not a unique integer")
            out[entry["id"]] = entry
        return out

    def _check_annotation(self, ann: dict) -> None:
        where = f"annotations {self.path}: annotation id {ann['id']}"
        if not _known(ann["category_id"], self.categories):
            known = ", ".join(map(str, sorted(self.categories)[:10])) + (", ..." if len(self.categories) > 10 else "")
            raise DatasetError(f"{where} has category_id {ann['category_id']!r}, not in 'categories' (ids {known})")
        if not _known(ann["image_id"], self.images):
            raise DatasetError(f"{where} has image_id {ann['image_id']!r}, not in 'images'")
        if not _is_box(ann["bbox"]):
            raise DatasetError(
                f"{where} has bbox {ann['bbox']!r}; expected [x, y, width, height] with width, height >= 0"
            )
        if not _is_number(ann["area"]) or ann["iscrowd"] not in (0, 1):
            raise DatasetError(f"{where}: expected a numeric 'area' and 'iscrowd' 0 or 1")
        seg = ann["segmentation"]
        if isinstance(seg, dict):  # RLE: its size must be the image's, or pycocotools decodes garbage
            img = self.images[ann["image_id"]]
            if seg.get("size") != [img["height"], img["width"]] or "counts" not in seg:
                raise DatasetError(
                    f"{where}: RLE segmentation with size {seg.get('size')!r}; expected 'counts' and size "
                    f"[{img['height']}, {img['width']}] (the image's height, width)"
                )
        elif not (isinstance(seg, list) and seg and all(_is_polygon(p) for p in seg)):
            raise DatasetError(f"{where}: segmentation is neither RLE nor a list of polygons [x1, y1, x2, y2, ...]")

    @property
    def ids(self) -> list[int]:
        """Every image id, sorted."""
        return sorted(self.images)

    def image(self, image_id: int) -> np.ndarray:
        """H x W x 3 uint8 RGB image."""
        if self.image_dir is None:
            raise DatasetError(f"annotations {self.path} were opened without an image folder")
        entry = self.images[image_id]
        path = self.image_dir / entry["file_name"]
        try:
            with Image.open(path) as img:
                image = np.array(img.convert("RGB"))
        except OSError as exc:
            raise DatasetError(f"image {path} is not a readable image: {exc}") from exc
        # Masks are predicted at the image's size and compared with annotations at the listed size.
        if image.shape[:2] != (entry["height"], entry["width"]):
            raise DatasetError(
                f"image {path} is {image.shape[1]}x{image.shape[0]} but {self.path} lists it (id {image_id}) as "
                f"width {entry['width']}, height {entry['height']}"
            )
        return image

    def boxes(self, image_id: int) -> list[Box]:
        """Ground-truth box prompts of one image; crowd regions are left out, as COCOeval ignores them."""
        return [
            Box(image_id, a["category_id"], [float(v) for v in a["bbox"]], None, a["id"])
            for a in self._by_image[image_id]
            if not a["iscrowd"]
        ]

    def instances(self, image_id: int) -> list[dict]:
        """The image's annotations as stored (crowd regions included)."""
        return list(self._by_image[image_id])

    def rle(self, ann_id: int) -> dict:
        """An annotation's mask as compressed RLE, whatever form the file stores it in."""
        ann = self.annotations[ann_id]
        img = self.images[ann["image_id"]]
        seg = ann["segmentation"]
        if isinstance(seg, list):  # polygons: one RLE per part, merged
            return mask_utils.merge(mask_utils.frPyObjects(seg, img["height"], img["width"]))
        if isinstance(seg["counts"], list):  # uncompressed RLE (crowd regions)
            return mask_utils.frPyObjects(seg, img["height"], img["width"])
        return as_bytes(seg)

    def mask(self, ann_id: int) -> np.ndarray:
        """An annotation's H x W boolean mask."""
        return mask_utils.decode(self.rle(ann_id)) > 0

    def coco(self) -> COCO:
        """A fresh pycocotools COCO over these annotations.

        COCOeval replaces each ground-truth segmentation by its RLE in place, so every call gets
        its own shallow copies and the dataset's own entries stay as read.
        """
        coco = COCO()
        coco.dataset = {**self.data, "annotations": [dict(a) for a in self.data["annotations"]]}
        with contextlib.redirect_stdout(io.StringIO()):  # createIndex prints progress lines
            coco.createIndex()
        return coco


def _results(path: str | Path, dataset: CocoDataset, expected: str, keys: tuple[str, ...]):
    """The entries of a COCO results file, each checked for `keys`, a known image and a known category."""
    path = Path(path)
    data = _read_json(path, "results", expected)
    if not isinstance(data, list):
        raise DatasetError(f"results {path}: top level is a {type(data).__name__}; expected {expected}")
    for n, entry in enumerate(data):
        lacking = [k for k in keys if not isinstance(entry, dict) or k not in entry]
        if lacking:
            raise DatasetError(f"results {path}: entry {n} has no {lacking[0]!r}; expected {expected}")
        if not _known(entry["image_id"], dataset.images):
            raise DatasetError(f"results {path}: entry {n} has image_id {entry['image_id']!r}, not in {dataset.path}")
        if not _known(entry["category_id"], dataset.categories):
            raise DatasetError(
                f"results {path}: entry {n} has category_id {entry['category_id']!r}, not in the categories of "
                f"{dataset.path}"
            )
        if not _is_number(entry["score"]):
            raise DatasetError(f"results {path}: entry {n} has score {entry['score']!r}; expected a finite number")
    return path, data


def read_detections(path: str | Path, dataset: CocoDataset, score_threshold: float = 0.0) -> list[Box]:
    """A detector's boxes in the COCO results format, [{image_id, category_id, bbox, score}, ...],
    keeping those scoring at least `score_threshold`, in file order."""
    expected = "a COCO results list [{image_id, category_id, bbox: [x, y, width, height], score}, ...]"
    path, data = _results(path, dataset, expected, ("image_id", "category_id", "bbox", "score"))
    for n, entry in enumerate(data):
        if not _is_box(entry["bbox"]):
            raise DatasetError(f"results {path}: entry {n} has bbox {entry['bbox']!r}; expected {expected}")
    return [
        Box(d["image_id"], d["category_id"], [float(v) for v in d["bbox"]], float(d["score"]))
        for d in data
        if d["score"] >= score_threshold
    ]


def read_segmentations(path: str | Path, dataset: CocoDataset) -> list[dict]:
    """Mask results in the COCO results format, [{image_id, category_id, segmentation: RLE, score}, ...].

    Returned entries hold those keys (RLE compressed, counts str) and `ann_id` where the file has it
    (the ground-truth annotation whose box prompted the mask, as `harness.evaluate.instance` writes).
    A `bbox` is dropped: COCOeval would take the box's area for the mask's area ranges.
    """
    expected = "a COCO results list [{image_id, category_id, segmentation: {size, counts}, score}, ...]"
    path, data = _results(path, dataset, expected, ("image_id", "category_id", "segmentation", "score"))
    out = []
    for n, entry in enumerate(data):
        img, seg = dataset.images[entry["image_id"]], entry["segmentation"]
        size = [img["height"], img["width"]]
        if not isinstance(seg, dict) or seg.get("size") != size or not isinstance(seg.get("counts"), str | list):
            raise DatasetError(
                f"results {path}: entry {n} segmentation is not an RLE {{size: {size}, counts}} of its image "
                f"(id {entry['image_id']})"
            )
        if isinstance(seg["counts"], list):  # uncompressed RLE: compress, COCOeval takes compressed only
            rle = mask_utils.frPyObjects(seg, *size)
            seg = {"size": size, "counts": rle["counts"].decode("ascii")}
        result = {k: entry[k] for k in ("image_id", "category_id", "score")} | {"segmentation": seg}
        if "ann_id" in entry:
            if entry["ann_id"] not in dataset.annotations or (
                dataset.annotations[entry["ann_id"]]["image_id"] != entry["image_id"]
            ):
                raise DatasetError(
                    f"results {path}: entry {n} has ann_id {entry['ann_id']!r}, not an annotation of image "
                    f"{entry['image_id']} in {dataset.path}"
                )
            result["ann_id"] = entry["ann_id"]
        out.append(result)
    return out


def generate(
    out: str | Path,
    images: int = 16,
    size: tuple[int, int] = (256, 144),
    seed: int = 0,
    objects: tuple[int, int] = (1, 3),
) -> Path:
    """Write a COCO-format dataset in the 2017 layout (see `paths`) to `out`, `images` images in each
    of val2017 and train2017 (for calibration); returns `out`.

    Image k of val2017 is frame 0 of synthetic sequence k (`synthetic.render_sequence` with one
    frame), of train2017 frame 0 of sequence images + k, and each visible object is one annotation:
    its visible pixels as compressed RLE, with `bbox` and `area` computed from that mask; the
    category is the object's shape kind. Files go to a scratch sibling folder renamed to `out` once
    complete, as `synthetic.generate` does.
    """
    out = Path(out)
    size, objects = (int(size[0]), int(size[1])), (int(objects[0]), int(objects[1]))
    synthetic._check_args(images, 1, size, objects, 0.5)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; remove it or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + scratch_suffix())
    shutil.rmtree(tmp, ignore_errors=True)
    params = dict(images=images, size=list(size), seed=seed, objects=list(objects))
    try:
        for n, split in enumerate(SPLITS):
            _write_split(tmp, split, range(n * images, (n + 1) * images), size, seed, objects, params)
        (tmp / synthetic.COMPLETE_MARKER).write_text(json.dumps(params, sort_keys=True) + "\n")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_split(root: Path, split: str, sequences, size, seed, objects, params) -> None:
    annotations, image_dir = paths(root, split)
    image_dir.mkdir(parents=True)
    annotations.parent.mkdir(parents=True, exist_ok=True)
    categories = [{"id": i + 1, "name": kind, "supercategory": "shape"} for i, kind in enumerate(synthetic.KINDS)]
    data = {"info": {"description": "generated by harness.data.coco.generate", **params}, "licenses": []}
    data.update(images=[], annotations=[], categories=categories)
    for image_id, k in enumerate(sequences, start=1):
        seq = synthetic.render_sequence(seed, k, 1, size, objects)
        name = f"{image_id:012d}.jpg"
        Image.fromarray(seq.images[0]).save(image_dir / name, quality=90)
        data["images"].append({"id": image_id, "file_name": name, "height": size[1], "width": size[0]})
        for obj, kind in enumerate(seq.kinds, start=1):
            mask = seq.labels[0] == obj
            if not mask.any():
                continue
            rle = encode(mask)
            data["annotations"].append(
                {
                    "id": len(data["annotations"]) + 1,
                    "image_id": image_id,
                    "category_id": synthetic.KINDS.index(kind) + 1,
                    "segmentation": rle,
                    "area": int(mask.sum()),
                    "bbox": [float(v) for v in mask_utils.toBbox(as_bytes(rle))],
                    "iscrowd": 0,
                }
            )
    annotations.write_text(json.dumps(data))
