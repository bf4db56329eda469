"""PTQ4SAM-style PTQ (methods/ptq4sam.py, harness/quant/ptq4sam.py) on the embedded default."""

import numpy as np
import pytest
import torch
from conftest import export_and_reload

import methods
from harness import models
from harness.data import synthetic
from harness.data.davis import DavisDataset
from harness.errors import ConfigError
from harness.evaluate import vos
from harness.quant import big, state
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
