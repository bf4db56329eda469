"""Suite files: load (OmegaConf), merge over the defaults, expand the matrix into RunSpecs.

A suite file has `name`, `base` (any part of the run config), `matrix` (dotted key -> list of
values, expanded as a cartesian product), `exclude` (list of {dotted key: value} patterns) and
`report`. Command-line overrides (`quant.act_bits=8`) apply to every expanded run, last.
Full schema validation is a later step; unknown top-level and section keys are already errors.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from harness.errors import ConfigError
from harness.quant.policy import DEFAULT_KEEP_FP, DEFAULT_SCOPE

DEFAULTS = {
    "model": {"name": "sam2_small", "checkpoint": None, "image_size": None},
    "data": {
        # kind "synthetic" generates a DAVIS-layout dataset under results/data (once) and reads it
        # with the DAVIS loader; kind "davis" reads `root` as it is.
        "eval": {"kind": "synthetic", "root": None, "split": "val", "resolution": "480p", "max_sequences": None},
        "calib": {"kind": "synthetic", "root": None, "split": "train", "resolution": "480p", "frames": 16},
        "synthetic": {"sequences": 6, "frames": 10, "size": "256x144", "seed": 0},
    },
    "quant": {
        "weight_bits": 8,
        "act_bits": 8,
        "scope": DEFAULT_SCOPE,
        "keep_fp": DEFAULT_KEEP_FP,
        "attention": True,
        "qkv_bits": None,
        "softmax_bits": None,
        "softmax_quant": "uniform",
        "bits": {},
    },
    "method": {"name": "fp"},
    "eval": {"save_predictions": False},
    "seed": 0,
    "device": None,
}
SUITE_KEYS = {"name", "description", "base", "matrix", "exclude", "report"}
SUITES_DIR = Path(__file__).resolve().parents[1] / "suites"


@dataclass
class RunSpec:
    name: str
    config: dict
    run_key: str


@dataclass
class Suite:
    name: str
    path: Path
    runs: list[RunSpec]
    report: dict = field(default_factory=dict)


def find_suite(name: str) -> Path:
    for candidate in (Path(name), Path("suites") / f"{name}.yaml", SUITES_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    if name.endswith((".yaml", ".yml")):
        raise ConfigError(f"suite file {name} does not exist")
    known = sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))
    raise ConfigError(f"suite {name!r} not found (looked for suites/{name}.yaml); known suites: {', '.join(known)}")


def run_key(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def parse_override(item: str) -> tuple[str, object]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected dotted.key=value")
    return key, yaml.safe_load(value) if value else None


def set_dotted(cfg: dict, key: str, value, where: str) -> None:
    node, parts = cfg, key.split(".")
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part), dict):
            raise ConfigError(f"{where}: {'.'.join(parts[: i + 1])} is not a section (in key {key!r})")
        node = node[part]
    _check_known(node, parts[-1], key, where)
    node[parts[-1]] = value


def _check_known(section: dict, leaf: str, key: str, where: str) -> None:
    # Method parameters, per-glob bits and free-form sections take any key; everything else must exist.
    free = key.startswith(("method.", "quant.bits."))
    if not free and leaf not in section:
        close = difflib.get_close_matches(leaf, list(section), n=1)
        hint = f"; did you mean {key.rsplit('.', 1)[0]}.{close[0]}?" if close else ""
        raise ConfigError(f"{where}: unknown key {key!r}{hint}")


def merge(base: dict, extra: dict, where: str, prefix: str = "") -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        key = f"{prefix}{k}"
        if prefix == "" and k not in out:
            close = difflib.get_close_matches(k, list(out), n=1)
            raise ConfigError(f"{where}: unknown key {key!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
        if isinstance(v, dict) and isinstance(out.get(k), dict) and not key.startswith(("quant.bits", "method")):
            out[k] = merge(out[k], v, where, f"{key}.")
        else:
            if prefix:
                _check_known(out, k, key, where)
            out[k] = copy.deepcopy(v)
    return out


def _matches(config: dict, pattern: dict) -> bool:
    for key, value in pattern.items():
        node = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node != value:
            return False
    return True


def _read(path: Path) -> dict:
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {str(e).splitlines()[0]}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping with keys {', '.join(sorted(SUITE_KEYS))}")
    unknown = sorted(set(raw) - SUITE_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key {unknown[0]!r}; expected {', '.join(sorted(SUITE_KEYS))}")
    return raw


def base_config(suite: str | None = None, overrides: list[str] | None = None) -> dict:
    """One run config: the defaults, a suite's `base` if given, then dotted overrides."""
    cfg = copy.deepcopy(DEFAULTS)
    if suite is not None:
        path = find_suite(suite)
        cfg = merge(cfg, _read(path).get("base") or {}, f"{path}: base")
    for key, value in map(parse_override, overrides or []):
        set_dotted(cfg, key, value, "command-line override")
    return cfg


def load_suite(name: str, overrides: list[str] | None = None) -> Suite:
    path = find_suite(name)
    raw = _read(path)
    base = merge(DEFAULTS, raw.get("base") or {}, f"{path}: base")
    matrix = raw.get("matrix") or {}
    for key, values in matrix.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: matrix.{key}: expected a non-empty list of values")
    parsed = [parse_override(o) for o in overrides or []]
    runs, seen = [], set()
    for combo in itertools.product(*matrix.values()):
        cfg = copy.deepcopy(base)
        for key, value in zip(matrix, combo):
            set_dotted(cfg, key, value, f"{path}: matrix")
        if any(_matches(cfg, pattern) for pattern in raw.get("exclude") or []):
            continue
        for key, value in parsed:
            set_dotted(cfg, key, value, "command-line override")
        key = run_key(cfg)
        if key in seen:
            continue
        seen.add(key)
        label = ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(matrix, combo)) or "base"
        runs.append(RunSpec(label, cfg, key))
    return Suite(raw.get("name", path.stem), path, runs, raw.get("report") or {})
