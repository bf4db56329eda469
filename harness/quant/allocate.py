"""Exact mixed-precision bit allocation over a chain of layers (Mix-QSAM's allocation step: Ranjan and
Savakis, "Mix-QSAM: Mixed-Precision Quantization of the Segment Anything Model", CVPR Workshops 2025).

Choose bits b_i from a candidate set for every layer i to

    maximize   sum_i importance_i * b_i  -  penalty * sum_i synergy_i * |b_i - b_{i+1}|
    subject to lo * P_budget   <= sum_i params_i * b_i   <= P_budget      (parameter bits)
               lo * OPS_budget <= sum_i macs_i * b_i^2   <= OPS_budget    (BOPs, weights x activations at b_i)

with P_budget = target * sum params and OPS_budget = target^2 * sum macs (`lo` = 0.95: both budgets
at least 95% used). Solved exactly as a mixed-integer linear program with HiGHS through
scipy.optimize.milp (already a dependency; no solver package to install): one binary per (layer,
candidate), and d_i >= |b_i - b_{i+1}| as two linear inequalities, which the objective drives to
equality. `brute_force` enumerates every assignment, for tests on small instances.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import lil_matrix

from harness.errors import ConfigError


@dataclass
class Allocation:
    bits: list[int]
    objective: float
    param_bits: float  # sum params_i * b_i
    bops: float  # sum macs_i * b_i^2


def _check(importance, params, macs, synergy, candidates):
    n = len(importance)
    if not (len(params) == len(macs) == n and len(synergy) == max(n - 1, 0)):
        raise ValueError(f"allocation: {n} layers need {n} params and macs and {n - 1} synergies")
    if not candidates or sorted(set(candidates)) != sorted(candidates):
        raise ConfigError(f"allocation: candidates {candidates} must be distinct bit-widths")


def _budgets(params, macs, target, lo):
    p_budget, o_budget = target * float(np.sum(params)), target**2 * float(np.sum(macs))
    return (lo * p_budget, p_budget), (lo * o_budget, o_budget)


def score(bits, importance, synergy, penalty) -> float:
    b = np.asarray(bits, dtype=float)
    return float(np.dot(importance, b) - penalty * np.dot(synergy, np.abs(np.diff(b))))


def solve(importance, params, macs, synergy, candidates, target, penalty=0.1, lo=0.95) -> Allocation:
    """The optimal allocation; ConfigError when no assignment meets both budgets."""
    _check(importance, params, macs, synergy, candidates)
    n, k = len(importance), len(candidates)
    cand = np.asarray(candidates, dtype=float)
    nx, nd = n * k, max(n - 1, 0)
    # variables: x[i, j] (layer i takes candidate j), then d[i] >= |b_i - b_{i+1}|
    c = np.concatenate([-np.outer(importance, cand).ravel(), penalty * np.asarray(synergy, dtype=float)])
    rows = lil_matrix((n + 2 + 2 * nd, nx + nd))
    lower, upper = [], []
    for i in range(n):  # one candidate per layer
        rows[i, i * k : (i + 1) * k] = 1
        lower.append(1)
        upper.append(1)
    (_, p_hi), (_, o_hi) = _budgets(params, macs, target, lo)
    # budget rows as shares of their budget: millions of parameter bits would dwarf the solver's tolerances
    rows[n, :nx] = np.outer(params, cand).ravel() / p_hi
    rows[n + 1, :nx] = np.outer(macs, cand**2).ravel() / o_hi
    lower += [lo, lo]
    upper += [1.0, 1.0]
    for i in range(nd):  # d_i - (b_i - b_{i+1}) >= 0 and d_i + (b_i - b_{i+1}) >= 0
        for sign, r in ((1, n + 2 + 2 * i), (-1, n + 3 + 2 * i)):
            rows[r, i * k : (i + 1) * k] = -sign * cand
            rows[r, (i + 1) * k : (i + 2) * k] = sign * cand
            rows[r, nx + i] = 1
            lower.append(0)
            upper.append(np.inf)
    integrality = np.concatenate([np.ones(nx), np.zeros(nd)])
    bounds = Bounds(np.zeros(nx + nd), np.concatenate([np.ones(nx), np.full(nd, np.inf)]))
    res = milp(c, constraints=LinearConstraint(rows.tocsr(), lower, upper), integrality=integrality, bounds=bounds)
    if res.x is None:
        raise ConfigError(
            f"allocation: no choice of bits from {list(candidates)} meets both budgets (target {target}, "
            f"each at least {lo:.0%} used): {res.message}"
        )
    pick = np.asarray(res.x[:nx]).reshape(n, k).argmax(1)
    bits = [int(candidates[j]) for j in pick]
    return _result(bits, importance, params, macs, synergy, penalty)


def _result(bits, importance, params, macs, synergy, penalty) -> Allocation:
    b = np.asarray(bits, dtype=float)
    return Allocation(
        bits, score(bits, importance, synergy, penalty), float(np.dot(params, b)), float(np.dot(macs, b**2))
    )


def brute_force(importance, params, macs, synergy, candidates, target, penalty=0.1, lo=0.95) -> Allocation | None:
    """Every assignment tried (k^n): the reference the solver is tested against."""
    _check(importance, params, macs, synergy, candidates)
    (p_lo, p_hi), (o_lo, o_hi) = _budgets(params, macs, target, lo)
    best = None
    for bits in itertools.product(candidates, repeat=len(importance)):
        a = _result(list(bits), importance, params, macs, synergy, penalty)
        if p_lo <= a.param_bits <= p_hi and o_lo <= a.bops <= o_hi and (best is None or a.objective > best.objective):
            best = a
    return best
