"""Block reconstruction of a calibrated quantized model: BRECQ (Li et al., "BRECQ: Pushing the Limit of
Post-Training Quantization by Block Reconstruction", ICLR 2021) with QDrop's random activation drop
(Wei et al., "QDrop: Randomly Dropping Quantization for Extremely Low-bit Post-Training
Quantization", ICLR 2022), as PTQ4SAM optionally runs it after calibration.

Blocks are the outermost modules whose names match one of the `blocks` globs (default: the image
encoder's Hiera blocks and the mask decoder's two-way transformer layers), taken one after the
other in model order. For each block:

1. The calibration frames run through the student (every quantizer active, earlier blocks already
   reconstructed) and a forward pre-hook keeps the block's inputs, one entry per call; one pass of
   the FP teacher over the same frames gave every block's FP outputs, paired with them by call.
2. What is learned are the block's activation quantizer steps (not AdaRound's weight rounding, the
   simpler choice): the per-tensor step of every Brevitas activation quantizer of the block (layer
   inputs, attention q/k/v; `value` of ParameterFromRuntimeStatsScaling or of rtn's RangeActScale), learned in the log
   domain, s = s0 * exp(theta), with Adam on theta at `lr` (a relative step, whatever the scale's
   size) and a cosine decay to 0, through straight-through rounding gradients (LSQ's d/ds without
   its gradient scale). Weights keep their calibrated per-channel steps (ptq4sam's MSE-searched
   `MseWeightStep`): learning those too, the same way, raised the output error of the first Hiera
   block at W4A4 (4 calibration frames, 200 steps: 0.0135 to 0.0125 at lr 1e-3, 0.020 at 3e-3, 0.10
   at 1e-2), where learning the activation steps alone lowered it to 0.0053 (lr 1e-2 to 1e-1 alike).
   AGQ's log2 softmax quantizers keep their searched (tau, scale). Nothing changes shape or kind,
   so the packed export (which stores activation steps as tensors) is untouched.
3. Each of `iters` steps takes one captured call at random and minimizes the mean squared error
   between the block's outputs and the teacher's (a mean over the outputs of a block that returns
   several, as the two-way layers return queries and keys). During these steps QDrop's drop is on:
   every activation quantizer of the block (layer inputs, q/k/v, softmax) passes each element of
   its input through unquantized with probability `drop_prob` (0: no drop). The drop is a forward
   hook that exists only inside the step loop (`qdrop`): nothing is left set afterwards.
4. The block's output error over all captured calls is measured, without drop, before and after;
   where it did not go down, the block's scales are put back (`kept` false in the table).
"""

from __future__ import annotations

import contextlib
import fnmatch
import math

import torch
import torch.nn as nn
from brevitas.core.scaling.standalone import ParameterFromRuntimeStatsScaling
from torch import Tensor

from harness.errors import ConfigError
from harness.quant.attention import Log2Quant
from harness.quant.ranges import RangeActScale
from harness.quant.state import quantizers

BLOCKS = ["image_encoder.trunk.blocks.*", "sam_mask_decoder.transformer.layers.*"]
DEFAULTS = {"enabled": False, "iters": 200, "lr": 0.01, "drop_prob": 0.5, "blocks": BLOCKS}


def check(params) -> dict:
    """A method's `recon` section, validated and default-filled."""
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ConfigError(f"method.recon: {params!r}; expected a mapping of reconstruction settings")
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        expected = ", ".join(DEFAULTS)
        raise ConfigError(f"method.recon.{unknown[0]}: unknown reconstruction setting; expected one of {expected}")
    p = {**DEFAULTS, **params}

    def bad(key, expected):
        raise ConfigError(f"method.recon.{key}: {p[key]!r}; expected {expected}")

    def num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if not isinstance(p["enabled"], bool):
        bad("enabled", "true or false")
    if not isinstance(p["iters"], int) or isinstance(p["iters"], bool) or p["iters"] < 0:
        bad("iters", "an integer >= 0")
    if not num(p["lr"]) or p["lr"] <= 0:
        bad("lr", "a number > 0")
    if not num(p["drop_prob"]) or not 0 <= p["drop_prob"] < 1:
        bad("drop_prob", "a number in [0, 1)")
    if isinstance(p["blocks"], str):
        p["blocks"] = [p["blocks"]]
    if not (isinstance(p["blocks"], list) and p["blocks"] and all(isinstance(g, str) and g for g in p["blocks"])):
        bad("blocks", "a module-name glob or a list of them, e.g. ['image_encoder.trunk.blocks.*']")
    p["lr"], p["drop_prob"] = float(p["lr"]), float(p["drop_prob"])
    return p


def find_blocks(model: nn.Module, globs) -> dict[str, nn.Module]:
    """The outermost modules matching any glob (a block's own submodules match `blocks.*` too), in model order."""
    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if any(fnmatch.fnmatchcase(name, g) for g in globs) and not any(name.startswith(f"{b}.") for b in out):
            out[name] = module
    return out


def _map(fn, obj):
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map(fn, o) for o in obj)
    if isinstance(obj, dict):
        return {k: _map(fn, v) for k, v in obj.items()}
    return obj


def _tensors(obj) -> list[Tensor]:
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _keep(t: Tensor) -> Tensor:
    # float32 on the CPU (the feed may run in bf16 autocast on a GPU); cloned again outside inference mode later.
    return t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype).clone()


def _normal(t: Tensor) -> Tensor:
    # The feed runs under inference mode; its tensors cannot be saved for backward until cloned outside it.
    return t.clone()


@torch.no_grad()
def _capture(model: nn.Module, feed, frames: int, names: list[str], attach) -> dict[str, list]:
    """{block: what `attach(block, calls)`'s hook appended to calls} while `feed(model, frames)` runs."""
    seen: dict[str, list] = {n: [] for n in names}
    hooks = [attach(model.get_submodule(n), seen[n]) for n in names]
    try:
        feed(model, frames)
    finally:
        for h in hooks:
            h.remove()
    return seen


def capture_inputs(model: nn.Module, feed, frames: int, names: list[str]) -> dict[str, list[tuple]]:
    """{block: [(args, kwargs) of each call]} while `feed(model, frames)` runs."""

    def attach(block, calls):
        def hook(mod, args, kwargs):
            calls.append((_map(_keep, args), _map(_keep, kwargs)))

        return block.register_forward_pre_hook(hook, with_kwargs=True)

    seen = _capture(model, feed, frames, names, attach)
    return {n: [(_map(_normal, a), _map(_normal, k)) for a, k in calls] for n, calls in seen.items()}


def capture_outputs(model: nn.Module, feed, frames: int, names: list[str]) -> dict[str, list[list[Tensor]]]:
    """{block: [output tensors of each call]} while `feed(model, frames)` runs."""

    def attach(block, calls):
        return block.register_forward_hook(lambda mod, args, out: calls.append([_keep(t) for t in _tensors(out)]))

    seen = _capture(model, feed, frames, names, attach)
    return {n: [[_normal(t) for t in outs] for outs in calls] for n, calls in seen.items()}


def _act_modules(block: nn.Module) -> list[nn.Module]:
    """The modules whose output is a block's quantized activation: Brevitas's fused activation quantizers
    (layer inputs, attention q/k/v, a uniform softmax quantizer) and log2 softmax quantizers."""
    out = []
    for kind, q in quantizers(block).values():
        if kind == "weight":
            continue
        proxy = getattr(q, "act_quant", q)
        if hasattr(proxy, "fused_activation_quant_proxy"):
            out.append(proxy.fused_activation_quant_proxy)
        elif isinstance(q, Log2Quant):
            out.append(q)
    return out


@contextlib.contextmanager
def qdrop(block: nn.Module, p: float, gen: torch.Generator):
    """QDrop inside the block: each element of every quantized activation is its FP value with probability p.

    Forward hooks, removed on exit whatever happens: after reconstruction no drop is left anywhere.
    """

    def drop(module, args, out):
        x = args[0]
        y = out[0] if isinstance(out, tuple) else out
        keep_fp = torch.rand(x.shape, generator=gen).to(x.device) < p
        y = torch.where(keep_fp, x.to(y.dtype), y)
        return (y, *out[1:]) if isinstance(out, tuple) else y

    hooks = [m.register_forward_hook(drop) for m in _act_modules(block)] if p > 0 else []
    try:
        yield len(hooks)
    finally:
        for h in hooks:
            h.remove()


def learned_scales(block: nn.Module) -> list[Tensor]:
    """The block's quantizer steps reconstruction learns: those of its Brevitas activation quantizers."""
    out, seen = [], set()
    for kind, q in quantizers(block).values():
        if kind == "weight":
            continue
        for m in q.modules():
            if isinstance(m, (ParameterFromRuntimeStatsScaling, RangeActScale)) and id(m.value) not in seen:
                seen.add(id(m.value))
                out.append(m.value)
    return out


def _outputs(block: nn.Module, call: tuple, device) -> list[Tensor]:
    args, kwargs = _map(lambda t: t.to(device), call)
    return _tensors(block(*args, **kwargs))


def _loss(outs: list[Tensor], target: list[Tensor]) -> Tensor:
    if len(outs) != len(target):
        raise RuntimeError(f"block returned {len(outs)} tensors, the teacher's returned {len(target)}")
    return sum(((o.float() - t.to(o.device)) ** 2).mean() for o, t in zip(outs, target)) / len(outs)


@torch.no_grad()
def block_error(block: nn.Module, calls: list[tuple], targets: list[list[Tensor]]) -> tuple[float, float]:
    """(mean squared error, relative squared error) of the block's outputs against the targets over all calls."""
    device = next(block.parameters()).device
    mse, sq, ref = 0.0, 0.0, 0.0
    for call, target in zip(calls, targets):
        outs = _outputs(block, call, device)
        mse += float(_loss(outs, target))
        sq += sum(float(((o.float() - t.to(o.device)) ** 2).sum()) for o, t in zip(outs, target))
        ref += sum(float((t**2).sum()) for t in target)
    return mse / len(calls), sq / max(ref, 1e-30)


def optimize(block: nn.Module, calls, targets, params: dict, gen: torch.Generator) -> None:
    """`iters` steps of Adam on the log of the block's quantizer scales, QDrop on."""
    scales = learned_scales(block)
    if not scales or params["iters"] == 0:
        return
    device = next(block.parameters()).device
    init = [s.detach().clone() for s in scales]
    thetas = [torch.zeros_like(s) for s in scales]
    opt = torch.optim.Adam(thetas, lr=params["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, params["iters"])
    flags = [s.requires_grad for s in scales]
    try:
        for s in scales:
            s.requires_grad_(True)
        with torch.enable_grad(), qdrop(block, params["drop_prob"], gen):
            for _ in range(params["iters"]):
                i = int(torch.randint(len(calls), (1,), generator=gen))
                loss = _loss(_outputs(block, calls[i], device), targets[i])
                grads = torch.autograd.grad(loss, scales, allow_unused=True)
                for theta, s, g in zip(thetas, scales, grads):
                    theta.grad = torch.zeros_like(theta) if g is None else g * s.detach()  # d/dtheta of s0 exp(theta)
                opt.step()
                sched.step()
                with torch.no_grad():
                    for s, s0, theta in zip(scales, init, thetas):
                        s.copy_(s0 * torch.exp(theta))
    finally:
        for s, flag in zip(scales, flags):
            s.requires_grad_(flag)


def reconstruct(student: nn.Module, teacher: nn.Module, feed, frames: int, params: dict, seed: int = 0) -> list[dict]:
    """Block reconstruction of `student` against the FP `teacher` on `frames` calibration frames.

    Returns one row per block: block, calls, scales (steps learned), mse_before / mse_after and
    rel_before / rel_after (squared error over the teacher's squared output), kept.
    """
    blocks = find_blocks(student, params["blocks"])
    if not blocks:
        raise ConfigError(f"method.recon.blocks: {params['blocks']!r} matches no module of the model")
    missing = [n for n in blocks if n not in dict(teacher.named_modules())]
    if missing:
        raise ConfigError(f"method.recon: the FP teacher has no module {missing[0]!r}")
    gen = torch.Generator().manual_seed(seed)
    targets_all = capture_outputs(teacher, feed, frames, list(blocks))
    was_training = student.training
    student.eval()
    rows = []
    try:
        for name, block in blocks.items():
            targets = targets_all.pop(name)
            calls = capture_inputs(student, feed, frames, [name])[name]
            if len(calls) != len(targets):
                raise RuntimeError(f"block {name}: {len(calls)} calls in the student, {len(targets)} in the teacher")
            if not calls:
                continue  # not on the calibration path
            scales = learned_scales(block)
            before = block_error(block, calls, targets)
            saved = [s.detach().clone() for s in scales]
            optimize(block, calls, targets, params, gen)
            after = block_error(block, calls, targets)
            kept = all(math.isfinite(v) for v in after) and after[0] < before[0]
            if not kept:
                with torch.no_grad():
                    for s, v in zip(scales, saved):
                        s.copy_(v)
                after, kept = before, False
            rows.append(
                {
                    "block": name,
                    "calls": len(calls),
                    "scales": len(scales),
                    "mse_before": before[0],
                    "mse_after": after[0],
                    "rel_before": before[1],
                    "rel_after": after[1],
                    "kept": kept,
                }
            )
    finally:
        student.train(was_training)
    return rows


def table(rows: list[dict]) -> str:
    """The per-block rows as CSV text (a run artifact)."""
    head = "block,calls,scales,mse_before,mse_after,rel_before,rel_after,kept"
    lines = [
        f"{r['block']},{r['calls']},{r['scales']},{r['mse_before']:.6g},{r['mse_after']:.6g},"
        f"{r['rel_before']:.6g},{r['rel_after']:.6g},{str(r['kept']).lower()}"
        for r in rows
    ]
    return "\n".join([head, *lines]) + "\n"


def summary(rows: list[dict]) -> dict[str, float]:
    """Means over blocks, as run metrics (recon/...)."""
    if not rows:
        return {"recon/blocks": 0.0}
    out = {
        f"recon/{k}": sum(r[k] for r in rows) / len(rows)
        for k in ("mse_before", "mse_after", "rel_before", "rel_after")
    }
    out["recon/blocks"] = float(len(rows))
    out["recon/kept_blocks"] = float(sum(r["kept"] for r in rows))
    return out
