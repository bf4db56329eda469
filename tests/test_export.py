import json
import math

import numpy as np
import pytest
import torch

import methods
from harness import models
from harness.data import synthetic
from harness.data.davis import DavisDataset
from harness.errors import CheckpointError, ConfigError
from harness.quant.export import export, load, pack, unpack
from harness.quant.policy import QuantPolicy
from harness.quant.size import model_size
from harness.quant.swap import quant_layers


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [1, 7, 1001])
def test_pack_round_trip(bits, signed, n):
    low, high = (-(1 << (bits - 1)), 1 << (bits - 1)) if signed else (0, 1 << bits)
    codes = torch.randint(low, high, (n,), generator=torch.Generator().manual_seed(n * bits))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(unpack(packed, bits, n, signed).long(), codes)


def test_pack_by_hand():
    # Little-endian bit stream: the first code takes the lowest bits of the first byte.
    assert pack(torch.tensor([0, 1, 2, 3]), 2).tolist() == [0b11_10_01_00]
    assert pack(torch.tensor([-2, -1, 0, 1]), 2).tolist() == [0b01_00_11_10]  # two's complement
    assert pack(torch.tensor([3, 10]), 4).tolist() == [0xA3]
    # 3 bits: the third code's lowest two bits end byte 0, its top bit starts byte 1.
    assert pack(torch.tensor([7, 0, 5]), 3).tolist() == [0b01_000_111, 0b1]


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    root = synthetic.generate(tmp_path_factory.mktemp("data") / "davis", sequences=2, frames=3, size=(160, 96))
    ds = DavisDataset(root, "train")
    seq = ds.sequences[0]
    return [ds.image(seq, name) for name in ds.frame_names(seq)]


def _run(model, image):
    """Image-encoder outputs and mask prediction of the image predictor for an H x W x 3 uint8 image and a box."""
    feats = []
    hook = model.image_encoder.register_forward_hook(lambda m, i, out: feats.append(out))
    predictor = models.image_predictor(model)
    predictor.set_image(image)
    hook.remove()
    h, w = image.shape[:2]
    masks, ious, logits = predictor.predict(box=np.array([w // 4, h // 4, 3 * w // 4, 3 * h // 4]))
    return [feats[0]["vision_features"], *feats[0]["backbone_fpn"]], [masks, ious, logits]


def _calibrate(frames):
    return lambda model: [_run(model, f) for f in frames[:-1]]


def _meta(quant):
    model = {"name": "sam2_small", "checkpoint": None, "image_size": 128}
    return {"model": model, "quant": quant, "method": {"name": "rtn", "act_stat": "max"}}


def _load(path):
    return load(path, methods.get("rtn"))


@pytest.fixture(scope="module")
def quantized(frames):
    """bits -> (model quantized with rtn and calibrated on the first frames, meta, decisions, its
    outputs on the last frame)."""
    cache = {}

    def get(bits):
        if bits not in cache:
            torch.manual_seed(bits)
            model = models.build("sam2_small", device="cpu")
            # keep_fp=[] quantizes the decoder's ConvTranspose2d too (output channels on axis 1).
            quant = {"weight_bits": bits, "act_bits": 8, "keep_fp": []}
            ctx = methods.ptq(methods.get("rtn"), model, QuantPolicy.from_config(quant), _calibrate(frames))
            cache[bits] = model, _meta(quant), ctx.decisions, _run(model, frames[-1])
        return cache[bits]

    return get


def _check_size(path, model, fp_bytes):
    """Stored tensor bytes == model_size's packed bytes; the file adds only the container."""
    ckpt = torch.load(path, weights_only=True)
    stored = [*ckpt["tensors"].values(), *(v for r in ckpt["layers"].values() for v in r.values())]
    data = sum(t.nbytes for t in stored if isinstance(t, torch.Tensor))
    assert data == model_size(model, fp_bytes=fp_bytes)["packed_bytes"]
    # The pickle holds every tensor's name (~60 KB for sam2_small's ~1300 tensors), shape and
    # offset (under 64 B each), and meta (the per-module decisions: ~30 KB).
    names = sum(map(len, ckpt["tensors"])) + sum(map(len, ckpt["layers"])) + len(json.dumps(ckpt["meta"]))
    overhead = path.stat().st_size - data
    assert 0 < overhead <= 0.02 * data + 64 * 1024 + names + 64 * len(stored)
    return path.stat().st_size


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_export_load_is_exact(bits, quantized, frames, tmp_path):
    model, meta, decisions, (feats, preds) = quantized(bits)
    export(model, tmp_path / "q.pt", meta, decisions)
    loaded = _load(tmp_path / "q.pt")
    assert set(quant_layers(loaded)) == set(quant_layers(model))
    assert any(type(m).__name__ == "QConvTranspose2d" for m in quant_layers(loaded).values())
    feats2, preds2 = _run(loaded, frames[-1])
    assert all(torch.equal(a, b) for a, b in zip(feats, feats2))
    assert all(np.array_equal(a, b) for a, b in zip(preds, preds2))
    assert preds[0].any()  # a real mask, not an empty one
    # Activation scales are final: eval never goes back to the statistics buffer. (The memory
    # path's quantizers, which single images never reach, stay uncalibrated, as in the exported model.)
    stats = {n: m for n, m in loaded.named_modules() if hasattr(m, "collect_stats_steps")}
    final = {n for n, m in stats.items() if m.counter > m.collect_stats_steps}
    assert final and all(n.startswith(("memory_attention.", "memory_encoder.")) for n in set(stats) - final)
    _check_size(tmp_path / "q.pt", model, fp_bytes=4)


def test_bfloat16_export_is_smaller_and_close(quantized, frames, tmp_path):
    model, meta, decisions, ((ref, *_), _) = quantized(4)
    export(model, tmp_path / "f32.pt", meta, decisions)
    export(model, tmp_path / "bf16.pt", meta, decisions, fp_dtype="bfloat16")
    assert _check_size(tmp_path / "bf16.pt", model, 2) < _check_size(tmp_path / "f32.pt", model, 4)
    out = _run(_load(tmp_path / "bf16.pt"), frames[-1])[0][0]
    assert not torch.equal(ref, out)
    assert (out - ref).norm() / ref.norm() < 0.05


def test_bad_files_and_options(quantized, tmp_path):
    with pytest.raises(CheckpointError, match=r"packed model .*missing\.pt does not exist"):
        _load(tmp_path / "missing.pt")
    torch.save({"model": {"w": torch.zeros(2)}}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match=r"packed model .*plain\.pt: expected a 'qbench-packed' file"):
        _load(tmp_path / "plain.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"packed model .*junk\.pt is not a readable torch file"):
        _load(tmp_path / "junk.pt")
    model, meta, decisions, _ = quantized(4)
    with pytest.raises(ConfigError, match="export.fp_dtype: 'float16'"):
        export(model, tmp_path / "q.pt", meta, decisions, fp_dtype="float16")
    export(model, tmp_path / "q.pt", meta, decisions)
    with pytest.raises(ConfigError, match="exported with method 'rtn', not 'fp'"):
        load(tmp_path / "q.pt", methods.get("fp"))


def test_a_plan_that_differs_from_the_policy_reloads_exactly(frames, tmp_path):
    torch.manual_seed(0)
    model = models.build("sam2_small", device="cpu")
    quant = {"weight_bits": 8, "act_bits": 8}
    method = methods.get("rtn")
    ctx = methods.Context({}, model, QuantPolicy.from_config(quant), calib_feed=_calibrate(frames))
    changed = {d.name: d for d in method.plan(ctx)}["image_encoder.trunk.blocks.0.attn.qkv"]
    changed.weight_bits, changed.act_bits = 3, 4  # as a data-dependent plan might
    method.quantize(ctx)
    method.calibrate(ctx)
    export(model, tmp_path / "q.pt", _meta(quant), ctx.decisions)
    loaded = _load(tmp_path / "q.pt")
    layer = quant_layers(loaded)[changed.name]
    assert int(layer.weight_quant.bit_width()) == 3 and int(layer.input_quant.bit_width()) == 4
    (feats, preds), (feats2, preds2) = _run(model, frames[-1]), _run(loaded, frames[-1])
    assert all(torch.equal(a, b) for a, b in zip(feats, feats2))
    assert all(np.array_equal(a, b) for a, b in zip(preds, preds2))


def test_export_cli_writes_a_loadable_model(tmp_path):
    import subprocess
    import sys

    from harness.quant.state import check_all_active
    from harness.runner import load_packed

    out = tmp_path / "w4.qpt"
    reduced = [
        "data.synthetic.sequences=2",
        "data.synthetic.frames=4",
        "data.synthetic.size=96x64",
        "data.calib.frames=3",
    ]
    cmd = [sys.executable, "-m", "harness", "export", "smoke", *reduced, "--run", "name=rtn,weight_bits=4"]
    proc = subprocess.run([*cmd, "--out", str(out), "--results", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    model = load_packed(out)
    check_all_active(model, [])
    assert {int(m.weight_quant.bit_width()) for m in quant_layers(model).values()} == {4}
    # The same export again, by another process under another name: the same bytes.
    again = tmp_path / "again" / "copy.qpt"
    proc = subprocess.run([*cmd, "--out", str(again), "--results", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert again.read_bytes() == out.read_bytes()
    bad = subprocess.run([*cmd[:-1], "name=nope", "--out", str(out)], capture_output=True, text=True)
    assert bad.returncode == 2 and "matches 0 runs" in bad.stderr
