import re
import shutil
import subprocess
import sys

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from PIL import Image

from harness import stats
from harness.config import load_suite
from harness.errors import ConfigError
from harness.evaluate.catalog import find
from harness.report import _lines, best_row, load_runs, report

# fp and rtn at W8/W2 over two seeds (but rtn W8 once: a cell with n=1, and one run less to wait for),
# on about the smallest data the pipeline accepts (one calibration frame leaves the memory attention
# uncalibrated), with 3 val sequences for the bootstrap to resample. Every number is a real MLflow record.
SUITE = """\
name: reptest
base:
  data:
    calib: {{frames: 2}}
    synthetic: {{sequences: 6, frames: 3, size: 64x48}}
matrix:
  method.name: [fp, rtn]
  quant.weight_bits: [8, 2]
  seed: [0, 1]
exclude:
  - {{method.name: fp, quant.weight_bits: 2}}
  - {{method.name: rtn, quant.weight_bits: 8, seed: 1}}
report:
{report}
"""
REPORT = """\
  figures: [bits_vs_metric, size_vs_metric, {name: ablation, x: quant.weight_bits, metric: fps}]
"""


def write_suite(folder, report_yaml=REPORT):
    path = folder / "reptest.yaml"
    path.write_text(SUITE.format(report=report_yaml))
    return path


@pytest.fixture(scope="session")
def recorded(tmp_path_factory):
    """Run the suite once (real runs, recorded in MLflow) and report it; (suite file, results, paths)."""
    tmp = tmp_path_factory.mktemp("report")
    path, results = write_suite(tmp), tmp / "results"
    cmd = [sys.executable, "-m", "harness", "suite", str(path), "--results", str(results)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return path, results, report(load_suite(str(path)), results)


def copy_db(results, tmp_path):
    """A fresh results folder over the same records, so a test's report does not overwrite the fixture's."""
    (tmp_path / "r").mkdir()
    shutil.copy(results / "mlflow.db", tmp_path / "r" / "mlflow.db")
    return tmp_path / "r"


def records(results):
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name("reptest")
    return client, client.search_runs([exp.experiment_id], "tags.kind = 'run' and attributes.status = 'FINISHED'")


def test_table_values_are_the_mlflow_metrics(recorded):
    _, results, paths = recorded
    _, runs = records(results)
    assert len(runs) == 5
    records_ = pd.DataFrame(
        {"method": r.data.params["method.name"], "bits": int(r.data.params["quant.weight_bits"]),
         "seed": int(r.data.params["seed"]), "jf": 100 * r.data.metrics["J_F-mean"]} for r in runs
    )  # fmt: skip
    expected = records_.groupby(["method", "bits"])["jf"].agg(["mean", "std", "count"])
    table = pd.read_csv(paths["table.csv"])
    assert list(table["method.name"]) == ["fp", "fp", "rtn", "rtn"]  # the reference row first
    assert list(table["quant.weight_bits"]) == [8, 2, 8, 2]
    assert (table["metric"] == "J_F-mean").all() and list(table["n"]) == [2, 2, 1, 2]
    assert (table["reference"] == "fp").all()
    fp = expected.loc[("fp", 8)]
    for _, row in table.iterrows():
        # fp ran at 8 bits only: its runs stand for every column.
        want = fp if row["method.name"] == "fp" else expected.loc[("rtn", row["quant.weight_bits"])]
        assert row["n"] == want["count"] and row["mean"] == pytest.approx(want["mean"])
        assert row["std"] == pytest.approx(want["std"], nan_ok=True)  # ddof=1 in both; NaN for n=1
        assert row["ci_lo"] < row["mean"] < row["ci_hi"]
        if row["method.name"] == "rtn":
            assert row["diff"] == pytest.approx(want["mean"] - fp["mean"])
        else:
            assert pd.isna(row["diff"]) and pd.isna(row["significant"])


def test_intervals_are_the_bootstrap_of_the_runs_per_object_csv(recorded, tmp_path):
    """Each cell's interval and paired difference, recomputed from the per_object.csv artifacts."""
    _, results, paths = recorded
    client, runs = records(results)

    def pooled(method, bits=None):
        cell = {}
        for r in runs:
            p = r.data.params
            if p["method.name"] == method and (bits is None or int(p["quant.weight_bits"]) == bits):
                frame = pd.read_csv(client.download_artifacts(r.info.run_id, "per_object.csv", str(tmp_path)))
                cell[f"seed {p['seed']}"] = stats.values(frame, "J_F-mean")
        return stats.pool(cell)

    fp = pooled("fp")
    assert len(fp.index.get_level_values(0).unique()) == 3  # the val sequences: what is resampled
    table = pd.read_csv(paths["table.csv"]).set_index(["method.name", "quant.weight_bits"])
    for bits in (8, 2):
        rtn, row = pooled("rtn", bits), table.loc[("rtn", bits)]
        own, diff = stats.bootstrap(rtn), stats.bootstrap(rtn, fp)
        assert (row["ci_lo"], row["ci_hi"]) == pytest.approx((100 * own.lo, 100 * own.hi))
        assert (row["diff_lo"], row["diff_hi"]) == pytest.approx((100 * diff.lo, 100 * diff.hi))
        assert row["diff"] == pytest.approx(100 * diff.mean) and row["significant"] == diff.significant
    # Min-max at 2-bit weights loses J&F on every sequence: the interval excludes 0.
    assert table.loc[("rtn", 2), "significant"] and table.loc[("rtn", 2), "diff_hi"] < 0


def test_markdown_and_latex(recorded):
    _, _, paths = recorded
    text = paths["table.md"].read_text()
    md = text.splitlines()
    header = next(i for i, line in enumerate(md) if line.startswith("| method \\ weight_bits | 8 | 2 |"))
    assert md[header + 2].startswith("| fp (ref.) |") and md[header + 3].startswith("| rtn |")
    rtn = [cell.strip() for cell in md[header + 3].strip("|").split("|")]
    # n=1 has no std but has an interval over sequences; the difference carries its own.
    assert re.fullmatch(r"\*?\*?\d+\.\d ± \d+\.\d\*?\*? \([+-]\d+\.\d ± \d+\.\d\)†? \[n=1\]", rtn[1]), rtn[1]
    assert re.fullmatch(r"\*?\*?\d+\.\d ± \d+\.\d\*?\*? \(-\d+\.\d ± \d+\.\d\)† \[n=2\]", rtn[2]), rtn[2]
    for part in ("percentage points (ppt)", "† where that interval excludes 0", "B = 2000 resamples of the 3 sequences",
                 "seed 0", "seeds per cell in brackets"):  # fmt: skip
        assert part in text, part
    assert "Without intervals" not in text
    tex = paths["table.tex"].read_text()
    for rule in ("\\toprule", "\\midrule", "\\bottomrule", "\\textbf{", "$\\pm$", "$^\\dagger$"):
        assert rule in tex
    assert "% Intervals: percentile bootstrap, B = 2000" in tex
    body = "\n".join(line for line in tex.splitlines() if not line.startswith("%"))
    assert "weight\\_bits" in body and not re.search(r"(?<!\\)_", body)


def test_error_bars_are_the_intervals(recorded):
    path, results, paths = recorded
    df, params = load_runs(load_suite(str(path)), results)
    fig, ax = plt.subplots()
    _lines(ax, df, params, "quant.weight_bits", find("jf"))
    (bars,) = ax.containers  # rtn's line; fp is the dashed line with its interval as a band
    ends = sorted((x, y0, y1) for (x, y0), (_, y1) in bars.lines[2][0].get_segments())
    plt.close(fig)
    table = pd.read_csv(paths["table.csv"])
    rtn = table[table["method.name"] == "rtn"].sort_values("quant.weight_bits")
    want = rtn[["quant.weight_bits", "ci_lo", "ci_hi"]].to_numpy()
    assert np.ravel(ends) == pytest.approx(want.ravel())


def shadow_without_per_object(results, run):
    """A later FINISHED record of the same run_key without artifacts, as older versions of the harness
    wrote them: the report reads the latest record of each run_key."""
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
    new = client.create_run(run.info.experiment_id, tags=tags).info.run_id
    client.log_batch(
        new,
        metrics=[Metric(k, v, 0, 0) for k, v in run.data.metrics.items()],
        params=[Param(k, v) for k, v in run.data.params.items()],
    )
    client.set_terminated(new, "FINISHED")


def test_records_without_per_object_csv_fall_back_to_mean_and_std(recorded, tmp_path):
    path, results, _ = recorded
    r = copy_db(results, tmp_path)
    _, runs = records(r)
    for run in runs:
        if run.data.params["method.name"] == "rtn" and run.data.params["quant.weight_bits"] == "2":
            shadow_without_per_object(r, run)
    paths = report(load_suite(str(path)), r)
    table = pd.read_csv(paths["table.csv"]).set_index(["method.name", "quant.weight_bits"])
    assert table.loc[("rtn", 2), ["ci_lo", "diff_lo", "significant"]].isna().all()
    assert table.loc[("rtn", 8), ["ci_lo", "diff_lo"]].notna().all()  # the other cells keep theirs
    text = paths["table.md"].read_text()
    assert "Without intervals (mean ± std over seeds): rtn @ 2 (no per_object.csv in the record)." in text
    rtn2 = next(line for line in text.splitlines() if line.startswith("| rtn |")).split("|")[3]
    cell = table.loc[("rtn", 2)]
    assert f"{cell['mean']:.1f} ± {cell['std']:.1f}" in rtn2 and "†" not in rtn2
    assert paths["bits_vs_metric_jf.png"].stat().st_size > 10_000


def test_baseline_row(recorded, tmp_path):
    path, results, _ = recorded
    r = copy_db(results, tmp_path)
    paths = report(load_suite(str(write_suite(tmp_path, "  baseline: rtn\n"))), r)
    table = pd.read_csv(paths["table.csv"]).set_index(["method.name", "quant.weight_bits"])
    assert (table["reference"] == "rtn").all() and table.loc["rtn", "diff"].isna().all()
    # fp against rtn: the same pairs with the sign turned, and the same interval mirrored.
    fp_on_2 = table.loc[("fp", 2)]
    assert fp_on_2["significant"] and fp_on_2["diff_lo"] > 0
    assert "| rtn (ref.) |" in paths["table.md"].read_text()


def test_best_row_is_the_best_mean_among_rows_with_the_most_columns():
    cells = pd.DataFrame({"row": ["a", "a", "b", "b", "c"], "mean": [50.0, 60, 70, 60, 90]})
    assert best_row(cells, find("jf")) == "b"  # c is best but has one column of two
    assert best_row(cells, find("size")) == "a"  # lower is better
    assert best_row(cells.assign(mean=[60.0, 70, 70, 60, 90]), find("jf")) == "a"  # a tie: the first row


def test_figures_are_png_and_pdf(recorded):
    _, _, paths = recorded
    stems = ["bits_vs_metric_jf", "size_vs_metric_jf", "ablation_quant-weight_bits_fps"]
    assert {f"{s}.{ext}" for s in stems for ext in ("png", "pdf")} <= set(paths)
    for stem in stems:
        assert paths[f"{stem}.png"].stat().st_size > 10_000 and paths[f"{stem}.pdf"].stat().st_size > 5_000
        with Image.open(paths[f"{stem}.png"]) as im:
            assert im.size == (1020, 780)  # 3.4 x 2.6 in at 300 dpi


def test_report_shows_only_the_current_expansion(recorded, tmp_path):
    path, results, _ = recorded
    # Narrowed to 8 bits: the W2 records stay in the database but not in the report, and the new
    # rtn W8 seed-1 run, never recorded, is simply missing.
    paths = report(load_suite(str(path), ["quant.weight_bits=8"]), copy_db(results, tmp_path))
    table = pd.read_csv(paths["table.csv"])
    assert list(table["quant.weight_bits"]) == [8, 8] and list(table["n"]) == [2, 1]


def test_errors_name_the_suite_and_key(recorded, tmp_path):
    _, results, _ = recorded
    with pytest.raises(ConfigError, match=r"no FINISHED runs of suite reptest in .*; run `nox -s suite -- reptest`"):
        report(load_suite(str(write_suite(tmp_path))), tmp_path / "empty")
    r = copy_db(results, tmp_path)
    cases = [
        ("  table: {rows: quant.nope}\n", r"report.table.rows: 'quant.nope' is not a run parameter; .*method.name"),
        ("  figures: [bits_vs_metrics]\n", r"unknown figure 'bits_vs_metrics'; expected one of ablation, bits_vs_met"),
        ("  figures: [{name: ablation, metric: fps}]\n", r"report.figures\[0\]: ablation needs x"),
        ("  table: {metric: jff}\n", r"reptest.yaml: report.table.metric: unknown metric 'jff'; expected one"),
        (
            "  baseline: lsq\n",
            r"reptest.yaml: report.baseline: 'lsq' is not a row of the table; expected one of fp, rtn$",
        ),
        ("  baseline: [fp]\n", r"reptest.yaml: report.baseline: value error, expected a row of the table: a method na"),
    ]
    for section, message in cases:
        with pytest.raises(ConfigError, match=message):
            report(load_suite(str(write_suite(tmp_path, section))), r)
