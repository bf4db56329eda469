"""Memory-lean QAT (harness/train.py, harness/quant/recompute.py, harness/quant/learned.py) on the
embedded default: micro-batches and checkpointed blocks give the gradients of the plain step, and
keep less for backward."""

import pytest
import torch
from brevitas.nn import QuantIdentity
from train_worker import without_dropout

import methods
from harness import memory, models, train
from harness.config import parse_override, set_dotted
from harness.data import synthetic
from harness.data.clips import ClipDataset, collate
from harness.data.davis import DavisDataset
from harness.errors import OutOfMemory
from harness.evaluate import vos
from harness.quant import recompute
from harness.quant.learned import LearnedIntQuant, LsqActStep
from harness.quant.lsc import LscActClip
from harness.quant.policy import QuantPolicy
from harness.schema import RunConfig


@pytest.fixture(scope="module")
def davis(tmp_path_factory):
    root = synthetic.generate(tmp_path_factory.mktemp("data") / "davis", sequences=6, frames=4, size=(160, 96), seed=5)
    return DavisDataset(root, "train")


def _config(*overrides):
    raw = {}
    for item in ["train.steps=1", "train.batch_size=3", "train.frames=2", "train.grad_clip=0", "train.log_every=1"]:
        set_dotted(raw, *parse_override(item), "test")
    for item in ["train.prompts.point_prob=0", *overrides]:  # mask prompts: no sampled clicks
        set_dotted(raw, *parse_override(item), "test")
    return RunConfig.model_validate(raw).model_dump()


def _model(name, bits, davis):
    torch.manual_seed(0)
    model = without_dropout(models.build("sam2_small", device="cpu"))
    if name == "fp":
        return model, None
    method = methods.get(name, **({"vrc": {"enabled": False}} if name == "qsam2" else {}))
    methods.ptq(
        method, model, QuantPolicy(weight_bits=bits[0], act_bits=bits[1]), lambda m: vos.run_frames(m, davis, 3)
    )
    return model, method


def _step(name, bits, davis, tmp_path, *overrides):
    """One training step: (its loss, the gradient of every parameter, the running LSC statistics)."""
    model, method = _model(name, bits, davis)
    cfg = _config(*overrides)
    data = ClipDataset(davis, 128, 2, seed=0)
    history = train.fit(model, cfg, data, checkpoint_dir=tmp_path, method=method, progress=False)["history"]
    # AdamW's first moment after one step is 0.1 x the gradient (no clipping).
    adam = torch.load(tmp_path / "last.pt", weights_only=False)["optimizer"]["state"]
    grads = torch.cat([adam[i]["exp_avg"].flatten() for i in sorted(adam)]) * 10
    sigmas = [m.sigma.clone() for m in model.modules() if isinstance(m, LscActClip)]
    return history[0]["train/loss"], grads, sigmas


def test_the_clips_differ_in_objects(davis):
    data = ClipDataset(davis, 128, 2, seed=0)
    counts = {collate([data[i]]).masks.shape[1] for i in range(3)}
    assert len(counts) > 1  # so that the micro-batch weights below are not all equal


@pytest.mark.parametrize("name,bits", [("fp", None), ("lsq", (4, 4))])
def test_micro_batches_give_the_gradients_of_the_whole_batch(name, bits, davis, tmp_path, monkeypatch):
    whole = _step(name, bits, davis, tmp_path / "whole")
    split = _step(name, bits, davis, tmp_path / "split", "train.micro_batch=1")
    assert split[0] == pytest.approx(whole[0], rel=1e-5)
    # The batched and the split forward round differently (and move a few codes across a
    # rounding boundary): agreement to 0.1% of the gradient's norm, as DDP's test.
    tolerance = 1e-3 * whole[1].norm()
    assert (split[1] - whole[1]).norm() <= tolerance
    # Micro-batches weighted equally instead of by their objects: a gradient the test tells apart.
    monkeypatch.setattr(train, "_micro_weights", lambda parts, device: [1 / len(parts)] * len(parts))
    equal = _step(name, bits, davis, tmp_path / "equal", "train.micro_batch=1")
    assert (equal[1] - whole[1]).norm() > 10 * tolerance


@pytest.mark.parametrize("prompts", ["train.prompts.point_prob=0", "train.prompts.point_prob=1"])
def test_checkpointed_blocks_give_the_same_gradients_and_statistics(prompts, davis, tmp_path):
    """Q-SAM2's LSC sums a statistic over a step's forwards; the recomputed blocks must see the
    statistic of their first run, and leave the live sum as it was. With point prompts the mask
    decoder runs once per corrective click, each pass recomputed in backward."""
    plain = _step("qsam2", (2, 8), davis, tmp_path / "plain", prompts, "train.checkpoint_blocks=false")
    ckpt = _step("qsam2", (2, 8), davis, tmp_path / "ckpt", prompts, "train.checkpoint_blocks=true")
    assert ckpt[0] == pytest.approx(plain[0], rel=1e-6)
    assert (ckpt[1] - plain[1]).norm() <= 1e-5 * plain[1].norm()
    assert plain[2] and all(torch.allclose(a, b, rtol=1e-6) for a, b in zip(plain[2], ckpt[2], strict=True))


def test_checkpointing_keeps_less_for_backward(davis):
    model, _ = _model("fp", None, davis)
    cfg = _config()
    view = models.training_view(model, "sam2_small", None, cfg["train"]["prompts"])
    view.train()
    inputs = collate([ClipDataset(davis, 128, 2, seed=0)[0]])
    totals, decoder = {}, {}
    for blocks in (False, True):
        with recompute.checkpointing(model, blocks), memory.saved_for_backward(model) as table:
            view(inputs)
        totals[blocks] = sum(table.values())
        decoder[blocks] = sum(b for (part, _), b in table.items() if part in ("sam_mask_decoder", "memory_encoder"))
    assert totals[True] < 0.7 * totals[False], totals
    assert decoder[True] < 0.2 * decoder[False], decoder  # about their inputs, which the checkpoint keeps


def test_later_micro_batches_leave_running_statistics_alone():
    torch.manual_seed(0)
    lsc = LscActClip(8, True, True, lsc_momentum=0.5, lsc_stat="std", lsc_alpha_init="max")
    lsc.train()
    with torch.no_grad():
        lsc._collect(torch.randn(100))
    lsc.init_scale()
    x = 3 * torch.randn(100)
    with recompute.frozen_statistics():
        lsc(x)
    frozen = lsc.sigma.clone()
    assert not lsc.end_step() and torch.equal(lsc.sigma, frozen)  # the frozen call added nothing
    lsc(x)
    assert lsc.end_step()
    assert lsc.sigma == pytest.approx(0.5 * frozen + 0.5 * x.std(correction=0))


def test_fake_quant_keeps_only_its_input_for_backward():
    quant = QuantIdentity(
        act_quant=methods.get("lsq").act_quant(4), return_quant_tensor=False
    )  # LsqActStep + LearnedIntQuant
    assert any(isinstance(m, LearnedIntQuant) for m in quant.modules())
    assert any(isinstance(m, LsqActStep) for m in quant.modules())
    quant.train()
    with torch.no_grad():
        quant(torch.randn(4096))  # initializes the step
    x = torch.randn(64, 4096, requires_grad=True)
    with memory.saved_for_backward(quant) as table:
        quant(x * 1.0)
    # x (the input) and a few scalars: not the 9 bytes per element of v, q and the mask
    assert sum(table.values()) <= x.numel() * 4 + 4096


def test_out_of_memory_in_a_step_names_the_step_and_the_micro_batch(davis):
    class Exhausting:  # a method whose loss term allocates what the device does not have
        def param_groups(self, model):
            return [{"name": "model", "params": list(model.parameters())}]

        def loss_terms(self, model):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

        def on_step(self, model, step):
            pass

    model, _ = _model("fp", None, davis)
    with pytest.raises(
        OutOfMemory, match=r"train step 0: out of memory on cpu with train.micro_batch 1 \(1 of 3 clips"
    ):
        train.fit(
            model,
            _config("train.micro_batch=1"),
            ClipDataset(davis, 128, 2, seed=0),
            method=Exhausting(),
            progress=False,
        )


@pytest.mark.skipif(memory.rss_bytes() is None, reason="needs /proc (Linux)")
def test_a_peak_inside_another_leaves_the_outer_one_the_whole_peak():
    size = 256 * 2**20
    with memory.Peak() as outer:
        with memory.Peak() as first:
            big = torch.ones(size // 4)  # 256 MiB, touched
            del big
        with memory.Peak() as second:
            small = torch.ones(2**20)
            del small
    # The inner resets of the high-water mark must not hide the first block's peak from the outer
    assert first.above > 0.9 * size and second.above < 0.5 * size
    assert outer.peak >= first.peak and outer.above > 0.9 * size


def test_train_bench_reports_peak_memory_and_what_is_saved_for_backward():
    from harness import bench

    out = bench.bench_train_model("sam2_small", None, [("lsq", 4, 4)], rounds=1, batch=1, frames=2, breakdown=True)
    fp, lsq = out["cases"]["fp"], out["cases"]["lsq W4A4"]
    assert fp["ratio"] == 1.0 and lsq["ratio"] > 0
    for c in (fp, lsq):
        assert c["peak_bytes"] > 0 and c["peak_bytes_per_frame"] == c["peak_bytes"] / 2
        assert c["step_s_per_frame"] == c["step_s"] / 2
    assert lsq["peak_ratio"] == lsq["peak_bytes"] / fp["peak_bytes"]
    assert any("LearnedIntQuant" in where for where in lsq["saved_for_backward"])
    assert not any("LearnedIntQuant" in where for where in fp["saved_for_backward"])
    assert "saved for backward" in bench.format_train([out])


@pytest.mark.parametrize("flag,value", [("--clips", "1y2"), ("--cases", "lsq:4")])
def test_bad_train_bench_arguments_are_one_line_errors(flag, value):
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "harness", "bench", "--train", flag, value], capture_output=True, text=True
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and lines[-1].startswith(f"error: bench {flag}: {value!r}"), proc.stderr[-500:]
