"""One RunSpec end to end, and the suite loop that runs them all and writes the summary table.

build the student -> method.plan -> quantize -> calibrate -> train (training methods) -> evaluate
(J&F) -> size -> agreement with the FP model (harness/evaluate/agreement.py: the student freed, the FP
predictions made once per key) -> MLflow. Here harness reaches methods, through the registry only.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import gc
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import mlflow
import torch

import methods
from harness import estimate, memory, models
from harness.claims import Claims, clean_scratch, scratch_suffix
from harness.config import RunSpec, Suite
from harness.data import synthetic
from harness.errors import CheckpointError, ConfigError, NonFiniteError, QBenchError
from harness.evaluate import agreement
from harness.evaluate import registry as evaluators
from harness.progress import progress
from harness.quant import export
from harness.quant.policy import QuantPolicy
from harness.quant.size import model_size
from harness.tracking import Tracker

log = logging.getLogger("qbench")


# Set by a search around a run: called with (value, step) after each intermediate evaluation
# (train.eval_every); it may raise harness.errors.Pruned to stop the run there.
reporter: contextvars.ContextVar = contextvars.ContextVar("reporter", default=None)


def intermediate_eval(ctx):
    """(step) -> the eval set's main metric of the student now, logged as eval/<metric> at that step
    and handed to the search's reporter, which may stop the run (Pruned)."""
    ev = evaluators.get(ctx.cfg["data"]["eval"]["kind"])
    main = next(m for m in ev.metrics if m.alias == ev.main)
    eval_data = evaluators.dataset(ctx.cfg, "eval", ctx.results_dir)

    def evaluate(step: int) -> float:
        _, summary = ev.evaluate(ctx.student, eval_data, ctx.decisions, save_dir=None, late={})
        value = float(summary[main.key])
        ctx.log({f"eval/{main.logged}": value}, step)
        report = reporter.get()
        if report is not None:
            report(value, step)
        return value

    return evaluate


def fp_eval(cfg: dict, results_dir: Path):
    """(model) -> (logged name, value) of the eval set's main metric of a model that holds no
    quantizers yet (VRC's re-fit FP model, harness.quant.vrc)."""

    def evaluate(model) -> tuple[str, float]:
        ev = evaluators.get(cfg["data"]["eval"]["kind"])
        main = next(m for m in ev.metrics if m.alias == ev.main)
        _, summary = ev.evaluate(model, evaluators.dataset(cfg, "eval", results_dir), (), save_dir=None, late={})
        return main.logged, float(summary[main.key])

    return evaluate


@contextlib.contextmanager
def _phase(times: dict, name: str, device: str = "cpu"):
    """Time (time_<name>_s) and peak memory (peak_<name>_gib: CPU, the process's resident set;
    CUDA, allocated) of one step of a run; the peak's reset also returns freed heap to the system."""
    if mlflow.active_run() is not None:  # where a killed process was, for its record (tracking.died_reason)
        mlflow.set_tag("phase", name)
    start = time.perf_counter()
    with memory.Peak(device) as peak:
        yield
    times[f"time_{name}_s"] = time.perf_counter() - start
    if peak.peak is not None:
        times[f"peak_{name}_gib"] = peak.peak / 2**30


def _log(metrics: dict, step: int | None = None) -> None:
    if mlflow.active_run() is not None:  # `qbench export` prepares a run outside any record
        mlflow.log_metrics(metrics, step=step)


def _artifact(name: str, text: str) -> None:
    if mlflow.active_run() is not None:
        mlflow.log_text(text, name)


def context(cfg: dict, results_dir: Path, checkpoint_dir: Path | None = None) -> methods.Context:
    """The student of a run config and what its method's steps may ask for."""
    m = cfg["model"]

    def build():
        return models.build(m["name"], m["checkpoint"], m["image_size"], cfg["device"])

    def make_teacher():
        # Re-seeded, so that without a checkpoint it draws the student's random weights, on a
        # forked generator, so that building it late does not change the run's random stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg["seed"])
            return build().eval().requires_grad_(False)

    @functools.cache  # opened once: Mix-QSAM feeds the calibration frames once per layer
    def calib_data():
        return evaluators.dataset(cfg, "calib", results_dir)

    def calib_feed(model, frames=None):
        done = evaluators.get(cfg["data"]["calib"]["kind"]).calibrate(
            model, calib_data(), frames or cfg["data"]["calib"]["frames"]
        )
        if frames and done < frames:  # a method's calib_images that the data cannot give
            raise ConfigError(f"method: {frames} calibration frames asked for (calib_images), data.calib has {done}")
        return done

    torch.manual_seed(cfg["seed"])
    ctx = methods.Context(
        cfg,
        build(),
        QuantPolicy.from_config(cfg["quant"]),
        make_teacher=make_teacher,
        calib_feed=calib_feed,
        evaluate_fp=fp_eval(cfg, results_dir),
        log=_log,
        artifact=_artifact,
        results_dir=results_dir,
        checkpoint_dir=checkpoint_dir,
    )

    def train(method):
        from harness.train import train  # the training stack is imported only by runs that train

        return train(ctx, method, intermediate_eval(ctx) if cfg["train"].get("eval_every") else None)

    ctx.train = train
    return ctx


def prepare(cfg: dict, results_dir: Path, metrics: dict, checkpoint_dir: Path | None = None):
    """Run a config's method up to evaluation: (model, decisions).

    `metrics` receives the time of each step (time_<step>_s) and the training metrics.
    """
    method = methods.from_config(cfg["method"])
    with _phase(metrics, "build", cfg["device"]):
        ctx = context(cfg, results_dir, checkpoint_dir)
    with _phase(metrics, "plan", cfg["device"]):
        method.plan(ctx)
    with _phase(metrics, "quantize", cfg["device"]):
        method.quantize(ctx)
    if method.quantizes:
        with _phase(metrics, "calibrate", cfg["device"]):
            method.calibrate(ctx)
    if method.trains and cfg["train"]["steps"] > 0:
        with _phase(metrics, "train", cfg["device"]):
            metrics.update(method.train(ctx))
    return ctx.student, ctx.decisions


def load_packed(path: str | Path):
    """A packed model file (harness.quant.export) rebuilt with the method it was exported with."""
    return export.load(path, methods.from_config(export.read(path)["meta"]["method"]))


def run_one(spec, results_dir: Path, suite: str = "default") -> dict:
    """Run one spec inside an active MLflow run; returns its metrics."""
    cfg, times = spec.config, {}
    estimate.check(cfg, results_dir)
    eval_ds = evaluators.dataset(cfg, "eval", results_dir)
    evaluator = evaluators.get(cfg["data"]["eval"]["kind"])
    agree = _agreement_plan(cfg, results_dir, evaluator)
    checkpoints = results_dir / "checkpoints" / suite / spec.run_key  # a killed training run resumes here
    model, decisions = prepare(cfg, results_dir, times, checkpoints)  # times: also the training metrics
    # Scratch under the results folder, named after this process: if it is killed, the next
    # invocation removes the folder (claims.clean_scratch). What goes under artifacts/ is the record's.
    (results_dir / "tmp").mkdir(parents=True, exist_ok=True)
    scratch = tempfile.TemporaryDirectory(dir=results_dir / "tmp", prefix="eval-", suffix=scratch_suffix())
    with scratch as tmp:
        art = Path(tmp) / "artifacts"
        art.mkdir()
        # Agreement reads the predictions back (the scoring code of predictions made elsewhere): they are
        # written beside the artifacts where they are not asked to be kept.
        save = art / "predictions" if cfg["eval"]["save_predictions"] else None
        if agree is not None and save is None:
            save = Path(tmp) / "predictions"
        with _phase(times, "evaluate", cfg["device"]):
            late = {}
            per_object, summary = evaluator.evaluate(model, eval_ds, decisions, save_dir=save, late=late)
            if late:  # in the record too, not only in the log
                notes = [f"{seq}: ids {ids} appear after frame 0, not scored" for seq, ids in late.items()]
                mlflow.set_tag("warnings", "; ".join(notes))
                mlflow.log_dict(late, "late_objects.json")
            per_object.to_csv(art / "per_object.csv", index=False)
            if "sequence" in per_object:
                per_object.groupby("sequence")[["J-mean", "F-mean"]].mean().to_csv(art / "per_sequence.csv")
            with open(art / "quant_plan.tsv", "w") as f:
                f.write("module\tkind\tparams\tquantized\tweight_bits\tact_bits\tsoftmax_bits\treason\n")
                for d in decisions:
                    bits = f"{d.weight_bits}\t{d.act_bits}\t{d.softmax_bits}"
                    f.write(f"{d.name}\t{d.kind}\t{d.params}\t{d.quantize}\t{bits}\t{d.reason}\n")
        sizes, quantized = model_size(model), sum(d.quantize for d in decisions)
        if agree is not None:
            del model  # the FP model, where it is made now, is not held beside the student
            _free(cfg["device"])
            summary = {**summary, **_agreement(cfg, results_dir, evaluator, eval_ds, agree, save, summary, art, times)}
        mlflow.log_artifacts(art)
    metrics = {**summary, **sizes, **times}
    metrics = {k.replace("&", "_"): float(v) for k, v in metrics.items()}
    metrics["quantized_modules"] = quantized
    mlflow.log_metrics(metrics)
    check_finite(metrics)
    return metrics


def _free(device: str | None) -> None:
    gc.collect()
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _agreement_plan(cfg: dict, results_dir: Path, evaluator) -> tuple[str, str, dict] | None:
    """(mode, cache key, what it hashes) of a run's agreement with the FP model, or None (off: eval.agreement
    false, or a data kind without it). mode "score": a method that quantizes, scored against the FP
    predictions (made first where the cache has none); "fill": the FP model itself (fp), whose agreement is
    1 by definition and not computed, and whose predictions fill the cache where it has none."""
    if not cfg["eval"].get("agreement", True) or evaluator.agree is None:
        return None
    cache_key = agreement.key(cfg, results_dir)
    if methods.from_config(cfg["method"]).quantizes:
        return "score", cache_key, agreement.payload(cfg, results_dir)
    if agreement.cached(results_dir, cache_key) is None:
        return "fill", cache_key, agreement.payload(cfg, results_dir)
    return None


def _fp_predictions(cfg: dict, evaluator, eval_ds):
    """(folder) -> the FP model's scores: its predictions on the eval data written there, the model built
    as the fp method's run builds it (same seed: the same weights where they are random), then freed."""

    def predict(out: Path) -> dict:
        m = cfg["model"]
        with torch.random.fork_rng(devices=[]):  # the run's random stream is not touched
            torch.manual_seed(cfg["seed"])
            fp = models.build(m["name"], m["checkpoint"], m["image_size"], cfg["device"])
            try:
                _, summary = evaluator.evaluate(fp, eval_ds, (), save_dir=out, late={})
            finally:
                del fp
                _free(cfg["device"])
        return {k: float(v) for k, v in summary.items()}

    return predict


def _agreement(cfg, results_dir: Path, evaluator, eval_ds, plan, save: Path, summary: dict, art: Path, times: dict):
    """The agreement metrics of a run (none for fp, whose predictions fill the cache instead)."""
    mode, cache_key, about = plan
    if mode == "fill":

        def publish(out: Path) -> dict:
            if save.is_dir():
                shutil.copytree(save, out, dirs_exist_ok=True)
            return {k: float(v) for k, v in summary.items()}

        _, made = agreement.fill(results_dir, cache_key, about, publish)
        mlflow.set_tag("agreement.cache", f"{cache_key} {'filled' if made else 'reused'}")
        return {}
    fp_dir = agreement.cached(results_dir, cache_key)
    if fp_dir is None:
        with _phase(times, "fp_predictions", cfg["device"]):
            fp_dir, made = agreement.fill(results_dir, cache_key, about, _fp_predictions(cfg, evaluator, eval_ds))
        log.info("FP predictions %s %s", "made in" if made else "made by another process in", fp_dir)
    else:
        made = False
        log.info("FP predictions reused from %s", fp_dir)
    mlflow.set_tag("agreement.cache", f"{cache_key} {'computed' if made else 'reused'}")
    with _phase(times, "agreement", cfg["device"]):
        per_object, scores = evaluator.agree(eval_ds, fp_dir / "predictions", save)
        per_object.to_csv(art / evaluators.AGREEMENT_CSV, index=False)
    if not scores:
        log.warning("agreement: no object could be scored against the FP predictions in %s", fp_dir)
        mlflow.set_tag("agreement", "nothing to score: the FP model segments no object on a scored frame")
    return scores


def check_finite(values: dict) -> None:
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        raise NonFiniteError(f"non-finite values: {bad}")


def status(suite: Suite, results_dir: str | Path = "results") -> list[tuple[RunSpec, str]]:
    """(spec, FINISHED | RUNNING | KILLED | FAILED | pending) for each run: RUNNING while a live
    process holds it; KILLED or FAILED when its latest record says so, or is RUNNING with its process
    gone (KILLED); the next invocation runs it again. Writes nothing (no database, experiment, folder)."""
    results_dir = Path(results_dir)
    tracker = Tracker(results_dir, suite.name, create=False)
    claims = Claims(results_dir / "claims" / suite.name, create=False)
    out = []
    for spec in suite.runs:
        if tracker.finished(spec.run_key):
            out.append((spec, "FINISHED"))
        elif claims.owner(spec.run_key):
            out.append((spec, "RUNNING"))
        else:
            last = tracker.latest(spec.run_key)
            state = last.info.status if last is not None else "pending"
            out.append((spec, {"RUNNING": "KILLED", "SCHEDULED": "pending"}.get(state, state)))
    return out


def preflight(suite: Suite, results_dir: str | Path = "results") -> None:
    """Fail before any work, and in a dry run, on inputs that cannot work: each distinct model
    (unknown name, unreadable checkpoint, checkpoint that does not match its config) and dataset
    (missing root, split file, sequence folder, frame or annotation). A synthetic dataset not yet
    generated is generated by its first run."""
    seen, counts = set(), {}
    for spec in suite.runs:
        cfg, where = spec.config, f"{suite.path}: run {spec.name}"
        m = cfg["model"]
        if m["checkpoint"] not in (None, models.RANDOM) and not Path(m["checkpoint"]).is_file():
            raise ConfigError(f"{where}: model.checkpoint: {m['checkpoint']} does not exist")
        if (key := ("model", m["name"], m["checkpoint"], m["image_size"])) not in seen:
            seen.add(key)
            try:
                models.check(m["name"], m["checkpoint"], m["image_size"])
            except QBenchError as e:
                raise type(e)(
                    f"{where}: model.checkpoint: {e}" if isinstance(e, CheckpointError) else f"{where}: {e}"
                ) from None
        parts = {f"data.{p}": cfg["data"][p] for p in ("eval", "calib")}
        if methods.from_config(cfg["method"]).trains and cfg["train"]["steps"]:
            parts["train.data"] = cfg["train"]["data"]
        for name, d in parts.items():
            if d["kind"] == "stream":  # generated on the fly: nothing on disk to check
                continue
            ev = evaluators.get(d["kind"])
            if d["root"] is not None and not Path(d["root"]).is_dir() and d["kind"] != "synthetic":
                raise ConfigError(f"{where}: {name}.root: {d['root']} is not a folder")
            root = ev.root(cfg, d, Path(results_dir))
            key = ("data", d["kind"], str(root), d["split"], d["resolution"], d.get("max_sequences"))
            if key not in counts:
                if (d["root"] is None or d["kind"] == "synthetic") and not synthetic.is_complete(root):
                    continue  # generated by the first run that needs it
                try:
                    ds = ev.load(cfg, name, d, Path(results_dir))
                    ev.check(ds)
                except QBenchError as e:
                    raise type(e)(f"{where}: {name}: {e}") from None
                counts[key] = ev.count(ds)
            asked = methods.from_config(cfg["method"]).calibration_frames() if name == "data.calib" else 0
            if asked > counts[key]:
                raise ConfigError(
                    f"{where}: method.calib_images: {asked} calibration frames asked for, data.calib has {counts[key]}"
                )


def run_suite(
    suite: Suite, results_dir: str | Path = "results", attempted_since: float | None = None
) -> tuple[list[dict], list[tuple[str, str]]]:
    """Run every spec not FINISHED and not claimed by a live process; failures are recorded
    (FAILED, reason tag, traceback artifact) and the suite goes on. Returns (summary rows, failures).
    With `attempted_since` (a time.time()), runs with a record started since then are skipped too:
    the worker processes of one invocation (harness/executor.py) try a failing run once, not each.
    """
    preflight(suite, results_dir)
    results_dir = Path(results_dir)
    for path in clean_scratch(results_dir):
        log.info("removed %s, left by a process that died", path)
    rank, world = _distributed()
    if rank != 0:
        return follow(suite, results_dir), []
    tracker = Tracker(results_dir, suite.name)
    claims = Claims(results_dir / "claims" / suite.name)
    for spec in suite.runs:  # records left RUNNING by a process that died: KILLED, with what they tell
        if claims.owner(spec.run_key) is None:
            tracker.mark_killed(spec.run_key)
    failed = []
    with tracker.suite(suite.name, len(suite.runs)):
        for spec in progress(suite.runs, desc=f"suite {suite.name}", unit="run"):
            # Other torchrun ranks follow the run rank 0 claimed (None: skipped).
            announce = (lambda c, k=spec.run_key: _announce(k if c == "claimed" else None)) if world > 1 else None
            outcome, reason = run_claimed(
                spec, suite.name, results_dir, tracker, claims, on_claim=announce, attempted_since=attempted_since
            )
            if outcome == "failed":
                failed.append((spec.name, reason))
    if world > 1:
        _announce(_DONE)
    rows = summary_rows(suite, tracker)
    write_summary(rows, results_dir / suite.name / "summary.md", suite)
    return rows, failed


def run_claimed(
    spec: RunSpec,
    suite_name: str,
    results_dir: Path,
    tracker: Tracker,
    claims: Claims,
    parent_run_id: str | None = None,
    on_claim=None,
    attempted_since: float | None = None,
) -> tuple[str, str | None]:
    """One run of a suite, as every executor runs it: claim it, then run it into a child record.

    Returns (outcome, failure reason): outcome is 'finished', 'busy' or 'attempted' (skipped: FINISHED,
    claimed by a live process, or with a record since `attempted_since`), 'done' or 'failed' (recorded
    FAILED with its reason and traceback).
    `parent_run_id` puts the child under a suite record of another process (a submitit job's
    submitter); in-process, the active suite record is its parent. `on_claim(claim)` is told the
    claim's result before anything runs.
    """

    def done() -> bool:  # checked under the claims' lock
        if tracker.finished(spec.run_key) is not None:
            return True
        return attempted_since is not None and tracker.latest(spec.run_key, attempted_since) is not None

    claim = claims.claim(spec.run_key, done)
    if claim == "finished" and tracker.finished(spec.run_key) is None:
        claim = "attempted"
    if on_claim is not None:
        on_claim(claim)
    if claim != "claimed":
        log.info("skip %s (run_key %s %s)", spec.name, spec.run_key, claim)
        return claim, None
    try:
        tracker.mark_killed(spec.run_key)
        with tracker.run(spec, parent_run_id=parent_run_id):
            run_one(spec, results_dir, suite_name)
    except Exception as e:  # noqa: BLE001 - a failed run is recorded; the suite goes on
        log.error("run %s failed: %s: %s", spec.name, type(e).__name__, e)
        return "failed", f"{type(e).__name__}: {e}"
    finally:
        claims.release(spec.run_key)
    return "done", None


_DONE = "suite done"


def _distributed() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1
    from harness.train import distributed

    return distributed()


def _announce(message):
    """Rank 0 tells the other torchrun ranks which run it claimed (None: skipped); they receive it."""
    box = [message]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def follow(suite: Suite, results_dir: Path) -> list[dict]:
    """A torchrun rank other than 0: prepare (and so train, in step with rank 0) each run that rank 0
    claimed. Rank 0 alone claims, records, checkpoints and evaluates."""
    specs = {spec.run_key: spec for spec in suite.runs}
    while (key := _announce(None)) != _DONE:
        cfg = specs[key].config if key is not None else None
        if cfg is None or not (methods.from_config(cfg["method"]).trains and cfg["train"]["steps"] > 0):
            continue  # nothing to train: rank 0 does the rest alone
        try:
            prepare(cfg, results_dir, {}, results_dir / "checkpoints" / suite.name / key)
        except Exception as e:  # noqa: BLE001 - rank 0 records the failure; follow the next run
            log.error("rank %d: run %s failed: %s: %s", torch.distributed.get_rank(), key, type(e).__name__, e)
    return []


def _evaluator(suite: Suite):
    return evaluators.get(suite.runs[0].config["data"]["eval"]["kind"]) if suite.runs else evaluators.get("synthetic")


def summary_rows(suite: Suite, tracker: Tracker) -> list[dict]:
    """One row per spec, read back from MLflow so skipped (already finished) runs are included."""
    ev, rows = _evaluator(suite), []
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
                **{metric.column: m.get(metric.logged) for metric in ev.columns},
                ev.rate: m.get("fps"),
                "packed MB": m.get("packed_bytes", 0) / 1e6,
                "vs BF16": m.get("ratio_vs_bf16"),
                "run_key": spec.run_key,
            }
        )
    return rows


def write_summary(rows: list[dict], path: Path, suite: Suite | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ev = _evaluator(suite) if suite is not None else evaluators.get("synthetic")
    cols = ["method", "bits", *(m.column for m in ev.columns), ev.rate, "packed MB", "vs BF16", "run_key"]
    # Scores in percent, the unit of the report's tables and figures.
    head = {m.column: f"{m.column} (%)" for m in ev.columns if m.percent}
    fmt = {ev.rate: "{:.2f}", "packed MB": "{:.3f}", "vs BF16": "{:.2f}x"}

    def cell(r, c):
        if r[c] is None or c not in fmt and c not in head:
            return str(r[c])
        if c in head:  # COCOeval gives -1 for a size range without ground truth
            return "n/a" if r[c] < 0 else f"{100 * r[c]:.1f}"
        return fmt[c].format(r[c])

    lines = ["| " + " | ".join(head.get(c, c) for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r, c) for c in cols) + " |" for r in rows]
    path.write_text("\n".join(lines) + "\n")
