"""PTQ4SAM's bimodal integration (harness/quant/big.py) on sam2's own Attention module."""

import torch
from sam2.modeling.sam.transformer import Attention

from harness.quant import big


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
