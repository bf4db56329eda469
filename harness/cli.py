"""`qbench` / `python -m harness`: the command line that nox sessions call."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

from harness import interrupts
from harness.errors import ConfigError, QBenchError


def _suite(args) -> int:
    from harness import estimate, executor
    from harness.config import load_suite
    from harness.runner import preflight, status

    suite = load_suite(args.suite, args.overrides)
    names = ("workers", "partition", "time", "gpus", "mem", "cpus", "array", "parallelism", "log_folder")
    cfg = executor.resolve(suite, {"kind": args.executor, **{k: getattr(args, k) for k in names}})
    if args.dry_run:
        preflight(suite, args.results)  # the errors a run would give, before listing it as pending
        states = status(suite, args.results)
        print(f"suite {suite.name} ({suite.path}): {len(suite.runs)} runs")
        misfits = []
        for spec, state in states:
            est = estimate.run(spec.config, args.results)
            ok, have = estimate.fits(est, estimate.device_type(spec.config))
            cost = f"  {estimate.describe(est, spec.config['train']['steps'])}" if est else ""
            print(f"  {spec.run_key}  {state:<8}  {spec.name}{cost}")
            if not ok:
                misfits.append(
                    f"warning: {spec.name} will not fit: estimated peak "
                    f"{est['peak_bytes'] / estimate.GIB:.1f} GiB, {have / estimate.GIB:.1f} GiB available"
                )
        for line in misfits:
            print(line, file=sys.stderr)
        return 0
    rows, failed = executor.run(suite, args.results, args.overrides, cfg, args.attempted_since)
    print(f"{len(rows)}/{len(suite.runs)} runs finished; summary: {args.results}/{suite.name}/summary.md")
    for name, reason in failed:
        print(f"FAILED {name}: {reason}", file=sys.stderr)
    return 1 if failed else 0


def _search(args) -> int:
    from harness.search import Search, run_search, spawn_workers
    from harness.search_report import summary

    search = Search(args.suite, args.overrides, args.results)  # a bad search section fails here, once
    if args.dry_run:
        print(summary(search))
        return 0
    if args.workers > 1:
        return spawn_workers(args.suite, args.overrides, args.results, args.workers)
    study = run_search(search, worker=args.worker)
    print(summary(search, study))
    return 0


def _make_data(args) -> int:
    from harness.data import synthetic

    try:
        size = synthetic.parse_size(args.size)
        out = synthetic.generate(args.out, args.sequences, args.frames, size, args.seed, progress=True)
    except (ValueError, FileExistsError) as e:  # bad arguments: one line, not a traceback
        raise ConfigError(f"make-data: {e}") from None
    print(f"wrote {args.sequences} sequences x {args.frames} frames ({args.size}) to {out}")
    return 0


def _make_checkpoint(args) -> int:
    import torch

    from harness import models

    torch.manual_seed(args.seed)
    model = models.build(args.model, models.RANDOM, device="cpu")  # unknown names: one-line errors
    models.save_checkpoint(model, args.out)
    n = sum(p.numel() for p in model.parameters())
    print(
        f"wrote random weights of {args.model} ({n / 1e6:.1f} M parameters) in SAM2's checkpoint format to {args.out}"
    )
    return 0


def _eval_vos(args) -> int:
    report = {}
    if args.format == "sav":
        from harness.data.sav import SavDataset
        from harness.evaluate.sav import score_folder

        root = Path(args.root)
        split = root / f"sav_{args.split}.txt"
        dataset = SavDataset(root, split if split.is_file() else None)
        per_object, summary = score_folder(dataset, args.results, allow_missing=args.allow_missing, report=report)
        extra = {"filled_frames": report.get("filled", 0), "unscored_objects": report.get("unscored", [])}
    else:
        from harness.evaluate.scoring import score_results_folder

        per_object, summary = score_results_folder(
            args.root, args.results, args.split, args.resolution, allow_missing=args.allow_missing, report=report
        )
        extra = {"filled_frames": report["filled"], "late_objects": report["late"]}
    if extra["filled_frames"]:
        print(f"warning: {extra['filled_frames']} missing prediction frames scored as empty", file=sys.stderr)
    if args.out:
        per_object.to_csv(args.out, index=False)
        print(f"per-object scores: {args.out}", file=sys.stderr if args.json else sys.stdout)
    if args.json:  # full precision (repr of the floats), to check agreement with another scorer
        print(json.dumps({**summary, **extra}, default=str))
    else:
        for key in ("J&F-mean", "J-mean", "F-mean"):
            print(f"{key}: {summary[key]:.4f}")
    return 0


def _eval_coco(args) -> int:
    from harness.evaluate.instance import score_results_file

    summary = score_results_file(args.annotations, args.results)
    if args.json:
        print(json.dumps(summary))
    else:
        for key, value in summary.items():
            print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    return 0


def _inspect(args) -> int:
    import json

    from harness.config import base_config
    from harness.inspect import format_text, inspect

    # Without a suite, inspect the min-max PTQ layout (fp, the default method, quantizes nothing).
    defaults = [] if args.suite else ["method.name=rtn"]
    cfg = base_config(args.suite, [*defaults, f"model.name={args.model}", *args.overrides])
    report = inspect(cfg, args.results)
    print(json.dumps(report, indent=1) if args.json else format_text(report))
    return 0


SMALL_CLIPS, LARGE_CLIPS = {"batch": 4, "frames": 4}, {"batch": 1, "frames": 2}  # clips x frames per step


def _train_cases(text: str) -> list[tuple[str, int, int]]:
    cases = []
    for case in filter(None, text.split(",")):
        name, *bits = case.split(":")
        if len(bits) != 2 or not all(b.isdigit() for b in bits):
            raise ConfigError(f"bench --cases: {case!r}; expected METHOD:W:A, e.g. lsq:4:4")
        cases.append((name, int(bits[0]), int(bits[1])))
    return cases


def _clips(text: str) -> dict:
    b, _, f = text.partition("x")
    if not (b.isdigit() and f.isdigit() and int(b) > 0 and int(f) > 0):
        raise ConfigError(f"bench --clips: {text!r}; expected CLIPSxFRAMES, e.g. 1x2")
    return {"batch": int(b), "frames": int(f)}


def _bench(args) -> int:
    import json

    import torch

    from harness import bench, estimate
    from harness.config import base_config
    from harness.quant.policy import QuantPolicy

    # The quant section of an fp config is normalized away: read it as rtn's.
    quant = base_config(None, ["method.name=rtn", *args.overrides])["quant"]
    policy = QuantPolicy.from_config(quant)
    default_models = ["sam2_small"] if args.kernels else ["sam2_small", "sam2.1_hiera_t"]
    model_list = [(m, None if m == "sam2_small" else args.image_size) for m in args.models or default_models]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.kernels:
        if args.train:
            raise ConfigError("bench: --kernels and --train are two benchmarks; pick one")
        return _bench_kernels(args, quant, model_list, device)
    if args.checkpoint or args.settings:
        raise ConfigError("bench: --checkpoint and --settings go with --kernels")
    if args.train:
        extra = [o for o in args.overrides if o.startswith("train.")]
        limit = int(args.limit_gb * 2**30) if args.limit_gb else None
        cases = bench.TRAIN_CASES if args.cases is None else _train_cases(args.cases)
        size_of = _clips(args.clips) if args.clips else None
        results = []
        for m, size in model_list:
            clips = size_of or (SMALL_CLIPS if m == "sam2_small" else LARGE_CLIPS)
            results.append(
                bench.bench_train_model(
                    m,
                    size,
                    cases,
                    args.repeats,
                    breakdown=args.breakdown,
                    overrides=extra,
                    limit=limit,
                    device=device,
                    **clips,
                )
            )
            where = estimate.record(results[-1], args.results)
        print(json.dumps(results, indent=1) if args.json else bench.format_train(results))
        print(f"figures for `qbench suite --dry-run` estimates: {where}", file=sys.stderr)
        return 0
    results = bench.run(policy, model_list, repeats=args.repeats, method=args.method, device=device)
    print(json.dumps(results, indent=1) if args.json else bench.format_text(results, policy, args.method))
    return 0


def _bench_kernels(args, quant: dict, model_list, device) -> int:
    import json

    import methods
    from harness import kernels

    kernels.require_torchao()  # before any model is built: a missing install is one line
    if not methods.get(args.method).quantizes:
        raise ConfigError(f"bench --kernels: --method {args.method} quantizes nothing; expected a quantizing method")
    if args.checkpoint and len(model_list) != 1:
        raise ConfigError("bench --kernels: --checkpoint goes with one model (--models NAME)")
    settings = kernels.KERNEL_SETTINGS
    if args.settings:
        by_label = {s.label: s for s in kernels.KERNEL_SETTINGS}
        wanted = [w.strip() for w in args.settings.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in by_label]
        if unknown or not wanted:
            raise ConfigError(
                f"bench --settings: {','.join(unknown) or args.settings!r}; expected some of {','.join(by_label)}"
            )
        settings = [by_label[w] for w in wanted]
    quant = {k: v for k, v in quant.items() if k not in ("weight_bits", "act_bits")}  # the settings' bits
    results = [
        kernels.bench_kernels(
            m, size, quant, settings, args.method, args.checkpoint, repeats=args.repeats, device=device
        )
        for m, size in model_list
    ]
    print(json.dumps(results, indent=1) if args.json else kernels.format_kernels(results))
    return 0


def _export(args) -> int:
    from pathlib import Path

    from harness.config import load_suite
    from harness.quant.export import export
    from harness.quant.size import model_size
    from harness.quant.state import check_all_active
    from harness.runner import prepare

    suite = load_suite(args.suite, args.overrides)
    specs = [s for s in suite.runs if args.run in (s.name, s.run_key)]
    if len(specs) != 1:
        names = ", ".join(f"{s.name} ({s.run_key})" for s in suite.runs)
        raise QBenchError(
            f"--run {args.run!r} matches {len(specs)} runs of suite {suite.name}; expected one of {names}"
        )
    cfg = specs[0].config
    model, decisions = prepare(cfg, Path(args.results), {})
    check_all_active(model, decisions)  # a quantizer calibration never reached must not be shipped
    export(model, args.out, {k: cfg[k] for k in ("model", "quant", "method")}, decisions, fp_dtype=args.fp_dtype)
    size = model_size(model, fp_bytes=4 if args.fp_dtype == "float32" else 2)
    print(
        f"wrote {args.out}: {Path(args.out).stat().st_size / 1e6:.3f} MB on disk, "
        f"{size['packed_bytes'] / 1e6:.3f} MB of tensors ({args.fp_dtype} scales and FP tensors)"
    )
    return 0


def _report(args) -> int:
    """The runs' report; for a suite file with a `search:` section, the search's report, and the
    runs' report too where the file also declares a matrix."""
    from harness.config import find_suite, load_suite, read_suite_file
    from harness.report import report

    raw, written = read_suite_file(find_suite(args.suite)), {}
    if raw.search is not None:
        from harness.search import Search
        from harness.search_report import report_search

        written = report_search(Search(args.suite, args.overrides, args.results))
    if raw.search is None or raw.matrix or raw.seeds or raw.include:
        runs = [o for o in args.overrides if not o.startswith("search.")]  # the search's budget
        written |= report(load_suite(args.suite, runs), args.results)
    for path in written.values():
        print(path)
    return 0


def _pretrain(args) -> int:
    from harness.pretrain import measure_card, pretrain

    out = Path(args.out)
    if args.card_only:
        card = measure_card(out / "sam2_small.json", Path(args.results))
    else:
        card = pretrain(args.overrides, out, Path(args.results))
    print(f"{out / card['file']} (sha256 {card['sha256'][:16]}...): model card {out / 'sam2_small.md'}")
    for row in card["val"]:
        print(f"  {row['method']:<5} {row['bits']:<5} J&F {row['J&F']:.3f}")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qbench", description="Low-bit quantization benchmarks for SAM2.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("suite", aliases=["run"], help="run every run of a suite file (resumable)")
    s.add_argument("suite", help="suite name (suites/NAME.yaml) or path to a suite file")
    s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. quant.act_bits=8")
    s.add_argument("--results", default="results", help="results folder (MLflow db, artifacts, tables)")
    s.add_argument("--dry-run", action="store_true", help="list the runs, their run_keys and which are finished")
    e = s.add_argument_group("executor", "where the runs run; these win over the suite file's executor: section")
    e.add_argument(
        "--executor",
        choices=["local", "gpus", "slurm", "submitit-local"],
        help="local (default): this process; gpus: one worker per visible GPU; slurm: a submitit job per run; "
        "submitit-local: submitit jobs on this machine",
    )
    e.add_argument("--workers", type=int, help="local: this many worker processes sharing the runs")
    e.add_argument("--partition", help="slurm partition")
    e.add_argument("--time", type=int, help="minutes per job (default 60)")
    e.add_argument("--gpus", type=int, help="GPUs per node of a job (default 0; > 0 runs on cuda)")
    e.add_argument("--mem", type=int, help="GB of memory per job")
    e.add_argument("--cpus", type=int, help="CPUs per task")
    e.add_argument("--array", action=argparse.BooleanOptionalAction, help="slurm: submit one job array")
    e.add_argument("--parallelism", type=int, help="at most this many jobs at once")
    e.add_argument("--log-folder", help="submitit's logs (default RESULTS/submitit/SUITE)")
    e.add_argument("--attempted-since", type=float, help=argparse.SUPPRESS)  # a worker's: its launcher's start
    s.set_defaults(fn=_suite)

    s = sub.add_parser("report", help="tables (md, tex, csv) and figures (png, pdf) from a suite's records")
    s.add_argument("suite")
    s.add_argument("overrides", nargs="*", help="the same dotted overrides the suite was run with")
    s.add_argument("--results", default="results")
    s.set_defaults(fn=_report)

    s = sub.add_parser("search", help="an Optuna search declared in a suite file's search section (resumable)")
    s.add_argument("suite")
    s.add_argument("overrides", nargs="*", help="dotted overrides of the base config, e.g. train.steps=6")
    s.add_argument("--results", default="results")
    s.add_argument("--workers", type=int, default=1, help="worker processes on this host sharing the study")
    s.add_argument(
        "--worker", type=int, default=0, help="this worker's index, for workers started by hand (seeds its sampler)"
    )
    s.add_argument("--dry-run", action="store_true", help="validate the search and show its trials so far")
    s.set_defaults(fn=_search)

    s = sub.add_parser("make-data", help="generate a synthetic video dataset in the DAVIS 2017 layout")
    s.add_argument("--out", required=True)
    s.add_argument("--sequences", type=int, default=8)
    s.add_argument("--frames", type=int, default=12)
    s.add_argument("--size", default="256x144", help="WxH")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_make_data)

    s = sub.add_parser(
        "make-checkpoint", help="write random weights of a SAM2 config in the released checkpoint format"
    )
    s.add_argument("--model", required=True, help="config name, e.g. sam2.1_hiera_t")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_make_checkpoint)

    s = sub.add_parser("eval-vos", help="score predicted masks against DAVIS or SA-V ground truth (J&F)")
    s.add_argument("--format", choices=["davis", "sav"], default="davis", help="ground-truth and prediction layout")
    s.add_argument("--root", "--davis-root", dest="root", required=True, help="DAVIS 2017 or SA-V (val) folder")
    s.add_argument(
        "--results",
        required=True,
        help="predictions: <sequence>/<frame>.png palette PNGs (davis), <video>/<object>/<frame>.png (sav)",
    )
    s.add_argument("--split", default="val", help="davis: ImageSets/2017/<split>.txt; sav: sav_<split>.txt if present")
    s.add_argument("--resolution", default="480p")
    s.add_argument("--out", help="per-object CSV to write")
    s.add_argument("--allow-missing", action="store_true", help="score missing prediction frames as empty")
    s.add_argument("--json", action="store_true", help="the summary as JSON, at full precision")
    s.set_defaults(fn=_eval_vos)

    s = sub.add_parser("eval-coco", help="score a COCO results JSON of masks (mask mIoU and COCOeval mask AP)")
    s.add_argument("--annotations", required=True, help="COCO instances JSON, e.g. instances_val2017.json")
    s.add_argument("--results", required=True, help="results JSON: [{image_id, category_id, segmentation, score}]")
    s.add_argument("--json", action="store_true", help="the metrics as JSON, at full precision")
    s.set_defaults(fn=_eval_coco)

    s = sub.add_parser("export", help="quantize + calibrate one run of a suite and write its packed model")
    s.add_argument("suite")
    s.add_argument("overrides", nargs="*", help="dotted overrides")
    s.add_argument("--run", required=True, help="run name or run_key (see `qbench suite NAME --dry-run`)")
    s.add_argument("--out", required=True, help="file to write (load with harness.runner.load_packed)")
    s.add_argument(
        "--fp-dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="float32 reloads bit-exactly; bfloat16 is the deployment size",
    )
    s.add_argument("--results", default="results", help="where generated calibration data lives")
    s.set_defaults(fn=_export)

    s = sub.add_parser("inspect", help="per-module quantization plan of a model, with size totals")
    s.add_argument("model", help="model name, e.g. sam2.1_hiera_t or sam2_small")
    s.add_argument("overrides", nargs="*", help="dotted overrides, e.g. quant.weight_bits=2 quant.act_bits=4")
    s.add_argument("--suite", help="take quant and method settings from this suite's base")
    s.add_argument("--json", action="store_true", help="one JSON document instead of a table")
    s.add_argument("--results", default="results", help="where generated calibration data lives (data-driven plans)")
    s.set_defaults(fn=_inspect)

    s = sub.add_parser("pretrain-proxy", help="train the embedded default (sam2_small) from scratch and ship it")
    s.add_argument("overrides", nargs="*", help="dotted overrides of harness/configs/pretrain_proxy.yaml")
    s.add_argument("--out", default=str(Path(__file__).parent / "checkpoints"), help="folder of weights + card")
    s.add_argument("--results", default="results", help="MLflow records, checkpoints to resume from")
    s.add_argument("--card-only", action="store_true", help="only re-score the shipped weights for their card")
    s.set_defaults(fn=_pretrain)

    s = sub.add_parser(
        "bench",
        help="time of the fake-quantized model over FP, in one run: evaluation, or a QAT step (--train)",
        description="Evaluation (default): median time of the image path and of one video tracking step, "
        "quantized by --method over FP. --train: median time of one training step of LSQ W4A4, PACT W4A8 and "
        "Q-SAM2 W2A8 over one FP training step (sam2_small: 4 clips x 4 frames; sam2 models: 1 clip x 2 frames). "
        "--kernels: W8A8, W4A16, ... through torchao's integer kernels beside FP and the fake-quantized model.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    s.add_argument(
        "overrides", nargs="*", help="quant overrides for evaluation, e.g. quant.weight_bits=4 quant.act_bits=8"
    )
    s.add_argument(
        "--models", "--model", nargs="+", help="model names (default: sam2_small sam2.1_hiera_t; --kernels: sam2_small)"
    )
    s.add_argument("--image-size", type=int, default=512, help="image size of the sam2 models (not sam2_small)")
    s.add_argument("--method", default="rtn", help="quantization method of the evaluation benchmark")
    s.add_argument("--train", action="store_true", help="time QAT training steps instead of evaluation")
    s.add_argument(
        "--kernels",
        action="store_true",
        help="convert the policy's Linear layers to torchao's integer kernels and measure FP / fake-quant / converted: "
        "latency, peak memory and agreement per setting (docs/kernels.md; needs the [kernels] extra)",
    )
    s.add_argument("--settings", help="--kernels: some of W8A8,W4A16,W4A8,W4A4,W2A8 (default: all)")
    s.add_argument("--checkpoint", help="--kernels: the model's checkpoint (default: the embedded one, or random)")
    s.add_argument("--repeats", type=int, default=5, help="timed repeats (--train: rounds of steps) after a warm-up")
    s.add_argument("--json", action="store_true", help="print the results as JSON")
    s.add_argument("--clips", help="--train: clips x frames per step, e.g. 1x2 (default: by model)")
    s.add_argument("--cases", help="--train: METHOD:W:A,... (default lsq:4:4,pact:4:8,qsam2:2:8; '' for FP alone)")
    s.add_argument("--breakdown", action="store_true", help="--train: bytes saved for backward, by module")
    s.add_argument("--limit-gb", type=float, help="--train on CPU: stop when resident memory passes this")
    s.add_argument("--results", default="results", help="--train: the results folder its figures are kept in")
    s.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda where there is one, else cpu")
    s.set_defaults(fn=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    # Dotted overrides may come after options (`suite smoke --dry-run quant.act_bits=6`).
    args, extra = p.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra)):
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides += extra
    # sam2 logs every image embedding at INFO on the root logger; only ours speaks at INFO.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("qbench").setLevel(logging.INFO)
    # Import-time notices of brevitas's optional CUDA / Hadamard kernels say nothing about a run.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message="fast_hadamard_transform package not found")
    try:
        with interrupts.handled():
            return args.fn(args)
    except QBenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the run in flight was recorded as KILLED on the way out
        print(f"interrupted: qbench {args.command} stopped; a run in progress is recorded as KILLED", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
