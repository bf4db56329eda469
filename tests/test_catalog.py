"""Every metric a run records has one entry in harness.evaluate.catalog, with its direction."""

import pandas as pd
import pytest
import torch.nn as nn
import yaml

from harness.errors import ConfigError
from harness.evaluate import catalog, instance, metrics, registry
from harness.quant.size import model_size
from harness.search import Search, direction


def test_the_catalog_names_what_the_size_accounting_and_the_evaluators_record():
    assert set(model_size(nn.Linear(4, 3))) == {i.key for i in catalog.SIZE.values()}
    per_object = pd.DataFrame([{c: 0.5 for c in metrics.STAT_COLUMNS}, {c: 0.7 for c in metrics.STAT_COLUMNS}])
    vos = {m.key for m in registry.get("davis").metrics}
    assert set(metrics.summarize(per_object)) == vos == {m.key for m in registry.get("sav").metrics}
    assert {m.key for m in registry.get("coco").metrics} == {"mIoU", *instance.AP_KEYS}


def test_directions_come_from_the_entries():
    assert [catalog.find(n).direction for n in ("jf", "J-mean", "ap50", "ratio", "quantized_ratio_vs_bf16")] == [
        "max"
    ] * 5
    lower = (
        "size",
        "packed_bytes",
        "bf16_bytes",
        "bits_per_weight",
        "j_decay",
        "F-decay",
        "time_train_s",
        "peak_train_gib",
    )
    assert [catalog.find(n).direction for n in lower] == ["min"] * len(lower)
    assert catalog.find("jf").key == "J_F-mean" and catalog.find("jf").scale == 100
    assert catalog.find("fps", "coco").label == "images/s" and catalog.find("fps", "davis").label == "frames/s"
    with pytest.raises(ConfigError, match=r"^x: unknown metric 'miou'; expected one of jf, j, f,"):
        catalog.find("miou", "davis", "x")  # a COCO metric is no objective of a DAVIS search


def test_a_search_takes_every_metric_the_size_accounting_logs(tmp_path):
    base = {"method": {"name": "rtn"}, "quant": {"weight_bits": 4}}
    for objective, want in (
        (["jf", "bf16_bytes"], ["maximize", "minimize"]),
        (["quantized_ratio_vs_bf16"], ["maximize"]),
    ):
        path = tmp_path / "s.yaml"
        search = {"space": {"quant.weight_bits": {"type": "int", "low": 2, "high": 8}}, "objective": objective}
        path.write_text(yaml.safe_dump({"name": "s", "base": base, "search": {**search, "pruner": "none"}}))
        assert [direction(m) for m in Search(str(path)).cfg.objective] == want
