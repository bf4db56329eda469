"""`qbench inspect`: what a policy quantizes in a model, module by module, and what it weighs."""

from __future__ import annotations

from pathlib import Path

import methods
from harness.quant.size import model_size


def inspect(cfg: dict, results_dir: str | Path = "results") -> dict:
    """Rows (one per Linear / Conv / attention module) and totals for a run config: its method's
    plan and swap, without calibration. A method whose plan or swap reads calibration data (Mix-QSAM's
    bit map, VRC, BIG) reads the run's calibration frames, generated under `results_dir` if need be."""
    from harness.runner import context  # the runner opens (and generates) the run's data

    method = methods.from_config(cfg["method"])
    ctx = context(cfg, Path(results_dir))
    model = ctx.student
    decisions = method.plan(ctx)
    method.quantize(ctx)
    rows = [
        {
            "module": d.name,
            "kind": d.kind,
            "quantized": d.quantize,
            "weight_bits": d.weight_bits,
            "act_bits": d.act_bits,
            "softmax_bits": d.softmax_bits,
            "params": d.params,
            "reason": d.reason,
        }
        for d in decisions
    ]
    totals = model_size(model)
    totals["quantized_modules"] = sum(d.quantize for d in decisions)
    totals["fp_modules"] = sum(not d.quantize for d in decisions)
    return {"model": cfg["model"]["name"], "method": cfg["method"]["name"], "rows": rows, "totals": totals}


def format_text(report: dict) -> str:
    lines = [f"{'module':<64} {'kind':<16} {'quant':<5} {'W':>3} {'A':>3} {'SM':>3} {'params':>10}  note"]
    for r in report["rows"]:
        bits = [str(r[k]) if r[k] is not None else "-" for k in ("weight_bits", "act_bits", "softmax_bits")]
        lines.append(
            f"{r['module']:<64} {r['kind']:<16} {'yes' if r['quantized'] else 'FP':<5} "
            f"{bits[0]:>3} {bits[1]:>3} {bits[2]:>3} {r['params']:>10}  {r['reason']}"
        )
    t = report["totals"]
    lines += [
        "",
        f"model {report['model']}, method {report['method']}: {t['quantized_modules']} modules quantized, "
        f"{t['fp_modules']} kept in FP",
        f"parameters: {t['params']:,} total, {t['quantized_params']:,} quantized ({t['quantized_share']:.1%})",
        f"average bits per weight: {t['bits_per_weight']:.2f}",
        f"packed size: {t['packed_bytes'] / 1e6:.3f} MB vs BF16 {t['bf16_bytes'] / 1e6:.3f} MB: "
        f"ratio {t['ratio_vs_bf16']:.2f}x (quantized part {t['quantized_ratio_vs_bf16']:.2f}x)",
    ]
    return "\n".join(lines)
