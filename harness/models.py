"""Build SAM2 models by name, load and validate checkpoints, override the image size.

Every model is built from a hydra config with the sam2 package's own classes, always as
`SAM2VideoPredictor` (a `SAM2Base` subclass), so the same object serves the video predictor and,
through `image_predictor`, the image predictor.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import json
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from harness.errors import CheckpointError, ConfigError

PROJECT_CONFIGS = Path(__file__).parent / "configs"
SAM2_CONFIGS = {
    **{f"sam2.1_hiera_{s}": f"configs/sam2.1/sam2.1_hiera_{s}.yaml" for s in ("t", "s", "b+", "l")},
    **{f"sam2_hiera_{s}": f"configs/sam2/sam2_hiera_{s}.yaml" for s in ("t", "s", "b+", "l")},
}


def available() -> list[str]:
    return sorted(SAM2_CONFIGS) + sorted(p.stem for p in PROJECT_CONFIGS.glob("*.yaml"))


def config_path(name: str) -> Path:
    """The hydra YAML of a model name (a shipped sam2 config, a project config, or a file path)."""
    if name in SAM2_CONFIGS:
        return Path(str(importlib.resources.files("sam2") / SAM2_CONFIGS[name]))
    if (PROJECT_CONFIGS / f"{name}.yaml").is_file():
        return PROJECT_CONFIGS / f"{name}.yaml"
    if name.endswith(".yaml") and Path(name).is_file():
        return Path(name)
    raise ConfigError(f"model.name: unknown model {name!r}; expected one of {', '.join(available())} or a .yaml path")


TRAIN_TARGET = "training.model.sam2.SAM2Train"
# Weights the project trains and ships (harness/checkpoints/<name>.pt with a model card <name>.json
# holding its sha256); `checkpoint: null` loads them, `checkpoint: random` keeps random weights.
EMBEDDED = Path(__file__).parent / "checkpoints"
RANDOM = "random"


def embedded_card(name: str) -> dict | None:
    card = EMBEDDED / f"{name}.json"
    return json.loads(card.read_text()) if card.is_file() else None


def resolve_checkpoint(name: str, checkpoint: str | Path | None) -> Path | None:
    """The file to load for a model config's `checkpoint` (None: random weights)."""
    if checkpoint == RANDOM:
        return None
    if checkpoint is not None:
        return Path(checkpoint)
    card = embedded_card(name)
    return EMBEDDED / card["file"] if card else None


def verify_embedded(path: Path) -> None:
    """The shipped weights must be the ones their model card describes (sha256)."""
    card = embedded_card(path.stem)
    if card is None or path.resolve() != (EMBEDDED / card["file"]).resolve():
        return
    if not path.is_file():
        raise CheckpointError(f"embedded checkpoint {path} is missing; restore it with `git checkout -- {path}`")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != card["sha256"]:
        raise CheckpointError(
            f"embedded checkpoint {path}: sha256 {digest[:16]}... does not match its model card "
            f"{EMBEDDED / (path.stem + '.json')} ({card['sha256'][:16]}...): the file is damaged or was replaced; "
            "restore it with git or rerun `qbench pretrain-proxy`"
        )


def load_config(name: str, image_size: int | None = None, overrides: list[str] | None = None, train: bool = False):
    cfg = OmegaConf.load(config_path(name))
    # Inference: always the video predictor class (a SAM2Base, so image inference works on it
    # too). Training: SAM2's own training model, whose state dict is the same.
    cfg.model._target_ = TRAIN_TARGET if train else "sam2.sam2_video_predictor.SAM2VideoPredictor"
    if image_size is not None:
        if image_size % 32:
            raise ConfigError(f"model.image_size: {image_size} is not a multiple of 32 (Hiera's windows need it)")
        cfg.model.image_size = image_size
        layer = cfg.model.memory_attention.layer
        for attn in ("self_attention", "cross_attention"):
            layer[attn].feat_sizes = [image_size // 16, image_size // 16]
    for item in overrides or []:
        key, _, value = item.lstrip("+").partition("=")
        OmegaConf.update(cfg, key, OmegaConf.from_dotlist([f"v={value}"]).v, force_add=True)
    return cfg


def build(
    name: str,
    checkpoint: str | Path | None = None,
    image_size: int | None = None,
    device: str | torch.device | None = None,
    overrides: list[str] | None = None,
    train: dict | None = None,
) -> torch.nn.Module:
    """Build SAM2 `name` in eval mode, with weights from `checkpoint` if given (random otherwise).

    With `train` (SAM2Train keyword arguments, e.g. from `train_kwargs`), the model is SAM2's
    training model `training.model.sam2.SAM2Train` instead of the video predictor.
    """
    cfg = load_config(name, image_size, overrides, train=train is not None)
    OmegaConf.resolve(cfg)
    model = instantiate(cfg.model, **(train or {}), _recursive_=True)
    path = resolve_checkpoint(name, checkpoint)
    if path is not None:
        verify_embedded(path)
        load_checkpoint(model, path, config=str(config_path(name)))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval()


def train_kwargs(prompts: dict) -> dict:
    """SAM2Train's prompt-sampling arguments from a run config's `train.prompts` section."""
    return dict(
        prob_to_use_pt_input_for_train=prompts["point_prob"],
        prob_to_use_box_input_for_train=prompts["box_prob"],
        num_correction_pt_per_frame=prompts["correction_points"],
        num_frames_to_correct_for_train=max(prompts["frames_to_correct"], prompts["init_cond_frames"]),
        rand_frames_to_correct_for_train=True,
        num_init_cond_frames_for_train=prompts["init_cond_frames"],
        rand_init_cond_frames_for_train=True,
    )


def training_view(model: torch.nn.Module, name: str, image_size: int | None, prompts: dict) -> torch.nn.Module:
    """A SAM2Train whose modules, parameters and buffers are `model`'s own (shared, not copied).

    Training it trains `model` in place, quantizers included (their swapped layers are the same
    objects), so the model that is evaluated is the one that was trained.
    """
    view = build(name, RANDOM, image_size, device="meta", train=train_kwargs(prompts))
    for attr in ("_modules", "_parameters", "_buffers"):
        own = getattr(view, attr)
        own.clear()
        own.update(getattr(model, attr))
    view.train(model.training)
    return view


def load_torch_file(path: str | Path, what: str = "checkpoint"):
    """torch.load with weights_only, on the CPU, and one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the same user error
        # torch's message runs to a dozen lines of advice about weights_only=False, which is wrong
        # advice for a damaged file: keep its first line.
        first = (str(e).strip().splitlines() or [""])[0]
        why = type(e).__name__ + ("" if "weights_only" in first or not first else f": {first[:200]}")
        raise CheckpointError(
            f"{what} {path} is not a readable torch file ({why}); expected a file written by torch.save"
        ) from e


def read_state_dict(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    path = Path(checkpoint)
    ckpt = load_torch_file(path)
    # SAM2's released checkpoints hold {"model": state_dict}; accept a bare state dict too.
    sd = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"checkpoint {path}: expected a state dict or {{'model': state_dict}}")
    return sd


def load_checkpoint(model: torch.nn.Module, checkpoint: str | Path, config: str = "?") -> None:
    """Load strictly; every mismatch is reported in one error naming checkpoint and config."""
    sd = read_state_dict(checkpoint)
    check_state_dict(sd, model.state_dict(), checkpoint, config)
    model.load_state_dict(sd)


def check(name: str, checkpoint: str | Path | None, image_size: int | None = None) -> None:
    """What `build` would reject, without building: unknown name, unreadable or mismatching checkpoint."""
    config = config_path(name)
    path = resolve_checkpoint(name, checkpoint)
    if path is None:
        return
    verify_embedded(path)
    own = build(name, RANDOM, image_size, device="cpu").state_dict()  # sam2 cannot be built on "meta"
    check_state_dict(read_state_dict(path), own, path, str(config))


def check_state_dict(sd: dict, own: dict, checkpoint, config: str) -> None:
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape
    ]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
            problems.append(f"{len(items)} {label}: {', '.join(items[:5])}{more}")
    if problems:
        raise CheckpointError(f"checkpoint {checkpoint} does not match config {config}: " + "; ".join(problems))


def save_checkpoint(model: torch.nn.Module, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Save in SAM2's released format ({"model": state_dict}), readable by `build`.

    With `dtype` (e.g. torch.float16), floating-point tensors are stored in it; loading casts
    them back to the model's dtype.
    """
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    torch.save({"model": sd}, path)


def image_predictor(model):
    """SAM2ImagePredictor for any image size (sam2 hard-codes the 1024 px feature sizes)."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    predictor = SAM2ImagePredictor(model)
    s = model.image_size
    predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    return predictor
