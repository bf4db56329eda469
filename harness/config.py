"""Suite files: load (OmegaConf), validate (harness.schema), expand the matrix into RunSpecs.

A suite file has `name`, `base` (any part of the run config), `seeds`, `matrix` (dotted key ->
list of values, expanded as a cartesian product), `include` (extra runs: {dotted key: value} over
base, each repeated over the seeds unless it names one) and `exclude` (patterns of {dotted key:
value}), `report` and `search`. Command-line
overrides (`quant.act_bits=8`) apply to every expanded run, last. Every run config is validated
and default-filled before anything runs; run_key hashes that canonical form.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import methods
from harness import models
from harness.errors import ConfigError
from harness.schema import ReportCfg, RunConfig, SuiteFile, validate

DEFAULTS = RunConfig().model_dump()
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
    executor: dict = field(default_factory=dict)  # schema.ExecutorCfg, dumped


def find_suite(name: str) -> Path:
    for candidate in (Path(name), Path("suites") / f"{name}.yaml", SUITES_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    if name.endswith((".yaml", ".yml")):
        raise ConfigError(f"suite file {name} does not exist")
    known = sorted(p.stem for p in SUITES_DIR.glob("*.yaml"))
    raise ConfigError(f"suite {name!r} not found (looked for suites/{name}.yaml); known suites: {', '.join(known)}")


OUT_OF_KEY = {"eval_every", "checkpoint_blocks", "memory_check"}


def run_key(config: dict) -> str:
    # train.eval_every only adds evaluations along the way (the trained model is the same, tested):
    # a search trial and a suite run of one config share their key and their record.
    # train.checkpoint_blocks changes memory and time only (the same gradients, tested);
    # train.memory_check only whether a run that may not fit starts.
    if set(config["train"]) & OUT_OF_KEY:
        config = {**config, "train": {k: v for k, v in config["train"].items() if k not in OUT_OF_KEY}}
    # sort_keys would hide the order of quant.bits entries, and there later entries win.
    bits = list(config["quant"]["bits"])
    payload = {**config, "_bits_order": bits} if len(bits) > 1 else config
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def parse_override(item: str) -> tuple[str, object]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected dotted.key=value")
    try:
        return key, yaml.safe_load(value) if value else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({str(e).splitlines()[0]})") from None


def set_dotted(cfg: dict, key: str, value, where: str) -> None:
    node, parts = cfg, key.split(".")
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: {'.'.join(parts[: i + 1])} is not a section (in key {key!r})")
    node[parts[-1]] = value


def merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        # Method parameters and per-module bit maps are replaced whole, not merged key by key.
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("method", "bits"):
            out[k] = merge(out[k], v)
        else:
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


def canonical(cfg: dict, where: str) -> dict:
    """Validated, default-filled run config: what run_key hashes.

    The method validates its own parameters. Parameters of other registered methods are dropped
    (a suite sweeping method.name over [fp, rtn, lsq] sets each one's parameters in one `method`
    section), a method that quantizes nothing gets the default quant section and one that does
    not train the default train section, so that settings which cannot change a run cannot make
    two run_keys for it.
    """
    out = validate(RunConfig, cfg, where).model_dump()
    for glob, bits in out["quant"]["bits"].items():
        out["quant"]["bits"][glob] = {k: v for k, v in bits.items() if v is not None}
    params = dict(out["method"])
    name = params.pop("name")
    others = {k for cls in methods.REGISTRY.values() for k in cls.defaults}
    for key in params:
        if key not in others:
            close = difflib.get_close_matches(key, sorted(others), n=1)
            hint = f"; did you mean 'method.{close[0]}'?" if close else ""
            raise ConfigError(f"{where}: method.{key}: not a parameter of any method{hint}")
    cls = methods.REGISTRY.get(name)
    own = {k: v for k, v in params.items() if cls is None or k in cls.defaults}
    try:
        method = methods.get(name, **own)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    out["method"] = {"name": name, **method.params}
    if not method.quantizes:
        out["quant"] = copy.deepcopy(DEFAULTS["quant"])
        out["data"]["calib"] = copy.deepcopy(DEFAULTS["data"]["calib"])
    if not method.trains:
        out["train"] = copy.deepcopy(DEFAULTS["train"])
    quant = out["quant"]
    quant["qkv_bits"] = quant["qkv_bits"] or quant["act_bits"]
    quant["softmax_bits"] = quant["softmax_bits"] or quant["act_bits"]
    card = models.embedded_card(out["model"]["name"]) if out["model"]["checkpoint"] is None else None
    out["model"]["weights_sha256"] = card["sha256"] if card else None
    # The device changes results (bf16 autocast on CUDA): resolve it so that it is part of run_key.
    out["device"] = out["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    for key in ("eval_every", "micro_batch"):  # added later: runs without them keep their run_keys
        if not out["train"][key]:
            del out["train"][key]
    for part in ("eval", "calib"):  # COCO's detector prompts: in run_key only where used
        d = out["data"][part]
        if d["detections"] is None:
            del d["detections"], d["score_threshold"]
    return out


def read_suite_file(path: Path) -> SuiteFile:
    """A suite file as written (env variables resolved), before its runs are expanded."""
    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    except OmegaConfBaseException as e:
        msg = str(e).splitlines()[0]
        missing = re.search(r"Environment variable '([^']+)' not found", msg)
        if missing:
            msg = f"environment variable {missing.group(1)} is not set"
        raise ConfigError(f"{path}: {getattr(e, 'full_key', None) or 'interpolation'}: {msg}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(raw, dict) or not raw:  # an empty file would silently run the defaults
        empty = "empty; " if not raw else ""
        raise ConfigError(f"{path}: {empty}expected a mapping of suite keys ({', '.join(SuiteFile.model_fields)})")
    return validate(SuiteFile, raw, str(path))


def base_config(suite: str | None = None, overrides: list[str] | None = None) -> dict:
    """One run config: the defaults, a suite's `base` if given, then dotted overrides."""
    cfg, where = copy.deepcopy(DEFAULTS), "command-line override"
    if suite is not None:
        path = find_suite(suite)
        cfg = merge(cfg, read_suite_file(path).base)
        where = f"{path}: base or override"
    for key, value in map(parse_override, overrides or []):
        set_dotted(cfg, key, value, "command-line override")
    return canonical(cfg, where)


def load_suite(name: str, overrides: list[str] | None = None) -> Suite:
    path = find_suite(name)
    suite = read_suite_file(path)
    base = merge(DEFAULTS, suite.base)
    canonical(base, f"{path}: base")
    matrix = dict(suite.matrix)
    if suite.seeds:
        matrix["seed"] = suite.seeds
    for key, values in matrix.items():
        if not values:
            raise ConfigError(f"{path}: matrix.{key}: expected a non-empty list of values")
    parsed = [parse_override(o) for o in overrides or []]
    # report.* settings change the tables, not the runs: they leave the run keys alone.
    report, settings = suite.report, [p for p in parsed if p[0].startswith("report.")]
    if settings:
        raw = report.model_dump(exclude_none=True)
        for key, value in settings:
            set_dotted(raw, key.removeprefix("report."), value, "command-line override")
        report = validate(ReportCfg, raw, "command-line override", "report.")
    parsed = [p for p in parsed if not p[0].startswith("report.")]
    for key, _ in parsed:
        if key.startswith("search."):  # else refused as an unknown run-config key, which says less
            raise ConfigError(
                f"command-line override {key}: a search setting; `qbench search` takes it, suite runs do not"
            )
    combos = [dict(zip(matrix, combo)) for combo in itertools.product(*matrix.values())]
    for key in {k for pattern in suite.exclude for k in pattern}:
        if not known_key(key):
            raise ConfigError(f"{path}: exclude: unknown key {key!r}")
    combos = [c for c in combos if not any(_matches_flat(c, base, p) for p in suite.exclude)]
    # An extra run repeats over the suite's seeds as the matrix runs do, unless it names its seed.
    seeds = [{"seed": v} for v in suite.seeds] if suite.seeds else [{}]
    combos += [{**seed, **extra} for extra in suite.include for seed in ([{}] if "seed" in extra else seeds)]
    runs, seen = [], set()
    for combo in combos:
        cfg = copy.deepcopy(base)
        for key, value in combo.items():
            set_dotted(cfg, key, value, f"{path}: matrix")
        for key, value in parsed:
            set_dotted(cfg, key, value, "command-line override")
        # A command-line override of a matrix key shows in the label (the run is what it says).
        label = _label({k: dict(parsed).get(k, v) for k, v in combo.items()})
        cfg = canonical(cfg, f"{path}: run {label}" + (" (with command-line overrides)" if parsed else ""))
        key = run_key(cfg)
        if key not in seen:
            seen.add(key)
            shown = {k: v for k, v in combo.items() if _applies(k, cfg)}  # fp's name has no bits
            runs.append(RunSpec(_label({k: dict(parsed).get(k, v) for k, v in shown.items()}), cfg, key))
    return Suite(suite.name or path.stem, path, runs, report.model_dump(), suite.executor.model_dump())


def known_key(key: str) -> bool:
    """Whether a dotted key names a run-config field (method parameters are the methods' to check)."""
    if key.startswith("method."):
        return True
    node = DEFAULTS
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _matches_flat(combo: dict, base: dict, pattern: dict) -> bool:
    cfg = copy.deepcopy(base)
    for key, value in combo.items():
        set_dotted(cfg, key, value, "exclude")
    return _matches(cfg, pattern)


def _applies(key: str, cfg: dict) -> bool:
    """Whether a matrix key can change a canonical run (canonical resets what its method ignores)."""
    method = methods.from_config(cfg["method"])
    if key.startswith(("quant.", "data.calib.")) and not method.quantizes:
        return False
    if key.startswith("train.") and not method.trains:
        return False
    return not key.startswith("method.") or key.split(".")[1] in cfg["method"]


def _label(combo: dict) -> str:
    return ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in combo.items()) or "base"
