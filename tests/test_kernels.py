"""`qbench bench --kernels`: the policy's Linear layers converted to torchao's integer kernels.

Real parts throughout: the embedded sam2_small, rtn's calibrated Brevitas model, torchao's quantize_.
"""

import sys

import pytest
import torch
import torch.nn as nn
from sam2.utils.transforms import SAM2Transforms

torchao = pytest.importorskip("torchao")

import methods  # noqa: E402
from harness import kernels, models  # noqa: E402
from harness.cli import main  # noqa: E402
from harness.data import synthetic  # noqa: E402
from harness.data.davis import DavisDataset  # noqa: E402
from harness.evaluate import vos  # noqa: E402
from harness.quant.policy import QuantPolicy  # noqa: E402
from harness.quant.swap import quant_layers  # noqa: E402

SETTINGS = {s.label: s for s in kernels.KERNEL_SETTINGS}


def _build():
    return models.build("sam2_small", device="cpu")


@pytest.fixture(scope="module")
def w8a8(tmp_path_factory):
    """FP, fake-quantized (rtn W8A8, calibrated) and converted sam2_small, and one image tensor."""
    torch.manual_seed(0)
    root = synthetic.generate(tmp_path_factory.mktemp("data"), sequences=1, frames=3, size=(128, 96), seed=0)
    ds = DavisDataset(root, "val")
    seq = ds.sequences[0]
    fp = _build()
    fq = _build()
    fq.load_state_dict(fp.state_dict())
    ctx = methods.ptq(
        methods.get("rtn"), fq, QuantPolicy(weight_bits=8, act_bits=8), lambda m: vos.predict_sequence(m, ds, seq)
    )
    cv = kernels.convert(fq, ctx.decisions, SETTINGS["W8A8"], _build)
    x = SAM2Transforms(fp.image_size, mask_threshold=0.0)(ds.image(seq, ds.frame_names(seq)[0]))[None]
    return fp, fq, cv, ctx.decisions, x


def test_w8a8_features_agree_with_fake_quant(w8a8):
    fp, fq, cv, _, x = w8a8
    assert kernels.sqnr_db(kernels._features(fq, x), kernels._features(cv, x)) > 15
    assert kernels.sqnr_db(kernels._features(fp, x), kernels._features(cv, x)) > 15


def test_policy_linears_hold_torchao_int8_weights(w8a8):
    from torchao.quantization import Int8Tensor

    fp, fq, cv, decisions, _ = w8a8
    names = kernels.policy_linears(decisions)
    assert len(names) > 50  # sam2_small's policy quantizes 91 Linear layers
    for name in names:
        weight = cv.get_submodule(name).weight
        assert type(weight) is Int8Tensor, name
        assert weight.qdata.dtype == torch.int8
        # the fake-quantized layer's float weight, in torchao's int8 codes and per-row scales
        w = fq.get_submodule(name).weight
        err = (weight.dequantize() - w).abs().amax(dim=1)
        assert (err <= w.abs().amax(dim=1) / 127 * 0.51).all(), name
    # packed int8 codes plus per-row scales: well under the float32 weights
    assert kernels.held_bytes(cv) < 0.5 * kernels.held_bytes(fp)
    assert not quant_layers(cv)  # no Brevitas layer: torchao's tensors are the only quantization


def test_modules_outside_the_policy_are_untouched(w8a8):
    fp, fq, cv, decisions, _ = w8a8
    converted = kernels.policy_linears(decisions)
    fp_modules = dict(fp.named_modules())
    outside = 0
    for name, module in cv.named_modules():
        assert type(module) is type(fp_modules[name]), name
        if name in converted:
            continue
        for key, t in module.named_parameters(recurse=False):
            assert not kernels._is_torchao(t), f"{name}.{key}"
            # the fake-quantized model's float weights, which here are FP's (rtn does not re-fit)
            assert torch.equal(t, fp_modules[name].get_parameter(key)), f"{name}.{key}"
        outside += isinstance(module, (nn.Linear, nn.Conv2d))
    assert outside > 20  # kept-FP Linear layers and every conv (the policy's convs stay FP in torchao)


def test_settings_without_a_kernel_say_so():
    for label in ("W4A4", "W2A8"):
        ok, why = kernels.kernel_available(SETTINGS[label], "cpu")
        assert not ok and why
    assert kernels.kernel_available(SETTINGS["W8A8"], "cpu") == (True, "")


def test_bench_kernels_table():
    r = kernels.bench_kernels(
        "sam2_small", settings=[SETTINGS["W8A8"], SETTINGS["W2A8"]], repeats=1, frames=2, agree_frames=4, calib_frames=4
    )
    w8, w2 = r["settings"]
    assert w8["kernel"] and w8["sqnr_db"] > 15 and 0.5 < w8["mask_iou"] <= 1
    for workload in ("image_encoder", "video_frame"):
        assert all(w8[workload][f"{k}_s"] > 0 for k in ("fp", "fq", "cv"))
    assert not w2["kernel"] and w2["why_not"] and "image_encoder" not in w2
    assert 0 < w2["packed_bytes"] < w8["packed_bytes"]
    table = kernels.format_kernels([r])
    assert "W8A8    yes" in table and "W2A8    no" in table and "no kernel, W2A8: torchao has no kernel" in table


def test_missing_torchao_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchao", None)  # what Python does for a package not installed
    assert main(["bench", "--kernels"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: qbench bench --kernels needs torchao") and "\n" not in err
