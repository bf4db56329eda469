import math

import pytest
import torch
import torch.nn as nn
from brevitas.nn import QuantConv2d, QuantConvTranspose2d, QuantLinear

import methods
from harness import models
from harness.data.davis import DavisDataset
from harness.errors import ConfigError
from harness.quant.policy import QuantPolicy, plan
from harness.quant.size import model_size
from harness.quant.swap import quant_layers

SWAPPED = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)


def _count(model, prefix=""):
    return sum(isinstance(m, SWAPPED) and n.startswith(prefix) for n, m in model.named_modules())


def test_policy_swaps_what_it_plans_and_keeps_fp_globs():
    model = models.build("sam2_small", device="cpu")
    in_scope = sum(_count(model, s + ".") for s in QuantPolicy().scope)
    kept = [
        n
        for n, m in model.named_modules()
        if isinstance(m, SWAPPED)
        and n.startswith("sam_mask_decoder.")
        and any(
            k in n
            for k in ("iou_prediction_head", "pred_obj_score_head", "output_hypernetworks_mlps", "output_upscaling")
        )
    ]
    kept.append("image_encoder.trunk.patch_embed.proj")
    decisions = methods.ptq(methods.get("rtn"), model, QuantPolicy(weight_bits=4, act_bits=8)).decisions
    layers = quant_layers(model)
    assert len(layers) == in_scope - len(kept) == sum(d.quantize and d.kind != "Attention" for d in decisions)
    for name in kept:
        assert not isinstance(model.get_submodule(name), (QuantLinear, QuantConv2d, QuantConvTranspose2d)), name
    # Out of scope (prompt encoder, object pointer projection) stays FP.
    assert not any(n.startswith(("sam_prompt_encoder", "obj_ptr_proj")) for n in layers)
    assert all(int(m.weight_quant.bit_width()) == 4 and int(m.input_quant.bit_width()) == 8 for m in layers.values())


def test_scope_and_per_glob_bits():
    model = models.build("sam2_small", device="cpu")
    policy = QuantPolicy(scope=["memory_attention"], keep_fp=[], bits={"*cross_attn_image*": {"weight_bits": 2}})
    methods.ptq(methods.get("rtn"), model, policy)
    layers = quant_layers(model)
    assert all(n.startswith("memory_attention.") for n in layers)
    assert len(layers) == _count(models.build("sam2_small", device="cpu"), "memory_attention.")
    for name, layer in layers.items():
        expected = 2 if "cross_attn_image" in name else 8
        assert int(layer.weight_quant.bit_width()) == expected, name


def test_policy_rejects_bad_values():
    with pytest.raises(ConfigError, match="quant.weight_bits: 1 is out of range"):
        QuantPolicy(weight_bits=1)
    with pytest.raises(ConfigError, match="quant.wieght_bits: unknown key"):
        QuantPolicy.from_config({"wieght_bits": 4})
    with pytest.raises(ConfigError, match="unknown parameter for method 'rtn'"):
        methods.get("rtn", momentum=0.9)
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        methods.get("nope")


def _encoder_error(davis_root, bits):
    """Relative L2 error of the image encoder's FPN features, rtn W{bits}A8 against FP."""
    ds = DavisDataset(davis_root, "train")
    torch.manual_seed(0)
    fp = models.build("sam2_small", device="cpu")
    q = models.build("sam2_small", device="cpu")
    q.load_state_dict(fp.state_dict())
    frames = []
    for seq in ds.sequences:
        for name in ds.frame_names(seq):
            img = torch.from_numpy(ds.image(seq, name)).permute(2, 0, 1).float() / 255
            frames.append(nn.functional.interpolate(img[None], size=(128, 128), mode="bilinear"))
    calib, test = torch.cat(frames[:-2]), torch.cat(frames[-2:])
    methods.ptq(
        methods.get("rtn"),
        q,
        QuantPolicy(weight_bits=bits, act_bits=8, scope=["image_encoder"]),
        lambda m: m.image_encoder(calib),
    )
    with torch.no_grad():
        ref = fp.image_encoder(test)["vision_features"]
        out = q.image_encoder(test)["vision_features"]
    return ((out - ref).norm() / ref.norm()).item()


def test_w8_close_to_fp_and_w4_further(davis_root):
    e8, e4 = _encoder_error(davis_root, 8), _encoder_error(davis_root, 4)
    assert 0 < e8 < 0.05
    assert e4 > 3 * e8


def test_packed_size_of_one_layer_by_hand():
    model = nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32))
    methods.ptq(methods.get("rtn"), model, QuantPolicy(weight_bits=4, act_bits=8, scope=["0"], keep_fp=[]))
    size = model_size(model)
    # weight codes 32*64*4/8 = 1024 B, 32 per-channel scales * 2 B = 64 B; the asymmetric input
    # quantizer: scale and zero point 2 B each, its calibrated flag 1 B;
    # FP in BF16: bias 32 + LayerNorm 64 parameters = 96 * 2 B = 192 B.
    assert size["packed_bytes"] == 1024 + 64 + 5 + 192
    assert size["bf16_bytes"] == (2048 + 32 + 64) * 2
    assert size["quantized_params"] == 2048
    assert math.isclose(size["quantized_ratio_vs_bf16"], 2048 * 2 / (1024 + 64 + 5))
    assert math.isclose(size["bits_per_weight"], (2048 * 4 + 96 * 16) / 2144)


def test_plan_reports_fp_reasons():
    model = models.build("sam2_small", device="cpu")
    by_name = {d.name: d for d in plan(model, QuantPolicy())}
    assert by_name["image_encoder.trunk.patch_embed.proj"].reason == "keep_fp image_encoder.trunk.patch_embed.*"
    assert by_name["obj_ptr_proj.layers.0"].reason == "out of scope"
    assert by_name["memory_attention.layers.0.linear1"].quantize
