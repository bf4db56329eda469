"""Tables and figures of a suite, read back from MLflow into results/<suite>/.

Only the latest FINISHED run of each run_key in the suite's current expansion counts, so a report
shows exactly what the suite file declares, whatever else the database holds. Runs that differ only
in `seed` are pooled: their mean over n runs, with the 95% bootstrap interval over sequences (COCO:
images) of the runs' per_object.csv (harness/stats.py), and each cell's difference to the reference
row (`report.baseline`) with its paired interval. A record without per_object.csv shows mean ± std.
"""

from __future__ import annotations

import logging
import os
import tempfile
import zlib
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per run's per_object.csv
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

import methods  # noqa: E402
from harness import stats  # noqa: E402
from harness.config import Suite  # noqa: E402
from harness.errors import ConfigError
from harness.evaluate import catalog  # noqa: E402
from harness.evaluate import registry as evaluators  # noqa: E402

log = logging.getLogger("qbench")

FIGURES = ("ablation", "bits_vs_metric", "size_vs_metric", "train_curve")
# Fixed per method so that a method looks the same in every figure of every suite.
COLOURS = {"fp": "black", "rtn": "#1f77b4", "lsq": "#ff7f0e", "pact": "#2ca02c", "qsam2": "#d62728"}
COLOURS |= {"ptq4sam": "#9467bd", "mixqsam": "#8c564b"}
MARKERS = {"fp": "", "rtn": "o", "lsq": "s", "pact": "^", "qsam2": "D", "ptq4sam": "v", "mixqsam": "P"}
FALLBACK_COLOURS = ("#e377c2", "#17becf", "#bcbd22", "#7f7f7f")
FALLBACK_MARKERS = ("X", "<", ">", "h")
STYLE = {
    "font.size": 8,
    "axes.labelsize": 8,
    "legend.fontsize": 7,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "lines.linewidth": 1.2,
    "lines.markersize": 4,
    "errorbar.capsize": 2,
    "pdf.fonttype": 42,  # TrueType in the PDF: editable text, accepted by publishers
}
FIGSIZE, DPI = (3.4, 2.6), 300
ERRORBARS = {"elinewidth": 0.7, "capthick": 0.7}  # thinner than the lines: intervals, not the data


def report(suite: Suite, results_dir="results") -> dict[str, Path]:
    """Write table.{md,tex,csv} and the declared figures (PNG + PDF); returns file name -> path."""
    df, params = load_runs(suite, results_dir)
    where = f"{suite.path}: report"
    spec = suite.report or {}
    table_spec = {"rows": "method.name", "cols": "quant.weight_bits", **(spec.get("table") or {})}
    if table_spec.get("metric") is None:
        table_spec["metric"] = evaluators.get(suite.runs[0].config["data"]["eval"]["kind"]).main
    for key in ("rows", "cols"):
        _check_param(table_spec[key], params, df, f"{where}.table.{key}")
    out = Path(results_dir) / suite.name
    out.mkdir(parents=True, exist_ok=True)
    metric = _metric(table_spec["metric"], df, f"{where}.table.metric")
    rows, cols = table_spec["rows"], table_spec["cols"]
    written = write_table(df, params, rows, cols, metric, out, suite.name, baseline=spec.get("baseline"), where=where)
    versions = out / "versions.md"
    lines = [f"Versions, commit and device of the {len(df)} runs this report reads (from their records).", ""]
    lines += [f"- {k}: {', '.join(v)}" for k, v in df.attrs["versions"].items()]
    versions.write_text("\n".join(lines) + "\n")
    written["versions.md"] = versions
    for i, fig in enumerate(spec.get("figures") or []):
        written |= figure(df, params, fig, table_spec["metric"], out, f"{where}.figures[{i}]")
    return written


def load_runs(suite: Suite, results_dir) -> tuple[pd.DataFrame, list[str]]:
    """One row per run of the suite (params typed, metrics as logged), in suite order."""
    db = Path(results_dir).resolve() / "mlflow.db"
    missing = ConfigError(f"no FINISHED runs of suite {suite.name} in {db}; run `nox -s suite -- {suite.name}` first")
    if not db.is_file():
        raise missing
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name(suite.name)
    found = (
        client.search_runs(
            [exp.experiment_id],
            "tags.kind = 'run' and attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=50000,
        )
        if exp
        else []
    )
    latest = {}
    for run in found:
        latest.setdefault(run.data.tags.get("run_key"), run)
    runs = [latest[s.run_key] for s in suite.runs if s.run_key in latest]
    if not runs:
        raise missing
    if len(runs) < len(suite.runs):
        log.warning("report %s: %d of %d runs have no FINISHED record", suite.name, len(runs), len(suite.runs))
    params = list(dict.fromkeys(k for r in runs for k in r.data.params))
    df = pd.DataFrame([{**r.data.params, **r.data.metrics, "run_id": r.info.run_id} for r in runs])
    df.attrs["metrics"] = {k for r in runs for k in r.data.metrics}
    df.attrs["tracking_uri"] = f"sqlite:///{db}"
    df.attrs["per_object"] = PerObject(df.attrs["tracking_uri"])
    df.attrs["versions"] = {
        k: sorted({r.data.tags[k] for r in runs if k in r.data.tags})
        for k in sorted({k for r in runs for k in r.data.tags if k.startswith(("version.", "git_commit", "device"))})
    }
    for key in params:  # MLflow stores params as text; numbers must sort and plot as numbers
        try:
            df[key] = pd.to_numeric(df[key])
        except (ValueError, TypeError):
            pass
    if {"quant.weight_bits", "quant.act_bits"} <= set(params):
        df["quant.wa"] = [f"W{w}A{a}" for w, a in zip(df["quant.weight_bits"], df["quant.act_bits"])]
        params.append("quant.wa")
    if set(DERIVED["method.parts"][1:]) & set(params):
        df["method.parts"] = [methods.label(r) for r in df.to_dict("records")]
        params.append("method.parts")
    return df, params


def _check_param(key, params: list[str], df: pd.DataFrame, where: str) -> None:
    if key not in params:
        swept = ", ".join(_swept(df, params)) or "none"
        raise ConfigError(f"{where}: {key!r} is not a run parameter; expected a swept key ({swept}) or another param")


# Keys made of others (load_runs adds them): a table or figure that uses one does not split by its parts.
DERIVED = {
    "quant.wa": ("quant.weight_bits", "quant.act_bits"),
    # A method's row label (methods.base.Method.label) and the parameters it reads.
    "method.parts": (
        "method.name",
        *dict.fromkeys(f"method.{k}" for m in methods.REGISTRY.values() for k in m.label_keys),
    ),
}


def _swept(df: pd.DataFrame, params: list[str], using=()) -> list[str]:
    """Keys that vary between runs, less derived keys not in `using` and the parts of those that are."""
    # A method's own knobs are absent (NaN) for other methods: absence is no sweep.
    parts = {p for k in using for p in DERIVED.get(k, ())}
    skip = parts | {k for k in DERIVED if k not in using}
    return [k for k in params if k not in skip and df[k].nunique() > 1]


def _splitting(df: pd.DataFrame, params: list[str], by: list[str]) -> list[str]:
    """Keys that tell apart runs which grouping by `by` would pool (seeds aside), in param order,
    each only if the keys before it do not already: a method's training knobs or qkv_bits (set by
    act_bits) do not split rows or lines; LSQ+ beside LSQ does."""
    extra: list[str] = []
    for key in params:
        if key in by or key == "seed" or df.empty:
            continue
        if (df.groupby([*by, *extra], dropna=False, sort=False)[key].nunique(dropna=False) > 1).any():
            extra.append(key)
    return extra


def _knobs(keys, values) -> list[str]:
    """key=value labels, without the knobs a method does not have (NaN)."""
    return [f"{_short(k)}={v}" for k, v in zip(keys, values) if not pd.isna(v)]


def _metric(alias: str, df: pd.DataFrame, where: str) -> catalog.Info:
    """A named metric, or any other metric these runs logged (printed as logged)."""
    try:
        info = catalog.find(alias, where=where)
    except ConfigError:
        if alias not in df.attrs["metrics"]:
            raise
        return catalog.Info(alias, label=alias)
    if info.key not in df.attrs["metrics"]:  # e.g. agreement, which runs with eval.agreement false do not record
        raise ConfigError(f"{where}: {alias!r}: no run of the table recorded {info.key}")
    return info


def _aggregate(df: pd.DataFrame, by: list[str], metric) -> pd.DataFrame:
    """mean, std (ddof=1; NaN for n=1), n and the run ids of the scaled metric per group, in first-seen order."""
    values = df.assign(value=df[metric.key] * metric.scale)
    if not by:
        values = values.assign(_all=0)
        by = ["_all"]
    g = values.groupby(by, sort=False, dropna=False)
    out = g["value"].agg(mean="mean", std="std", n="count")
    out["runs"] = g["run_id"].agg(list)
    return out.reset_index()


class PerObject:
    """Each run's per_object.csv artifact, read through the MLflow client once, and the pooled
    per-object values of a group of runs; where they cannot be had, a line saying why instead."""

    def __init__(self, tracking_uri: str):
        self.client = MlflowClient(tracking_uri)
        self.frames: dict[str, pd.DataFrame | str] = {}
        self.cells: dict[tuple, pd.Series | str] = {}
        self.unit = None  # "sequences" or "images", from the first frame read

    def __deepcopy__(self, memo):  # pandas deep-copies attrs into every derived frame: one cache for all
        return self

    def frame(self, run_id: str, artifact: str = "per_object.csv") -> pd.DataFrame | str:
        """The run's per-object frame (per_object.csv, or an agreement metric's
        per_object_agreement.csv), or why there is none."""
        key = run_id if artifact == "per_object.csv" else (run_id, artifact)
        if key not in self.frames:
            try:
                if artifact not in {f.path for f in self.client.list_artifacts(run_id)}:
                    self.frames[key] = f"no {artifact} in the record"
                else:
                    with tempfile.TemporaryDirectory() as tmp:
                        path = self.client.download_artifacts(run_id, artifact, tmp)
                        self.frames[key] = pd.read_csv(path, dtype={"sequence": str})
                    self.unit = self.unit or stats.unit_name(self.frames[key])
            except (MlflowException, OSError, ValueError) as e:  # an unreadable artifact: no interval, no crash
                self.frames[key] = f"{artifact} unreadable ({type(e).__name__}: {e})"
        return self.frames[key]

    def pooled(self, df: pd.DataFrame, run_ids: list[str], metric) -> pd.Series | str:
        """Each object's value averaged over the runs (harness.stats.pool), or why there is none."""
        key = (metric.key, *run_ids)
        if key not in self.cells:
            self.cells[key] = self._pool(df, run_ids, metric)
        return self.cells[key]

    def _pool(self, df: pd.DataFrame, run_ids: list[str], metric) -> pd.Series | str:
        runs = df.set_index("run_id")
        found = {}
        artifact = getattr(metric, "artifact", "per_object.csv")
        for run_id in run_ids:
            frame = self.frame(run_id, artifact)
            if isinstance(frame, str):
                return frame
            try:  # an agreement metric's per-object table has the columns of per_object.csv
                v = stats.values(frame, getattr(metric, "source", metric.key))
            except ValueError as e:
                return str(e)
            if v is None:
                return f"{metric.key} is not a mean over objects"
            logged = runs.at[run_id, metric.key] if metric.key in runs else float("nan")
            # A record whose objects do not average to its logged metric is not this metric's sample.
            if not np.isclose(v.mean(), logged, rtol=1e-9, atol=1e-9):
                return f"{artifact} does not average to the logged {metric.key}"
            seed = runs.at[run_id, "seed"] if "seed" in runs else None
            found[f"seed {seed}" if f"seed {seed}" not in found else f"run {run_id}"] = v
        try:
            return stats.pool(found)
        except ValueError as e:
            return str(e)


def _intervals(agg: pd.DataFrame, df: pd.DataFrame, metric) -> pd.DataFrame:
    """agg with ci_lo, ci_hi (scaled; NaN without one), units and no_ci (why there is none) per group."""
    loader, out = df.attrs["per_object"], []
    for runs in agg["runs"]:
        v = loader.pooled(df, runs, metric)
        if isinstance(v, str):
            out.append((float("nan"), float("nan"), float("nan"), v))
            continue
        iv = stats.bootstrap(v)
        out.append((iv.lo * metric.scale, iv.hi * metric.scale, iv.units, ""))
    cols = ["ci_lo", "ci_hi", "units", "no_ci"]
    return agg.assign(**{c: [o[i] for o in out] for i, c in enumerate(cols)})


def _yerr(agg: pd.DataFrame) -> np.ndarray:
    """Error bars: the 95% bootstrap interval where a group has one, else the seeds' std (0 for one run)."""
    lo = (agg["mean"] - agg["ci_lo"]).fillna(agg["std"]).fillna(0)
    hi = (agg["ci_hi"] - agg["mean"]).fillna(agg["std"]).fillna(0)
    return np.clip(np.vstack([lo, hi]), 0, None)  # matplotlib refuses negative lengths


def _short(key: str) -> str:
    """method.name -> method, quant.weight_bits -> weight_bits."""
    parts = key.split(".")
    return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]


# --- table ------------------------------------------------------------------------------------------


def table_frame(df, params, rows: str, cols: str, metric, baseline=None, where="report") -> pd.DataFrame:
    """Long form, one row per cell: row, col, mean, std, n, ci_lo, ci_hi, diff, diff_lo, diff_hi,
    significant, reference (and runs, units, no_ci, no_diff for the notes). The fp runs make the
    first row; differences are to the row `baseline` (default: fp if there, else best_row)."""
    fp = df["method.name"] == "fp"
    # fp's own params (e.g. the bits it ignores) do not split the quantized rows.
    extra = _splitting(df[~fp], params, [rows, cols])
    cells = _aggregate(df[~fp], [rows, *extra, cols], metric)
    cells["row"] = [", ".join([str(r[rows]), *_knobs(extra, [r[k] for k in extra])]) for _, r in cells.iterrows()]
    keep = ["row", "col", "mean", "std", "n", "runs"]
    cells = cells.rename(columns={cols: "col"})[keep]
    # fp's normalized quant section (W8A8) is no column of its own when quantized runs exist.
    col_order = list(dict.fromkeys(df[~fp][cols] if (~fp).any() else df[cols]))
    # No fp row for a metric fp does not record (agreement with the FP model, 1 by definition, not computed).
    if fp.any() and df.loc[fp, metric.key].notna().any():
        # fp has no bit-width: where it was not run at a column's value, its pooled runs stand in.
        ref = []
        for col in col_order:
            at = df[fp & (df[cols] == col)]
            ref.append(_aggregate(at if len(at) else df[fp], [], metric).assign(row="fp", col=col))
        cells = pd.concat([pd.concat(ref)[keep], cells], ignore_index=True)
    cells = _intervals(cells, df, metric)
    reference = _reference(cells, baseline, metric, where)
    at = {c: i for i, (r, c) in enumerate(zip(cells["row"], cells["col"])) if r == reference}
    pooled, diffs = df.attrs["per_object"].pooled, []
    for r in cells.to_dict("records"):
        j = at.get(r["col"])
        if j is None or r["row"] == reference:
            diffs.append((float("nan"),) * 3 + (None, ""))
            continue
        ref_runs, d = cells.at[j, "runs"], r["mean"] - cells.at[j, "mean"]
        a, b = pooled(df, r["runs"], metric), pooled(df, ref_runs, metric)
        if isinstance(a, str) or isinstance(b, str):  # the note on cells without intervals names it
            diffs.append((d, float("nan"), float("nan"), None, ""))
            continue
        try:
            iv = stats.bootstrap(a, b)
        except ValueError as e:  # other objects than the reference's: no paired difference
            diffs.append((d, float("nan"), float("nan"), None, str(e)))
            continue
        diffs.append((d, iv.lo * metric.scale, iv.hi * metric.scale, iv.significant, ""))
    for i, c in enumerate(["diff", "diff_lo", "diff_hi", "significant", "no_diff"]):
        cells[c] = [d[i] for d in diffs]
    cells["reference"] = reference
    cells["col"] = pd.Categorical(cells["col"], col_order)
    return cells


def _reference(cells: pd.DataFrame, baseline, metric, where: str) -> str:
    names = list(dict.fromkeys(cells["row"]))
    if baseline is not None:
        if str(baseline) not in names:
            raise ConfigError(
                f"{where}.baseline: {baseline!r} is not a row of the table; expected one of {', '.join(names)}"
            )
        return str(baseline)
    return "fp" if "fp" in names else best_row(cells, metric)


def best_row(cells: pd.DataFrame, metric) -> str:
    """The row with a value in the most columns and, among those, the best mean of its cells
    (highest; lowest for a lower-is-better metric), the first in table order on a tie."""
    by_row = cells.dropna(subset=["mean"]).groupby("row", sort=False)["mean"].agg(["count", "mean"])
    top = by_row[by_row["count"] == by_row["count"].max()]["mean"]
    return top.idxmin() if metric.lower_is_better else top.idxmax()


def _cell(r, decimals: int, bold: bool, tex: bool, mixed_n: bool) -> str:
    if pd.isna(r["mean"]):
        return "--" if tex else "–"
    pm = "$\\pm$" if tex else " ± "

    def num(v) -> str:
        return f"{v:.{decimals}f}"

    s = num(r["mean"])
    if pd.notna(r["ci_lo"]):  # the interval's half-width; table.csv has its ends
        s += pm + num((r["ci_hi"] - r["ci_lo"]) / 2)
    elif r["n"] > 1:
        s += pm + num(r["std"])
    s = (f"\\textbf{{{s}}}" if tex else f"**{s}**") if bold else s
    if pd.notna(r["diff"]):
        d = f"{r['diff']:+.{decimals}f}" + (
            pm + num((r["diff_hi"] - r["diff_lo"]) / 2) if pd.notna(r["diff_lo"]) else ""
        )
        mark = ("$^\\dagger$" if tex else "†") if r["significant"] is True else ""
        s += f" {{\\scriptsize ({d.replace('-', '$-$')}){mark}}}" if tex else f" ({d}){mark}"
    return s + (f" [n={r['n']}]" if mixed_n else "")


def _notes(cells: pd.DataFrame, metric, unit: str | None) -> list[str]:
    """The lines under a table: what its numbers are (unit, spread, difference, resampling, seeds) and
    which cells have no interval, and why."""
    reference, has_ci, has_diff = cells["reference"].iloc[0], cells["ci_lo"].notna(), cells["diff_lo"].notna()
    ppt = " in percentage points (ppt)" if metric.scale == 100 else ""
    diff = f"(d) = difference to {reference} (ref.){ppt}"
    if has_diff.any():
        diff = f"(d ± h) = difference to {reference} (ref.){ppt}, paired by object, ± the half-width of its 95%"
        diff += " interval, † where that interval excludes 0"
    spread = "the half-width of its 95% bootstrap interval" if has_ci.any() else "std over seeds"
    n = sorted(set(cells["n"]))
    seeds = f"{n[0]} seed{'s' * (n[0] != 1)} per cell" if len(n) == 1 else "seeds per cell in brackets [n=...]"
    lines = [f"{metric.label}: mean ± {spread}; {diff}; best per column in bold; {seeds}."]
    if has_ci.any():
        units = sorted(set(cells["units"].dropna().astype(int)))
        count = f"{units[0]}" if len(units) == 1 else f"{units[0]} to {units[-1]}"
        lines.append(
            f"Intervals: percentile bootstrap, B = {stats.RESAMPLES} resamples of the {count} {unit} "
            f"(each with all its objects and seeds), seed {stats.SEED}."
        )
    lacking = cells[~has_ci & cells["mean"].notna()]
    if len(lacking):
        why: dict[str, list[str]] = {}
        for r in lacking.itertuples():
            why.setdefault(r.no_ci, []).append(f"{r.row} @ {r.col}")
        every = len(why) == 1 and not has_ci.any()
        named = [f"{'every cell' if every else ', '.join(c)} ({w})" for w, c in why.items()]
        lines.append(f"Without intervals (mean ± std over seeds): {'; '.join(named)}.")
    unpaired = [f"{r.row} @ {r.col}: {r.no_diff}" for r in cells.itertuples() if r.no_diff]
    if unpaired:
        lines.append(f"No paired difference: {'; '.join(unpaired)}.")
    return lines


def write_table(
    df, params, rows: str, cols: str, metric, out: Path, suite: str, baseline=None, where="report"
) -> dict[str, Path]:
    cells = table_frame(df, params, rows, cols, metric, baseline, where)
    name, decimals, label = metric.key, metric.decimals, metric.label
    csv = ["row", "col", "mean", "std", "n", "ci_lo", "ci_hi", "diff", "diff_lo", "diff_hi", "significant", "reference"]
    cells[csv].rename(columns={"row": rows, "col": cols}).assign(metric=name).to_csv(out / "table.csv", index=False)
    quant = cells["row"] != "fp"
    best = cells[quant].groupby("col", observed=True)["mean"].transform(metric.direction)
    cells["bold"] = quant & (cells["mean"] == best.reindex(cells.index))
    mixed = cells["n"].nunique() > 1
    col_order = list(cells["col"].cat.categories)
    row_order = list(dict.fromkeys(cells["row"]))
    reference = cells["reference"].iloc[0]
    grid = {(r["row"], r["col"]): r for _, r in cells.iterrows()}
    row_leaf, col_leaf = _short(rows), _short(cols)
    notes = _notes(cells, metric, df.attrs["per_object"].unit)

    def body(tex: bool) -> list[list[str]]:
        lines = []
        for row in row_order:
            shown = f"{row} (ref.)" if row == reference else row
            got = [grid.get((row, c)) for c in col_order]
            lines.append(
                [shown]
                + [_cell(g, decimals, g["bold"], tex, mixed) if g is not None else "--" if tex else "–" for g in got]
            )
        return lines

    md = [f"**{suite}** — {label} by {rows} (rows) and {cols} (columns)", ""]
    md.append("| " + " | ".join([f"{row_leaf} \\ {col_leaf}", *map(str, col_order)]) + " |")
    md.append("|" + "---|" + "---:|" * len(col_order))
    md += ["| " + " | ".join(line) + " |" for line in body(tex=False)]
    (out / "table.md").write_text("\n".join([*md, *(x for note in notes for x in ("", note)), ""]))

    def esc(s) -> str:
        return str(s).replace("\\", "\\textbackslash{}").replace("_", "\\_").replace("&", "\\&").replace("%", "\\%")

    k = len(col_order)
    plain = [n.replace("±", "+/-").replace("†", "dagger") for n in notes]
    tex = [f"% {suite}: {plain[0]}", *(f"% {n}" for n in plain[1:])]
    tex += [f"\\begin{{tabular}}{{l{'c' * k}}}", "\\toprule"]
    tex += [f" & \\multicolumn{{{k}}}{{c}}{{{esc(col_leaf)}}} \\\\", f"\\cmidrule(lr){{2-{k + 1}}}"]
    tex += [" & ".join([esc(row_leaf), *map(esc, col_order)]) + " \\\\", "\\midrule"]
    for row, line in zip(row_order, body(tex=True)):
        tex.append(" & ".join([esc(line[0]), *line[1:]]) + " \\\\")
        if row == "fp" and len(row_order) > 1:
            tex.append("\\midrule")
    (out / "table.tex").write_text("\n".join([*tex, "\\bottomrule", "\\end{tabular}", ""]))
    return {f: out / f for f in ("table.md", "table.tex", "table.csv")}


# --- figures ----------------------------------------------------------------------------------------


def style(method: str) -> dict:
    h = zlib.crc32(method.encode())  # stable across processes, unlike hash()
    colour = COLOURS.get(method, FALLBACK_COLOURS[h % len(FALLBACK_COLOURS)])
    return {"color": colour, "marker": MARKERS.get(method, FALLBACK_MARKERS[h % len(FALLBACK_MARKERS)])}


def figure(df, params, fig_spec, default_metric: str, out: Path, where: str) -> dict[str, Path]:
    fig_spec = {"name": fig_spec} if isinstance(fig_spec, str) else dict(fig_spec or {})
    name = fig_spec.get("name")
    if name not in FIGURES:
        raise ConfigError(f"{where}: unknown figure {name!r}; expected one of {', '.join(FIGURES)}")
    unknown = set(fig_spec) - {"name", "x", "metric", "runs"}
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}; expected name, x, metric, runs")
    if name == "train_curve":
        return _train_curve_figure(df, params, fig_spec, out, where)
    alias = fig_spec.get("metric", default_metric)
    metric = _metric(alias, df, f"{where}.metric")
    x = fig_spec.get("x", "quant.weight_bits" if name == "bits_vs_metric" else None)
    if name == "ablation" and x is None:
        raise ConfigError(f"{where}: ablation needs x: the swept dotted key to plot against")
    if x is not None and name != "size_vs_metric":
        _check_param(x, params, df, f"{where}.x")
    stem = f"{name}_{x.replace('.', '-')}_{alias}" if name == "ablation" else f"{name}_{alias}"
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=FIGSIZE, layout="constrained")
        if name == "size_vs_metric":
            _size_vs_metric(ax, df, params, metric)
        else:
            _lines(ax, df, params, x, metric)
        ax.set_ylabel(metric.label)
        ax.grid(True, which="both")
        # fp first, the Pareto front last, methods in suite order between (matplotlib groups by artist type).
        handles, labels = ax.get_legend_handles_labels()
        order = sorted(range(len(labels)), key=lambda i: (labels[i] != "fp") + (labels[i] == "Pareto front"))
        # As many columns as fit the figure's width: an entry is about 3.6 em + 0.55 em per character.
        entry_pt = 7 * (3.6 + 0.55 * max(map(len, labels)))
        ncols = max(1, min(len(labels), int(FIGSIZE[0] * 72 // entry_pt)))
        fig.legend(
            [handles[i] for i in order],
            [labels[i] for i in order],
            loc="outside upper center",
            ncols=ncols,
            frameon=False,
            handlelength=1.8,
            columnspacing=1.0,
        )
        return _save(fig, out, stem)


def _save(fig, out: Path, stem: str) -> dict[str, Path]:
    paths = {f"{stem}.{ext}": out / f"{stem}.{ext}" for ext in ("png", "pdf")}
    for path in paths.values():
        fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return paths


def _train_curve_figure(df, params, spec: dict, out: Path, where: str) -> dict[str, Path]:
    """The logged training curve (`metric`, default train/loss) of every training run that matches
    `runs` ({dotted key: value}), one line per run, against the training step."""
    metric = spec.get("metric", "train/loss")
    runs = df[df["train_final_loss"].notna()] if "train_final_loss" in df else df.iloc[:0]
    for key, value in (spec.get("runs") or {}).items():
        _check_param(key, params, df, f"{where}.runs")
        runs = runs[runs[key].astype(str) == str(value)]
    if runs.empty:
        raise ConfigError(f"{where}: no finished training run matches runs={spec.get('runs')}")
    client = MlflowClient(df.attrs["tracking_uri"])
    extra = _splitting(runs, params, ["method.name"])
    stem = "train_curve_" + metric.replace("/", "-")
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=FIGSIZE, layout="constrained")
        for i, (_, r) in enumerate(runs.iterrows()):
            history = client.get_metric_history(r["run_id"], metric)
            if not history:
                raise ConfigError(f"{where}: run {r['run_id']} logged no {metric!r}")
            steps, values = zip(*sorted((h.step, h.value) for h in history))
            st = {**style(r["method.name"]), "marker": None}
            label = _series_label((r["method.name"], *(r[k] for k in extra)), extra)
            ax.plot(steps, values, label=label, lw=1.0, ls=["-", "--", ":", "-."][i % 4], **st)
        ax.set_xlabel("training step")
        ax.set_ylabel(metric)
        ax.grid(True)
        fig.legend(loc="outside upper center", ncols=2, frameon=False, fontsize=6)
        return _save(fig, out, stem)


def _series_label(key, extra: list[str]) -> str:
    key = key if isinstance(key, tuple) else (key,)
    return ", ".join([str(key[0]), *_knobs(extra, key[1:])])


def _lines(ax, df, params, x: str, metric) -> None:
    """One line per method (and per other swept knob), with the cells' intervals as error bars; fp as a
    dashed reference with its interval as a band."""
    fp = df["method.name"] == "fp"
    quant = df[~fp & df[x].notna()]
    extra = _splitting(quant, params, ["method.name", x])
    agg = _intervals(_aggregate(quant, ["method.name", *extra, x], metric), df, metric)
    numeric = pd.api.types.is_numeric_dtype(quant[x]) and len(quant) > 0
    ticks = sorted(quant[x].unique()) if numeric else []
    scale = _x_scale(ticks) if numeric else "linear"
    position = {t: i for i, t in enumerate(ticks)}  # the "even" scale: one step per value
    styles = ["-", "--", ":", "-."]
    for i, (key, s) in enumerate(agg.groupby(["method.name", *extra], sort=False, dropna=False)):
        # numbers in order; labels (W2A8, ...) in the suite's order, as the table's columns
        s = s.sort_values(x) if numeric else s
        xs = (s[x].map(position) if scale == "even" else s[x]) if numeric else s[x].astype(str)
        st = style(str(key[0] if isinstance(key, tuple) else key))
        ax.errorbar(xs, s["mean"], yerr=_yerr(s), label=_series_label(key, extra), **st, **ERRORBARS, ls=styles[i % 4])
    if numeric:
        if scale == "log2":
            ax.set_xscale("log", base=2)
        ax.set_xticks([position[t] for t in ticks] if scale == "even" else ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
    if fp.any() and df.loc[fp, metric.key].notna().any():  # fp records no agreement with itself
        ref = _intervals(_aggregate(df[fp], [], metric), df, metric)
        ax.axhline(ref["mean"].iloc[0], color="black", ls="--", lw=1.0, label="fp", zorder=1)
        (lo,), (hi,) = ref["mean"].to_numpy() + _yerr(ref) * [[-1], [1]]
        if hi > lo:
            ax.axhspan(lo, hi, color="black", alpha=0.08, lw=0)
    if x == "quant.weight_bits":
        ax.invert_xaxis()  # 8 -> 2 bits left to right in every figure, as in the tables' columns
    ax.set_xlabel({"quant.weight_bits": "weight bits", "quant.wa": "weight / activation bits"}.get(x, x))


def _x_scale(ticks) -> str:
    """log2 for 1, 2, 4, ... (or a range of 16x and more), "even" (evenly spaced values, labelled) where the
    gaps differ by more than 4x (momentum 0, 0.9, 0.99, 0.999), else linear."""
    if ticks[0] > 0:
        ratios = {round(b / a, 6) for a, b in zip(ticks, ticks[1:])}
        if ticks[-1] / ticks[0] >= 16 or len(ratios) == 1 and min(ratios) >= 2:
            return "log2"
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    return "even" if gaps and max(gaps) > 4 * min(gaps) else "linear"


def _size_vs_metric(ax, df, params, metric) -> None:
    """One marker per configuration (seeds pooled); the Pareto front (smaller, better) as a step line."""
    by = [k for k in _swept(df, params) if k != "seed"]
    agg = _intervals(_aggregate(df, by, metric), df, metric)
    agg["size"] = _aggregate(df, by, catalog.RUN["size"])["mean"]
    methods = agg["method.name"] if "method.name" in agg else pd.Series([df["method.name"].iloc[0]] * len(agg))
    # Name each quantized point by what tells it apart from the others (W4, frames=8, ...).
    named = [k for k in _swept(agg[methods.values != "fp"], by) if k != "method.name"]
    for method in dict.fromkeys(methods):
        s = agg[methods.values == method]
        st = style(str(method)) | ({"marker": "*", "markersize": 7} if method == "fp" else {})
        ax.errorbar(s["size"], s["mean"], yerr=_yerr(s), ls="none", label=str(method), **st, **ERRORBARS)
        for _, r in s.iterrows() if method != "fp" else ():
            text = ", ".join(f"W{r[k]}" if k == "quant.weight_bits" else f"{_short(k)}={r[k]}" for k in named)
            ax.annotate(text, (r["size"], r["mean"]), (3, 3), textcoords="offset points", fontsize=6, color=st["color"])
    sign = 1 if metric.direction == "max" else -1
    front, best = [], float("-inf")
    for _, r in agg.sort_values(["size", "mean"], ascending=[True, sign < 0]).iterrows():
        if sign * r["mean"] > best:
            front.append(r)
            best = sign * r["mean"]
    # Held to the largest size: the best reachable within any size budget, which shows what it dominates.
    front = pd.DataFrame([*front, front[-1].copy()])
    front.iloc[-1, front.columns.get_loc("size")] = agg["size"].max()
    ax.step(front["size"], front["mean"], where="post", color="0.4", ls="--", lw=0.9, zorder=3, label="Pareto front")
    ax.set_xlabel(catalog.RUN["size"].label)
