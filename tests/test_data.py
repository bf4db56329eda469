"""Synthetic DAVIS generator and DAVIS 2017 loader, on real files in tmp_path."""

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness.data.davis import PALETTE, DavisDataset, read_palette_png, write_palette_png
from harness.data.synthetic import (
    MIN_VISIBLE,
    generate,
    is_complete,
    parse_size,
    render_sequence,
    split_names,
)
from harness.errors import DatasetError


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("synth") / "davis")  # defaults: 8 sequences x 12 frames


def make_davis(root: Path, seqs: dict[str, np.ndarray], resolution="480p", split="val") -> Path:
    """A hand-made DAVIS-like tree: seqs maps a name to its T x H x W annotation ids."""
    for name, masks in seqs.items():
        (root / "JPEGImages" / resolution / name).mkdir(parents=True)
        (root / "Annotations" / resolution / name).mkdir(parents=True)
        for t, ids in enumerate(masks):
            rgb = np.zeros((*ids.shape, 3), np.uint8) + np.uint8(40 * t)
            Image.fromarray(rgb).save(root / "JPEGImages" / resolution / name / f"{t:05d}.jpg")
            png = Image.fromarray(ids)
            # A full palette unlike DAVIS's: the loader must only read indices. (A short one would
            # make Pillow write a low bit depth that cannot hold the void index 255.)
            png.putpalette(np.arange(768, dtype=np.uint8)[::-1].tobytes())
            png.save(root / "Annotations" / resolution / name / f"{t:05d}.png")
    (root / "ImageSets" / "2017").mkdir(parents=True)
    (root / "ImageSets" / "2017" / f"{split}.txt").write_text("".join(f"{n}\n" for n in seqs))
    return root


# --- generator ---------------------------------------------------------------------------


def test_generate_is_deterministic(tmp_path):
    args = dict(sequences=3, frames=4, size=(96, 64), seed=7)
    a = _files(generate(tmp_path / "a", **args))
    b = _files(generate(tmp_path / "b", **args))
    assert a == b
    c = _files(generate(tmp_path / "c", **{**args, "seed": 8}))
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k.endswith(".jpg"))
    # Sequence k does not depend on how many sequences are generated.
    d = _files(generate(tmp_path / "d", **{**args, "sequences": 2}))
    assert all(d[k] == a[k] for k in d if "synth-001" in k)


def test_layout(synth):
    assert is_complete(synth)
    assert not list(synth.parent.glob("*.tmp-*"))
    names = [f"synth-{k:03d}" for k in range(8)]
    sets = synth / "ImageSets" / "2017"
    assert (sets / "train.txt").read_text().split() == names[:4]
    assert (sets / "val.txt").read_text().split() == names[4:]
    for k, name in enumerate(names):
        jpgs = sorted((synth / "JPEGImages" / "480p" / name).iterdir())
        pngs = sorted((synth / "Annotations" / "480p" / name).iterdir())
        assert [p.name for p in jpgs] == [f"{t:05d}.jpg" for t in range(12)]
        assert [p.name for p in pngs] == [f"{t:05d}.png" for t in range(12)]
        with Image.open(jpgs[0]) as img:
            assert img.size == (256, 144) and img.mode == "RGB"
        rendered = render_sequence(0, k, 12, (256, 144), (1, 3))
        n = len(rendered.kinds)
        assert 1 <= n <= 3
        for t, png in enumerate(pngs):
            with Image.open(png) as img:
                assert img.mode == "P"
                assert img.getpalette()[:768] == PALETTE.flatten().tolist()
                ids = np.array(img)
            np.testing.assert_array_equal(ids, rendered.labels[t])
            assert ids.max() <= n
            if t == 0:  # frame 0 masks are the prompts: every object must show up
                counts = np.bincount(ids.ravel(), minlength=n + 1)
                assert counts[1:].min() >= MIN_VISIBLE


def test_generate_refuses_non_empty_out_and_bad_args(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="x"):
        generate(tmp_path / "x", sequences=1, frames=1)
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="objects"):
        generate(tmp_path / "y", objects=(0, 2))
    with pytest.raises(ValueError, match="size"):
        generate(tmp_path / "y", size=(16, 16))
    assert not (tmp_path / "y").exists()
    (tmp_path / "empty").mkdir()  # an empty folder is fine to fill
    assert is_complete(generate(tmp_path / "empty", sequences=1, frames=2, size=(64, 48)))


def test_split_names_and_parse_size():
    names = [f"s{k}" for k in range(8)]
    assert split_names(names, 0.5) == (names[:4], names[4:])
    assert split_names(names[:3], 0.5) == (names[:2], names[2:3])
    assert split_names(names[:2], 0.0) == (names[:1], names[1:2])
    assert split_names(names[:2], 1.0) == (names[:1], names[1:2])
    assert split_names(names[:1], 0.5) == (names[:1], names[:1])
    assert parse_size("256x144") == (256, 144)
    assert parse_size("854X480") == (854, 480)
    for bad in ("256", "axb", "1x2x3", "16x16"):
        with pytest.raises(ValueError, match=bad):
            parse_size(bad)


def test_content_has_occlusion_exits_reentry_and_kinds():
    occluded = left = reentered = 0
    kinds = set()
    for k in range(8):
        seq = render_sequence(3, k, 24, (256, 144), (2, 3))
        kinds.update(seq.kinds)
        visible = np.stack([(seq.labels == i + 1).sum(axis=(1, 2)) for i in range(len(seq.kinds))], axis=1)
        assert (visible <= seq.full_area).all()
        occluded += int((visible < seq.full_area).any())
        for area in seq.full_area.T:
            gone = np.flatnonzero(area == 0)
            if len(gone):
                left += 1
                reentered += int((area[gone[0] :] > 0).any())
    assert occluded and left and reentered
    assert len(kinds) >= 3


def test_camera_jitter_shifts_the_background():
    seq = render_sequence(0, 0, 12, (256, 144), (1, 3))
    assert len({tuple(c) for c in seq.camera}) >= 4
    assert np.abs(seq.camera).max() <= 6
    img = seq.images.astype(float)
    for t in range(11):
        dx, dy = seq.camera[t + 1] - seq.camera[t]
        if dx == dy == 0:
            continue
        # Frame t+1 at (x, y) shows what frame t showed at (x + dx, y + dy).
        h, w = 144 - abs(dy), 256 - abs(dx)
        a = img[t, max(dy, 0) : max(dy, 0) + h, max(dx, 0) : max(dx, 0) + w]
        b = img[t + 1, max(-dy, 0) : max(-dy, 0) + h, max(-dx, 0) : max(-dx, 0) + w]
        bg = (seq.labels[t, max(dy, 0) : max(dy, 0) + h, max(dx, 0) : max(dx, 0) + w] == 0) & (
            seq.labels[t + 1, max(-dy, 0) : max(-dy, 0) + h, max(-dx, 0) : max(-dx, 0) + w] == 0
        )
        aligned = np.abs(a - b)[bg].mean()
        unaligned = np.abs(img[t + 1] - img[t])[(seq.labels[t] == 0) & (seq.labels[t + 1] == 0)].mean()
        # Aligned, only pixel noise remains (mean |diff| about 3.4); unaligned, the texture shows.
        assert aligned < 4 and unaligned > aligned + 1


# --- loader ------------------------------------------------------------------------------


def test_loader_on_generated_data(synth):
    ds = DavisDataset(synth)
    assert (ds.root, ds.split, ds.resolution) == (synth, "val", "480p")
    assert ds.sequences == [f"synth-{k:03d}" for k in range(4, 8)]
    assert DavisDataset(synth, split="train").sequences == [f"synth-{k:03d}" for k in range(4)]
    seq = ds.sequences[0]
    assert ds.image_dir(seq) == synth / "JPEGImages" / "480p" / seq
    assert ds.frame_names(seq) == [f"{t:05d}" for t in range(12)]
    image = ds.image(seq, "00003")
    assert image.shape == (144, 256, 3) and image.dtype == np.uint8
    masks = ds.annotations(seq)
    assert masks.shape == (12, 144, 256) and masks.dtype == np.uint8
    np.testing.assert_array_equal(masks[5], ds.annotation(seq, "00005"))
    n = len(render_sequence(0, 4, 12, (256, 144), (1, 3)).kinds)
    assert ds.object_ids(seq) == list(range(1, n + 1))
    subset = DavisDataset(synth, sequences=["synth-006"])
    assert subset.sequences == ["synth-006"]


def test_loader_reads_davis_like_full_resolution(tmp_path):
    ids = np.zeros((2, 30, 40), np.uint8)
    ids[:, 2:10, 2:10] = 1
    ids[0, 12:20, 12:30] = 2
    ids[:, 0, :] = 255  # void border, as in some DAVIS-style datasets
    root = make_davis(tmp_path / "DAVIS", {"bear": ids}, resolution="Full-Resolution")
    ds = DavisDataset(root, resolution="Full-Resolution")
    assert ds.sequences == ["bear"]
    assert ds.object_ids("bear") == [1, 2]
    np.testing.assert_array_equal(ds.annotations("bear"), ids)  # 255 kept as stored
    assert ds.image("bear", "00001").shape == (30, 40, 3)
    # A grayscale ('L') annotation is accepted as well.
    Image.fromarray(ids[1]).save(root / "Annotations" / "Full-Resolution" / "bear" / "00001.png")
    np.testing.assert_array_equal(ds.annotation("bear", "00001"), ids[1])


def test_palette_roundtrip(tmp_path):
    assert PALETTE.shape == (256, 3) and PALETTE.dtype == np.uint8
    assert PALETTE[:5].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0], [0, 0, 128]]
    assert PALETTE[8].tolist() == [64, 0, 0]
    ids = np.arange(256, dtype=np.uint8).reshape(16, 16)
    path = tmp_path / "seq" / "00000.png"  # the folder is created, as prediction writers need
    write_palette_png(path, ids)
    with Image.open(path) as img:
        assert img.mode == "P"
    np.testing.assert_array_equal(read_palette_png(path), ids)
    with pytest.raises(ValueError):
        write_palette_png(tmp_path / "bad.png", ids.astype(np.int32))


def test_loader_errors_name_the_culprit(tmp_path, synth):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=re.escape(f"DAVIS root {missing} does not exist")):
        DavisDataset(missing)
    with pytest.raises(DatasetError, match=r"test-dev\.txt does not exist; available splits: train, val"):
        DavisDataset(synth, split="test-dev")
    with pytest.raises(DatasetError, match=r"Full-Resolution does not exist; available resolutions: 480p"):
        DavisDataset(synth, resolution="Full-Resolution")
    with pytest.raises(DatasetError, match="'bogus' is not listed in split file .*val.txt"):
        DavisDataset(synth, sequences=["bogus"])

    ids = np.zeros((3, 20, 24), np.uint8)
    ids[:, 4:12, 4:12] = 1
    root = make_davis(tmp_path / "d", {"cat": ids, "dog": ids})
    (root / "ImageSets" / "2017" / "val.txt").write_text("cat\ndog\nemu\n")
    with pytest.raises(DatasetError, match="sequence folder .*JPEGImages/480p/emu does not exist"):
        DavisDataset(root)
    (root / "ImageSets" / "2017" / "val.txt").write_text("cat\ndog\n")

    ds = DavisDataset(root)
    png = root / "Annotations" / "480p" / "cat" / "00001.png"
    png.unlink()
    for call in (lambda: ds.annotations("cat"), lambda: ds.annotation("cat", "00001")):
        with pytest.raises(DatasetError, match=re.escape(f"annotation {png} does not exist")):
            call()
    rgb = root / "Annotations" / "480p" / "dog" / "00000.png"
    Image.fromarray(np.zeros((20, 24, 3), np.uint8)).save(rgb)
    with pytest.raises(DatasetError, match=re.escape(f"annotation {rgb} has mode 'RGB'")):
        ds.object_ids("dog")
    with pytest.raises(DatasetError, match="'emu' is not part of this dataset"):
        ds.frame_names("emu")
    for jpg in (root / "JPEGImages" / "480p" / "dog").glob("*.jpg"):
        jpg.unlink()
    with pytest.raises(DatasetError, match=r"no \.jpg frames in .*dog"):
        ds.frame_names("dog")


def test_loader_is_lazy(tmp_path):
    ids = np.ones((1, 8, 8), np.uint8)
    root = make_davis(tmp_path / "d", {"cat": ids})
    (root / "Annotations" / "480p" / "cat" / "00000.png").write_bytes(b"not a png")
    ds = DavisDataset(root)  # nothing is read yet
    with pytest.raises(DatasetError, match="00000.png is not a readable PNG"):
        ds.object_ids("cat")
