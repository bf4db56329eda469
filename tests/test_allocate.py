"""Mix-QSAM's bit allocation (harness/quant/allocate.py): the MILP against brute force."""

import numpy as np
import pytest

from harness.errors import ConfigError
from harness.quant import allocate


def _instance(rng, n):
    return {
        "importance": rng.random(n),
        "params": rng.integers(100, 5000, n).astype(float),
        "macs": rng.integers(1_000, 900_000, n).astype(float),
        "synergy": np.log1p(rng.random(n - 1) * 20),
    }


@pytest.mark.parametrize("seed", range(12))
def test_the_solver_equals_brute_force_on_small_chains(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 7))
    inst = _instance(rng, n)
    candidates = [2, 3, 4, 5, 6] if seed % 2 else [4, 6, 8]
    target = 4 if seed % 2 else 6
    penalty = [0.0, 0.1, 1.0][seed % 3]
    best = allocate.brute_force(**inst, candidates=candidates, target=target, penalty=penalty)
    if best is None:
        with pytest.raises(ConfigError, match="no choice of bits"):
            allocate.solve(**inst, candidates=candidates, target=target, penalty=penalty)
        return
    got = allocate.solve(**inst, candidates=candidates, target=target, penalty=penalty)
    assert got.objective == pytest.approx(best.objective, abs=1e-6)
    assert set(got.bits) <= set(candidates)
    p_budget, o_budget = target * inst["params"].sum(), target**2 * inst["macs"].sum()
    assert 0.95 * p_budget - 1e-6 <= got.param_bits <= p_budget + 1e-6
    assert 0.95 * o_budget - 1e-6 <= got.bops <= o_budget + 1e-6


def test_importance_buys_bits_and_synergy_keeps_neighbours_together():
    params, macs = np.full(4, 1000.0), np.full(4, 1000.0)
    # Equal layers, budgets for an average of 4 bits (no lower bound on their use): the important
    # layer gets more bits; at least 95% of each used, four equal layers can only take 4 bits each.
    a = allocate.solve([1.0, 0.1, 0.1, 0.1], params, macs, [0.0] * 3, [2, 3, 4, 5, 6], target=4, penalty=0.0, lo=0.0)
    assert a.bits == [6, 3, 3, 3]
    assert allocate.solve([1.0, 0.1, 0.1, 0.1], params, macs, [0.0] * 3, [2, 3, 4, 5, 6], target=4).bits == [4] * 4
    # A large synergy penalty on every pair: all layers take one width.
    b = allocate.solve([1.0, 0.1, 0.1, 0.1], params, macs, [100.0] * 3, [2, 3, 4, 5, 6], target=4, lo=0.0)
    assert b.bits == [4] * 4
