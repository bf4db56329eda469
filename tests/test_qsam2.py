"""Q-SAM2: VRC's closed-form re-fit and LSC's momentum-stabilized learned clips (methods/qsam2.py)."""

import pytest
import torch
import torch.nn as nn
from brevitas.graph.calibrate import calibration_mode
from brevitas.nn import QuantIdentity

import methods
from harness import models, runner
from harness.config import load_suite
from harness.data import synthetic
from harness.errors import ConfigError
from harness.quant import lsc, swap, vrc
from harness.quant.lsc import LscActClip, LscWeightClip
from harness.quant.policy import Decision


def _linear(d_in=12, d_out=5, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, d_out))


def _feed(inputs):
    """A calibration feed over a list of per-image token matrices."""

    def feed(model, frames):
        for x in inputs[:frames]:
            model(x)
        return min(frames, len(inputs))

    return feed


def _refit(model, inputs, **params):
    return vrc.refit(model, _feed(inputs), vrc.check({"enabled": True, "layers": "*", **params}), {"0": 2})


def test_vrc_returns_w_unchanged_for_full_rank_inputs_and_rcond_0():
    model = _linear()
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    inputs = [torch.randn(200, 12) for _ in range(4)]
    (row,) = _refit(model, inputs, rcond=0.0, calib_images=4)
    assert row["rank"] == 12 and row["images"] == 4 and row["rows"] == 4 * (200 - 64)
    assert torch.allclose(model[0].weight, w0, atol=1e-5)
    assert torch.equal(model[0].bias, b0)
    assert row["out_err"] < 1e-10 and row["std_after"] == pytest.approx(row["std_before"], rel=1e-5)


def test_vrc_truncation_lowers_weight_variance_within_the_output_error_bound():
    # Inputs with a decaying spectrum: the weak directions carry weight but little signal.
    model = _linear(d_in=16, d_out=8)
    basis = torch.linalg.qr(torch.randn(16, 16))[0]
    spectrum = torch.logspace(0, -3, 16)
    inputs = [torch.randn(300, 16) * spectrum @ basis.T for _ in range(3)]
    w0 = model[0].weight.detach().double().clone()
    rcond = 0.05
    (row,) = _refit(model, inputs, rcond=rcond, calib_images=3, held_out=0)
    w1 = model[0].weight.detach().double()
    x = torch.cat(inputs).double()
    assert 0 < row["rank"] < 16
    assert row["std_after"] < 0.9 * row["std_before"] and w1.var() < w0.var()
    # Dropping the singular directions below rcond * s_max moves X W^T by at most rcond * s_max * ||W||_F.
    bound = rcond * torch.linalg.matrix_norm(x, ord=2) * torch.linalg.matrix_norm(w0)
    assert torch.linalg.matrix_norm(x @ w1.T - x @ w0.T) <= bound
    assert torch.linalg.matrix_norm(x @ w1.T - x @ w0.T) > 0


def test_vrc_with_image_mean_rows_projects_w_onto_the_images():
    model = _linear(d_in=10, d_out=4)
    inputs = [torch.randn(50, 10) + torch.randn(10) for _ in range(3)]
    w0 = model[0].weight.detach().double().clone()
    (row,) = _refit(model, inputs, rows="image_mean", rcond=1e-6, calib_images=3, held_out=0)
    means = torch.stack([x.double().mean(0) for x in inputs])  # 3 rows < 10 features
    projector = torch.linalg.pinv(means) @ means
    assert row["rank"] == 3 and row["rows"] == 3
    assert torch.allclose(model[0].weight.double(), w0 @ projector, atol=1e-5)
    assert row["maxabs_after"] <= row["maxabs_before"] and row["std_after"] < row["std_before"]


def test_vrc_ridge_and_bias_refit_and_its_one_line_errors():
    model = _linear()
    inputs = [torch.randn(100, 12) for _ in range(2)]
    w0 = model[0].weight.detach().clone()
    (row,) = _refit(model, inputs, ridge=0.5, refit_bias=True, calib_images=2)
    assert model[0].weight.norm() < w0.norm() and row["rank"] == 13
    with pytest.raises(ConfigError, match=r"method\.vrc\.rows: 'pixels'; expected 'tokens' or 'image_mean'"):
        vrc.check({"rows": "pixels"})
    with pytest.raises(ConfigError, match=r"method\.vrc\.rcnd: unknown VRC setting"):
        methods.get("qsam2", vrc={"rcnd": 0.1})
    with pytest.raises(ConfigError, match=r"method\.vrc\.layers: 'mask_decoder\.\*' matches no Linear layer"):
        _refit(model, inputs, layers="mask_decoder.*")


@pytest.mark.parametrize("name,on", [("qsam2", True), ("qsam2_vrc", True), ("rtn", False), ("lsq", False)])
def test_vrc_switch_survives_the_round_trip_through_a_run_config(name, on):
    for enabled in (True, False):
        params = methods.get(name, vrc={"enabled": enabled}).params
        again = methods.from_config({"name": name, **params})  # what a run builds from its canonical config
        assert again.params.get("vrc", {}).get("enabled", False) is enabled
        assert again.params == params
    # A method's default: on for Q-SAM2's, off (and out of run_key) for the others.
    assert methods.get(name).params.get("vrc", {}).get("enabled", False) is on
    assert ("vrc" in methods.get(name, vrc={"enabled": False}).params) is on


def _lsc_identity(momentum, data, update="step"):
    quant = methods.get("qsam2", lsc={"momentum": momentum, "alpha_init": "max", "update": update}).act_quant(4)
    m = QuantIdentity(act_quant=quant, return_quant_tensor=False)
    with torch.no_grad(), calibration_mode(m):
        for batch in data:
            m(batch)
    clip = m.act_quant.fused_activation_quant_proxy.tensor_quant.scaling_impl
    assert isinstance(clip, LscActClip)
    return m.train(), clip


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_lsc_running_statistic_follows_the_momentum_formula(momentum):
    gen = torch.Generator().manual_seed(0)
    calib = [torch.randn(500, generator=gen) * s for s in (1.0, 3.0)]
    m, clip = _lsc_identity(momentum, calib)
    sigma = (calib[0].std(correction=0) + calib[1].std(correction=0)) / 2  # the calibration batches' mean
    assert clip.sigma.item() == pytest.approx(sigma.item(), rel=1e-5)
    absmax = torch.cat(calib).abs().max()
    assert (clip.alpha * clip.sigma).item() == pytest.approx(absmax.item(), rel=1e-5)  # starts at min-max
    for scale in (0.5, 2.0, 4.0):
        # One optimizer step that calls the quantizer twice (two frames through memory attention):
        # the statistic holds still during the step and then moves once, by the calls' mean.
        xs = [torch.randn(300, generator=gen) * scale, torch.randn(300, generator=gen) * 2 * scale]
        for x in xs:
            m(x)
            assert clip.sigma.item() == pytest.approx(sigma.item(), rel=1e-5)
        assert lsc.end_step(m) == 1 and lsc.end_step(m) == 0  # nothing new since
        step_stat = sum(x.std(correction=0) for x in xs) / 2
        sigma = momentum * sigma + (1 - momentum) * step_stat
        assert clip.sigma.item() == pytest.approx(sigma.item(), rel=1e-5)
        if momentum == 0:
            assert clip.sigma.item() == pytest.approx(step_stat.item(), rel=1e-5)
    with torch.no_grad():
        m.eval()(torch.randn(300) * 100)  # evaluation leaves the statistic alone
    assert clip.sigma.item() == pytest.approx(sigma.item(), rel=1e-5)


def test_lsc_per_call_update_moves_the_statistic_at_every_forward():
    gen = torch.Generator().manual_seed(0)
    m, clip = _lsc_identity(0.5, [torch.randn(500, generator=gen)], update="call")
    sigma = clip.sigma.item()
    for scale in (2.0, 4.0):
        x = torch.randn(300, generator=gen) * scale
        m(x)
        sigma = 0.5 * sigma + 0.5 * x.std(correction=0).item()
        assert clip.sigma.item() == pytest.approx(sigma, rel=1e-5)
    assert lsc.end_step(m) == 0  # nothing left for the step's end
    with pytest.raises(ConfigError, match=r"method.lsc.update: 'epoch'; expected 'step' or 'call'"):
        methods.get("qsam2", lsc={"update": "epoch"})


def test_lsc_alpha_receives_the_clipping_gradient():
    m, clip = _lsc_identity(0.5, [torch.randn(500, generator=torch.Generator().manual_seed(1))])
    with torch.no_grad():
        clip.alpha.fill_(0.8)
    x = torch.tensor([-3.0, 2.5, 0.9, 0.1, -0.4, 1.7, -1.2], requires_grad=True)
    upstream = torch.tensor([0.3, -1.0, 2.0, 0.5, 1.5, 0.7, -0.2])
    sigma = clip.sigma.item()  # the clip of a step uses the statistic of the steps before it
    out = m(x)
    (out * upstream).sum().backward()
    c = 0.8 * sigma
    s = c / 7  # signed 4-bit, full range: codes -8..7, the clip c at the top code
    v = x.detach() / s
    above, below = v > 7, v < -8
    assert above.any() and below.any() and not (above | below).all()
    side = above.float() - below.float() * 8 / 7  # d out / d c: q / Qp where clipped
    assert clip.alpha.grad.item() == pytest.approx((upstream * side).sum().item() * sigma, rel=1e-5)
    assert torch.equal(x.grad, upstream * ~(above | below))
    assert torch.allclose(out, torch.clamp(torch.round(v), -8, 7) * s, atol=1e-6)


def test_lsc_weight_clip_per_channel_momentum_and_gradient():
    model = _linear(d_in=8, d_out=3)
    method = methods.get("qsam2", lsc={"alpha_init": "max"})
    swap.quantize(model, [Decision("0", "Linear", 27, True, weight_bits=2, act_bits=8)], method)
    layer = model[0].train()
    clip = layer.weight_quant.tensor_quant.scaling_impl
    assert isinstance(clip, LscWeightClip)
    w = layer.weight.detach().clone()
    layer.quant_weight()  # the first call starts sigma at std(w) and the clip at max|w|, per channel
    assert torch.allclose(clip.sigma.reshape(-1), w.std(1, correction=0))
    assert torch.allclose((clip.alpha * clip.sigma).reshape(-1), w.abs().amax(1))
    with torch.no_grad():
        layer.weight.mul_(torch.tensor([[1.0], [2.0], [0.5]]))
    wq = layer.quant_weight().value
    assert torch.allclose(clip.sigma.reshape(-1), w.std(1, correction=0))  # moves at the step's end
    upstream = torch.randn(3, 8)
    (wq * upstream).sum().backward()
    c = (clip.alpha * clip.sigma).detach()
    v = layer.weight.detach() / c  # 2-bit full range: codes -2..1, step c / 1
    side = (v > 1).float() - 2 * (v < -2).float()
    assert torch.allclose(clip.alpha.grad, (upstream * side).sum(1, keepdim=True) * clip.sigma, atol=1e-6)
    assert lsc.end_step(model) == 1
    expected = 0.9 * w.std(1, correction=0) + 0.1 * layer.weight.detach().std(1, correction=0)
    assert torch.allclose(clip.sigma.reshape(-1), expected)


DAVIS_SUITES = {
    "davis_2bit": 16,  # fp once, rtn / ptq4sam / lsq / pact / qsam2 at W2A4, W2A8, W4A4
    "davis_ptq": 7,  # fp once, rtn / ptq4sam / mixqsam at W4A4, W6A6
    "davis_ablation_momentum": 4,
    "davis_ablation_calib": 8,
    "davis_ablation_parts": 11,
}


@pytest.fixture(scope="module")
def davis_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("davis_env")
    # 2 train sequences x 32 frames: as many calibration frames as the largest count a suite asks for (64)
    root = synthetic.generate(tmp / "DAVIS", sequences=4, frames=32, size=(96, 64), objects=(1, 1))
    models.save_checkpoint(models.build("sam2_small", device="cpu"), tmp / "sam2_small.pt")
    return {"SAM2_MODEL": "sam2_small", "SAM2_CHECKPOINT": str(tmp / "sam2_small.pt"), "DAVIS_ROOT": str(root)}


@pytest.mark.parametrize("name", sorted(DAVIS_SUITES))
def test_davis_suites_expand_and_validate_on_data_in_the_davis_layout(name, davis_env, monkeypatch, tmp_path):
    for key, value in davis_env.items():
        monkeypatch.setenv(key, value)
    suite = load_suite(name)
    assert len(suite.runs) == DAVIS_SUITES[name]
    runner.preflight(suite, tmp_path)  # every model, checkpoint and dataset the runs name
    for spec in suite.runs:
        assert spec.config["data"]["eval"]["root"] == davis_env["DAVIS_ROOT"]
        assert spec.config["model"]["checkpoint"] == davis_env["SAM2_CHECKPOINT"]
    names = {s.config["method"]["name"] for s in suite.runs}
    assert ("mixqsam" if name == "davis_ptq" else "qsam2") in names
    monkeypatch.delenv("SAM2_CHECKPOINT")
    with pytest.raises(ConfigError, match=rf"{name}.yaml: .*environment variable SAM2_CHECKPOINT is not set$"):
        load_suite(name)


def test_lsc_mse_initialization_picks_the_clip_with_the_least_error():
    model = _linear(d_in=256, d_out=4)
    swap.quantize(
        model,
        [Decision("0", "Linear", 1028, True, weight_bits=2, act_bits=8)],
        methods.get("qsam2", lsc={"alpha_init": "mse"}),
    )
    layer = model[0]
    w = layer.weight.detach()
    layer.quant_weight()
    clip = layer.weight_quant.tensor_quant.scaling_impl
    c = (clip.alpha * clip.sigma).detach()

    def err(c):  # 2-bit full range: codes -2..1, step c
        return (torch.clamp(torch.round(w / c), -2, 1) * c - w).pow(2).mean(1, keepdim=True)

    assert (c < w.abs().amax(1, keepdim=True)).all()
    assert (err(c) <= err(w.abs().amax(1, keepdim=True))).all()
    for f in (0.8, 1.25):  # a local minimum on the grid's scale
        assert (err(c) <= err(c * f) + 1e-9).all()


def test_a_methods_label_names_the_parts_each_run_uses():
    nan = float("nan")  # MLflow params a run does not have
    on, off = {"method.lsc.weights": "True", "method.lsc.acts": "True"}, {"method.lsc.weights": "False"}
    cases = [
        ({"method.name": "rtn", "method.vrc.enabled": nan}, "rtn"),
        ({"method.name": "rtn", "method.vrc.enabled": "True"}, "rtn + VRC"),
        ({"method.name": "rtn", "method.act_stat": "max", "method.act_range": "asymmetric"}, "rtn"),
        (
            {"method.name": "rtn", "method.act_stat": "mean_max", "method.act_range": "symmetric"},
            "rtn (symmetric, mean_max)",
        ),
        ({"method.name": "qsam2", "method.vrc.enabled": "True", **on}, "qsam2 (VRC+LSC)"),
        (
            {"method.name": "qsam2", "method.vrc.enabled": "True", "method.vrc.rows": "image_mean", **on},
            "qsam2 (VRC-img+LSC)",
        ),
        (
            {"method.name": "qsam2_vrc", "method.vrc.enabled": "True", "method.vrc.rows": "image_mean"},
            "qsam2_vrc + VRC-img",
        ),
        ({"method.name": "qsam2", "method.vrc.enabled": "False", **on}, "qsam2 (LSC)"),
        ({"method.name": "qsam2", "method.vrc.enabled": "True", **off, "method.lsc.acts": "False"}, "qsam2 (VRC)"),
        ({"method.name": "qsam2", "method.vrc.enabled": "False", **off, "method.lsc.acts": "True"}, "qsam2 (LSC-A)"),
        (
            {"method.name": "qsam2", "method.vrc.enabled": "False", **off, "method.lsc.acts": "False"},
            "qsam2 (min-max QAT)",
        ),
    ]
    for run, label in cases:
        assert methods.label(run) == label


def test_an_uncalibrated_lsc_activation_clip_quantizes_with_its_start_values():
    # A quantizer no calibration frame reached must not crash a forward; the all-active check
    # (harness.quant.state) is what reports it before an evaluation.
    m = QuantIdentity(act_quant=methods.get("qsam2").act_quant(4), return_quant_tensor=False).eval()
    clip = m.act_quant.fused_activation_quant_proxy.tensor_quant.scaling_impl
    assert not clip.calibrated and clip.clip() is None
    x = torch.linspace(-10, 10, 41)
    step = torch.tensor(1.0) / 7  # clip alpha x sigma_hat = 1 x 1 at the top code 7
    assert torch.allclose(m(x), torch.clamp(torch.round(x / step), -8, 7) * step)
