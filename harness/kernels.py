"""`qbench bench --kernels`: real integer kernels (torchao) beside the fake-quantized model.

The policy's Linear layers of an FP copy carrying the fake-quantized model's float weights (VRC's
re-fit included) are converted with torchao's quantize_: the same bits, torchao's own scales
(per-row weights, dynamic per-token activations for W8A8; per group of INT4_GROUP weights for
int4). Convolutions and attention matmuls, which the policy also quantizes, stay FP there: torchao
converts Linear layers. Agreement with the fake-quantized model is measured, not assumed.
"""

from __future__ import annotations

import logging
import math
import statistics
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from sam2.utils.transforms import SAM2Transforms

import methods
from harness import memory, models
from harness.bench import _timed, _video_step
from harness.data import synthetic
from harness.data.davis import DavisDataset
from harness.errors import QBenchError
from harness.evaluate import metrics, vos
from harness.quant.policy import QuantPolicy
from harness.quant.size import model_size

INT4_GROUP = 32  # torchao's int4 is group-wise; 32 divides every in_features of sam2_small and Hiera
CALIB_FRAMES = 16  # as the smoke suite's data.calib.frames


@dataclass(frozen=True)
class KernelSetting:
    label: str
    weight_bits: int
    act_bits: int
    torchao: str | None  # the torchao conversion (see _torchao_config); None: torchao has no kernel for it


KERNEL_SETTINGS = [
    KernelSetting("W8A8", 8, 8, "int8_dynamic_act_int8_weight"),
    KernelSetting("W4A16", 4, 16, "int4_weight_only"),
    KernelSetting("W4A8", 4, 8, "int8_dynamic_act_int4_weight"),
    KernelSetting("W4A4", 4, 4, None),
    KernelSetting("W2A8", 2, 8, None),
]


def require_torchao() -> str:
    """torchao's version, or the one-line error of a missing install."""
    # torch warns at torchao's import that an Enum of it needs no registering: nothing to act on.
    pytree_log = logging.getLogger("torch.utils._pytree")
    level = pytree_log.level
    pytree_log.setLevel(logging.ERROR)
    try:
        import torchao
    except ImportError:
        raise QBenchError(
            "qbench bench --kernels needs torchao: pip install 'sam2-qbench[kernels]' (or pip install torchao)"
        ) from None
    finally:
        pytree_log.setLevel(level)
    return torchao.__version__


def _torchao_config(kind: str, device: torch.device):
    """torchao's config for one conversion on one device, and the dtype its Linear layers need first."""
    if kind == "int8_dynamic_act_int8_weight":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig

        return Int8DynamicActivationInt8WeightConfig(set_inductor_config=False), None
    if kind == "int4_weight_only" and device.type == "cpu":
        # CPU: tinygemm's _weight_int4pack_mm_for_cpu, through torchao's Int4OpaqueTensor (prototype)
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        return PrototypeInt4WeightOnlyConfig(group_size=INT4_GROUP, set_inductor_config=False), None
    if kind == "int4_weight_only":
        # CUDA: tinygemm's _weight_int4pack_mm, on bfloat16 weights only (activations are cast to it)
        from torchao.quantization import Int4WeightOnlyConfig

        config = Int4WeightOnlyConfig(
            group_size=INT4_GROUP, int4_packing_format="tile_packed_to_4d", set_inductor_config=False
        )
        return config, torch.bfloat16
    if kind == "int8_dynamic_act_int4_weight":
        # CPU only, and only where torchao was built with its da8w4_linear_cpu kernel
        from torchao.prototype.quantization.int4 import Int8DynamicActivationInt4WeightConfig

        return Int8DynamicActivationInt4WeightConfig(group_size=INT4_GROUP, set_inductor_config=False), None
    raise ValueError(f"unknown torchao conversion {kind!r}")


def _is_torchao(t: torch.Tensor) -> bool:
    from torchao.utils import TorchAOBaseTensor

    return isinstance(t, TorchAOBaseTensor)


def kernel_available(setting: KernelSetting, device="cpu") -> tuple[bool, str]:
    """Whether torchao converts and runs one Linear layer of this setting on `device`, and why not."""
    if setting.torchao is None:
        return False, "torchao has no kernel for these bits"
    device = torch.device(device)
    try:
        config, dtype = _torchao_config(setting.torchao, device)
        from torchao.quantization import quantize_

        layer = nn.Linear(64, 64).to(device=device, dtype=dtype)
        quantize_(layer, config)
        if not _is_torchao(layer.weight):
            return False, "torchao left the weight unconverted"
        with torch.inference_mode():
            layer(torch.randn(4, 64, device=device))
    except Exception as e:  # any failure of torchao here means: no kernel on this device
        return False, f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:120]
    return True, ""


def policy_linears(decisions) -> set[str]:
    """The Linear layers the plan quantizes: what the conversion converts."""
    return {d.name for d in decisions if d.quantize and d.kind == "Linear"}


def convert(fq: nn.Module, decisions, setting: KernelSetting, build) -> nn.Module:
    """A fresh FP model (`build()`) with the fake-quantized model's float weights, its policy's
    Linear layers converted by torchao; every other module as built (FP)."""
    from torchao.quantization import quantize_

    model = build()
    own = model.state_dict()
    # A swapped layer keeps its float weight under the same key; quantizer keys are not the FP model's.
    state = {k: v for k, v in fq.state_dict().items() if k in own}
    if own.keys() - state.keys():
        raise QBenchError(f"bench --kernels: the fake-quantized model lacks {sorted(own.keys() - state.keys())[:3]}")
    model.load_state_dict(state)
    names = policy_linears(decisions)
    config, dtype = _torchao_config(setting.torchao, next(model.parameters()).device)
    if dtype is not None:
        for n in names:
            model.get_submodule(n).to(dtype)
    quantize_(model, config, filter_fn=lambda m, fqn: fqn in names)
    left = sorted(n for n in names if not _is_torchao(model.get_submodule(n).weight))
    if left:
        raise QBenchError(
            f"bench --kernels {setting.label}: torchao left {len(left)} of the policy's {len(names)} Linear layers "
            f"unconverted, e.g. {left[0]} (in_features not a multiple of {INT4_GROUP}?)"
        )
    return model


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    """10 log10(|ref|^2 / |ref - x|^2)."""
    ref, x = ref.double(), x.double()
    noise = (ref - x).pow(2).sum()
    return float("inf") if noise == 0 else float(10 * torch.log10(ref.pow(2).sum() / noise))


def _features(model, x) -> torch.Tensor:
    """The image encoder's outputs, every FPN level flattened into one vector."""
    with torch.inference_mode():
        return torch.cat([f.float().reshape(-1) for f in model.image_encoder(x)["backbone_fpn"]])


def _encoder_step(model, x):
    model.image_encoder(x)


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; a torchao tensor by its inner tensors (int codes, scales)."""
    if _is_torchao(t):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def held_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (torchao's packed weights at their real size)."""
    return sum(_tensor_bytes(t) for t in [*model.parameters(), *model.buffers()])


def _mask_iou(a: np.ndarray, b: np.ndarray, ids) -> float:
    """Mean IoU of two predicted id maps per object and frame (frames 1.., frame 0 is the prompt)."""
    ious = [metrics.jaccard(a[t] == o, b[t] == o) for t in range(1, len(a)) for o in ids]
    return float(np.mean(ious))


def _jf(ds, seq, pred) -> float:
    per_object = metrics.per_object_frame({seq: metrics.score_sequence(ds.annotations(seq), pred, ds.object_ids(seq))})
    return metrics.summarize(per_object)["J&F-mean"]


def bench_kernels(
    name,
    image_size=None,
    quant: dict | None = None,
    settings=KERNEL_SETTINGS,
    method_name="rtn",
    checkpoint=None,
    repeats=5,
    frames=4,
    agree_frames=8,
    calib_frames=CALIB_FRAMES,
    device="cpu",
) -> dict:
    """Per setting: latency (median of `repeats` after a warm-up, FP / fake-quant / converted called
    in turn) and peak memory of the image encoder and of one tracking step; SQNR of the converted
    model's image-encoder features against the fake-quantized model's, and the mask IoU of their
    predictions over a generated sequence; the packed size. Settings without a kernel: size only."""
    version = require_torchao()
    device = torch.device(device)
    quant = dict(quant or {})

    def build():
        return models.build(name, checkpoint, image_size=image_size, device=device)

    torch.manual_seed(0)
    fp = build()
    out = {"model": name, "image_size": fp.image_size, "device": device.type, "method": method_name}
    out |= {"torch_threads": torch.get_num_threads(), "torchao": version, "repeats": repeats}
    out |= {"frames": frames, "agree_frames": agree_frames}
    out |= {"fp_held_bytes": held_bytes(fp), "settings": []}
    # Calibration frames (smoke's 16, or more where the method asks: VRC's, PTQ4SAM's calib_images)
    # come from sequences of their own; one more sequence is timed and scored.
    calib_frames = max(calib_frames, methods.get(method_name).calibration_frames())
    n_calib = math.ceil(calib_frames / agree_frames)
    with tempfile.TemporaryDirectory() as tmp:
        root = synthetic.generate(
            f"{tmp}/data", n_calib + 1, agree_frames, size=(256, 144), seed=0, val_fraction=1 / (n_calib + 1)
        )
        calib, ds = DavisDataset(root, "train"), DavisDataset(root, "val")
        seq = ds.sequences[0]
        image = ds.image(seq, ds.frame_names(seq)[0])
        x = SAM2Transforms(fp.image_size, mask_threshold=0.0)(image)[None].to(device)
        fp_pred = vos.predict_sequence(fp, ds, seq)
        fp_features = _features(fp, x)

        def feed(m, n=None):  # as a run's calib_feed: the first n calibration frames
            return vos.run_frames(m, calib, n or calib_frames)

        for s in settings:
            policy = QuantPolicy.from_config({**quant, "weight_bits": s.weight_bits, "act_bits": s.act_bits})
            fq = build()
            fq.load_state_dict(fp.state_dict())
            ctx = methods.ptq(methods.get(method_name), fq, policy, feed)
            ok, why = kernel_available(s, device)
            row = {"setting": s.label, "kernel": ok, "why_not": why, "torchao": s.torchao}
            row["packed_bytes"] = model_size(fq)["packed_bytes"]
            row["linear_layers"] = len(policy_linears(ctx.decisions))
            # quantized by the policy, FP in the converted model: convs and attention matmuls
            row["not_converted"] = sum(d.quantize and d.kind != "Linear" for d in ctx.decisions)
            out["settings"].append(row)
            if not ok:
                continue
            cv = convert(fq, ctx.decisions, s, build)
            trio = {"fp": fp, "fq": fq, "cv": cv}
            for label, step in (
                ("image_encoder", lambda m: _encoder_step(m, x)),
                ("video_frame", lambda m: _video_step(m, ds, seq, frames)),
            ):
                times = {k: [] for k in trio}
                peaks = {k: [] for k in trio}
                with torch.inference_mode():
                    for m in trio.values():
                        step(m)  # warm-up
                    for _ in range(repeats):
                        for k, m in trio.items():
                            with memory.Peak(device) as peak:
                                times[k].append(_timed(step, m))
                            peaks[k].append(peak.above)
                per = frames if label == "video_frame" else 1  # one tracking step, as `qbench bench`
                row[label] = {f"{k}_s": statistics.median(v) / per for k, v in times.items()}
                row[label] |= {f"{k}_peak_bytes": max(v) if None not in v else None for k, v in peaks.items()}
            fq_features = _features(fq, x)
            cv_features = _features(cv, x)
            row["sqnr_db"] = sqnr_db(fq_features, cv_features)
            row["sqnr_fq_vs_fp_db"] = sqnr_db(fp_features, fq_features)
            row["sqnr_cv_vs_fp_db"] = sqnr_db(fp_features, cv_features)
            fq_pred, cv_pred = vos.predict_sequence(fq, ds, seq), vos.predict_sequence(cv, ds, seq)
            row["mask_iou"] = _mask_iou(fq_pred, cv_pred, ds.object_ids(seq))
            row["jf"] = {"fp": _jf(ds, seq, fp_pred), "fq": _jf(ds, seq, fq_pred), "cv": _jf(ds, seq, cv_pred)}
            row["cv_held_bytes"] = held_bytes(cv)
            del fq, cv, trio
    return out


def format_kernels(results: list[dict]) -> str:
    mb, trio = 1e6, ("fp", "fq", "cv")
    lines = []
    for r in results:
        lines.append(
            f"{r['model']} {r['image_size']} px, {r['device']}, torch threads {r['torch_threads']}, "
            f"torchao {r['torchao']}, {r['method']}; ms: median of {r['repeats']} after a warm-up, "
            "fp/fq/cv = FP / fake-quant (Brevitas) / converted (torchao)"
        )
        lines.append(
            f"enc: the image encoder; track: one tracking step ({r['frames']}-frame call / {r['frames']}); peak: "
            "above the resident models during a call, the larger workload (CPU: RSS; CUDA: allocated); SQNR: "
            "converted vs fake-quant image-encoder features, fq/cv~FP: each vs FP; IoU, dJ&F: converted vs "
            f"fake-quant masks over a generated {r['agree_frames']}-frame sequence; packed: harness.quant.size, BF16"
        )
        lines.append(
            f"{'setting':<7} {'kernel':<6} {'enc ms fp/fq/cv':>17} {'track ms fp/fq/cv':>19} "
            f"{'peak MB fp/fq/cv':>17} {'weights MB fp/cv':>17} {'SQNR dB':>8} {'fq/cv~FP':>9} {'IoU':>6} "
            f"{'dJ&F':>6} {'packed MB':>9}"
        )
        for row in r["settings"]:
            head = f"{row['setting']:<7} {'yes' if row['kernel'] else 'no':<6}"
            packed = f"{row['packed_bytes'] / mb:>9.3f}"
            if not row["kernel"]:
                dashes = " ".join(f"{'-':>{w}}" for w in (17, 19, 17, 17, 8, 9, 6, 6))
                lines.append(f"{head} {dashes} {packed}")
                continue
            enc, trk = row["image_encoder"], row["video_frame"]
            ms = lambda w: "/".join(f"{w[f'{k}_s'] * 1e3:.1f}" for k in trio)  # noqa: E731
            peaks = [[w[f"{k}_peak_bytes"] for w in (enc, trk) if w[f"{k}_peak_bytes"] is not None] for k in trio]
            peak = "/".join(f"{max(p) / mb:.1f}" if p else "n/a" for p in peaks)
            held = f"{r['fp_held_bytes'] / mb:.2f}/{row['cv_held_bytes'] / mb:.2f}"
            vs_fp = f"{row['sqnr_fq_vs_fp_db']:.1f}/{row['sqnr_cv_vs_fp_db']:.1f}"
            djf = row["jf"]["cv"] - row["jf"]["fq"]
            lines.append(
                f"{head} {ms(enc):>17} {ms(trk):>19} {peak:>17} {held:>17} {row['sqnr_db']:>8.1f} {vs_fp:>9} "
                f"{row['mask_iou']:>6.3f} {djf:>+6.3f} {packed}"
            )
        done = [row for row in r["settings"] if row["kernel"]]
        if done:
            lines.append(
                f"converted: the policy's {done[0]['linear_layers']} Linear layers; its {done[0]['not_converted']} "
                "quantized convs and attention modules stay FP there"
            )
        for row in r["settings"]:
            if not row["kernel"]:
                lines.append(f"no kernel, {row['setting']}: {row['why_not']}")
    return "\n".join(lines)
