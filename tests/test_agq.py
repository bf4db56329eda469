"""PTQ4SAM's adaptive-granularity log2 quantizer (harness/quant/agq.py)."""

import pytest
import torch

from harness.quant import agq


def test_log2_levels_by_hand():
    x = torch.tensor([1.0, 0.5, 0.3, 0.25, 2.0**-8, 0.0])
    # tau 1, 3 bits: levels 1, 1/2, ..., 2^-7; 0.3 -> round(1.74) = 2 -> 0.25; 2^-8 is past the range.
    assert agq.log2_quantize(x, 1.0, 1, 3).tolist() == [1.0, 0.5, 0.25, 0.25, 0.0, 0.0]
    # tau 2: levels 2^(-k/2); 0.3 -> round(3.47) = 3 -> 2^-1.5
    assert agq.log2_quantize(x, 1.0, 2, 3)[2].item() == pytest.approx(2**-1.5)


def test_search_picks_the_granularity_and_scale_with_the_least_output_error():
    # Attention rows whose probabilities sit at 2^(-k/4) * 0.8: exactly on tau 4's levels with s = 0.8,
    # between the levels of tau 1 and 2 for every scale of the grid but that one.
    k = torch.tensor([0, 1, 3, 5, 2, 7, 6, 4], dtype=torch.float32)
    probs = [(0.8 * 2 ** (-k / 4)).reshape(2, 4)]
    values = [torch.randn(4, 3, generator=torch.Generator().manual_seed(0))]
    tau, scale, err = agq.search(probs, values, bits=4, grid=8)
    assert tau == 4 and scale == pytest.approx(0.8) and err < 1e-10
    # Each other tau's best error on the same grid is larger.
    for other in (1, 2):
        t, _, e = agq.search(probs, values, bits=4, taus=(other,), grid=8)
        assert t == other and e > 1e-4


def test_the_harness_log2_quantizer_keeps_a_searched_tau_and_scale_in_its_state():
    from harness.quant.attention import Log2Quant

    searched = Log2Quant(3, tau=4)
    searched.scale.fill_(0.8)
    fresh = Log2Quant(3)
    fresh.load_state_dict(searched.state_dict())
    x = torch.rand(5, 7).softmax(-1)
    assert torch.equal(fresh(x), agq.log2_quantize(x, 0.8, 4, 3)) and float(fresh.tau) == 4


def test_search_reaches_scales_far_below_the_maximum_for_a_flat_attention():
    # 255 flat rows (64 tokens, probabilities near 1/64) and one peaked row that sets the maximum: at 4
    # bits with tau 4 the levels reach s * 2^(-15/4) only, so the bulk needs s far below the max.
    gen = torch.Generator().manual_seed(0)
    flat = (torch.randn(255, 64, generator=gen) * 0.3).softmax(-1)
    peaked = torch.zeros(1, 64).index_fill_(1, torch.tensor([0]), 6.0).softmax(-1)
    probs, values = [torch.cat([flat, peaked])], [torch.randn(64, 8, generator=gen)]
    top = float(probs[0].max())
    tau, scale, err = agq.search(probs, values, bits=4, taus=(4,))
    narrow = agq.search(probs, values, bits=4, taus=(4,), low=0.72)  # the first form's range, [0.72, 1] x max
    assert scale < 0.72 * top and narrow[1] >= 0.72 * top * (1 - 1e-6)
    assert err < narrow[2]
    assert agq.LOW * top <= scale
