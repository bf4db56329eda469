"""The PTQ baselines' activation ranges (harness/quant/ranges.py) through rtn's Brevitas quantizers."""

import pytest
import torch
import torch.nn.functional as F
from brevitas.nn import QuantIdentity

import methods
from harness.errors import ConfigError
from harness.quant.fastpath import act_quant
from harness.quant.swap import calibrate


def _calibrated(frames, bits=4, **params):
    q = QuantIdentity(act_quant=methods.get("rtn", **params).act_quant(bits), return_quant_tensor=False)

    def feed():
        for x in frames:
            q(x)

    calibrate(q, feed)
    return q.eval()


def test_max_is_the_maximum_over_frames_and_mean_max_the_mean_of_their_maxima():
    # One-sided frames [0, m] with maxima 1, 2, 10, 1: the range ends at 10, or at their mean 3.5.
    frames = [torch.linspace(0, m, 50) for m in (1.0, 2.0, 10.0, 1.0)]
    assert _calibrated(frames).act_quant.scale().item() == pytest.approx(10 / 15)
    assert _calibrated(frames, act_stat="mean_max").act_quant.scale().item() == pytest.approx(3.5 / 15)
    symmetric = _calibrated(frames, act_range="symmetric")
    assert symmetric.act_quant.scale().item() == pytest.approx(10 / 7)  # signed 4 bits: Qp = 7


def test_asymmetric_range_spends_its_codes_on_a_one_sided_gelu_input():
    gen = torch.Generator().manual_seed(0)
    frames = [F.gelu(torch.randn(2000, generator=gen) * 3) for _ in range(4)]  # about [-0.17, 10]
    x = torch.cat(frames)
    asym, sym = _calibrated(frames), _calibrated(frames, act_range="symmetric")
    lo, hi = x.min(), x.max()
    s = (hi - lo) / 15
    z = torch.round(-lo / s)
    assert asym.act_quant.scale().item() == pytest.approx(s.item(), rel=1e-6)
    assert asym.act_quant.zero_point().item() == z.item()
    with torch.no_grad():
        expected = (torch.clamp(torch.round(x / s + z), 0, 15) - z) * s
        out = asym(x)
        assert torch.allclose(out, expected, atol=1e-6)
        assert asym(torch.zeros(3)).abs().max() == 0  # zero stays exactly zero
        err_asym, err_sym = (out - x).pow(2).mean(), (sym(x) - x).pow(2).mean()
    # Symmetric signed codes leave the negative half nearly unused: more than twice the error.
    assert err_asym < 0.5 * err_sym
    # The eval fast path gives Brevitas's own arithmetic, zero point included.
    with torch.no_grad():
        assert torch.equal(act_quant(asym.act_quant, x), asym.act_quant(x))


def test_a_quantizer_that_saw_no_frame_stays_uncalibrated_and_bad_settings_are_one_line_errors():
    q = QuantIdentity(act_quant=methods.get("rtn").act_quant(8), return_quant_tensor=False)
    calibrate(q, lambda: None)
    scale = q.act_quant.fused_activation_quant_proxy.tensor_quant.scaling_impl
    assert not scale.calibrated and scale.calibration_starved
    with pytest.raises(ConfigError, match=r"method.act_range: 'signed'; expected one of asymmetric, symmetric"):
        methods.get("rtn", act_range="signed")
    with pytest.raises(ConfigError, match=r"method.act_stat: 'median'; expected one of max, mean_max, percentile"):
        methods.get("rtn", act_stat="median")
