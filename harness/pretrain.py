"""`qbench pretrain-proxy`: train the embedded default (sam2_small) from random weights and ship it.

Reads harness/configs/pretrain_proxy.yaml (a run config) plus dotted overrides, trains with
harness/train.py on freshly generated sequences, writes the weights in float16 to
harness/checkpoints/sam2_small.pt with a model card beside them (sam2_small.json: config, seeds,
steps, wall time, loss history, sha256; sam2_small.md and the loss curve PNG), then scores fp and
rtn on the held-out generated val split with suites/pretrain_val.yaml and adds those numbers.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import mlflow
import torch
import yaml

from harness import models
from harness.config import RunSpec, merge, parse_override, run_key, set_dotted
from harness.errors import ConfigError
from harness.schema import RunConfig, validate
from harness.tracking import Tracker, environment
from harness.train import fit, train_data

CONFIG = Path(__file__).parent / "configs" / "pretrain_proxy.yaml"
VAL_SUITE = "pretrain_val"
SUBSET = 2  # val sequences that the tests score the shipped weights on


def load(overrides: list[str]) -> list[dict]:
    """The validated run config of each phase: `train` updated by the phase's keys, then overrides."""
    raw = yaml.safe_load(CONFIG.read_text())
    phases = raw.pop("phases", None) or [{}]
    configs = []
    for i, phase in enumerate(phases):
        cfg = merge(raw, {"train": phase})
        for key, value in map(parse_override, overrides):
            # `train.x=v` sets every phase, `phases.N.x=v` one phase's train.x.
            scope, _, rest = key.partition(".")
            if scope == "phases":
                index, _, key = rest.partition(".")
                if index != str(i):
                    continue
                key = f"train.{key}"
            set_dotted(cfg, key, value, "command-line override")
        cfg = validate(RunConfig, cfg, f"{CONFIG} (phase {i})").model_dump()
        if cfg["train"]["data"]["kind"] != "stream":
            raise ConfigError(f"{CONFIG}: train.data.kind: pretraining expects 'stream' (fresh generated sequences)")
        configs.append(cfg)
    return configs


def pretrain(overrides: list[str], out: Path = models.EMBEDDED, results: Path = Path("results")) -> dict:
    """Train every phase in order over the same weights; write the weights and the model card."""
    overrides = [o for o in overrides if not o.startswith("phases.")] + [
        o for o in overrides if o.startswith("phases.")
    ]
    phases = load(overrides)
    name = phases[0]["model"]["name"]
    torch.manual_seed(phases[0]["seed"])
    model = models.build(name, models.RANDOM, phases[0]["model"]["image_size"], phases[0]["device"] or "cpu")
    tracker = Tracker(results, "pretrain_proxy")
    versions = environment()  # now: the commit whose code trains, not the one at the end
    start, history, offset = time.perf_counter(), [], 0
    for i, cfg in enumerate(phases):
        key = run_key(cfg)
        with tracker.run(RunSpec(f"pretrain phase {i}", cfg, key)):
            result = fit(
                model,
                cfg,
                train_data(cfg, None),
                checkpoint_dir=results / "checkpoints" / "pretrain_proxy" / key,
                log=lambda metrics, step: mlflow.log_metrics(metrics, step=step),
            )
        history += [{**h, "step": h["step"] + offset, "phase": i} for h in result["history"]]
        offset += cfg["train"]["steps"]
    wall = time.perf_counter() - start

    out.mkdir(parents=True, exist_ok=True)
    weights, tmp = out / f"{name}.pt", out / f".{name}.pt.tmp"
    models.save_checkpoint(model, tmp, dtype=torch.float16)
    card = {
        "file": weights.name,
        "sha256": hashlib.sha256(tmp.read_bytes()).hexdigest(),
        "model": name,
        "phases": phases,
        "command": "qbench pretrain-proxy " + " ".join(overrides),
        "train_wall_s": wall,  # this process's time; a resumed run counts only its last part
        "versions": versions,
        "history": history,
    }
    tmp.replace(weights)
    (out / f"{name}.json").write_text(json.dumps(card, indent=1, default=str) + "\n")
    return measure_card(out / f"{name}.json", results)


def measure_card(card_path: Path, results: Path = Path("results")) -> dict:
    """Score the weights a model card describes and write the numbers into it (`--card-only`)."""
    card = json.loads(card_path.read_text())
    weights = card_path.parent / card["file"]
    plot_loss(card["history"], card_path.parent / f"{card['model']}_loss.png")
    # Records are keyed by config, not by weights: score each set of weights in its own folder.
    results = results / "pretrain_val" / card["sha256"][:16]
    card["val"] = validate_embedded(weights, results)
    card["val_subset"] = score_subset(weights, results)
    card_path.write_text(json.dumps(card, indent=1, default=str) + "\n")
    write_card_md(card, card_path.with_suffix(".md"))
    return card


def validate_embedded(weights: Path, results: Path) -> list[dict]:
    """fp and rtn at W8A8 / W4A8 / W2A8 on the generated val split, with these weights."""
    from harness.config import load_suite
    from harness.runner import run_suite

    rows, failed = run_suite(load_suite(VAL_SUITE, [f"model.checkpoint={weights.resolve()}"]), results)
    if failed:
        raise RuntimeError(f"validation suite {VAL_SUITE} had failed runs: {failed}")
    return [{k: r[k] for k in ("method", "bits", "J&F", "J", "F")} for r in rows]


def score_subset(weights: Path, results: Path) -> dict:
    """FP J&F on the first SUBSET val sequences: what tests/test_embedded.py checks the weights against."""
    from harness.config import load_suite
    from harness.evaluate import vos
    from harness.evaluate.registry import dataset

    cfg = load_suite(VAL_SUITE).runs[0].config
    ds = dataset(cfg, "eval", results)
    ds.sequences = ds.sequences[:SUBSET]
    model = models.build(cfg["model"]["name"], weights, device="cpu")
    summary = vos.evaluate(model, ds, progress=False)[1]
    return {"sequences": ds.sequences, "J&F": summary["J&F-mean"]}


def plot_loss(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["train/loss"] for h in history], label="total (20 focal + dice + IoU + class)")
    ax.plot(steps, [h["train/loss_dice"] for h in history], label="dice")
    for before, after in zip(history, history[1:]):
        if before.get("phase") != after.get("phase"):
            ax.axvline(before["step"], color="grey", linestyle="--", linewidth=1)
            ax.text(before["step"], ax.get_ylim()[1], f" phase {after['phase'] + 1}", va="top", fontsize=8)
    ax.set_xlabel("step (all phases)")
    ax.set_ylabel("loss of the logged step")
    ax.set_yscale("log")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_card_md(card: dict, path: Path) -> None:
    first = card["phases"][0]
    lines = [
        f"# Model card: {card['model']} (the embedded default)",
        "",
        f"Weights: `{card['file']}` (float16, sha256 `{card['sha256']}`), trained from random weights at "
        f"{first['model']['image_size'] or 128} px by",
        "",
        f"    OMP_NUM_THREADS=1 {card['command'].strip()}",
        "",
        "with harness/configs/pretrain_proxy.yaml, in phases over the same weights (AdamW, warmup then cosine):",
        "",
    ]
    for i, cfg in enumerate(card["phases"]):
        t, d = cfg["train"], cfg["train"]["data"]
        lines.append(
            f"{i + 1}. {t['steps']} steps of {t['batch_size']} clips x {t['frames']} frames "
            f"({t['image_fraction']:.0%} of steps single images with point / box prompts), lr {t['lr']}, "
            f"warmup {t['warmup_steps']}, cosine to {t['min_lr_ratio']} x lr; fresh generated sequences every step "
            f"(stream seed {d['seed']}, {d['size']}, {d['objects'][0]}-{d['objects'][1]} objects), never repeated."
        )
    step_s = [h["train/step_s"] for h in card["history"]]
    lines += [
        "",
        f"Wall time: {card['train_wall_s'] / 60:.1f} min on {card['versions']['device']} "
        f"(mean logged step time {sum(step_s) / len(step_s):.2f} s).",
        "",
        "## Validation (generated val split, seed 0, never seen in training: suites/pretrain_val.yaml)",
        "",
        "| method | bits | J&F | J | F |",
        "|---|---|---|---|---|",
    ]
    for r in card["val"]:
        lines.append(f"| {r['method']} | {r['bits']} | {r['J&F']:.3f} | {r['J']:.3f} | {r['F']:.3f} |")
    lines += ["", f"![loss curve]({card['model']}_loss.png)", ""]
    versions = ", ".join(f"{k.split('.', 1)[1]} {v}" for k, v in card["versions"].items() if k.startswith("version."))
    lines += [f"Versions: {versions}; git commit {card['versions'].get('git_commit', '?')}.", ""]
    path.write_text("\n".join(lines))
