"""harness/train.py on the real small SAM2, SAM2's own training model and loss, generated data."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from train_worker import without_dropout

from harness import models
from harness.config import parse_override, set_dotted
from harness.data.clips import ClipDataset, collate
from harness.data.davis import DavisDataset
from harness.errors import NonFiniteError
from harness.schema import RunConfig
from harness.train import fit, lr_factor, train_data

ROOT = Path(__file__).resolve().parents[1]
WORKER = [sys.executable, str(ROOT / "tests" / "train_worker.py")]


def config(*overrides):
    raw = {}
    for item in overrides:
        set_dotted(raw, *parse_override(item), "test")
    return RunConfig.model_validate(raw).model_dump()


def small_model():
    torch.manual_seed(0)
    return without_dropout(models.build("sam2_small", models.RANDOM, device="cpu"))


def test_clips_have_all_objects_of_the_first_frame_at_the_model_size(davis_root):
    ds = DavisDataset(davis_root, split="train")
    clips = ClipDataset(ds, image_size=128, frames=3, seed=5, flip=True, scale_jitter=0.3)
    a, b = clips[7], clips[7]
    assert all(torch.equal(x.data, y.data) for x, y in zip(a.frames, b.frames))  # seeded by index
    assert not torch.equal(clips[8].frames[0].data, a.frames[0].data)
    batch = collate([clips[i] for i in range(3)])
    objects = sum(len(clips[i].frames[0].objects) for i in range(3))
    assert batch.img_batch.shape == (3, 3, 3, 128, 128)  # T, B, C, H, W
    assert batch.masks.shape == (3, objects, 128, 128)
    assert batch.masks[0].flatten(1).any(1).all()  # every object is visible in frame 0


def test_clips_hold_at_most_max_objects_of_the_first_frames_objects():
    source = {"seed": 11, "size": (160, 96), "objects": (4, 4)}
    every = ClipDataset(source, image_size=96, frames=2, seed=0)
    capped = ClipDataset(source, image_size=96, frames=2, seed=0, max_objects=2)
    for i in range(4):
        ids = [o.object_id for o in every[i].frames[0].objects]
        kept = [o.object_id for o in capped[i].frames[0].objects]
        assert len(ids) > 2 and len(kept) == 2 and set(kept) <= set(ids)
        assert [o.object_id for o in capped[i].frames[1].objects] == kept  # the same objects all clip long
    assert len({tuple(o.object_id for o in capped[i].frames[0].objects) for i in range(12)}) > 1  # drawn per clip
    assert config("train.steps=1")["train"]["max_objects"] == 3  # SAM2.1's fine-tuning max_num_objects


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    assert lr_factor(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(99, 100, 10, 0.1) == pytest.approx(0.1, abs=1e-3)
    assert lr_factor(55, 100, 10, 0.1) == pytest.approx(0.55)  # halfway down the cosine


def test_loss_falls_on_a_fixed_set_of_clips(davis_root):
    cfg = config(
        "train.steps=40",
        "train.batch_size=2",
        "train.frames=5",
        "train.lr=2e-3",
        "train.log_every=5",
        "train.prompts.point_prob=0",
    )
    model = small_model()
    # Clips as long as the sequences, no flips or crops: two distinct clips that the model can fit.
    data = ClipDataset(DavisDataset(davis_root, split="train"), 128, 5, seed=0)
    history = fit(model, cfg, data, progress=False)["history"]
    first, last = history[0]["train/loss"], history[-1]["train/loss"]
    assert last < 0.7 * first, [h["train/loss"] for h in history]


def test_nan_loss_fails_with_step_and_term():
    cfg = config(
        "train.steps=3",
        "train.batch_size=1",
        "train.frames=2",
        "train.data.kind=stream",
        "train.data.size=96x64",
        "train.prompts.point_prob=0",
    )
    model = small_model()
    with torch.no_grad():
        model.image_encoder.trunk.patch_embed.proj.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteError, match=r"train step 0: loss term \w+ is nan"):
        fit(model, cfg, train_data(cfg, None), progress=False)


def test_distillation_from_an_identical_teacher_is_zero_for_features():
    cfg = config(
        "train.steps=1",
        "train.batch_size=1",
        "train.frames=2",
        "train.data.kind=stream",
        "train.data.size=96x64",
        "train.objectives.supervised=0",
        "train.objectives.distill_feat=1",
        "train.objectives.distill_mask=1",
        "train.lr=1e-9",
        "train.log_every=1",
    )
    model, teacher = small_model(), small_model()
    history = fit(model, cfg, train_data(cfg, None), teacher=teacher, progress=False)["history"]
    assert history[0]["train/distill_feat"] == 0.0  # same weights, same inputs
    assert history[0]["train/distill_mask"] > 0  # binary cross-entropy to soft targets is not zero


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.e2e
def test_resume_after_sigkill_reaches_the_same_weights(tmp_path):
    steps = 10
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir(), killed.mkdir()
    subprocess.run([*WORKER, str(straight), str(steps)], check=True, cwd=ROOT)

    proc = subprocess.Popen([*WORKER, str(killed), str(steps)], cwd=ROOT)
    ckpt = killed / "ckpt" / "last.pt"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt.is_file() and torch.load(ckpt, weights_only=False)["step"] >= 4:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_from = torch.load(ckpt, weights_only=False)["step"]
    assert 4 <= resumed_from < steps, "the kill came too late to test a resume"

    subprocess.run([*WORKER, str(killed), str(steps)], check=True, cwd=ROOT)
    assert int((killed / "resumed-from-rank0.txt").read_text()) == resumed_from  # it went on from there
    a, b = _weights(straight / "final-rank0.pt"), _weights(killed / "final-rank0.pt")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    opt_a = torch.load(straight / "ckpt" / "last.pt", weights_only=False)["optimizer"]["state"]
    opt_b = torch.load(ckpt, weights_only=False)["optimizer"]["state"]
    assert all(torch.equal(opt_a[i]["exp_avg_sq"], opt_b[i]["exp_avg_sq"]) for i in opt_a)


class _Stop(Exception):
    pass


def _quantized_fit(cfg, results, stop_at=None):
    """Build, quantize and calibrate the embedded default as the runner does, then train; an
    exception from the step-`stop_at` record stops it before that step's checkpoint, as a kill would."""
    import methods
    from harness import runner
    from harness.evaluate import registry as evaluators

    method = methods.from_config(cfg["method"])
    ctx = runner.context(cfg, results, results / "ckpt")
    method.plan(ctx)
    method.quantize(ctx)
    method.calibrate(ctx)

    def log(metrics, step):
        if step == stop_at:
            raise _Stop

    data = train_data(cfg, lambda d: evaluators.dataset(cfg, d, results))
    try:
        out = fit(ctx.student, cfg, data, results / "ckpt", method=method, teacher=ctx.teacher, log=log, progress=False)
    except _Stop:
        return None, None
    return ctx.student.state_dict(), out


@pytest.mark.parametrize("method", ["lsq", "pact", "qsam2"])
def test_a_quantized_run_resumed_from_its_checkpoint_reaches_the_same_weights(method, tmp_path):
    """Brevitas rebuilds quantizer modules on load_state_dict: the optimizer must take the
    parameters after the checkpoint is loaded, or the resumed run stops training the quantizers."""
    cfg = config(
        f"method.name={method}",
        *(["method.vrc.calib_images=2"] if method == "qsam2" else []),
        "quant.weight_bits=2",
        "model.image_size=128",
        "data.synthetic.sequences=2",
        "data.synthetic.frames=3",
        "data.synthetic.size=96x64",
        "data.calib.frames=2",
        "train.steps=3",
        "train.batch_size=1",
        "train.frames=2",
        "train.log_every=1",
        "train.checkpoint_every=1",
        "train.data.kind=stream",
        "train.data.size=96x64",
        "train.objectives.distill_mask=1.0",
    )
    straight, _ = _quantized_fit(cfg, tmp_path / "straight")
    _quantized_fit(cfg, tmp_path / "killed", stop_at=2)
    assert torch.load(tmp_path / "killed" / "ckpt" / "last.pt", weights_only=False)["step"] == 1
    resumed, out = _quantized_fit(cfg, tmp_path / "killed")
    assert out["resumed_from"] == 1
    different = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    assert not different, different[:5]


@pytest.mark.e2e
def test_ddp_on_two_processes_matches_one_process(tmp_path):
    """Same global batch (2 clips): 2 ranks of 1 clip give the loss and the averaged gradient of 1 process."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    subprocess.run([*WORKER, str(one), "1"], check=True, cwd=ROOT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29561"]
    subprocess.run([*torchrun, str(ROOT / "tests" / "train_worker.py"), str(two), "1"], check=True, cwd=ROOT, env=env)
    single = json.loads((one / "history-rank0.json").read_text())[0]["train/loss"]
    ddp = json.loads((two / "history-rank0.json").read_text())[0]["train/loss"]
    assert ddp == pytest.approx(single, rel=1e-5)
    # AdamW's first moment after one step is 0.1 x the (clipped) gradient: the gradients agree.
    adam_one = torch.load(one / "ckpt" / "last.pt", weights_only=False)["optimizer"]["state"]
    adam_two = torch.load(two / "ckpt" / "last.pt", weights_only=False)["optimizer"]["state"]
    assert adam_one.keys() == adam_two.keys()
    a = torch.cat([adam_one[i]["exp_avg"].flatten() for i in adam_one])
    b = torch.cat([adam_two[i]["exp_avg"].flatten() for i in adam_one])
    # The batched and the split forward round differently: agreement to 0.1% of the gradient's norm.
    assert (a - b).norm() <= 1e-3 * a.norm()
    # Rank 0 alone writes checkpoints; both ranks end with the same weights.
    a, b = _weights(two / "final-rank0.pt"), _weights(two / "final-rank1.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in (two / "ckpt").iterdir()) == ["last.pt"]


@pytest.mark.e2e
def test_a_suite_under_torchrun_is_run_and_recorded_once_by_rank_0(tmp_path):
    from mlflow.tracking import MlflowClient

    suite = tmp_path / "ddp.yaml"
    suite.write_text(
        """name: ddp
base:
  model: {name: sam2_small, checkpoint: random}
  data:
    synthetic: {sequences: 2, frames: 4, size: 96x64, seed: 1}
    calib: {frames: 3}
  method: {name: rtn_ft}
  train: {steps: 2, batch_size: 2, frames: 2, checkpoint_every: 1, log_every: 1,
          prompts: {point_prob: 0}, data: {kind: stream, size: 96x64}}
"""
    )
    results = tmp_path / "results"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29562"]
    worker = str(ROOT / "tests" / "suite_ddp_worker.py")
    subprocess.run([*torchrun, worker, str(suite), str(results)], check=True, cwd=ROOT, env=env)
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ddp").experiment_id], "tags.kind = 'run'")
    assert [r.info.status for r in runs] == ["FINISHED"]
    history = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2]  # logged once per step, by rank 0 alone
    (ckpt,) = (results / "checkpoints" / "ddp").iterdir()
    assert ckpt.name == runs[0].data.tags["run_key"]
    assert torch.load(ckpt / "last.pt", weights_only=False)["step"] == 2


def test_a_missing_train_data_root_is_named_before_any_work(tmp_path):
    import suite_ddp_worker  # noqa: F401  (registers the training stand-in rtn_ft)

    from harness.config import load_suite
    from harness.errors import ConfigError
    from harness.runner import run_suite

    suite = tmp_path / "qat.yaml"
    suite.write_text(
        "base:\n  method: {name: rtn_ft}\n  train: {steps: 5, data: {kind: davis, root: /no/such/davis}}\n"
    )
    with pytest.raises(ConfigError, match=r"qat\.yaml: run base: train\.data\.root: /no/such/davis is not a folder"):
        run_suite(load_suite(str(suite)), tmp_path / "results")
    assert not (tmp_path / "results").exists()  # nothing recorded


def test_progress_lines_and_interval_means_without_a_terminal(davis_root, caplog, monkeypatch):
    # stderr is not a terminal under pytest: a log line per interval (0 s here) instead of a silent bar.
    monkeypatch.setenv("QBENCH_PROGRESS_INTERVAL", "0")
    cfg = config("train.steps=4", "train.batch_size=1", "train.frames=1", "train.log_every=2")
    ds = DavisDataset(davis_root, split="train")
    with caplog.at_level("INFO", logger="qbench"):
        out = fit(small_model(), cfg, train_data(cfg, lambda d: ds))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train:")]
    assert lines[0] == "train: 0/4 step"
    assert [line.split(" after")[0] for line in lines[1:]] == [f"train: {i}/4 step" for i in (1, 2, 3, 4)]
    assert "loss=" in lines[-1]
    # each record is the mean of its interval's steps, not the last step's value
    every = fit(small_model(), {**cfg, "train": {**cfg["train"], "log_every": 1}}, train_data(cfg, lambda d: ds))
    per_step = [h["train/loss"] for h in every["history"]]
    assert [h["step"] for h in out["history"]] == [2, 4]
    assert [h["train/loss"] for h in out["history"]] == pytest.approx([sum(per_step[:2]) / 2, sum(per_step[2:]) / 2])
