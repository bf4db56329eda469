"""One RunSpec end to end, and the suite loop that runs them all and writes the summary table.

build FP model -> method.quantize -> method.calibrate -> evaluate (J&F) -> size -> MLflow.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
import traceback
from pathlib import Path

import mlflow
import torch
from tqdm.auto import tqdm

import methods
from harness import models
from harness.config import Suite
from harness.data import synthetic
from harness.data.davis import DavisDataset
from harness.evaluate import vos
from harness.quant.policy import QuantPolicy
from harness.quant.size import model_size
from harness.tracking import Tracker

log = logging.getLogger("qbench")


def dataset(cfg: dict, part: str, results_dir: Path) -> DavisDataset:
    d = cfg["data"][part]
    root = d["root"]
    if d["kind"] == "synthetic":
        s = cfg["data"]["synthetic"]
        if root is None:
            root = results_dir / "data" / f"synthetic-n{s['sequences']}-t{s['frames']}-{s['size']}-seed{s['seed']}"
        if not synthetic.is_complete(root):
            synthetic.generate(
                root, sequences=s["sequences"], frames=s["frames"], size=synthetic.parse_size(s["size"]), seed=s["seed"]
            )
    elif d["kind"] != "davis":
        raise ValueError(f"data.{part}.kind: {d['kind']!r}; expected 'davis' or 'synthetic'")
    ds = DavisDataset(root, split=d["split"], resolution=d["resolution"])
    if d.get("max_sequences"):
        ds.sequences = ds.sequences[: d["max_sequences"]]
    return ds


@contextlib.contextmanager
def _phase(times: dict, name: str):
    start = time.perf_counter()
    yield
    times[f"time_{name}_s"] = time.perf_counter() - start


def run_one(spec, results_dir: Path) -> dict:
    """Run one spec inside an active MLflow run; returns its metrics."""
    cfg, times = spec.config, {}
    torch.manual_seed(cfg["seed"])
    method_cfg = dict(cfg["method"])
    method = methods.get(method_cfg.pop("name"), **method_cfg)
    policy = QuantPolicy.from_config(cfg["quant"])
    eval_ds = dataset(cfg, "eval", results_dir)
    calib_ds = dataset(cfg, "calib", results_dir) if method.quantizes else None
    with _phase(times, "build"):
        m = cfg["model"]
        model = models.build(m["name"], m["checkpoint"], m["image_size"], cfg["device"])
    with _phase(times, "quantize"):
        decisions = method.quantize(model, policy)
    if method.quantizes:
        with _phase(times, "calibrate"):
            method.calibrate(model, lambda: vos.run_frames(model, calib_ds, cfg["data"]["calib"]["frames"]))
    with _phase(times, "evaluate"), tempfile.TemporaryDirectory() as tmp:
        save = Path(tmp) / "predictions" if cfg["eval"]["save_predictions"] else None
        per_object, summary = vos.evaluate(model, eval_ds, decisions, save_dir=save)
        per_object.to_csv(Path(tmp) / "per_object.csv", index=False)
        per_object.groupby("sequence")[["J-mean", "F-mean"]].mean().to_csv(Path(tmp) / "per_sequence.csv")
        with open(Path(tmp) / "quant_plan.tsv", "w") as f:
            f.write("module\tkind\tparams\tquantized\tweight_bits\tact_bits\treason\n")
            for d in decisions:
                f.write(f"{d.name}\t{d.kind}\t{d.params}\t{d.quantize}\t{d.weight_bits}\t{d.act_bits}\t{d.reason}\n")
        mlflow.log_artifacts(tmp)
    metrics = {**summary, **model_size(model), **times}
    metrics = {k.replace("&", "_"): float(v) for k, v in metrics.items()}
    mlflow.log_metrics(metrics)
    return metrics


def run_suite(suite: Suite, results_dir: str | Path = "results") -> list[dict]:
    """Run every spec not already FINISHED; failures are recorded and the suite goes on."""
    results_dir = Path(results_dir)
    tracker = Tracker(results_dir, suite.name)
    failed = []
    with tracker.suite(suite.name, len(suite.runs)):
        for spec in tqdm(suite.runs, desc=f"suite {suite.name}", unit="run", disable=None):
            if tracker.finished(spec.run_key):
                log.info("skip %s (run_key %s already FINISHED)", spec.name, spec.run_key)
                continue
            try:
                with tracker.run(spec):
                    run_one(spec, results_dir)
            except Exception as e:  # noqa: BLE001 - a failed run is recorded; the suite goes on
                log.error("run %s failed: %s\n%s", spec.name, e, traceback.format_exc())
                failed.append((spec.name, f"{type(e).__name__}: {e}"))
    rows = summary_rows(suite, tracker)
    write_summary(rows, results_dir / suite.name / "summary.md")
    return rows, failed


def summary_rows(suite: Suite, tracker: Tracker) -> list[dict]:
    """One row per spec, read back from MLflow so skipped (already finished) runs are included."""
    rows = []
    for spec in suite.runs:
        run = tracker.finished(spec.run_key)
        if run is None:
            continue
        cfg, m = spec.config, run.data.metrics
        fp = cfg["method"]["name"] == "fp"
        rows.append(
            {
                "method": cfg["method"]["name"],
                "bits": "FP" if fp else f"W{cfg['quant']['weight_bits']}A{cfg['quant']['act_bits']}",
                "J&F": m.get("J_F-mean"),
                "J": m.get("J-mean"),
                "F": m.get("F-mean"),
                "frames/s": m.get("fps"),
                "packed MB": m.get("packed_bytes", 0) / 1e6,
                "vs BF16": m.get("ratio_vs_bf16"),
                "run_key": spec.run_key,
            }
        )
    return rows


def write_summary(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = ["method", "bits", "J&F", "J", "F", "frames/s", "packed MB", "vs BF16", "run_key"]
    fmt = {
        "J&F": "{:.3f}",
        "J": "{:.3f}",
        "F": "{:.3f}",
        "frames/s": "{:.2f}",
        "packed MB": "{:.3f}",
        "vs BF16": "{:.2f}x",
    }
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [fmt[c].format(r[c]) if c in fmt and r[c] is not None else str(r[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")
