"""Every metric a run records, by name: its alias, how tables print it and which way is better.

Search objectives, the report's columns and the training loop's intermediate evaluation read
metrics from here and nowhere else. A benchmark's own metrics come from its evaluator's `Metric`s
(harness/evaluate/registry.py), with their agreement twins (agree/<key>, alias <alias>_fp: the
predictions scored against the FP model's, harness/evaluate/agreement.py); the ones every run records
(the size accounting of harness/quant/size.py, frames/s, each step's time and peak memory) are
declared below.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from harness.errors import ConfigError
from harness.evaluate import registry


@dataclass(frozen=True)
class Info:
    key: str  # MLflow's name
    scale: float = 1.0  # tables print value * scale
    decimals: int = 3
    label: str = ""
    lower_is_better: bool = False
    artifact: str = "per_object.csv"  # the record's per-object table it is a mean over (where it is one)
    per_object: str | None = None  # its name there (harness.stats.PER_OBJECT); None: the key

    @property
    def source(self) -> str:
        return self.per_object or self.key

    @property
    def direction(self) -> str:
        return "min" if self.lower_is_better else "max"


# What harness.quant.size.summary logs for every run (tests/test_catalog.py holds the two together).
SIZE = {
    "params": Info("params", decimals=0, label="parameters"),
    "quantized_params": Info("quantized_params", decimals=0, label="quantized parameters"),
    "quantized_share": Info("quantized_share", decimals=3, label="quantized share of parameters"),
    "size": Info("packed_bytes", 1e-6, 2, "packed size (MB)", lower_is_better=True),
    "bf16_bytes": Info("bf16_bytes", 1e-6, 2, "BF16 size (MB)", lower_is_better=True),
    "ratio": Info("ratio_vs_bf16", 1, 2, "compression vs BF16 (x)"),
    "quantized_ratio_vs_bf16": Info("quantized_ratio_vs_bf16", 1, 2, "quantized layers' compression vs BF16 (x)"),
    "bits_per_weight": Info("bits_per_weight", 1, 2, "bits per weight", lower_is_better=True),
}
RUN = {"fps": Info("fps", 1, 2, "frames/s"), **SIZE}
# Per-step figures (harness/runner.py): time_<step>_s, peak_<step>_gib.
STEP = re.compile(r"time_\w+_s|peak_\w+_gib")


def _evaluators(kind: str | None) -> list[registry.Evaluator]:
    return [registry.get(kind)] if kind else list(registry.EVALUATORS.values())


def aliases(kind: str | None = None) -> dict[str, Info]:
    """alias -> Info of every named metric (of one data kind's runs, or of every kind's)."""
    out: dict[str, Info] = {}
    for ev in _evaluators(kind):
        for m in (*ev.metrics, *ev.agreement):
            label = m.label or m.column or m.key
            scale, decimals, label = (100, 1, f"{label} (%)") if m.percent else (1, 3, label)
            own = m.logged.removeprefix(registry.AGREE)  # per_object_agreement.csv has per_object.csv's columns
            out[m.alias] = Info(m.logged, scale, decimals, label, m.lower_is_better, m.artifact, own)
    fps = Info("fps", 1, 2, registry.get(kind).rate) if kind else RUN["fps"]
    return {**out, **RUN, "fps": fps}


def find(name: str, kind: str | None = None, where: str = "metric") -> Info:
    """An alias (jf, size) or a recorded name (J_F-mean, J-decay, time_train_s) as an Info."""
    named = aliases(kind)
    if name in named:
        return named[name]
    by_key = {i.key: i for i in named.values()}
    if name in by_key:
        return by_key[name]
    if STEP.fullmatch(name):
        return Info(name, 1, 2, name, lower_is_better=True)
    raise ConfigError(
        f"{where}: unknown metric {name!r}; expected one of {', '.join(named)}, a name they log "
        f"({', '.join(sorted(by_key))}) or time_<step>_s / peak_<step>_gib"
    )
