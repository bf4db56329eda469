"""Reader and generator for the SA-V val/test folder layout (Ravi et al., 2024, "SAM 2: Segment Anything in
Images and Videos"), as described in facebookresearch/sam2 sav_dataset/README.md:

    <root>/JPEGImages_24fps/<video>/00000.jpg ...          every frame, extracted at 24 fps
    <root>/Annotations_6fps/<video>/<object>/00000.png ... one binary PNG per object and annotated frame (6 fps,
                                                           so every 4th frame: 00000, 00004, 00008, ...)
    <root>/sav_val.txt (or sav_test.txt)                   optional: the video ids of the split

Every object has its own PNG because SA-V masks may overlap (a person and that person's hand). Object
folders are integers ("000"), which SAM2's tools/vos_inference.py turns into predictor object ids, and frame
names are integers, because SAM2's frame loader orders JPEGs by int(stem); both are checked here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from harness.claims import scratch_suffix
from harness.data import synthetic
from harness.data.davis import write_palette_png
from harness.errors import DatasetError
from harness.progress import progress as progress_bar

IMAGES = "JPEGImages_24fps"
ANNOTATIONS = "Annotations_6fps"
ANNOTATION_STEP = 4  # 24 fps frames per 6 fps annotation


def _int_sorted(stems: list[str], what: str, folder: Path) -> list[str]:
    bad = [s for s in stems if not (s.isascii() and s.isdigit())]
    if bad:
        raise DatasetError(f"{what} {folder / bad[0]} is not named by an integer, as SA-V and SAM2 require")
    return sorted(stems, key=int)


def read_binary_png(path: str | Path, shape: tuple[int, int] | None = None, what: str = "mask") -> np.ndarray:
    """H x W bool mask (value > 0) of a one-object PNG, as SAM2's SA-V evaluator reads it.

    Fails on a missing or unreadable file, more than one channel, more than two distinct values (SA-V
    holds one object per PNG) and, with `shape` (H, W), another size.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{what} {path} does not exist")
    try:
        with Image.open(path) as img:
            mode, arr = img.mode, np.array(img)
    except OSError as exc:
        raise DatasetError(f"{what} {path} is not a readable PNG: {exc}") from exc
    if arr.ndim != 2:
        raise DatasetError(f"{what} {path} has mode {mode!r} with {arr.shape[2]} channels; expected a 1-channel PNG")
    # bincount is ~20x faster than np.unique on a 1080p frame, and SA-V val has tens of thousands of masks.
    if arr.dtype == np.uint8:
        values = np.flatnonzero(np.bincount(arr.ravel(), minlength=256))
    else:
        values = np.unique(arr)
    if len(values) > 2:
        shown = ", ".join(str(v) for v in values[:5])
        raise DatasetError(f"{what} {path} is not binary: {len(values)} distinct values ({shown}, ...)")
    if shape is not None and arr.shape != tuple(shape):
        raise DatasetError(
            f"{what} {path} is {arr.shape[1]}x{arr.shape[0]} (WxH) but the video is {shape[1]}x{shape[0]}"
        )
    return arr > 0


class SavDataset:
    """The videos of an SA-V-layout folder, with its structure checked up front; masks are read lazily.

    `split_file` (a path, or a file name inside `root`, e.g. "sav_val.txt") lists the videos; without it every
    folder of Annotations_6fps is a video. `videos` narrows that to a subset.
    """

    def __init__(self, root: str | Path, split_file: str | Path | None = None, videos: list[str] | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"SA-V root {self.root} does not exist")
        for kind in (IMAGES, ANNOTATIONS):
            if not (self.root / kind).is_dir():
                raise DatasetError(f"SA-V folder {self.root / kind} does not exist (expected <root>/{kind})")
        if split_file is not None:
            path = Path(split_file)
            path = path if path.is_absolute() or path.is_file() else self.root / path
            if not path.is_file():
                raise DatasetError(f"SA-V split file {path} does not exist")
            listed = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            origin = f"split file {path}"
        else:
            listed = sorted(p.name for p in (self.root / ANNOTATIONS).iterdir() if p.is_dir())
            origin = f"folder {self.root / ANNOTATIONS}"
        if videos is not None:
            unknown = [v for v in videos if v not in listed]
            if unknown:
                raise DatasetError(f"SA-V video {unknown[0]!r} is not listed in {origin}")
            listed = list(videos)
        if not listed:
            raise DatasetError(f"SA-V: no videos in {origin}")
        self.videos = listed
        self._index = {video: self._scan(video) for video in self.videos}
        self._sizes: dict[str, tuple[int, int]] = {}

    def _scan(self, video: str) -> tuple[list[str], list[str], list[str]]:
        """(frame names, object folders, annotated frames) of one video, with its structure checked."""
        image_dir, ann_dir = self.root / IMAGES / video, self.root / ANNOTATIONS / video
        if not image_dir.is_dir():
            raise DatasetError(f"SA-V video {video!r}: frame folder {image_dir} does not exist")
        frames = _int_sorted([p.stem for p in image_dir.glob("*.jpg")], "frame", image_dir)
        if not frames:
            raise DatasetError(f"SA-V video {video!r}: no .jpg frames in {image_dir}")
        if not ann_dir.is_dir():
            raise DatasetError(f"SA-V video {video!r}: annotation folder {ann_dir} does not exist")
        objects = _int_sorted([p.name for p in ann_dir.iterdir() if p.is_dir()], "object folder", ann_dir)
        if not objects:
            raise DatasetError(f"SA-V video {video!r}: no object folders in {ann_dir}")
        if len({int(o) for o in objects}) < len(objects):
            raise DatasetError(f"SA-V video {video!r}: object folders in {ann_dir} repeat an id ({', '.join(objects)})")
        have = {o: {p.stem for p in (ann_dir / o).glob("*.png")} for o in objects}
        union = set().union(*have.values())
        for obj in objects:
            # SAM2's evaluator scores each object on its own file list, so an object short of a frame would
            # silently be scored on other frames than the rest: a broken download, not a protocol choice.
            if missing := sorted(union - have[obj], key=lambda s: (len(s), s)):
                other = next(o for o in objects if missing[0] in have[o])
                raise DatasetError(
                    f"SA-V object folder {ann_dir / obj} lacks {missing[0]}.png, which object {other} has "
                    f"({len(missing)} such frames)"
                )
        annotated = _int_sorted(list(union), "annotation", ann_dir / objects[0])
        if not annotated:
            raise DatasetError(f"SA-V video {video!r}: no .png masks in the object folders of {ann_dir}")
        have_jpg = set(frames)
        if no_jpg := [f for f in annotated if f not in have_jpg]:
            raise DatasetError(
                f"SA-V annotation {ann_dir / objects[0] / no_jpg[0]}.png has no frame {image_dir / no_jpg[0]}.jpg "
                f"({len(no_jpg)} such frames)"
            )
        return frames, objects, annotated

    def __len__(self) -> int:
        return len(self.videos)

    def _entry(self, video: str) -> tuple[list[str], list[str], list[str]]:
        if video not in self._index:
            raise DatasetError(f"SA-V video {video!r} is not part of this dataset ({self.root})")
        return self._index[video]

    def image_dir(self, video: str) -> Path:
        """JPEGImages_24fps/<video>: the folder the SAM2 video predictor reads."""
        self._entry(video)
        return self.root / IMAGES / video

    def annotation_dir(self, video: str) -> Path:
        self._entry(video)
        return self.root / ANNOTATIONS / video

    def frame_names(self, video: str) -> list[str]:
        """Stems of every 24 fps frame, in SAM2's (numeric) order: index k is predictor frame k."""
        return list(self._entry(video)[0])

    def object_ids(self, video: str) -> list[str]:
        """Object folder names, e.g. ['000', '001'], in numeric order."""
        return list(self._entry(video)[1])

    def annotated_frames(self, video: str) -> list[str]:
        """Stems of the annotated (6 fps) frames, in numeric order; every object has all of them."""
        return list(self._entry(video)[2])

    def frame_size(self, video: str) -> tuple[int, int]:
        """(H, W) of the video's frames, from the first JPEG's header."""
        if video not in self._sizes:
            path = self.image_dir(video) / f"{self.frame_names(video)[0]}.jpg"
            try:
                with Image.open(path) as img:
                    self._sizes[video] = (img.height, img.width)
            except OSError as exc:
                raise DatasetError(f"frame {path} is not a readable image: {exc}") from exc
        return self._sizes[video]

    def mask(self, video: str, obj: str, frame: str) -> np.ndarray:
        """H x W bool mask of object folder `obj` on annotated frame `frame`."""
        path = self.annotation_dir(video) / obj / f"{frame}.png"
        return read_binary_png(path, self.frame_size(video), what="annotation")

    def check(self) -> None:
        """Read every mask once: non-binary or wrongly sized PNGs fail here, before any run."""
        for video in self.videos:
            for obj in self.object_ids(video):
                for frame in self.annotated_frames(video):
                    self.mask(video, obj, frame)


def generate(
    out: str | Path,
    videos: int = 4,
    frames: int = 24,
    size: tuple[int, int] = (256, 144),
    seed: int = 0,
    objects: tuple[int, int] = (1, 3),
    progress: bool = False,
    train_videos: int = 0,
) -> Path:
    """Write an SA-V-layout dataset of synthetic videos (harness.data.synthetic's renderer) to `out`.

    Every frame is a JPEG; every ANNOTATION_STEP-th frame from 0 has one 0/1 palette PNG per object (object
    folder = label - 1 as 3 digits, like SA-V's 000, 001, ...), empty where the object is hidden.
    sav_val.txt lists the first `videos` videos, sav_train.txt the `train_videos` after them (calibration
    data apart from the scored videos). size is (width, height). As synthetic.generate, files go to a scratch
    folder renamed to `out` once complete, so `out` is never seen half written.
    """
    out = Path(out)
    size = (int(size[0]), int(size[1]))
    if videos < 1 or frames < 1:
        raise ValueError(f"videos ({videos}) and frames ({frames}) must be at least 1")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; remove it or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + scratch_suffix())
    shutil.rmtree(tmp, ignore_errors=True)
    names = [f"sav_synth_{k:03d}" for k in range(videos + train_videos)]
    try:
        for k, name in enumerate(progress_bar(names, desc="synthetic SA-V", unit="video", enabled=progress)):
            seq = synthetic.render_sequence(seed, k, frames, size, objects)
            image_dir = tmp / IMAGES / name
            image_dir.mkdir(parents=True)
            for t in range(frames):
                Image.fromarray(seq.images[t]).save(image_dir / f"{t:05d}.jpg", quality=90)
            for label in range(1, len(seq.kinds) + 1):
                for t in range(0, frames, ANNOTATION_STEP):
                    mask = (seq.labels[t] == label).astype(np.uint8)
                    write_palette_png(tmp / ANNOTATIONS / name / f"{label - 1:03d}" / f"{t:05d}.png", mask)
        (tmp / "sav_val.txt").write_text("".join(f"{name}\n" for name in names[:videos]))
        if train_videos:
            (tmp / "sav_train.txt").write_text("".join(f"{name}\n" for name in names[videos:]))
        params = dict(videos=videos, frames=frames, size=list(size), seed=seed, objects=list(objects))
        if train_videos:
            params["train_videos"] = train_videos
        (tmp / synthetic.COMPLETE_MARKER).write_text(json.dumps(params, sort_keys=True) + "\n")
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
