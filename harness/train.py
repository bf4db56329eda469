"""Training loop: QAT, fine-tuning and the embedded default's pretraining.

`fit` reads top to bottom: config, views, optimizer, resume (`_resume`), then per step its
micro-batches (`_step_parts`), their loss and backward (`_accumulate`), the optimizer step, the
record (`_Records`) and the checkpoint (`_save`). The forward and the loss are SAM2's own:
`training.model.sam2.SAM2Train` (a view sharing the student's modules, see
models.training_view) and `training.loss_fns.MultiStepMultiMasksAndIous` (focal 20, dice 1,
IoU 1, object score 1, as SAM2's training configs), fed with clips from harness/data/clips.py.
A method adds parameter groups, loss terms and a per-step hook (methods.base.Method).

Data parallel through torchrun (WORLD_SIZE > 1): every rank takes its share of the global batch,
gradients are averaged by DDP, and rank 0 alone writes checkpoints and records.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from harness import memory, models
from harness.data.clips import ClipDataset, collate
from harness.errors import NonFiniteError, OutOfMemory
from harness.evaluate import registry as evaluators
from harness.progress import progress as progress_bar
from harness.quant import recompute
from harness.quant.swap import weights_once

# SAM2's weights for focal, dice, IoU and object-score terms (sam2.1 training configs).
LOSS_WEIGHTS = {"loss_mask": 20.0, "loss_dice": 1.0, "loss_iou": 1.0, "loss_class": 1.0}


def sam2_loss():
    # Imported here: training.loss_fns pulls in training.trainer (tensorboard, hydra, iopath).
    from training.loss_fns import MultiStepMultiMasksAndIous

    return MultiStepMultiMasksAndIous(
        weight_dict=dict(LOSS_WEIGHTS),
        supervise_all_iou=True,
        iou_use_l1_loss=True,
        pred_obj_scores=True,
        focal_gamma_obj_score=0.0,
        focal_alpha_obj_score=-1.0,
    )


def lr_factor(step: int, steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup, then cosine from 1 down to `min_ratio` (reached after the last step)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(steps - warmup, 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def distributed() -> tuple[int, int]:
    """(rank, world size); joins the torchrun process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        # Other ranks wait in a collective while rank 0 evaluates a run alone: allow long waits.
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per rank
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(hours=12))
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _rng_state(view) -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "sam2train": view.rng.bit_generator.state,  # SAM2Train's own prompt sampler
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(view, state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    view.rng.bit_generator.state = state["sam2train"]
    if state.get("cuda"):
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def _keep_numpy_python_rng():
    state = np.random.get_state(), random.getstate()
    yield
    np.random.set_state(state[0])
    random.setstate(state[1])


def autocast(amp: str, device: torch.device):
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _distill(student_out, teacher_out, student_feats, teacher_feats, weights) -> dict:
    terms = {}
    if weights["distill_mask"]:
        # Binary cross-entropy to the teacher's mask probabilities: bounded where the teacher's
        # "no object" logits are -1024 (an MSE on logits would be dominated by them).
        terms["distill_mask"] = sum(
            F.binary_cross_entropy_with_logits(s["pred_masks"].float(), torch.sigmoid(t["pred_masks"].float()))
            for s, t in zip(student_out, teacher_out, strict=True)
        ) / len(student_out)
    if weights["distill_feat"]:
        terms["distill_feat"] = sum(
            F.mse_loss(s.float(), t.float()) for s, t in zip(student_feats, teacher_feats, strict=True)
        ) / len(student_feats)
    return terms


def distills(objectives: dict) -> bool:
    return bool(objectives["distill_mask"] or objectives["distill_feat"])


def _encoder_features(view) -> tuple[list, object]:
    feats = []
    hook = view.image_encoder.register_forward_hook(lambda m, i, out: feats.extend(out["backbone_fpn"]))
    return feats, hook


def train(ctx, method, on_eval=None) -> dict:
    """The `train` step of a run (methods.base.Context): fit the student, return the last metrics.
    `on_eval(step)`: the runner's intermediate evaluation, every `train.eval_every` steps."""
    data = train_data(ctx.cfg, lambda d: evaluators.dataset(ctx.cfg, d, ctx.results_dir))
    teacher = ctx.teacher if distills(ctx.cfg["train"]["objectives"]) else None
    history = fit(
        ctx.student, ctx.cfg, data, ctx.checkpoint_dir, method=method, teacher=teacher, log=ctx.log, on_eval=on_eval
    )["history"]
    # Summary metrics of the run; the per-step curves are already in the record under train/.
    return {
        "train_final_loss": history[-1]["train/loss"],
        "train_step_s": float(np.mean([h["train/step_s"] for h in history])),
    }


def train_data(cfg: dict, dataset_for) -> ClipDataset:
    """The clip source of a run config's `train.data` section; `dataset_for(part)` opens DAVIS layouts."""
    t, image_size = cfg["train"], cfg["model"]["image_size"]
    image_size = image_size or models.load_config(cfg["model"]["name"]).model.image_size
    d = t["data"]
    if d["kind"] == "stream":
        from harness.data.synthetic import parse_size

        source = {"seed": d["seed"], "size": parse_size(d["size"]), "objects": d["objects"]}
    else:
        source = dataset_for(d)
    return ClipDataset(
        source, image_size, t["frames"], cfg["seed"], t["flip"], t["scale_jitter"], max_objects=t["max_objects"]
    )


def _micro_weights(parts: list, device) -> list[float]:
    """Each micro-batch's share of the step's loss: SAM2's loss is a sum over objects divided by
    their number, so a micro-batch of O_i objects weighs O_i / O (counted over every rank, as
    MultiStepMultiMasksAndIous counts them under DDP), and the sum equals one batch's loss."""
    counts = torch.tensor([float(p.masks.shape[1]) for p in parts], device=device)
    if dist.is_initialized():
        dist.all_reduce(counts)
    return (counts / counts.sum()).tolist()


def _check_finite(values: dict, step: int, device) -> None:
    bad = [(name, value) for name, value in values.items() if not math.isfinite(value)]
    if dist.is_initialized():  # every rank stops, not only the one that saw it
        flag = torch.tensor([float(bool(bad))], device=device)
        dist.all_reduce(flag)
        if flag.item() and not bad:
            raise NonFiniteError(f"train step {step}: a non-finite loss on another rank")
    if bad:
        raise NonFiniteError(f"train step {step}: loss term {bad[0][0]} is {bad[0][1]}")


def _micro_loss(net, view, inputs, criterion, objectives, teacher_view, weight, clip_share, amp):
    """(loss terms, loss) of one micro-batch, weighted by its share of the step's batch."""
    device = inputs.img_batch.device
    if teacher_view is not None:
        before = _rng_state(view)
    feats, hook = _encoder_features(view)
    with autocast(amp, device):
        outputs = net(inputs)
        hook.remove()
        losses = criterion(outputs, inputs.masks)
        terms = {k: losses[k] * weight for k in LOSS_WEIGHTS}
        loss = objectives["supervised"] * losses["core_loss"] * weight
        if teacher_view is not None:
            # The teacher starts from the student's RNG states, so the prompts of the first
            # frame are the same; corrective clicks come from each model's own errors.
            gpus = [device] if device.type == "cuda" else []
            with torch.no_grad(), torch.random.fork_rng(devices=gpus), _keep_numpy_python_rng():
                _set_rng_state(teacher_view, before)
                t_feats, t_hook = _encoder_features(teacher_view)
                t_outputs = teacher_view(inputs)
                t_hook.remove()
            extra = _distill(outputs, t_outputs, feats, t_feats, objectives)
            del t_outputs, t_feats
            for name, value in extra.items():
                # mask distillation is a mean over objects, feature distillation over frames
                terms[name] = value * (clip_share if name == "distill_feat" else weight)
                loss = loss + objectives[name] * terms[name]
    return terms, loss


def _oom_reason(step: int, device, t: dict, share: int) -> str:
    micro, peak = t.get("micro_batch") or share, ""
    if device.type == "cuda":
        peak = f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB allocated"
        torch.cuda.empty_cache()
    return (
        f"train step {step}: out of memory on {device}{peak} with train.micro_batch {micro} "
        f"({micro} of {share} clips x {t['frames']} frames at once); a smaller train.micro_batch needs less"
    )


def _accumulate(net, view, model, parts, criterion, objectives, teacher_view, method, blocks, amp, step) -> dict:
    """Forward and backward of one step's micro-batches; returns the step's loss terms as floats.

    Gradients add up to those of the unsplit batch: each micro-batch's SAM2 loss and mask
    distillation weigh its share of the objects, feature distillation its share of the clips,
    the method's own terms (regularizers) count once. Under DDP gradients are reduced once, at
    the last micro-batch. Prompts are sampled per micro-batch, as SAM2Train samples them per call.
    """
    device = parts[0].img_batch.device
    weights = _micro_weights(parts, device)
    clips = [p.img_batch.shape[1] for p in parts]
    values: dict[str, float] = {}
    for i, inputs in enumerate(parts):
        # A running statistic moves once per step, from the first micro-batch (harness.quant.recompute);
        # the quantized weights stay through backward, where checkpointed blocks run again.
        with recompute.frozen_statistics(i > 0), weights_once(model, eager=blocks):
            weight, share = weights[i], clips[i] / sum(clips)
            terms, loss = _micro_loss(net, view, inputs, criterion, objectives, teacher_view, weight, share, amp)
            if i == 0 and method is not None:
                with autocast(amp, device):
                    for name, value in method.loss_terms(model).items():
                        loss, terms[name] = loss + value, value
            terms["loss"] = loss
            for name, value in terms.items():
                values[name] = values.get(name, 0.0) + float(value.detach() if torch.is_tensor(value) else value)
            _check_finite(values, step, device)
            last = i == len(parts) - 1
            with contextlib.nullcontext() if last or not isinstance(net, DDP) else net.no_sync():
                loss.backward()
        del terms, loss
    return values


def _views(model, teacher, cfg: dict, world: int):
    """(view, net, teacher_view): SAM2's training forward over the student's own modules (net: the
    view under DDP where there are several ranks) and over the teacher's, when it distills."""
    t = cfg["train"]
    view = models.training_view(model, cfg["model"]["name"], cfg["model"]["image_size"], t["prompts"])
    view.train()
    net = DDP(view, find_unused_parameters=True) if world > 1 else view
    teacher_view = None
    if distills(t["objectives"]):
        if teacher is None:
            raise ValueError("train.objectives: distillation needs the FP teacher")
        teacher_view = models.training_view(teacher, cfg["model"]["name"], cfg["model"]["image_size"], t["prompts"])
        teacher_view.eval().requires_grad_(False)
        teacher_view.training = True  # SAM2Train samples prompts as in training only when training
    return view, net, teacher_view


def _optimizer(model, method, t: dict):
    """(groups, optimizer, schedule): AdamW, quantizer parameters with their own learning rate and
    weight decay, warmup then cosine."""
    groups = (
        method.param_groups(model) if method is not None else [{"name": "model", "params": list(model.parameters())}]
    )
    for g in groups:
        quant = g["name"] == "quant"
        g.setdefault("lr", t["quant_lr"] if quant else t["lr"])
        g.setdefault("weight_decay", t["quant_weight_decay"] if quant else t["weight_decay"])
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.AdamW(groups)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, t["steps"], t["warmup_steps"], t["min_lr_ratio"])
    )
    return groups, optimizer, schedule


def _resume(state: dict | None, optimizer, schedule, view, rank: int, steps: int, ckpt: Path | None):
    """(first step to run, history so far): the optimizer, scheduler and random states of a
    checkpoint put back (the model's are loaded before the optimizer exists, see fit)."""
    if state is None:
        return 0, []
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["scheduler"])
    _set_rng_state(view, state["rng"][rank] if rank < len(state["rng"]) else state["rng"][0])
    if rank == 0:
        logging.getLogger("qbench").info("train: resuming from step %d of %d (%s)", state["step"], steps, ckpt)
    return state["step"], state["history"]


def _step_parts(data: ClipDataset, cfg: dict, step: int, rank: int, world: int, device) -> list:
    """This rank's micro-batches of `step`. The data position is the step, so a resumed run sees
    the clips an uninterrupted one would; an image step (train.image_fraction) takes 1-frame clips."""
    t, batch = cfg["train"], cfg["train"]["batch_size"]
    source = data
    if t["image_fraction"] and np.random.default_rng([cfg["seed"], step]).random() < t["image_fraction"]:
        source = copy.copy(data)
        source.frames = 1
    share = batch // world
    clips = [source[step * batch + rank * share + i] for i in range(share)]
    micro = t.get("micro_batch") or share
    return [collate(clips[i : i + micro]).to(device) for i in range(0, share, micro)]


def _save(ckpt: Path, model, optimizer, schedule, view, done: int, history: list, rank: int, world: int) -> None:
    """Write `last.pt` (rank 0), with every rank's random state; a kill mid-write leaves the
    previous checkpoint intact."""
    rngs = [_rng_state(view)]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, _rng_state(view))
    if rank != 0:
        return
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": schedule.state_dict(),
        "step": done,
        "rng": rngs,
        "history": history,
    }
    ckpt.parent.mkdir(parents=True, exist_ok=True)
    tmp = ckpt.with_suffix(f".tmp-{os.getpid()}")
    torch.save(state, tmp)
    tmp.replace(ckpt)


class _Records:
    """The logged curve: every `log_every` steps, the mean of each loss term since the last record,
    the learning rate, seconds per step and the highest step's peak memory."""

    def __init__(self, start: int, history: list):
        self.history, self.metrics = history, {}
        self._sums, self._peak, self._since, self._clock = {}, None, start, time.perf_counter()

    def add(self, values: dict, peak: int | None) -> None:
        for name, value in values.items():
            self._sums[name] = self._sums.get(name, 0.0) + value
        if peak is not None:
            self._peak = max(self._peak or 0, peak)

    def close(self, done: int, lr: float) -> dict:
        now, n = time.perf_counter(), done - self._since
        self.metrics = {f"train/{k}": v / n for k, v in self._sums.items()}
        self.metrics["train/lr"] = lr
        self.metrics["train/step_s"] = (now - self._clock) / n
        if self._peak is not None:  # CPU: the resident set
            self.metrics["train/peak_gib"] = self._peak / 2**30
        self._sums, self._peak, self._since, self._clock = {}, None, done, now
        self.history.append({"step": done, **self.metrics})
        return self.metrics


def fit(
    model,
    cfg: dict,
    data: ClipDataset,
    checkpoint_dir: str | Path | None = None,
    method=None,
    teacher=None,
    log=None,
    progress: bool = True,
    on_eval=None,
) -> dict:
    """Train `model` in place as `cfg["train"]` says.

    Returns {"metrics": the last logged, "history": all logged, "resumed_from": the first step run}.

    `data`: clips; `checkpoint_dir`: where `last.pt` is written every `checkpoint_every` steps
    and resumed from; `method`: param_groups(), loss_terms(), on_step() (None: every parameter
    in one group); `teacher`: the FP model for distillation; `log(metrics, step)`: records;
    `on_eval(step)`: an evaluation every `train.eval_every` steps before the last (rank 0 only),
    with the training random state put back after it, so that it does not change the run.
    """
    t = cfg["train"]
    steps, batch = t["steps"], t["batch_size"]
    rank, world = distributed()
    if batch % world:
        raise ValueError(f"train.batch_size {batch} is not divisible by the {world} data-parallel ranks")
    if on_eval is not None and world > 1:  # rank 0 alone would evaluate while the others wait in a collective
        raise ValueError("train.eval_every: intermediate evaluations run in one process, not under torchrun")
    device = next(model.parameters()).device
    torch.manual_seed(cfg["seed"])
    ckpt = Path(checkpoint_dir) / "last.pt" if checkpoint_dir else None
    state = torch.load(ckpt, map_location=device, weights_only=False) if ckpt and ckpt.is_file() else None
    if state is not None:
        # Before the optimizer takes the parameters: Brevitas rebuilds a quantizer's modules when a
        # state dict is loaded, so quantizer parameters taken earlier would no longer be the model's.
        model.load_state_dict(state["model"])
    view, net, teacher_view = _views(model, teacher, cfg, world)
    criterion = sam2_loss()
    groups, optimizer, schedule = _optimizer(model, method, t)
    start, history = _resume(state, optimizer, schedule, view, rank, steps, ckpt)
    del state
    records = _Records(start, history)
    bar = progress_bar(
        range(start, steps), initial=start, total=steps, desc="train", unit="step", enabled=progress and rank == 0
    )
    with recompute.checkpointing(model, t.get("checkpoint_blocks", True)) as blocks:
        for step in bar:
            parts = _step_parts(data, cfg, step, rank, world, device)
            optimizer.zero_grad(set_to_none=True)
            with memory.Peak(device) as step_peak:
                try:
                    values = _accumulate(
                        net,
                        view,
                        model,
                        parts,
                        criterion,
                        t["objectives"],
                        teacher_view,
                        method,
                        blocks,
                        t["amp"],
                        step,
                    )
                except torch.OutOfMemoryError:
                    raise OutOfMemory(_oom_reason(step, device, t, batch // world)) from None
                if t["grad_clip"]:
                    torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], t["grad_clip"])
                lr = optimizer.param_groups[0]["lr"]  # this step's rate (the scheduler moves on below)
                optimizer.step()
            schedule.step()
            if method is not None:
                method.on_step(model, step)
            if world > 1:
                reduced = torch.tensor([values["loss"]], device=device)
                dist.all_reduce(reduced)
                values["loss"] = float(reduced) / world
            records.add(values, step_peak.peak)
            done = step + 1
            if done % t["log_every"] == 0 or done == steps:
                metrics = records.close(done, lr)
                if rank == 0 and log is not None:
                    log(metrics, done)
                bar.set_postfix(loss=f"{values['loss']:.3f}", refresh=False)
            if on_eval is not None and rank == 0 and done % (t.get("eval_every") or steps) == 0 and done < steps:
                _evaluate_between(on_eval, model, view, done, device)
            if ckpt is not None and (done % t["checkpoint_every"] == 0 or done == steps):
                _save(ckpt, model, optimizer, schedule, view, done, records.history, rank, world)
    bar.close()
    model.eval()
    return {"metrics": records.metrics, "history": records.history, "resumed_from": start}


def _evaluate_between(on_eval, model, view, done: int, device) -> None:
    """`on_eval(done)` in eval mode, with the training random state put back after it."""
    model.eval()
    gpus = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus), _keep_numpy_python_rng():
        on_eval(done)
    view.train()
