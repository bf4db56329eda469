"""A small training run in its own process, for the SIGKILL-resume and DDP tests.

    python tests/train_worker.py OUT_DIR STEPS [dotted.key=value ...]

Trains sam2_small from random weights on a generated stream (2 clips x 2 frames, mask prompts,
dropout off so that ranks and runs are comparable), checkpointing in OUT_DIR/ckpt; writes the
final state dict to OUT_DIR/final-rank<R>.pt and the logged losses to OUT_DIR/history-rank<R>.json.
"""

import json
import os
import sys
from pathlib import Path

import torch

from harness import models
from harness.config import parse_override, set_dotted
from harness.schema import RunConfig
from harness.train import fit, train_data


def without_dropout(model):
    """Dropout off (layers and RoPEAttention's attention dropout), so that runs and ranks compare."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if hasattr(m, "dropout_p"):
            m.dropout_p = 0.0
    return model


if __name__ == "__main__":
    torch.set_num_threads(1)
    out, steps = Path(sys.argv[1]), int(sys.argv[2])
    raw = {}
    for item in [
        f"train.steps={steps}",
        "train.batch_size=2",
        "train.frames=2",
        "train.lr=1e-3",
        "train.log_every=1",
        "train.checkpoint_every=2",
        "train.data.kind=stream",
        "train.data.size=96x64",
        "train.prompts.point_prob=0",
        *sys.argv[3:],
    ]:
        set_dotted(raw, *parse_override(item), "worker")
    cfg = RunConfig.model_validate(raw).model_dump()
    torch.manual_seed(0)
    model = models.build("sam2_small", models.RANDOM, device="cpu")
    without_dropout(model)
    result = fit(model, cfg, train_data(cfg, None), checkpoint_dir=out / "ckpt", progress=False)
    rank = int(os.environ.get("RANK", "0"))
    torch.save(model.state_dict(), out / f"final-rank{rank}.pt")
    (out / f"history-rank{rank}.json").write_text(json.dumps(result["history"]))
    (out / f"resumed-from-rank{rank}.txt").write_text(str(result["resumed_from"]))
