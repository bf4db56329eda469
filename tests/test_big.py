"""PTQ4SAM's bimodal integration (harness/quant/big.py) on sam2's own Attention module."""

import copy

import pytest
import torch
import torch.nn as nn
from sam2.modeling.sam.transformer import Attention

import methods
from harness.quant import big
from harness.quant.policy import QuantPolicy


def _bimodal_attention():
    torch.manual_seed(0)
    attn = Attention(embedding_dim=32, num_heads=2)
    with torch.no_grad():  # half the key channels far above zero, half far below: two modes
        attn.k_proj.bias.copy_(torch.where(torch.arange(32) % 2 == 0, 3.0, -3.0))
        attn.k_proj.weight.mul_(0.2)
    return attn


def test_big_detects_bimodal_keys_folds_signs_and_leaves_fp_outputs_unchanged():
    attn = _bimodal_attention()
    q, kv = torch.randn(1, 7, 32), torch.randn(1, 200, 32)
    before = attn(q, kv, kv)
    keys = attn.k_proj(kv)
    assert big.peaks(keys) == 2
    assert big.integrate(attn, keys)
    assert torch.allclose(attn(q, kv, kv), before, atol=1e-6)
    after = attn.k_proj(kv)
    assert big.peaks(after) == 1 and (after.mean((0, 1)) > 0).all()
    # Unimodal keys are left alone.
    assert not big.integrate(attn, after)


def test_peaks_counts_modes_of_plain_distributions():
    gen = torch.Generator().manual_seed(1)
    one = torch.randn(5000, generator=gen)
    two = torch.cat([torch.randn(2500, generator=gen) - 4, torch.randn(2500, generator=gen) + 4])
    assert big.peaks(one) == 1 and big.peaks(two) == 2


def _cases():
    gen = torch.Generator().manual_seed(1)
    n = torch.randn(6000, generator=gen)
    return {
        "bimodal": torch.cat([n[:3000] - 4, n[3000:] + 4]),
        "trimodal": torch.cat([n[:2000] - 6, n[2000:4000], n[4000:] + 6]),
        # Student-t with 2 degrees of freedom: one mode, tails that end in an isolated extreme
        "heavy-tailed": torch.distributions.StudentT(2.0).sample((6000,)),
    }


@pytest.mark.parametrize(
    "case,official,wide",
    [("bimodal", (2, True), (2, True)), ("trimodal", (3, False), (3, True)), ("heavy-tailed", (1, False), (2, True))],
)
def test_official_detector_folds_at_exactly_two_peaks_and_the_wide_one_at_two_or_more(case, official, wide):
    torch.manual_seed(0)
    keys = _cases()[case]
    # official: 128 points, find_peaks(height = 1% of the density's sum, distance 32), exactly 2;
    # wide: 512 points, maxima >= 5% of the highest, boundary maxima counted (a tail's last point), >= 2.
    assert (big.peaks(keys), big.bimodal(keys)) == official
    assert (big.peaks(keys, "wide"), big.bimodal(keys, "wide")) == wide


class _Holder(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn


def test_the_fold_shrinks_an_asymmetric_key_quantizers_range_and_the_attention_error():
    fp = _bimodal_attention()
    q, kv = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(2)), torch.randn(1, 200, 32)
    folded = copy.deepcopy(fp)
    assert big.integrate(folded, folded.k_proj(kv))
    with torch.no_grad():
        ref = fp(q, kv, kv)
    out = {}
    for name, attn in (("plain", copy.deepcopy(fp)), ("folded", folded)):
        holder = _Holder(attn)
        policy = QuantPolicy(weight_bits=8, act_bits=4, scope=["attn"], keep_fp=["attn.*_proj"])
        methods.ptq(methods.get("rtn"), holder, policy, lambda m: m.attn(q, kv, kv))
        with torch.no_grad():
            out[name] = (float(attn.k_quant.act_quant.scale()), float((attn(q, kv, kv) - ref).norm() / ref.norm()))
    # Keys in one mode: about half the range, so half the step, and a smaller attention output error.
    assert out["folded"][0] < 0.7 * out["plain"][0]
    assert out["folded"][1] < out["plain"][1]
