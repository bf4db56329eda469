"""Variance-Reduced Calibration (VRC) of Q-SAM2 (Farronato et al., "Q-SAM2: Accurate Quantization for
Segment Anything Model 2", arXiv 2506.09782, 2025): a closed-form re-fit of linear layers' weights
before quantization.

For each chosen nn.Linear of the FP model, the calibration frames give inputs X (rows) and the
layer's FP outputs Y; W is replaced by the minimum-norm least-squares solution of X W^T = Y with a
relative singular-value cut-off `rcond` (pinv), or by ridge regression. With token rows and no
cut-off this gives W back; what acts is the cut-off (directions of the input space the data barely
excites are dropped) or, with one row per image (`rows: image_mean`) and fewer images than input
features, the projection of W onto the span of the calibration images (../shared/METHODS.md).

The system is solved from its normal equations (X^T X and X^T Y in float64), so memory is one
d_in x d_in matrix per layer whatever the number of tokens: pinv(X) Y = V diag(1 / lambda) V^T X^T Y
over the eigenpairs of X^T X with lambda > rcond^2 * lambda_max (singular values s = sqrt(lambda)).
Each forward call of a layer counts as one image (the calibration feed runs one frame at a time).
"""

from __future__ import annotations

import fnmatch
import math

import pandas as pd
import torch
import torch.nn as nn
from torch import Tensor

from harness.errors import ConfigError

DEFAULTS = {
    "enabled": False,
    "calib_images": 16,
    "rows": "tokens",
    "token_subsample": 0,
    "rcond": 0.05,
    "ridge": 0.0,
    "refit_bias": False,
    "layers": "image_encoder.*",
    "held_out": 64,
}


def check(params) -> dict:
    """A method's `vrc` section, validated and default-filled."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ConfigError(f"method.vrc: {params!r}; expected a mapping of VRC settings ({', '.join(DEFAULTS)})")
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"method.vrc.{unknown[0]}: unknown VRC setting; expected one of {', '.join(DEFAULTS)}")
    p = {**DEFAULTS, **params}

    def bad(key, expected):
        raise ConfigError(f"method.vrc.{key}: {p[key]!r}; expected {expected}")

    for key in ("enabled", "refit_bias"):
        if not isinstance(p[key], bool):
            bad(key, "true or false")
    for key, low in (("calib_images", 1), ("token_subsample", 0), ("held_out", 0)):
        if not isinstance(p[key], int) or isinstance(p[key], bool) or p[key] < low:
            bad(key, f"an integer >= {low}")
    for key in ("rcond", "ridge"):
        if not isinstance(p[key], (int, float)) or isinstance(p[key], bool) or p[key] < 0:
            bad(key, "a number >= 0")
        p[key] = float(p[key])
    if p["rows"] not in ("tokens", "image_mean"):
        bad("rows", "'tokens' or 'image_mean'")
    if not isinstance(p["layers"], str) or not p["layers"]:
        bad("layers", "a module-name glob such as 'image_encoder.*'")
    return p


class _Layer:
    """Normal equations and held-out tokens of one layer, accumulated over its forward calls."""

    def __init__(self, module: nn.Linear, params: dict, gen: torch.Generator):
        self.module, self.p, self.gen = module, params, gen
        self.d = module.in_features + (1 if params["refit_bias"] else 0)
        self.xtx = self.xty = None  # on the layer's device (a GPU's float64 beats the CPU's)
        self.rows, self.calls = 0, 0
        self.held_x: list[Tensor] = []
        self.held_y: list[Tensor] = []

    def add(self, x: Tensor, y: Tensor) -> None:
        if self.calls >= self.p["calib_images"]:
            return
        self.calls += 1
        x = x.detach().reshape(-1, x.shape[-1]).double()
        y = y.detach().reshape(-1, y.shape[-1]).double()
        order = torch.randperm(len(x), generator=self.gen).to(x.device)
        held = order[: min(self.p["held_out"], len(x) // 2)]
        fit = order[len(held) :]
        if self.p["token_subsample"]:
            fit = fit[: self.p["token_subsample"]]
        self.held_x.append(x[held].cpu())
        self.held_y.append(y[held].cpu())
        if self.p["rows"] == "image_mean":
            x, y = x[fit].mean(0, keepdim=True), y[fit].mean(0, keepdim=True)
        else:
            x, y = x[fit], y[fit]
        if not self.p["refit_bias"] and self.module.bias is not None:
            y = y - self.module.bias.detach().double()
        if self.p["refit_bias"]:
            x = torch.cat([x, x.new_ones(len(x), 1)], 1)
        if self.xtx is None:
            self.xtx = x.new_zeros(self.d, self.d)
            self.xty = x.new_zeros(self.d, y.shape[1])
        self.xtx += x.T @ x
        self.xty += x.T @ y
        self.rows += len(x)

    def solve(self) -> tuple[Tensor, Tensor | None, int]:
        """(new weight, new bias or None, rank kept)."""
        p = self.p
        if p["ridge"] > 0:  # relative to the mean diagonal of X^T X, so one value fits any number of rows
            lam = p["ridge"] * self.xtx.diagonal().mean()
            eye = torch.eye(len(self.xtx), dtype=self.xtx.dtype, device=self.xtx.device)
            wt, rank = torch.linalg.solve(self.xtx + lam * eye, self.xty), len(self.xtx)
        else:
            evals, evecs = torch.linalg.eigh(self.xtx)
            top = evals.max().clamp_min(0)
            floor = max(p["rcond"] ** 2, len(evals) * torch.finfo(torch.float64).eps) * top
            keep = evals > floor
            v = evecs[:, keep]
            wt, rank = v @ ((v.T @ self.xty) / evals[keep, None]), int(keep.sum())
        w = wt.T.cpu()
        if p["refit_bias"]:
            return w[:, :-1], w[:, -1], rank
        return w, None, rank


def _kurtosis(w: Tensor) -> float:
    w = w.double().reshape(-1)
    c = w - w.mean()
    return float(c.pow(4).mean() / c.pow(2).mean().pow(2).clamp_min(1e-300))


def _rtn_weight(w: Tensor, bits: int) -> Tensor:
    """Per-output-channel symmetric min-max round-to-nearest (rtn's weight quantizer)."""
    qp = 2 ** (bits - 1) - 1
    s = (w.abs().amax(1, keepdim=True) / qp).clamp_min(1e-12)
    return torch.clamp(torch.round(w / s), -qp, qp) * s


def _rel_err(pred: Tensor, ref: Tensor) -> float:
    return float((pred - ref).pow(2).sum() / ref.pow(2).sum().clamp_min(1e-300))


def layers(model: nn.Module, glob: str) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and fnmatch.fnmatchcase(n, glob)}


@torch.no_grad()
def refit(model: nn.Module, feed, params: dict, weight_bits: dict[str, int] | None = None, seed: int = 0) -> list[dict]:
    """Re-fit the matching Linear layers of an FP model in place from `feed(model, frames)`.

    Returns one row per layer: weight std, kurtosis and max |w| before and after, the rank kept,
    and on held-out calibration tokens the relative output error of the re-fit layer against the
    FP layer (`out_err`) and, where `weight_bits` gives the layer's bits, of rtn's quantized weight
    before and after the re-fit against the FP layer (`qerr_before`, `qerr_after`).
    """
    chosen = layers(model, params["layers"])
    if not chosen:
        raise ConfigError(f"method.vrc.layers: {params['layers']!r} matches no Linear layer of the model")
    gen = torch.Generator().manual_seed(seed)
    acc = {name: _Layer(m, params, gen) for name, m in chosen.items()}
    hooks = [m.register_forward_hook(lambda mod, inp, out, a=acc[n]: a.add(inp[0], out)) for n, m in chosen.items()]
    try:
        feed(model, params["calib_images"])
    finally:
        for h in hooks:
            h.remove()
    rows = []
    for name, a in acc.items():
        if not a.calls:
            raise ConfigError(f"method.vrc.layers: {name} saw no calibration data (it is not on the path of a frame)")
        m = a.module
        w0 = m.weight.detach().double().cpu()
        b0 = m.bias.detach().double().cpu() if m.bias is not None else None
        w1, b1, rank = a.solve()
        hx, hy = torch.cat(a.held_x), torch.cat(a.held_y)
        b = b1 if b1 is not None else b0

        def out(w, bias=b, hx=hx):
            return hx @ w.T + (bias if bias is not None else 0)

        row = {
            "layer": name,
            "d_in": m.in_features,
            "d_out": m.out_features,
            "images": a.calls,
            "rows": a.rows,
            "rank": rank,
            "std_before": float(w0.std()),
            "std_after": float(w1.std()),
            "kurtosis_before": _kurtosis(w0),
            "kurtosis_after": _kurtosis(w1),
            "maxabs_before": float(w0.abs().max()),
            "maxabs_after": float(w1.abs().max()),
            "out_err": _rel_err(out(w1), hy),
        }
        bits = (weight_bits or {}).get(name)
        if bits:
            row["qerr_before"] = _rel_err(out(_rtn_weight(w0, bits), b0), hy)
            row["qerr_after"] = _rel_err(out(_rtn_weight(w1, bits)), hy)
        if not all(math.isfinite(v) for v in row.values() if isinstance(v, float)):
            raise FloatingPointError(f"VRC re-fit of {name} is not finite: {row}")
        m.weight.copy_(w1.to(m.weight))
        if b1 is not None:
            m.bias.copy_(b1.to(m.bias))
        rows.append(row)
    return rows


def summary(rows: list[dict]) -> dict[str, float]:
    """Averages over layers, as run metrics (vrc/...)."""
    keys = [k for k in {k: 0 for r in rows for k in r} if isinstance(rows[0].get(k, 0.0), float)]
    out = {f"vrc/{k}": sum(r[k] for r in rows if k in r) / sum(k in r for r in rows) for k in keys}
    out["vrc/rank_frac"] = sum(min(1.0, r["rank"] / r["d_in"]) for r in rows) / len(rows)
    return out


def table(rows: list[dict]) -> str:
    """The per-layer rows as CSV text (a run artifact)."""
    return pd.DataFrame(rows).to_csv(index=False, float_format="%.6g")
