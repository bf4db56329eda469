"""Training clips in the batched video structure of SAM2's training model.

A clip is T consecutive frames of one sequence with every object of its first frame, resized to
the model's (square) image size the way the video predictor resizes frames, ImageNet-normalised,
as `training.utils.data_utils.VideoDatapoint`; `collate` batches clips into the
`BatchedVideoDatapoint` that `SAM2Train.forward` and SAM2's loss take.

Clip `index` depends only on (seed, index): the data position of a training run is its step, so
a resumed run sees exactly the clips an uninterrupted one would. Sources: a DAVIS-layout folder
(real DAVIS or generated) or a stream of freshly generated sequences, never repeated (a fixed set
of generated sequences overfits, see ../shared/SAM2_NOTES.md).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from training.utils.data_utils import Frame, Object, VideoDatapoint, collate_fn

from harness.data import synthetic
from harness.data.davis import DavisDataset
from harness.errors import DatasetError

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


class ClipDataset(Dataset):
    """Clip `index` of T frames with at most `max_objects` of the objects visible in its first frame
    (a random subset where there are more, as SAM2's training sampler draws them; 0: all). A
    step's memory grows with frames x objects. `len` is nominal (indices beyond it work too)."""

    def __init__(
        self,
        source: DavisDataset | dict,
        image_size: int,
        frames: int,
        seed: int = 0,
        flip: bool = False,
        scale_jitter: float = 0.0,
        length: int = 10**9,
        max_objects: int = 0,
    ):
        """`source`: a DavisDataset, or {"seed", "size": (w, h), "objects": (lo, hi)} for a stream."""
        self.source, self.image_size, self.frames = source, image_size, frames
        self.seed, self.flip, self.scale_jitter, self.length = seed, flip, scale_jitter, length
        self.max_objects = max_objects
        if isinstance(source, DavisDataset):
            self.usable = [s for s in source.sequences if len(source.frame_names(s)) >= frames]
            if not self.usable:
                raise DatasetError(f"{source.root} split {source.split}: no sequence has {frames} frames for a clip")

    def __len__(self) -> int:
        return self.length

    def _frames(self, rng: np.random.Generator, index: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        if isinstance(self.source, dict):
            s = self.source
            # The stream's sequence `index` is a new scene; the clip starts at its frame 0.
            seq = synthetic.render_sequence(s["seed"], index, self.frames, tuple(s["size"]), tuple(s["objects"]))
            images = [_jpeg(img) for img in seq.images]
            return images, list(seq.labels)
        ds = self.source
        seq = self.usable[rng.integers(len(self.usable))]
        names = ds.frame_names(seq)
        start = int(rng.integers(len(names) - self.frames + 1))
        chosen = names[start : start + self.frames]
        return [ds.image(seq, n) for n in chosen], [ds.annotation(seq, n) for n in chosen]

    def __getitem__(self, index: int) -> VideoDatapoint:
        rng = np.random.default_rng([self.seed, index])
        images, labels = self._frames(rng, index)
        # A crop (or the resize) can lose every object of frame 0; draw another crop, and at last
        # take the whole frame, so that a step never lacks data (DDP ranks must stay in step).
        for attempt in range(10):
            clip = self._clip(images, labels, rng, index, self.scale_jitter if attempt < 9 else 0.0)
            if clip.frames[0].objects:
                return clip
        raise DatasetError(f"clip {index}: no object of its first frame survives resizing to {self.image_size} px")

    def _clip(self, images, labels, rng: np.random.Generator, index: int, jitter: float) -> VideoDatapoint:
        height, width = labels[0].shape
        # Scale jitter: one crop for the whole clip, zooming in by up to `jitter`.
        zoom = 1 - rng.uniform(0, jitter) if jitter else 1.0
        ch, cw = max(round(height * zoom), 1), max(round(width * zoom), 1)
        y0, x0 = int(rng.integers(height - ch + 1)), int(rng.integers(width - cw + 1))
        flip = self.flip and rng.random() < 0.5
        size = (self.image_size, self.image_size)
        frames, ids = [], None
        for image, label in zip(images, labels, strict=True):
            image, label = image[y0 : y0 + ch, x0 : x0 + cw], label[y0 : y0 + ch, x0 : x0 + cw]
            if flip:
                image, label = image[:, ::-1], label[:, ::-1]
            # The same resize as sam2's frame loader (PIL's default filter, to a square).
            pixels = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize(size), dtype=np.float32)
            tensor = (torch.from_numpy(pixels).permute(2, 0, 1) / 255.0 - MEAN) / STD
            small = np.asarray(Image.fromarray(np.ascontiguousarray(label)).resize(size, Image.NEAREST))
            if ids is None:  # the objects of the clip: those visible in its first frame, as prompted
                ids = [int(i) for i in np.unique(small) if i not in (0, 255)]
                if self.max_objects and len(ids) > self.max_objects:
                    ids = sorted(int(i) for i in rng.choice(ids, self.max_objects, replace=False))
            frames.append(Frame(tensor, [Object(i, len(frames), torch.from_numpy(small == i)) for i in ids]))
        return VideoDatapoint(frames, video_id=index, size=(height, width))


def _jpeg(image: np.ndarray) -> np.ndarray:
    # The evaluation frames are JPEGs (quality 90): train on the same artefacts.
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=90)
    buf.seek(0)
    with Image.open(buf) as img:
        return np.array(img.convert("RGB"))


def collate(clips: list[VideoDatapoint]):
    """The BatchedVideoDatapoint of SAM2's training model: every frame lists its clip's objects."""
    return collate_fn(clips, dict_key="clips")
