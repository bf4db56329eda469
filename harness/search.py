"""Optuna searches over a suite's run config: `qbench search NAME` (`nox -s search -- NAME`).

A suite file's `search:` section declares the space (dotted run-config keys, each a float, int or
categorical, optionally log-scaled and conditional on other keys such as method.name), the
objective (one metric, or a metric and the packed size as a multi-objective study), the sampler,
the pruner, n_trials and timeout (the budget, the only search keys a command-line override such as
`search.n_trials=40` may set). Each trial is a run config built from the suite's `base` and the
other command-line overrides with the sampled values set: it runs through the suite runner's own
code path (claim, child MLflow record under the search's parent record, runner.run_one), so it has
the run_key a suite run of the same config has, and a trial equal to a FINISHED run reuses that record.

Storage: Optuna's journal file (results/searches/<study>.journal by default), which several worker
processes on one host share through its file lock; `storage: postgresql://...` (any SQLAlchemy URL)
for workers on many hosts. A killed worker's trial is closed as FAIL and its parameters are tried
again by the next worker to start; finished trials are kept.
"""

from __future__ import annotations

import copy
import difflib
import fcntl
import logging
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

import optuna
from pydantic import Field, model_validator

from harness.claims import Claims, clean_scratch, pid_alive
from harness.config import (
    DEFAULTS,
    RunSpec,
    canonical,
    find_suite,
    known_key,
    merge,
    parse_override,
    read_suite_file,
    run_key,
    set_dotted,
)
from harness.errors import ConfigError, Pruned
from harness.evaluate import catalog
from harness.schema import Strict, validate
from harness.tracking import Tracker

log = logging.getLogger("qbench")
optuna.logging.set_verbosity(optuna.logging.WARNING)  # the harness logs each trial itself


class Param(Strict):
    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None
    # Sample this key only where the trial's config has these values ({key: value or [values]}).
    when: dict[str, Any] = {}

    @model_validator(mode="after")
    def _check(self):
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs a non-empty list of choices")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"a {self.type} parameter needs low < high")
        elif self.log and self.low <= 0:
            raise ValueError("a log-scaled parameter needs low > 0")
        elif self.log and self.step is not None:
            raise ValueError("a log-scaled parameter cannot have a step (Optuna samples one or the other)")
        return self


class SearchCfg(Strict):
    space: dict[str, Param] = Field(min_length=1)
    objective: list[str] = ["jf"]  # one metric, or [metric, size] for a multi-objective study
    sampler: Literal["tpe", "nsga2", "random"] | None = None  # None: tpe, nsga2 with two objectives
    population: int | None = Field(None, ge=2)  # nsga2's population (Optuna's default 50)
    pruner: Literal["none", "median", "hyperband"] | None = None  # None: median, none with two objectives
    startup_trials: int = Field(2, ge=0)  # trials the median pruner and TPE wait for
    n_trials: int = Field(20, ge=1)
    timeout: float | None = Field(None, gt=0)  # seconds: no new trial starts after it
    storage: str | None = None  # None: a journal file under results/searches; "journal:PATH"; a SQLAlchemy URL
    study: str | None = None  # default: the suite's name
    seed: int = 0
    enqueue_base: bool = True  # the first trial is the base config's own values (the default to beat)


# The search keys a command-line override may set: the budget. The others (space, objective,
# sampler, storage, ...) define the study, and a resumed study must keep them: edit the file.
BUDGET = ("n_trials", "timeout")
LATENCY = re.compile(r"fps|time_\w+_s")


def split_budget(overrides: list[str]) -> tuple[dict, list[str]]:
    """({n_trials/timeout: value} of the `search.*` overrides, the other overrides as given)."""
    budget, rest = {}, []
    for item in overrides:
        key, value = parse_override(item)
        if not key.startswith("search."):
            rest.append(item)
            continue
        name = key[len("search.") :]
        if name not in BUDGET:
            close = difflib.get_close_matches(name, BUDGET, n=1)
            hint = f"; did you mean 'search.{close[0]}'?" if close else ""
            raise ConfigError(
                f"command-line override {key}: only search.n_trials and search.timeout can be set on the "
                f"command line (the other search keys define the study: edit the suite file){hint}"
            )
        budget[name] = value
    return budget, rest


def _metric_key(alias: str) -> str:
    return catalog.find(alias).key


def direction(alias: str) -> str:
    return {"min": "minimize", "max": "maximize"}[catalog.find(alias).direction]


class Search:
    """A suite file's search: its config, base run config and Optuna study."""

    def __init__(self, name: str, overrides: list[str] | None = None, results_dir: str | Path = "results"):
        self.path = find_suite(name)
        suite = read_suite_file(self.path)
        if suite.search is None:
            raise ConfigError(f"{self.path}: no `search:` section (see docs/searches.md)")
        self.cfg = validate(SearchCfg, suite.search, str(self.path), prefix="search.")
        self.name = suite.name or self.path.stem
        self.results_dir = Path(results_dir).resolve()
        budget, self.overrides = split_budget(overrides or [])  # self.overrides: those of the run configs
        if budget:
            self.cfg = validate(SearchCfg, {**suite.search, **budget}, "command-line override", prefix="search.")
        self.base = merge(DEFAULTS, suite.base)
        for key, value in map(parse_override, self.overrides):
            set_dotted(self.base, key, value, "command-line override")
        self._check()

    def _check(self) -> None:
        where, c = f"{self.path}: search", self.cfg
        for key, p in c.space.items():
            if not known_key(key):
                raise ConfigError(f"{where}.space: unknown run-config key {key!r}")
            for cond in p.when:
                if not known_key(cond):
                    raise ConfigError(f"{where}.space.{key}.when: unknown run-config key {cond!r}")
        if not 1 <= len(c.objective) <= 2:
            raise ConfigError(f"{where}.objective: {c.objective!r}; expected one metric or two (e.g. [jf, size])")
        multi = len(c.objective) == 2
        for m in c.objective:
            info = catalog.find(m, self.base["data"]["eval"]["kind"], f"{where}.objective")
            # Timings here are of fake-quantized layers: a trade-off against them would reward the
            # simulation, not a low-bit kernel (there is none yet).
            if multi and LATENCY.fullmatch(info.key):
                raise ConfigError(
                    f"{where}.objective: {m!r}: latency is not available as an objective yet (no low-bit "
                    "kernel; timings are of fake-quantized layers); use e.g. [jf, size]"
                )
        if multi and c.pruner not in (None, "none"):
            raise ConfigError(f"{where}.pruner: {c.pruner!r}; Optuna cannot prune multi-objective studies, use none")
        if (c.pruner or "median") != "none" and not multi and not self.base["train"]["eval_every"]:
            raise ConfigError(
                f"{where}.pruner: {c.pruner or 'median'} needs intermediate values: set base.train.eval_every "
                "(or pruner: none)"
            )
        canonical(copy.deepcopy(self.base), f"{self.path}: base")

    # --- the study
    @property
    def journal(self) -> Path | None:
        """The journal file of a journal storage, None for a database URL."""
        s = self.cfg.storage
        if s is None:
            return self.results_dir / "searches" / f"{self.study_name}.journal"
        return Path(s[len("journal:") :]) if s.startswith("journal:") else None

    def storage(self):
        if self.journal is not None:
            from optuna.storages import JournalStorage
            from optuna.storages.journal import JournalFileBackend

            self.journal.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(self.journal)))
        s = self.cfg.storage
        if "://" not in s:
            raise ConfigError(f"{self.path}: search.storage: {s!r}; expected journal:PATH or a SQLAlchemy URL")
        return optuna.storages.RDBStorage(s)

    @property
    def study_name(self) -> str:
        return self.cfg.study or self.name

    @property
    def multi(self) -> bool:
        return len(self.cfg.objective) == 2

    def study(self, worker: int = 0) -> optuna.Study:
        c = self.cfg
        pruner = c.pruner or ("none" if self.multi else "median")
        if pruner == "median":
            pruner = optuna.pruners.MedianPruner(n_startup_trials=c.startup_trials, n_warmup_steps=0)
        elif pruner == "hyperband":
            t = self.base["train"]
            pruner = optuna.pruners.HyperbandPruner(min_resource=t["eval_every"], max_resource=t["steps"])
        else:
            pruner = optuna.pruners.NopPruner()
        study = optuna.create_study(
            study_name=self.study_name,
            storage=self.storage(),
            directions=[direction(m) for m in c.objective],
            pruner=pruner,
            load_if_exists=True,
        )
        # Workers, and a worker resuming a study, draw different samples: the trials so far are part
        # of the seed (the same seed again would repeat the first samples, each reusing a record).
        seed = c.seed + 1000 * worker + len(study.trials)
        sampler = c.sampler or ("nsga2" if self.multi else "tpe")
        if sampler == "tpe":
            study.sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(c.startup_trials, 1))
        elif sampler == "nsga2":
            population = {"population_size": c.population} if c.population else {}
            study.sampler = optuna.samplers.NSGAIISampler(seed=seed, **population)
        else:
            study.sampler = optuna.samplers.RandomSampler(seed=seed)
        return study

    # --- a trial's run config
    def sample(self, trial: optuna.trial.BaseTrial) -> tuple[dict, dict]:
        """(canonical run config, the sampled values) of a trial; keys whose `when` does not hold are not sampled."""
        cfg, chosen = copy.deepcopy(self.base), {}
        for key, p in self.cfg.space.items():
            if not all(_value(cfg, k) in (v if isinstance(v, list) else [v]) for k, v in p.when.items()):
                continue
            if p.type == "categorical":
                value = trial.suggest_categorical(key, p.choices)
            elif p.type == "int":
                value = trial.suggest_int(key, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
            else:
                value = trial.suggest_float(key, p.low, p.high, step=p.step, log=p.log)
            set_dotted(cfg, key, value, f"{self.path}: search.space")
            chosen[key] = value
        return canonical(cfg, f"{self.path}: search trial {chosen}"), chosen

    def base_values(self) -> dict:
        """The base config's values of the space's keys (those that apply to it and lie in the space)."""
        full, out = canonical(copy.deepcopy(self.base), str(self.path)), {}
        for key, p in self.cfg.space.items():
            value = _value(full, key)
            if value is None or not all(
                _value(full, k) in (v if isinstance(v, list) else [v]) for k, v in p.when.items()
            ):
                continue
            if value in p.choices if p.type == "categorical" else p.low <= value <= p.high:
                out[key] = value  # else that key is sampled
        return out

    def overrides_and(self, params: dict) -> list[tuple[str, Any]]:
        """The command-line overrides, then a trial's values: what a trial sets over the suite's base."""
        return [*map(parse_override, self.overrides), *params.items()]

    def values(self, metrics: dict) -> list[float]:
        missing = [m for m in self.cfg.objective if _metric_key(m) not in metrics]
        if missing:
            raise ConfigError(f"{self.path}: search.objective: metric {missing[0]!r} was not recorded by the run")
        return [float(metrics[_metric_key(m)]) for m in self.cfg.objective]


def _value(cfg: dict, key: str):
    node = cfg
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


_COUNTED = (
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.PRUNED,
    optuna.trial.TrialState.FAIL,
    optuna.trial.TrialState.RUNNING,
)


def _dead(t: optuna.trial.FrozenTrial) -> bool:
    """A RUNNING trial whose worker on this host is gone, or that never got its worker's pid (a kill
    right after asking) a minute after it started."""
    pid, host = t.user_attrs.get("pid"), t.user_attrs.get("host")
    if pid is None:
        return t.datetime_start is not None and time.time() - t.datetime_start.timestamp() > 60
    return host == socket.gethostname() and pid != os.getpid() and not pid_alive(pid)


def _prepare(search: Search, study: optuna.Study) -> int:
    """Once per start, whichever worker comes first (a file lock): close as FAIL the RUNNING trials
    of dead workers and queue their parameters again, and queue the base config as trial 0."""
    lock = search.results_dir / "searches" / f"{search.study_name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        n, trials = 0, study.get_trials(deepcopy=False)
        for t in trials:
            if t.state == optuna.trial.TrialState.RUNNING and _dead(t):
                study.tell(t.number, state=optuna.trial.TrialState.FAIL)
                keep = {k: v for k, v in t.user_attrs.items() if k == "base"}
                study.enqueue_trial(t.params, user_attrs={"retry_of": t.number, **keep})
                n += 1
        if search.cfg.enqueue_base and not any(t.user_attrs.get("base") for t in trials):
            study.enqueue_trial(search.base_values(), user_attrs={"base": True})
    return n


def _budget_used(study: optuna.Study) -> int:
    """Trials run or running, of all workers; a killed one that was queued again counts once."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs["retry_of"] for t in trials if "retry_of" in t.user_attrs}
    return sum(t.state in _COUNTED and t.number not in retried for t in trials)


def run_search(search: Search, worker: int = 0) -> optuna.Study:
    """One worker's loop: ask, run the trial's config, tell; until n_trials are used or timeout passes."""
    from harness.config import Suite
    from harness.progress import progress as bar
    from harness.runner import preflight

    c = search.cfg
    for path in clean_scratch(search.results_dir):
        log.info("removed %s, left by a process that died", path)
    study = search.study(worker)
    if n := _prepare(search, study):
        log.info("search %s: %d trial(s) of killed workers queued again", search.study_name, n)
    base = canonical(copy.deepcopy(search.base), str(search.path))
    preflight(Suite(search.name, search.path, [RunSpec("base", base, run_key(base))]), search.results_dir)
    tracker = Tracker(search.results_dir, search.name)
    claims = Claims(search.results_dir / "claims" / search.name)
    start = time.monotonic()
    with tracker.suite(search.name, c.n_trials, search=search.study_name):
        pbar = bar(total=c.n_trials, initial=_budget_used(study), desc=f"search {search.study_name}", unit="trial")
        while _budget_used(study) < c.n_trials and (c.timeout is None or time.monotonic() - start < c.timeout):
            trial = study.ask()
            trial.set_user_attr("pid", os.getpid())
            trial.set_user_attr("host", socket.gethostname())
            try:
                cfg, chosen = search.sample(trial)
            except Exception as e:  # noqa: BLE001 - a sampled combination the schema or a method rejects
                trial.set_user_attr("failure", f"{type(e).__name__}: {e}"[:2000])
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            key = run_key(cfg)
            trial.set_user_attr("run_key", key)
            spec = RunSpec(
                f"trial {trial.number}: " + ",".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in chosen.items()), cfg, key
            )
            try:
                metrics = _run_trial(spec, trial, search, tracker, claims)
                study.tell(trial, search.values(metrics))
                log.info("%s: %s", spec.name, dict(zip(c.objective, search.values(metrics))))
            except Pruned as e:
                trial.set_user_attr("pruned", str(e))
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                log.info("%s: %s", spec.name, e)
            except Exception as e:  # noqa: BLE001 - a failed trial is recorded; the search goes on
                trial.set_user_attr("failure", f"{type(e).__name__}: {e}"[:2000])
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                log.error("%s failed: %s: %s", spec.name, type(e).__name__, e)
            pbar.update(_budget_used(study) - pbar.n)
        pbar.close()
    return study


def _run_trial(spec, trial, search, tracker, claims) -> dict:
    """The trial's metrics: an existing FINISHED record of its run_key, or a new child record."""
    from harness.runner import reporter, run_one

    while True:
        done = tracker.finished(spec.run_key)
        if done is not None:
            trial.set_user_attr("reused_run", done.info.run_id)
            return done.data.metrics
        if claims.claim(spec.run_key, lambda: tracker.finished(spec.run_key) is not None) == "claimed":
            break
        time.sleep(2)  # the same config is running in another worker: wait for its record
    try:
        tracker.mark_killed(spec.run_key)
        with tracker.run(spec, tags={"search.study": search.study_name, "search.trial": str(trial.number)}) as run:
            trial.set_user_attr("mlflow_run", run.info.run_id)

            def report(value: float, step: int) -> None:
                trial.report(value, step)
                if trial.should_prune():
                    raise Pruned(f"pruned at step {step} ({value:.4f})")

            token = reporter.set(report)
            try:
                return run_one(spec, search.results_dir, search.name)
            finally:
                reporter.reset(token)
    finally:
        claims.release(spec.run_key)


def spawn_workers(name: str, overrides: list[str], results_dir: str | Path, workers: int) -> int:
    """`workers` processes of `qbench search` on one study; returns the worst exit status."""
    from harness.executor import worker_env

    cmd = [sys.executable, "-m", "harness", "search", name, *overrides, "--results", str(results_dir)]
    procs = [subprocess.Popen([*cmd, "--worker", str(i)], env=worker_env(workers)) for i in range(workers)]
    return max(p.wait() for p in procs)
