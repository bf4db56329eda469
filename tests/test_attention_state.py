"""Attention quantization, SAM2 part coverage, mixed bit maps, quantizer state and the all-active check."""

import pytest
import torch
import torch.nn as nn
from brevitas.nn import QuantLinear

import methods
from harness import models
from harness.data.davis import DavisDataset
from harness.errors import ConfigError
from harness.evaluate import vos
from harness.quant import state
from harness.quant.attention import ATTENTION_TYPES, Log2Quant, QuantAttentionMixin
from harness.quant.policy import PARTS, QuantPolicy
from harness.quant.swap import quant_layers

IMAGES = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))


def _quantized(policy=None, calibrate=True):
    torch.manual_seed(0)
    model = models.build("sam2_small", device="cpu")
    feed = (lambda m: m.image_encoder(IMAGES)) if calibrate else None
    ctx = methods.ptq(methods.get("rtn"), model, policy or QuantPolicy(weight_bits=4, act_bits=8), feed)
    return model, ctx.decisions


def test_every_attention_module_has_its_own_active_quantizers():
    model, decisions = _quantized()
    attn = {n: m for n, m in model.named_modules() if isinstance(m, ATTENTION_TYPES)}
    # 8 Hiera blocks, 2 memory-attention layers x (self + cross), 2 two-way blocks x 3 + the final token-to-image.
    assert len(attn) == 8 + 4 + 7 == sum(d.kind == "Attention" for d in decisions)
    assert all(isinstance(m, QuantAttentionMixin) for m in attn.values())
    quantizers = [getattr(m, q) for m in attn.values() for q in ("q_quant", "k_quant", "v_quant", "softmax_quant")]
    assert len({id(q) for q in quantizers}) == len(quantizers) == 4 * 19
    scales = [t for q in quantizers for t in (*q.parameters(), *q.buffers())]
    assert len({id(p) for p in scales}) == len(scales) > 0
    hiera = [n for n in attn if n.startswith("image_encoder")]
    # Calibration saw different tensors in each module: their scales differ.
    q_scales = {model.get_submodule(n).q_quant.act_quant.scale().item() for n in hiera}
    assert len(q_scales) == len(hiera)


def test_attention_with_quantizers_disabled_equals_fp_attention():
    fp = models.build("sam2_small", device="cpu")
    model, _ = _quantized()
    fp.load_state_dict({k: v for k, v in model.state_dict().items() if k in fp.state_dict()})
    # Everything but attention disabled: explicit softmax(q k^T) v must match SDPA up to rounding.
    assert state.set_enabled(model, False, kinds=("weight", "act", "attention")) == len(state.quantizers(model))
    with torch.no_grad():
        ref, out = fp.image_encoder(IMAGES)["vision_features"], model.image_encoder(IMAGES)["vision_features"]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    state.set_enabled(model, True, kinds=("attention",))
    with torch.no_grad():
        assert not torch.allclose(model.image_encoder(IMAGES)["vision_features"], ref, rtol=1e-4, atol=1e-5)


def test_log2_quantizer_by_hand():
    q = Log2Quant(bits=3)
    x = torch.tensor([1.0, 0.5, 0.3, 0.01, 0.001, 0.0])
    # -log2(x) = 0, 1, 1.74, 6.64, 9.97, inf -> rounded 0, 1, 2, 7, 10 (> 7: zero), inf (zero).
    assert torch.equal(q(x), torch.tensor([1.0, 0.5, 0.25, 2.0**-7, 0.0, 0.0]))
    model, _ = _quantized(QuantPolicy(softmax_quant="log2", softmax_bits=4))
    logs = [m.softmax_quant for m in model.modules() if isinstance(m, QuantAttentionMixin)]
    assert len(logs) == 19 and all(isinstance(m, Log2Quant) and m.bits == 4 for m in logs)


@pytest.mark.parametrize("part", PARTS)
def test_each_part_can_be_included_alone(part):
    model, _ = _quantized(QuantPolicy(scope=[part], keep_fp=[]), calibrate=False)
    fp = models.build("sam2_small", device="cpu")
    expected = [
        n
        for n, m in fp.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)) and (n == part or n.startswith(part + "."))
    ]
    assert expected and sorted(quant_layers(model)) == sorted(expected)


def test_part_can_be_left_out():
    model, _ = _quantized(QuantPolicy(scope=["image_encoder", "memory_encoder"]), calibrate=False)
    assert not any(n.startswith(("sam_mask_decoder", "memory_attention")) for n in state.quantizers(model))
    with pytest.raises(ConfigError, match="quant.scope: 'image_encoderr' is not a submodule"):
        _quantized(QuantPolicy(scope=["image_encoderr"]), calibrate=False)


def test_mixed_bit_map_is_applied_exactly():
    bits = {
        "image_encoder.trunk.blocks.0.attn.qkv": {"weight_bits": 2, "act_bits": 5},
        "memory_attention.layers.1.linear2": {"weight_bits": 3},
        "sam_mask_decoder.transformer.layers.0.self_attn": {"qkv_bits": 6, "softmax_bits": 7},
    }
    model, decisions = _quantized(QuantPolicy(weight_bits=4, act_bits=8, bits=bits), calibrate=False)
    for name, layer in quant_layers(model).items():
        want = {"weight_bits": 4, "act_bits": 8, **bits.get(name, {})}
        assert int(layer.weight_quant.bit_width()) == want["weight_bits"], name
        assert int(layer.input_quant.bit_width()) == want["act_bits"], name
    attn = model.get_submodule("sam_mask_decoder.transformer.layers.0.self_attn")
    assert int(attn.k_quant.act_quant.bit_width()) == 6 and int(attn.softmax_quant.act_quant.bit_width()) == 7
    other = model.get_submodule("sam_mask_decoder.transformer.layers.1.self_attn")
    assert int(other.k_quant.act_quant.bit_width()) == 8
    with pytest.raises(ConfigError, match="quant.bits.memory_attention.layers.9.linear2: no module"):
        _quantized(QuantPolicy(bits={"memory_attention.layers.9.linear2": {"weight_bits": 2}}), calibrate=False)
    with pytest.raises(ConfigError, match="quant.bits.x.wbits"):
        QuantPolicy(bits={"x": {"wbits": 2}})


def test_all_active_check(davis_root):
    model, decisions = _quantized(QuantPolicy(scope=["image_encoder"]))
    state.check_all_active(model, decisions)
    state.set_enabled(model, False, kinds=("act",), modules="image_encoder.trunk.blocks.3.mlp.layers.0")
    with pytest.raises(
        state.QuantStateError, match=r"1 quantizers not active: .*blocks\.3\.mlp\.layers\.0\.input_quant is disabled"
    ):
        state.check_all_active(model, decisions)
    # Evaluation refuses a half-quantized model before scoring anything.
    with pytest.raises(state.QuantStateError):
        vos.evaluate(model, DavisDataset(davis_root, "val"), decisions)
    state.set_enabled(model, True)
    state.check_all_active(model, decisions)
    state.set_enabled(model, False, kinds=("attention",), modules="image_encoder.trunk.blocks.0.attn")
    with pytest.raises(state.QuantStateError, match="4 quantizers not active"):
        state.check_all_active(model, decisions)

    # A module the policy quantizes but that holds no quantizer (an FP model under that policy).
    with pytest.raises(state.QuantStateError, match="image_encoder.trunk.blocks.0.attn.qkv is not quantized"):
        state.check_all_active(models.build("sam2_small", device="cpu"), decisions)
    # Quantizers that calibration never reached (the memory path is not run by an image batch).
    starved, decisions = _quantized(QuantPolicy(scope=["image_encoder", "memory_attention"]))
    with pytest.raises(state.QuantStateError, match="memory_attention.* was never calibrated"):
        state.check_all_active(starved, decisions)


def test_all_active_check_refuses_training_mode_unfitted_log2_and_bits_off_the_plan():
    import dataclasses

    model, decisions = _quantized(QuantPolicy(scope=["image_encoder"]))
    model.train()
    with pytest.raises(state.QuantStateError, match="the model .* is in training mode"):
        state.check_all_active(model, decisions)
    model.eval()
    # A quantizer built at other bits than its decision says (a bit map applied to the wrong model).
    name = "image_encoder.trunk.blocks.3.mlp.layers.0"
    off = [dataclasses.replace(d, act_bits=6) if d.name == name else d for d in decisions]
    with pytest.raises(state.QuantStateError, match=rf"{name}\.input_quant has 8 bits, its decision 6"):
        state.check_all_active(model, off)
    # A log2 softmax quantizer that AGQ was to fit and never did keeps s = 1, tau = 1.
    attn = model.get_submodule("image_encoder.trunk.blocks.0.attn")
    attn.softmax_quant = Log2Quant(8, needs_fit=True).eval()
    with pytest.raises(state.QuantStateError, match=r"blocks\.0\.attn\.softmax_quant was never fitted"):
        state.check_all_active(model, decisions)
    attn.softmax_quant.fitted.fill_(True)
    state.check_all_active(model, decisions)


def test_eval_weight_cache_matches_brevitas_and_follows_weight_changes():
    model, _ = _quantized()
    layer = model.get_submodule("image_encoder.trunk.blocks.2.mlp.layers.0")
    x = torch.randn(3, layer.in_features)
    with torch.no_grad():
        fast = layer(x)
        slow = QuantLinear.forward(layer, x)  # Brevitas's own forward, no cache
        assert torch.equal(fast, slow)
        layer.weight.mul_(2)
        assert torch.equal(layer(x), QuantLinear.forward(layer, x))
        assert not torch.equal(layer(x), fast)


def test_activation_fast_path_is_bit_identical_to_brevitas():
    from harness.quant.fastpath import act_quant

    model, _ = _quantized()
    attn = model.get_submodule("image_encoder.trunk.blocks.5.attn")
    x = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(1)) * 4
    probs = x.softmax(-1)
    for quantizer, t in ((attn.q_quant, x), (attn.v_quant, x), (attn.softmax_quant, probs)):
        with torch.no_grad():
            fast, slow = act_quant(quantizer.act_quant, t), quantizer(t)
        assert torch.equal(fast, slow)
        assert len(torch.unique(fast)) <= 256  # 8-bit: at most 256 levels
    # Disabled, the shortcut steps aside and the input passes through.
    state.set_enabled(model, False, kinds=("attention",))
    assert torch.equal(act_quant(attn.q_quant.act_quant, x), x)


def test_fast_path_keeps_gradients_and_sees_writes_through_data():
    from harness.quant.fastpath import reset_eval_caches

    model, _ = _quantized()
    layer = model.get_submodule("image_encoder.trunk.blocks.2.mlp.layers.0")
    x = torch.randn(3, layer.in_features)
    layer(x).sum().backward()  # eval mode, autograd on: Brevitas's path, gradients reach the weight
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    with torch.no_grad():
        before = layer(x)
        layer.weight.data.mul_(2)  # invisible to _version
        reset_eval_caches(model)
        assert torch.equal(layer(x), QuantLinear.forward(layer, x))
        assert not torch.equal(layer(x), before)
