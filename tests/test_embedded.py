"""The shipped small SAM2 (harness/checkpoints): it loads, is what its model card says, and segments."""

import json
import shutil

import pytest
import torch

from harness import models
from harness.config import load_suite
from harness.errors import CheckpointError
from harness.evaluate import vos
from harness.evaluate.registry import dataset
from harness.pretrain import VAL_SUITE
from harness.runner import prepare

CARD = json.loads((models.EMBEDDED / "sam2_small.json").read_text())


@pytest.fixture(scope="module")
def val_subset(tmp_path_factory):
    cfg = load_suite(VAL_SUITE).runs[0].config
    ds = dataset(cfg, "eval", tmp_path_factory.mktemp("results"))
    ds.sequences = CARD["val_subset"]["sequences"]
    return ds


def test_the_default_is_the_shipped_checkpoint():
    shipped = models.read_state_dict(models.EMBEDDED / CARD["file"])
    model = models.build("sam2_small", device="cpu")
    assert all(torch.equal(v, shipped[k].float()) for k, v in model.state_dict().items())
    assert (models.EMBEDDED / CARD["file"]).stat().st_size <= 20e6
    random = models.build("sam2_small", models.RANDOM, device="cpu")
    assert not torch.equal(random.sam_mask_decoder.iou_token.weight, model.sam_mask_decoder.iou_token.weight)


def test_shipped_weights_reach_their_recorded_jf(val_subset):
    model = models.build("sam2_small", device="cpu")
    summary = vos.evaluate(model, val_subset, progress=False)[1]
    assert summary["J&F-mean"] == pytest.approx(CARD["val_subset"]["J&F"], abs=0.01)


def test_rtn_w8a8_stays_within_002_of_fp(val_subset, tmp_path):
    suite = load_suite(VAL_SUITE, ["data.calib.frames=8"])
    jf = {}
    for spec in suite.runs:
        cfg = spec.config
        if cfg["method"]["name"] == "fp" or cfg["quant"]["weight_bits"] == 8:
            model, decisions = prepare(cfg, tmp_path, {})
            jf[cfg["method"]["name"]] = vos.evaluate(model, val_subset, decisions, progress=False)[1]["J&F-mean"]
    assert set(jf) == {"fp", "rtn"}
    assert jf["fp"] > 0.5  # it segments: random weights score below 0.1
    assert abs(jf["rtn"] - jf["fp"]) <= 0.02


def test_a_damaged_shipped_checkpoint_is_one_line_naming_it(tmp_path, monkeypatch):
    for name in (CARD["file"], "sam2_small.json"):
        shutil.copy(models.EMBEDDED / name, tmp_path / name)
    weights = tmp_path / CARD["file"]
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside a tensor: torch would still load it
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(models, "EMBEDDED", tmp_path)
    with pytest.raises(CheckpointError) as e:
        models.build("sam2_small", device="cpu")
    msg = str(e.value)
    assert str(weights) in msg and "sha256" in msg and "\n" not in msg
    weights.unlink()
    with pytest.raises(CheckpointError, match=f"embedded checkpoint {weights} is missing"):
        models.build("sam2_small", device="cpu")
