"""Suite files: expansion, overrides, environment interpolation and every validation error."""

import subprocess
import sys

import pytest

from harness.config import base_config, load_suite, run_key
from harness.errors import ConfigError


def _suite(tmp_path, text, name="s"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return str(path)


def test_expansion_overrides_and_canonical_runs():
    suite = load_suite("smoke", ["quant.act_bits=6"])
    # fp ignores the bits: its name does not carry them.
    assert [r.name for r in suite.runs] == ["name=fp", "name=rtn,weight_bits=8", "name=rtn,weight_bits=4"]
    rtn = [r.config for r in suite.runs if r.config["method"]["name"] == "rtn"]
    assert all(c["quant"]["act_bits"] == 6 for c in rtn)
    # fp quantizes nothing: its quant section is the default whatever the matrix says, so fp x {8, 4} is one run.
    assert suite.runs[0].config["quant"]["act_bits"] == 8
    assert len({r.run_key for r in suite.runs}) == 3
    assert len(load_suite("smoke", ["quant.weight_bits=4"]).runs) == 2
    # Defaults are filled in, so a suite that spells out a default has the same run_key.
    explicit = load_suite("smoke", ["quant.softmax_quant=uniform", "seed=0"])
    assert [r.run_key for r in explicit.runs][0] == suite.runs[0].run_key


def test_seeds_include_exclude(tmp_path):
    path = _suite(
        tmp_path,
        """
name: s
base: {method: {name: rtn}}
seeds: [0, 1]
matrix: {quant.weight_bits: [8, 4]}
exclude: [{quant.weight_bits: 4, seed: 1}]
include: [{quant.weight_bits: 2, quant.act_bits: 6}, {quant.weight_bits: 2, quant.act_bits: 4, seed: 1}]
""",
    )
    runs = load_suite(path).runs
    got = sorted((r.config["quant"]["weight_bits"], r.config["quant"]["act_bits"], r.config["seed"]) for r in runs)
    # An extra run repeats over the seeds, unless it names its own.
    assert got == [(2, 4, 1), (2, 6, 0), (2, 6, 1), (4, 8, 0), (8, 8, 0), (8, 8, 1)]


def test_env_interpolation(tmp_path, monkeypatch):
    path = _suite(tmp_path, "name: s\nbase:\n  data:\n    eval: {kind: davis, root: '${oc.env:QB_TEST_ROOT}'}\n")
    monkeypatch.setenv("QB_TEST_ROOT", "/data/DAVIS")
    assert load_suite(path).runs[0].config["data"]["eval"]["root"] == "/data/DAVIS"
    monkeypatch.delenv("QB_TEST_ROOT")
    with pytest.raises(ConfigError, match=r"s.yaml: base.data.eval.root: environment variable QB_TEST_ROOT is not set"):
        load_suite(path)


@pytest.mark.parametrize(
    "text,message",
    [
        ("base:\n  modle: {name: sam2_small}\n", r"s.yaml: base: unknown key 'modle'; did you mean 'model'\?"),
        ("base:\n  quant: {wieght_bits: 4}\n", r"unknown key 'quant.wieght_bits'; did you mean 'quant.weight_bits'\?"),
        (
            "base:\n  quant: {weight_bits: 1}\n",
            r"base: quant.weight_bits: input should be greater than or equal to 2 \(got 1\)",
        ),
        ("base:\n  quant: {act_bits: eight}\n", r"quant.act_bits: input should be a valid integer.*\(got 'eight'\)"),
        (
            "base:\n  data: {eval: {kind: kitti}}\n",
            r"data.eval.kind: value error, input should be 'synthetic', 'davis', 'coco' or 'sav' \(got 'kitti'\)",
        ),
        ("base:\n  train: {lr: -1}\n", r"train.lr: input should be greater than 0"),
        (
            "base:\n  method: {name: rtn, act_stat: median}\n",
            r"method.act_stat: 'median'; expected one of max, mean_max, percentile",
        ),
        (
            "base:\n  method: {name: rtn, act_sat: max}\n",
            r"method.act_sat: not a parameter of any method; did you mean 'method.act_stat'\?",
        ),
        (
            "base:\n  method: {name: gptq}\n",
            r"method.name: unknown method 'gptq'; expected one of fp, lsq, mixqsam, pact, ptq4sam, qsam2, qsam2_vrc, rtn",
        ),
        (
            "matrix: {quant.weight_bit: [2, 4]}\n",
            r"run weight_bit=2: unknown key 'quant.weight_bit'; did you mean 'quant.weight_bits'\?",
        ),
        ("matrix: {quant.weight_bits: []}\n", r"matrix.quant.weight_bits: expected a non-empty list"),
        ("matrix: {quant.weight_bits: 4}\n", r"s.yaml: matrix.quant.weight_bits: input should be a valid list"),
        ("sweep: {}\n", r"s.yaml: unknown key 'sweep'"),
        ("base: [1, 2]\n", r"s.yaml: base: input should be a valid dictionary"),
        ("base:\n  model: {image_size: 100}\n", r"model.image_size: input should be a multiple of 32"),
        (
            "base:\n  quant: {scope: [imag_encoder]}\n",
            r"quant.scope.0: value error, 'imag_encoder' is not a part of SAM2",
        ),
        ("exclude: [{method.name: fp, quant.wbits: 4}]\n", r"s.yaml: exclude: unknown key 'quant.wbits'"),
    ],
)
def test_validation_errors(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_suite(_suite(tmp_path, text))


def test_run_key_sees_the_order_of_bit_overrides(tmp_path):
    # Later entries of quant.bits win, so the two orders are two different runs.
    a = _suite(
        tmp_path,
        "base:\n  method: {name: rtn}\n  quant: {bits: {'*.qkv': {weight_bits: 4}, 'image_encoder.trunk.blocks.0.attn.qkv': {weight_bits: 8}}}\n",
        "a",
    )
    b = _suite(
        tmp_path,
        "base:\n  method: {name: rtn}\n  quant: {bits: {'image_encoder.trunk.blocks.0.attn.qkv': {weight_bits: 8}, '*.qkv': {weight_bits: 4}}}\n",
        "b",
    )
    assert load_suite(a).runs[0].run_key != load_suite(b).runs[0].run_key
    # Settings that cannot change a run do not change its key.
    plain = load_suite("smoke").runs
    same = load_suite("smoke", ["method.percentile=50", "quant.qkv_bits=8"]).runs
    assert [r.run_key for r in plain] == [r.run_key for r in same]
    assert same[1].name == "name=rtn,weight_bits=8"
    assert [r.name for r in load_suite("smoke", ["quant.weight_bits=4"]).runs] == [
        "name=fp",
        "name=rtn,weight_bits=4",
    ]


@pytest.mark.parametrize("method", ["fp", "rtn"])
def test_train_settings_do_not_change_the_run_key_of_a_method_that_does_not_train(method):
    plain = base_config(None, [f"method.name={method}"])
    trained = base_config(None, [f"method.name={method}", "train.steps=10", "train.lr=0.5"])
    assert run_key(plain) == run_key(trained)


def test_override_errors():
    with pytest.raises(
        ConfigError, match=r"command-line overrides\): unknown key 'quant.act_bit'; did you mean 'quant.act_bits'"
    ):
        load_suite("smoke", ["quant.act_bit=6"])
    with pytest.raises(ConfigError, match="override 'quant.act_bits': expected dotted.key=value"):
        load_suite("smoke", ["quant.act_bits"])
    with pytest.raises(ConfigError, match="suite 'nope' not found"):
        load_suite("nope")
    with pytest.raises(ConfigError, match=r"override 'quant.scope=\[a': value is not valid YAML"):
        load_suite("smoke", ["quant.scope=[a"])


def test_report_settings_from_the_command_line_leave_the_runs_alone():
    plain = load_suite("smoke")
    paired = load_suite("smoke", ["report.baseline=rtn", "report.table.cols=quant.act_bits"])
    assert paired.report["baseline"] == "rtn" and paired.report["table"]["cols"] == "quant.act_bits"
    assert plain.report["baseline"] is None
    assert [r.run_key for r in paired.runs] == [r.run_key for r in plain.runs]
    with pytest.raises(ConfigError, match=r"command-line override: unknown key 'report.tabel'"):
        load_suite("smoke", ["report.tabel.rows=seed"])
    with pytest.raises(ConfigError, match=r"command-line override: report.baseline: .*expected a row of the table"):
        load_suite("smoke", ["report.baseline=[a]"])


def test_cli_exits_2_with_one_line_before_any_work(tmp_path):
    path = _suite(tmp_path, "base:\n  quant: {weight_bits: 1}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "harness", "suite", path, "--results", str(tmp_path / "r")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "quant.weight_bits" in proc.stderr
    assert not (tmp_path / "r").exists()
