import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

REDUCED = ["data.synthetic.sequences=2", "data.synthetic.frames=4", "data.synthetic.size=96x64", "data.calib.frames=3"]


def qbench(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "harness", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.e2e
def test_smoke_suite_end_to_end(tmp_path):
    results = tmp_path / "results"
    first = qbench("suite", "smoke", *REDUCED, "--results", str(results))
    assert first.returncode == 0, first.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name("smoke")
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'run'")
    assert sorted((r.data.params["method.name"], r.data.params["quant.weight_bits"]) for r in runs) == [
        ("fp", "8"),
        ("rtn", "4"),
        ("rtn", "8"),
    ]
    suites = client.search_runs([exp.experiment_id], "tags.kind = 'suite'")
    assert len(suites) == 1
    for r in runs:
        assert r.info.status == "FINISHED"
        assert r.data.tags["mlflow.parentRunId"] == suites[0].info.run_id
        assert r.data.tags["version.brevitas"] and r.data.tags["version.sam2"] == "1.1.0"
        assert len(r.data.tags["run_key"]) == 16
        m = r.data.metrics
        assert 0 <= m["J_F-mean"] <= 1 and m["J_F-mean"] == pytest.approx((m["J-mean"] + m["F-mean"]) / 2)
        assert m["fps"] > 0
        artifacts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"per_object.csv", "per_sequence.csv", "quant_plan.tsv"} <= artifacts
    by_method = {(r.data.params["method.name"], r.data.params["quant.weight_bits"]): r.data.metrics for r in runs}
    assert by_method[("fp", "8")]["ratio_vs_bf16"] == 1
    assert 1 < by_method[("rtn", "8")]["ratio_vs_bf16"] < by_method[("rtn", "4")]["ratio_vs_bf16"]

    summary = (results / "smoke" / "summary.md").read_text().splitlines()
    assert summary[0].startswith("| method | bits | J&F (%) | J (%) | F (%) |") and len(summary) == 5
    fp_row = next(line for line in summary if line.startswith("| fp |"))
    assert f"| {100 * by_method[('fp', '8')]['J_F-mean']:.1f} |" in fp_row  # the report's unit

    # A second invocation finds every run FINISHED and records no new child run.
    second = qbench("suite", "smoke", *REDUCED, "--results", str(results))
    assert second.returncode == 0, second.stderr[-3000:]
    assert len(client.search_runs([exp.experiment_id], "tags.kind = 'run'")) == 3
    assert "3/3 runs finished" in second.stdout


def test_eval_vos_cli(davis_root, tmp_path):
    from harness.data.davis import DavisDataset, write_palette_png

    ds = DavisDataset(davis_root, "val")
    perfect, damaged = tmp_path / "perfect", tmp_path / "damaged"
    dropped_seq, dropped_obj = ds.sequences[0], ds.object_ids(ds.sequences[0])[0]
    for seq in ds.sequences:
        for name, gt in zip(ds.frame_names(seq), ds.annotations(seq), strict=True):
            write_palette_png(perfect / seq / f"{name}.png", gt)
            write_palette_png(damaged / seq / f"{name}.png", gt * ((gt != dropped_obj) | (seq != dropped_seq)))
    proc = qbench(
        "eval-vos", "--davis-root", str(davis_root), "--results", str(perfect), "--out", str(tmp_path / "o.csv")
    )
    assert proc.returncode == 0, proc.stderr
    assert "J&F-mean: 1.0000" in proc.stdout and (tmp_path / "o.csv").is_file()

    # The dropped object scores J = F = 1 on scored frames where it is absent from the ground truth
    # (empty prediction, empty truth) and 0 where it is present; every other object scores 1.
    gt = ds.annotations(dropped_seq)[1:-1] == dropped_obj
    absent = sum(not frame.any() for frame in gt) / len(gt)
    n_objects = sum(len(ds.object_ids(s)) for s in ds.sequences)
    expected = (n_objects - 1 + absent) / n_objects
    proc = qbench("eval-vos", "--davis-root", str(davis_root), "--results", str(damaged))
    assert proc.returncode == 0, proc.stderr
    assert f"J&F-mean: {expected:.4f}" in proc.stdout

    missing = qbench("eval-vos", "--davis-root", str(davis_root), "--results", str(tmp_path / "none"))
    assert missing.returncode == 2 and "none" in missing.stderr


def test_internal_evaluation_matches_eval_vos(davis_root, tmp_path):
    """The harness's own scores equal eval-vos on the predictions it saved (one metric code path)."""
    from harness import models
    from harness.data.davis import DavisDataset
    from harness.evaluate import vos
    from harness.evaluate.scoring import score_results_folder

    ds = DavisDataset(davis_root, "val")
    _, internal = vos.evaluate(models.build("sam2_small", device="cpu"), ds, save_dir=tmp_path / "pred")
    _, external = score_results_folder(davis_root, tmp_path / "pred", "val")
    assert Path(tmp_path / "pred" / ds.sequences[0]).is_dir()
    for key in ("J&F-mean", "J-mean", "F-mean"):
        assert internal[key] == pytest.approx(external[key])
