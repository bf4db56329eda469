import re
import shutil
import subprocess
import sys

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from harness.config import load_suite
from harness.errors import ConfigError
from harness.report import report

# fp and rtn at W8/W4 over two seeds (but rtn W8 once: a cell with n=1, and one run less to wait for),
# on about the smallest data the pipeline accepts (one calibration frame leaves the memory attention
# uncalibrated). Values are meaningless (random weights) but every number is a real MLflow record.
SUITE = """\
name: reptest
base:
  data:
    calib: {{frames: 2}}
    synthetic: {{sequences: 1, frames: 3, size: 64x48}}
matrix:
  method.name: [fp, rtn]
  quant.weight_bits: [8, 4]
  seed: [0, 1]
exclude:
  - {{method.name: fp, quant.weight_bits: 4}}
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


def test_table_values_are_the_mlflow_metrics(recorded):
    _, results, paths = recorded
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name("reptest")
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'run' and attributes.status = 'FINISHED'")
    assert len(runs) == 5
    records = pd.DataFrame(
        {"method": r.data.params["method.name"], "bits": int(r.data.params["quant.weight_bits"]),
         "seed": int(r.data.params["seed"]), "jf": 100 * r.data.metrics["J_F-mean"]} for r in runs
    )  # fmt: skip
    expected = records.groupby(["method", "bits"])["jf"].agg(["mean", "std", "count"])
    table = pd.read_csv(paths["table.csv"])
    assert list(table["method.name"]) == ["fp", "fp", "rtn", "rtn"]  # the reference row first
    assert list(table["quant.weight_bits"]) == [8, 4, 8, 4]
    assert (table["metric"] == "J_F-mean").all() and list(table["n"]) == [2, 2, 1, 2]
    fp = expected.loc[("fp", 8)]
    for _, row in table.iterrows():
        # fp ran at 8 bits only: its runs stand for every column.
        want = fp if row["method.name"] == "fp" else expected.loc[("rtn", row["quant.weight_bits"])]
        assert row["n"] == want["count"] and row["mean"] == pytest.approx(want["mean"])
        assert row["std"] == pytest.approx(want["std"], nan_ok=True)  # ddof=1 in both; NaN for n=1
        if row["method.name"] == "rtn":
            assert row["delta_fp"] == pytest.approx(want["mean"] - fp["mean"])
        else:
            assert pd.isna(row["delta_fp"])


def test_markdown_and_latex(recorded):
    _, _, paths = recorded
    md = paths["table.md"].read_text().splitlines()
    header = next(i for i, line in enumerate(md) if line.startswith("| method \\ weight_bits | 8 | 4 |"))
    assert md[header + 2].startswith("| fp (ref.) |") and md[header + 3].startswith("| rtn |")
    rtn = [cell.strip() for cell in md[header + 3].strip("|").split("|")]
    assert " ± " not in rtn[1] and rtn[1].endswith("[n=1]") and re.search(r"\([+-]\d+\.\d\)", rtn[1])
    assert " ± " in rtn[2] and rtn[2].endswith("[n=2]")
    assert any("n per cell in brackets" in line for line in md)
    tex = paths["table.tex"].read_text()
    for rule in ("\\toprule", "\\midrule", "\\bottomrule", "\\textbf{"):
        assert rule in tex
    body = "\n".join(line for line in tex.splitlines() if not line.startswith("%"))
    assert "weight\\_bits" in body and not re.search(r"(?<!\\)_", body)


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
    # Narrowed to 8 bits: the W4 records stay in the database but not in the report, and the new
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
    ]
    for section, message in cases:
        with pytest.raises(ConfigError, match=message):
            report(load_suite(str(write_suite(tmp_path, section))), r)
