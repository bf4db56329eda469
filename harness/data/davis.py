"""Reader for the DAVIS 2017 folder layout, used unchanged for the real download and for synthetic data.

    <root>/JPEGImages/<resolution>/<seq>/00000.jpg ...
    <root>/Annotations/<resolution>/<seq>/00000.png ...   (palette PNG, index = object id)
    <root>/ImageSets/2017/<split>.txt                      (one sequence name per line)

Annotation values are returned exactly as stored: 0 is background, 1..N are objects and some
datasets use 255 for void pixels, so nothing is remapped here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from harness.errors import DatasetError


def _voc_palette() -> np.ndarray:
    # The PASCAL VOC colour map that DAVIS uses: the bits of the index are spread over R, G, B
    # from the most significant bit down, so 1 -> (128, 0, 0), 2 -> (0, 128, 0), 8 -> (64, 0, 0).
    ids = np.arange(256)
    palette = np.zeros((256, 3), dtype=np.uint8)
    for bit in range(8):
        for channel in range(3):
            palette[:, channel] |= (((ids >> (3 * bit + channel)) & 1) << (7 - bit)).astype(np.uint8)
    return palette


PALETTE: np.ndarray = _voc_palette()
"""256 x 3 uint8 DAVIS / PASCAL VOC palette; index 0 is black background."""


def read_palette_png(path: str | Path) -> np.ndarray:
    """Return the H x W uint8 palette indices (object ids) of a DAVIS-style annotation PNG."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"annotation {path} does not exist")
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L"):
                raise DatasetError(
                    f"annotation {path} has mode {img.mode!r}; expected a palette ('P') or 'L' PNG of object ids"
                )
            return np.array(img, dtype=np.uint8)
    except OSError as exc:
        raise DatasetError(f"annotation {path} is not a readable PNG: {exc}") from exc


def write_palette_png(path: str | Path, ids: np.ndarray) -> None:
    """Write an H x W uint8 array of object ids as a palette PNG with the DAVIS palette, creating its folder."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.dtype != np.uint8:
        raise ValueError(f"write_palette_png({path}): expected a 2-D uint8 array, got {ids.dtype} {ids.shape}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(ids)
    img.putpalette(PALETTE.tobytes())  # also turns the 'L' image into mode 'P' without touching indices
    img.save(path)


class DavisDataset:
    """One split of a DAVIS 2017-style dataset; images are read lazily, only when asked for."""

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        resolution: str = "480p",
        sequences: list[str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.resolution = resolution
        if not self.root.is_dir():
            raise DatasetError(f"DAVIS root {self.root} does not exist")

        split_file = self.root / "ImageSets" / "2017" / f"{split}.txt"
        if not split_file.is_file():
            available = sorted(p.stem for p in split_file.parent.glob("*.txt")) or ["none"]
            raise DatasetError(f"split file {split_file} does not exist; available splits: {', '.join(available)}")

        for kind in ("JPEGImages", "Annotations"):
            folder = self.root / kind / resolution
            if not folder.is_dir():
                available = sorted(p.name for p in folder.parent.glob("*") if p.is_dir()) or ["none"]
                raise DatasetError(f"folder {folder} does not exist; available resolutions: {', '.join(available)}")

        listed = [line.strip() for line in split_file.read_text().splitlines() if line.strip()]
        if sequences is None:
            self.sequences = listed
        else:
            known = set(listed)
            for seq in sequences:
                if seq not in known:
                    raise DatasetError(f"sequence {seq!r} is not listed in split file {split_file}")
            self.sequences = list(sequences)

        for seq in self.sequences:
            for kind in ("JPEGImages", "Annotations"):
                folder = self.root / kind / resolution / seq
                if not folder.is_dir():
                    raise DatasetError(f"sequence folder {folder} does not exist (listed in {split_file})")

    def check(self) -> None:
        """Fail on a frame without its annotation or an annotation without its frame, and on an
        annotation that does not decode, before any run: otherwise a sequence is scored on fewer frames.

        An annotations folder holding only the first frame (DAVIS test-dev) needs only that one.
        """
        for seq in self.sequences:
            jpgs = {p.stem for p in self.image_dir(seq).glob("*.jpg")}
            pngs = {p.stem for p in self.annotation_dir(seq).glob("*.png")}
            if no_jpg := sorted(pngs - jpgs):
                raise DatasetError(
                    f"sequence {seq!r}: frame {self.image_dir(seq) / no_jpg[0]}.jpg does not exist but its "
                    f"annotation does ({len(no_jpg)} such frames: {', '.join(no_jpg[:5])})"
                )
            if len(pngs) > 1 and (no_png := sorted(jpgs - pngs)):
                raise DatasetError(
                    f"sequence {seq!r}: annotation {self.annotation_dir(seq) / no_png[0]}.png does not exist but "
                    f"its frame does ({len(no_png)} such frames: {', '.join(no_png[:5])})"
                )
            self.annotations(seq)  # every annotation decodes, at one size

    def __len__(self) -> int:
        return len(self.sequences)

    def _check(self, seq: str) -> None:
        if seq not in self.sequences:
            raise DatasetError(f"sequence {seq!r} is not part of this dataset ({self.root}, split {self.split})")

    def image_dir(self, seq: str) -> Path:
        """JPEGImages/<resolution>/<seq>: the folder the SAM2 video predictor reads."""
        self._check(seq)
        return self.root / "JPEGImages" / self.resolution / seq

    def annotation_dir(self, seq: str) -> Path:
        self._check(seq)
        return self.root / "Annotations" / self.resolution / seq

    def frame_names(self, seq: str) -> list[str]:
        """Sorted stems of the sequence's .jpg frames, e.g. ['00000', '00001', ...]."""
        folder = self.image_dir(seq)
        names = sorted(p.stem for p in folder.glob("*.jpg"))
        if not names:
            raise DatasetError(f"no .jpg frames in {folder}")
        return names

    def image(self, seq: str, frame: str) -> np.ndarray:
        """H x W x 3 uint8 RGB frame."""
        path = self.image_dir(seq) / f"{frame}.jpg"
        if not path.is_file():
            raise DatasetError(f"frame {path} does not exist")
        try:
            with Image.open(path) as img:
                return np.array(img.convert("RGB"))
        except OSError as exc:
            raise DatasetError(f"frame {path} is not a readable image: {exc}") from exc

    def annotation(self, seq: str, frame: str) -> np.ndarray:
        """H x W uint8 object ids of one frame, values as stored (0 background, 255 void if present)."""
        return read_palette_png(self.annotation_dir(seq) / f"{frame}.png")

    def annotations(self, seq: str) -> np.ndarray:
        """T x H x W uint8 object ids for every frame, in frame_names order."""
        masks = [self.annotation(seq, name) for name in self.frame_names(seq)]
        shapes = {m.shape for m in masks}
        if len(shapes) > 1:
            raise DatasetError(f"annotations in {self.annotation_dir(seq)} have different sizes: {sorted(shapes)}")
        return np.stack(masks)

    def object_ids(self, seq: str) -> list[int]:
        """Sorted object ids in the first frame's annotation, without background (0) and void (255)."""
        first = self.annotation(seq, self.frame_names(seq)[0])
        return [int(i) for i in np.unique(first) if i not in (0, 255)]
