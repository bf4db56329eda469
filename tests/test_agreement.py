"""Agreement with the FP model (harness/evaluate/agreement.py): each quantized run's predictions scored
against the FP model's on the same prompts, from FP predictions made once per key and cached on disk."""

import json

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

import methods
from harness import runner
from harness.config import base_config, load_suite, run_key
from harness.errors import ConfigError, DatasetError
from harness.evaluate import agreement, catalog
from harness.report import report
from methods.fp import FP

DATA = """\
  data:
    calib: {frames: 3}
    synthetic: {sequences: 4, frames: 4, size: 96x64}
"""
TINY = ["data.synthetic.sequences=4", "data.synthetic.frames=4", "data.synthetic.size=96x64", "data.calib.frames=3"]


class _FPThatQuantizes(FP):
    """The FP model run as a method that quantizes (nothing): its run is scored against the FP predictions."""

    name = "fp_quantizes"
    quantizes = True


def _records(results, suite):
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name(suite)
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'run'", order_by=["attributes.start_time ASC"])
    return client, runs


def _run(tmp_path, name, text, results):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    suite = load_suite(str(path))
    rows, failed = runner.run_suite(suite, results)
    assert not failed, failed
    return suite, _records(results, name)


def _cache_folders(results):
    return sorted(p for p in (results / agreement.CACHE).iterdir() if p.is_dir())


def test_the_fp_model_agrees_with_its_own_cached_predictions_exactly(tmp_path, monkeypatch):
    monkeypatch.setitem(methods.REGISTRY, "fp_quantizes", _FPThatQuantizes)
    results = tmp_path / "results"
    text = f"name: self\nbase:\n{DATA}matrix:\n  method.name: [fp, fp_quantizes]\n"
    text += "report:\n  table: {rows: method.name, cols: quant.weight_bits, metric: jf_fp}\n"
    suite, (client, (fp, student)) = _run(tmp_path, "self", text, results)
    # The fp run fills the cache with its own predictions and records no agreement (1 by definition).
    assert fp.data.tags["agreement.cache"].endswith(" filled")
    assert not any(k.startswith("agree/") for k in fp.data.metrics)
    (cache,) = _cache_folders(results)
    assert json.loads((cache / "key.json").read_text())["fp_scores"]["J&F-mean"] == fp.data.metrics["J_F-mean"]
    # The FP model as a student is scored against those cached predictions: exactly 1.
    assert student.data.tags["agreement.cache"] == f"{cache.name} reused"
    m = student.data.metrics
    assert m["agree/J_F-mean"] == 1.0 and m["agree/J-mean"] == 1.0 and m["agree/F-mean"] == 1.0
    assert m["J_F-mean"] == fp.data.metrics["J_F-mean"]
    assert "time_fp_predictions_s" not in m and m["time_agreement_s"] > 0
    # In a table of agreement fp has no row (it records none); the student's cell is 100%.
    table = report(suite, results)["table.md"].read_text()
    assert "| fp |" not in table and "| fp_quantizes (ref.) | **100.0 ± 0.0** |" in table, table


AT_2BIT = f"""\
name: agree2
base:
{DATA}  method: {{name: rtn}}
  quant: {{weight_bits: 2, act_bits: 8}}
report:
  table: {{rows: method.name, cols: quant.weight_bits, metric: jf_fp}}
"""


def test_a_quantized_run_records_agreement_below_one_from_a_cache_made_once(tmp_path):
    results = tmp_path / "results"
    suite, (client, (first,)) = _run(tmp_path, "agree2", AT_2BIT, results)
    (cache,) = _cache_folders(results)
    made = cache.stat().st_mtime_ns
    # The first run makes the FP predictions, in a phase of its own.
    assert first.data.tags["agreement.cache"] == f"{cache.name} computed"
    assert first.data.metrics["time_fp_predictions_s"] > 0 and "peak_fp_predictions_gib" in first.data.metrics
    # A later run of another suite with the same key (another bit-width and seed, its predictions kept in
    # its record) reuses them: no FP evaluation, the cache untouched.
    other = AT_2BIT.replace("name: agree2", "name: agree3").replace("weight_bits: 2", "weight_bits: 4")
    other = other.replace("report:", "  seed: 1\n  eval: {save_predictions: true}\nreport:")
    _, (_, (second,)) = _run(tmp_path, "agree3", other, results)
    assert second.data.tags["agreement.cache"] == f"{cache.name} reused"
    assert "time_fp_predictions_s" not in second.data.metrics and second.data.metrics["time_agreement_s"] > 0
    assert cache.stat().st_mtime_ns == made and _cache_folders(results) == [cache]
    for r in (first, second):
        m = r.data.metrics
        assert 0 <= m["agree/J_F-mean"] < 1, m
        assert m["agree/J_F-mean"] == pytest.approx((m["agree/J-mean"] + m["agree/F-mean"]) / 2)
        arts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"per_object.csv", "per_object_agreement.csv"} <= arts
        frame = pd.read_csv(client.download_artifacts(r.info.run_id, "per_object_agreement.csv", str(tmp_path)))
        assert ((frame["J-mean"] + frame["F-mean"]) / 2).mean() == pytest.approx(m["agree/J_F-mean"])
    # save_predictions keeps the run's predictions in its record; without it they stay in scratch.
    assert "predictions" in {a.path for a in client.list_artifacts(second.info.run_id)}
    assert "predictions" not in {a.path for a in client.list_artifacts(first.info.run_id)}
    assert not any((results / "tmp").iterdir())  # scratch removed
    assert second.data.metrics["agree/J_F-mean"] > first.data.metrics["agree/J_F-mean"]  # W4 follows FP closer
    fp_jf = json.loads((cache / "key.json").read_text())["fp_scores"]["J&F-mean"]
    print("FP J&F vs GT:", fp_jf)
    print("agree/J_F-mean W2A8:", first.data.metrics["agree/J_F-mean"], "J&F vs GT:", first.data.metrics["J_F-mean"])
    print("agree/J_F-mean W4A8:", second.data.metrics["agree/J_F-mean"], "J&F vs GT:", second.data.metrics["J_F-mean"])

    # A report table shows it (metric: jf_fp), with intervals from per_object_agreement.csv and no fp row.
    table = report(suite, results)["table.md"].read_text()
    assert "J&F vs FP (%) by method.name" in table and "| fp" not in table
    assert "B = 2000 resamples of the 2 sequences" in table, table


def test_the_cache_key_follows_what_determines_the_fp_predictions(tmp_path):
    def key(*overrides):
        return agreement.key(base_config(None, [*TINY, *overrides]), tmp_path)

    base = key("method.name=rtn")
    # Other eval data, other key.
    assert (
        len({base, key("data.eval.max_sequences=1"), key("data.synthetic.seed=5"), key("data.eval.split=train")}) == 4
    )
    assert base != key("model.image_size=96") and base != key("model.checkpoint=random")
    # What the FP model does not see: the same key (fp's run fills the cache the quantized runs read).
    same = [key("method.name=fp"), key("quant.weight_bits=2"), key("data.calib.frames=2"), key("seed=3")]
    assert same == [base] * 4
    # Random weights are drawn from the seed: there it is part of the key.
    assert key("model.checkpoint=random", "seed=1") != key("model.checkpoint=random")


def test_agreement_is_a_validated_switch_that_keeps_run_keys(tmp_path):
    default = base_config(None, TINY)
    assert default["eval"] == {"save_predictions": False}  # runs recorded before it keep their run_keys
    assert run_key(base_config(None, [*TINY, "eval.agreement=true"])) == run_key(default)
    assert base_config(None, [*TINY, "eval.agreement=false"])["eval"]["agreement"] is False
    with pytest.raises(ConfigError, match=r"^command-line override: eval.agreement: input should be a valid boolean"):
        base_config(None, ["eval.agreement=sometimes"])
    with pytest.raises(ConfigError, match=r"unknown key 'eval.agreemnt'; did you mean 'eval.agreement'\?$"):
        base_config(None, ["eval.agreemnt=false"])
    assert catalog.find("jf_fp").key == "agree/J_F-mean" and catalog.find("miou_fp", "coco").key == "agree/mIoU"
    assert catalog.find("jf_fp").artifact == "per_object_agreement.csv"


def test_agreement_off_computes_nothing(tmp_path):
    results = tmp_path / "results"
    text = f"name: agree_off\nbase:\n{DATA}  method: {{name: rtn}}\n  quant: {{weight_bits: 4}}\n  eval: {{agreement: false}}\n"
    _, (client, (run,)) = _run(tmp_path, "agree_off", text, results)
    assert not any(k.startswith("agree/") or "fp_predictions" in k for k in run.data.metrics)
    assert "agreement.cache" not in run.data.tags and not (results / agreement.CACHE).exists()
    assert "per_object_agreement.csv" not in {a.path for a in client.list_artifacts(run.info.run_id)}


COCO = """\
name: coco_agree
base:
  method: {name: rtn}
  quant: {scope: [image_encoder, sam_mask_decoder], weight_bits: 2, act_bits: 8}
  data:
    eval: {kind: coco, split: val2017}
    calib: {kind: coco, split: train2017, frames: 3}
    synthetic: {sequences: 4, size: 160x96, seed: 2}
"""


def test_coco_records_the_mean_mask_iou_with_the_fp_masks(tmp_path):
    results = tmp_path / "results"
    _, (client, (run,)) = _run(tmp_path, "coco_agree", COCO, results)
    m = run.data.metrics
    assert 0 <= m["agree/mIoU"] <= 1 and run.data.tags["agreement.cache"].endswith(" computed")
    frame = pd.read_csv(client.download_artifacts(run.info.run_id, "per_object_agreement.csv", str(tmp_path)))
    assert list(frame.columns) == ["image_id", "prompt", "category_id", "ann_id", "iou"]
    assert frame["iou"].between(0, 1).all() and frame["iou"].mean() == pytest.approx(m["agree/mIoU"])
    instances = pd.read_csv(client.download_artifacts(run.info.run_id, "per_object.csv", str(tmp_path)))
    assert sorted(frame["ann_id"]) == sorted(instances["ann_id"])  # one prompt per ground-truth instance
    print("agree/mIoU W2A8 (COCO):", m["agree/mIoU"], "mIoU vs GT:", m["mIoU"])


def test_video_agreement_is_the_evaluators_own_jf_with_the_fp_masks_as_ground_truth(davis_root, tmp_path):
    import shutil

    import numpy as np

    from harness.data import sav
    from harness.data.davis import DavisDataset, read_palette_png, write_palette_png

    # DAVIS layout: the annotations as FP predictions, and as predictions: 1; one object dropped: less.
    ds = DavisDataset(davis_root, "val")
    ref = davis_root / "Annotations" / "480p"
    assert agreement.score_vos(ds, ref, ref)[1]["J&F-mean"] == 1.0
    seq, obj = ds.sequences[0], ds.object_ids(ds.sequences[0])[0]
    for name in ds.frame_names(seq):
        ids = read_palette_png(ref / seq / f"{name}.png")
        write_palette_png(tmp_path / "pred" / seq / f"{name}.png", np.where(ids == obj, 0, ids).astype(np.uint8))
    for other in ds.sequences[1:]:
        shutil.copytree(ref / other, tmp_path / "pred" / other)
    per_object, summary = agreement.score_vos(ds, ref, tmp_path / "pred")
    assert 0 < summary["J&F-mean"] < 1 and len(per_object) == sum(len(ds.object_ids(s)) for s in ds.sequences)
    # SA-V layout, SAM2's SA-V counting: the annotations against themselves agree exactly.
    root = sav.generate(tmp_path / "sav", videos=2, frames=9, size=(96, 64), seed=1)
    sds = sav.SavDataset(root, root / "sav_val.txt")
    per_object, summary = agreement.score_sav(sds, root / sav.ANNOTATIONS, root / sav.ANNOTATIONS)
    assert summary["J&F-mean"] == 1.0 and len(per_object) > 0
    # A damaged cache is named, not scored.
    shutil.rmtree(tmp_path / "pred" / seq)
    with pytest.raises(DatasetError, match="FP prediction .* does not exist: the cache .* is damaged"):
        agreement.score_vos(ds, tmp_path / "pred", ref)
