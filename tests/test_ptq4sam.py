"""PTQ4SAM-style PTQ (methods/ptq4sam.py, harness/quant/ptq4sam.py) on the embedded default."""

import numpy as np
import pytest
import torch
from conftest import export_and_reload

import methods
from harness import models
from harness.config import base_config, run_key
from harness.data import synthetic
from harness.data.davis import DavisDataset
from harness.errors import ConfigError
from harness.evaluate import vos
from harness.quant import big, reconstruct, state
from harness.quant.attention import Log2Quant
from harness.quant.policy import QuantPolicy
from harness.quant.ptq4sam import BIG_TARGETS, MseWeightStep, integrate_bimodal


@pytest.fixture(scope="module")
def davis(tmp_path_factory):
    root = synthetic.generate(tmp_path_factory.mktemp("data") / "davis", sequences=4, frames=4, size=(160, 96), seed=5)
    return DavisDataset(root, "train"), DavisDataset(root, "val")


def _feed(ds):
    return lambda model, frames=4: vos.run_frames(model, ds, frames)


def _logits(model, ds):
    """Mask logits of the first frames of a sequence, prompted with its first mask."""
    seq = ds.sequences[0]
    out = []
    with torch.inference_mode():
        state_ = model.init_state(str(ds.image_dir(seq)))
        for obj in ds.object_ids(seq):
            first = ds.annotation(seq, ds.frame_names(seq)[0])
            model.add_new_mask(state_, frame_idx=0, obj_id=obj, mask=torch.from_numpy(first == obj))
        for _, _, logits in model.propagate_in_video(state_):
            out.append(logits.clone())
    return torch.stack(out)


def test_bimodal_integration_leaves_the_fp_model_unchanged(davis):
    torch.manual_seed(0)
    model = models.build("sam2_small", device="cpu")
    before = _logits(model, davis[1])
    folded = integrate_bimodal(model, _feed(davis[0]), 4)
    assert len(folded) == 3  # two two-way blocks and the final token-to-image attention
    # Whatever the detection found, folding any signs into q and k keeps the FP outputs.
    gen = torch.Generator().manual_seed(1)
    for name, m in model.named_modules():
        if name in folded:
            big.fold(m, torch.where(torch.rand(m.k_proj.out_features, generator=gen) < 0.5, -1.0, 1.0))
    assert torch.allclose(_logits(model, davis[1]), before, atol=1e-4)
    assert all(n.startswith("sam_mask_decoder") and n.endswith("token_to_image") for n in folded), BIG_TARGETS


def test_ptq4sam_calibrates_every_attention_and_reloads_exactly(davis, tmp_path):
    torch.manual_seed(0)
    model = models.build("sam2_small", device="cpu")
    method = methods.get("ptq4sam", calib_images=4)
    ctx = methods.ptq(method, model, QuantPolicy(weight_bits=4, act_bits=4), _feed(davis[0]))
    state.check_all_active(model, ctx.decisions)
    logs = [m for m in model.modules() if isinstance(m, Log2Quant)]
    assert logs and all(float(q.tau) in (1, 2, 4) and 0 < float(q.scale) <= 1 for q in logs)
    assert len({(float(q.tau), float(q.scale)) for q in logs}) > 1  # chosen per module
    steps = [m for m in model.modules() if isinstance(m, MseWeightStep)]
    assert steps and all(bool(s.initialized) for s in steps)
    layer = next(
        m
        for m in model.modules()
        if hasattr(m, "weight_quant") and isinstance(m.weight_quant.tensor_quant.scaling_impl, MseWeightStep)
    )
    step = layer.weight_quant.tensor_quant.scaling_impl.value.reshape(-1)
    assert (step <= layer.weight.detach().abs().amax(1) / 7 + 1e-7).all()  # clips at most max|w|
    preds = vos.predict_sequence(model, davis[1], davis[1].sequences[0])
    loaded = export_and_reload(model, method, ctx.decisions, 4, 4, tmp_path / "q.pt")
    assert [float(q.tau) for q in loaded.modules() if isinstance(q, Log2Quant)] == [float(q.tau) for q in logs]
    assert preds[1:].any() and np.array_equal(vos.predict_sequence(loaded, davis[1], davis[1].sequences[0]), preds)


@pytest.mark.parametrize("bad", [{"taus": []}, {"weight_range": "l1"}, {"big": "yes"}, {"calib_images": 0}])
def test_bad_ptq4sam_parameters_are_one_line_errors(bad):
    with pytest.raises(ConfigError, match=rf"method\.{next(iter(bad))}: ") as e:
        methods.get("ptq4sam", **bad)
    assert "\n" not in str(e.value)


RECON = {"enabled": True, "iters": 20, "lr": 0.03, "drop_prob": 0.5}


@pytest.fixture(scope="module")
def reconstructed(davis):
    """A W4A4 ptq4sam run with reconstruction (few steps, 2 calibration frames), as the runner makes it."""

    def teacher():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return models.build("sam2_small", device="cpu").eval().requires_grad_(False)

    torch.manual_seed(0)
    model = models.build("sam2_small", device="cpu")
    method = methods.get("ptq4sam", calib_images=2, recon=RECON)
    logs, artifacts = {}, {}
    ctx = methods.Context(
        {"seed": 0},
        model,
        QuantPolicy(weight_bits=4, act_bits=4),
        make_teacher=teacher,
        calib_feed=_feed(davis[0]),
        log=lambda metrics, step=None: logs.update(metrics),
        artifact=lambda name, text: artifacts.update({name: text}),
    )
    method.plan(ctx)
    method.quantize(ctx)
    method.calibrate(ctx)
    return method, ctx, logs, artifacts


def _rows(csv: str) -> list[dict]:
    head, *lines = csv.strip().splitlines()
    return [dict(zip(head.split(","), line.split(","))) for line in lines]


def test_reconstruction_leaves_every_quantizer_active_and_no_drop(reconstructed, davis):
    method, ctx, logs, _ = reconstructed
    model = ctx.student
    assert "teacher" not in ctx.__dict__  # built for reconstruction only, then freed
    state.check_all_active(model, ctx.decisions)
    found = state.quantizers(model)
    assert found and all(not getattr(q, "act_quant", q).disable_quant for _, q in found.values())
    assert not [n for n, m in model.named_modules() if m._forward_hooks or m._forward_pre_hooks]  # no drop hook left
    assert logs["recon/blocks"] == 10 and logs["recon/kept_blocks"] >= 1
    model.eval()
    first = _logits(model, davis[1])
    assert torch.equal(_logits(model, davis[1]), first)  # deterministic: no random drop at evaluation


def test_qdrop_drops_inside_its_block_only(reconstructed, davis):
    _, ctx, _, _ = reconstructed
    block = ctx.student.get_submodule("image_encoder.trunk.blocks.0")
    x = torch.randn(1, 32, 32, block.dim)
    with torch.no_grad():
        plain = block(x)
        with reconstruct.qdrop(block, 0.5, torch.Generator().manual_seed(0)) as hooks:
            dropped = [block(x), block(x)]
        assert hooks > 0 and not torch.equal(dropped[0], dropped[1]) and not torch.equal(dropped[0], plain)
        assert torch.equal(block(x), plain)


def test_reconstruction_lowers_the_blocks_output_error(reconstructed, davis):
    method, ctx, logs, artifacts = reconstructed
    rows = _rows(artifacts["recon.csv"])
    assert [r["block"] for r in rows] == [f"image_encoder.trunk.blocks.{i}" for i in range(8)] + [
        f"sam_mask_decoder.transformer.layers.{i}" for i in range(2)
    ]
    for r in rows:
        before, after = float(r["mse_before"]), float(r["mse_after"])
        assert after < before if r["kept"] == "true" else after == before, r
    assert sum(r["kept"] == "true" for r in rows) >= 8
    assert logs["recon/rel_after"] < logs["recon/rel_before"]
    assert logs["recon/mse_after"] < logs["recon/mse_before"]
    # The recorded error is the model's: the last Hiera block, on its inputs now, against a fresh FP
    # teacher. (Not a decoder layer: its inputs on later frames depend, through the memory, on the
    # decoder's own outputs, which reconstructing a later layer changes.)
    last = rows[7]["block"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        teacher = models.build("sam2_small", device="cpu").eval()
    feed = _feed(davis[0])
    targets = reconstruct.capture_outputs(teacher, feed, 2, [last])[last]

    def error(model):
        calls = reconstruct.capture_inputs(model, feed, 2, [last])[last]
        return reconstruct.block_error(model.get_submodule(last), calls, targets)[0]

    reconstructed_error = error(ctx.student)
    assert reconstructed_error == pytest.approx(float(rows[7]["mse_after"]), rel=1e-4)
    # Against the same calibration without reconstruction: the errors of the earlier blocks, which
    # each block's "before" already leaves out, add up to much less at the end of the encoder.
    torch.manual_seed(0)
    plain = models.build("sam2_small", device="cpu")
    methods.ptq(methods.get("ptq4sam", calib_images=2), plain, QuantPolicy(weight_bits=4, act_bits=4), feed)
    assert reconstructed_error < 0.92 * error(plain)  # 0.176 against 0.202 when written


def test_reconstructed_model_reloads_exactly(reconstructed, davis, tmp_path):
    method, ctx, _, _ = reconstructed
    assert method.params["recon"]["enabled"]
    preds = vos.predict_sequence(ctx.student, davis[1], davis[1].sequences[0])
    loaded = export_and_reload(ctx.student, method, ctx.decisions, 4, 4, tmp_path / "q.pt")
    state.check_all_active(loaded, ctx.decisions)
    assert preds[1:].any() and np.array_equal(vos.predict_sequence(loaded, davis[1], davis[1].sequences[0]), preds)


def test_reconstruction_off_keeps_the_run_key():
    plain = base_config(None, ["method.name=ptq4sam"])
    assert "recon" not in plain["method"]
    off = base_config(None, ["method.name=ptq4sam", "method.recon={enabled: false, iters: 5}"])
    on = base_config(None, ["method.name=ptq4sam", "method.recon={enabled: true}"])
    assert run_key(off) == run_key(plain) != run_key(on)
    assert on["method"]["recon"] == {**reconstruct.DEFAULTS, "enabled": True}


@pytest.mark.parametrize(
    "bad", [{"iters": -1}, {"lr": 0}, {"drop_prob": 1.0}, {"blocks": []}, {"enabled": "yes"}, {"steps": 3}]
)
def test_bad_reconstruction_settings_are_one_line_errors(bad):
    with pytest.raises(ConfigError, match=rf"method\.recon\.{next(iter(bad))}: ") as e:
        methods.get("ptq4sam", recon={"enabled": True, **bad})
    assert "\n" not in str(e.value)


def test_agq_refuses_an_attention_the_calibration_frames_never_reach():
    torch.manual_seed(0)
    model = models.build("sam2_small", device="cpu")
    images = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    policy = QuantPolicy(weight_bits=8, act_bits=8, scope=["image_encoder", "memory_attention"])
    # Single images never run memory attention: its log2 quantizers would keep s = 1, tau = 1.
    with pytest.raises(
        ConfigError, match=r"method.agq: attention memory_attention\.layers\.0\.\S+ \(\+3 more\) never ran"
    ):
        methods.ptq(methods.get("ptq4sam", big=False), model, policy, lambda m, frames=None: m.image_encoder(images))
