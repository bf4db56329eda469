"""What a search found: its trials table, optimization history, parameter importances, the Pareto
front of a two-objective study (PNG + PDF), and the best trial (of a two-objective study, the Pareto
set) written out as a ready suite file.

Written by `qbench report NAME` (`nox -s report -- NAME`) for a suite file with a `search:` section.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import yaml  # noqa: E402

from harness.errors import ConfigError  # noqa: E402
from harness.evaluate import catalog  # noqa: E402
from harness.report import DPI, FIGSIZE, STYLE  # noqa: E402
from harness.search import Search  # noqa: E402

STATE = optuna.trial.TrialState
MAXIMIZE = optuna.study.StudyDirection.MAXIMIZE


def load(search: Search) -> optuna.Study | None:
    if search.journal is not None and not search.journal.is_file():
        return None  # not created by looking
    try:
        return optuna.load_study(study_name=search.study_name, storage=search.storage())
    except KeyError:
        return None


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _label(alias: str) -> str:
    return catalog.find(alias).label


def _shown(alias: str, value: float) -> float:
    return value * catalog.find(alias).scale


def best(search: Search, study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The best trial of a one-objective study (a two-objective study has a Pareto set instead)."""
    if search.multi or not any(t.state == STATE.COMPLETE for t in study.trials):
        return None
    return study.best_trial


def pareto(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The completed trials no other trial dominates (Optuna's best_trials), best on the first objective first."""
    sign = 1 if study.directions[0] == MAXIMIZE else -1
    return sorted(study.best_trials, key=lambda t: (-sign * t.values[0], t.number))


def _dominates(a: list[float], b: list[float], directions) -> bool:
    signs = [1 if d == MAXIMIZE else -1 for d in directions]
    better = [s * (x - y) for s, x, y in zip(signs, a, b)]
    return all(d >= 0 for d in better) and any(d > 0 for d in better)


def summary(search: Search, study: optuna.Study | None = None) -> str:
    """The trials so far as a markdown table (also what `qbench search` prints)."""
    study = study or load(search)
    objective = search.cfg.objective
    head = f"search {search.study_name} ({search.path}): {search.cfg.n_trials} trials asked"
    if study is None or not study.trials:
        return head + ", none run yet"
    keys = list(search.cfg.space)
    cols = ["trial", "state", *(_label(m) for m in objective), *keys, "run_key", "note"]
    lines = [head, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    top = best(search, study)
    front = {t.number for t in pareto(study)} if search.multi else set()
    for t in study.trials:
        values = [f"{_shown(m, v):.2f}" for m, v in zip(objective, t.values)] if t.values else ["-"] * len(objective)
        note = [
            "base config" if t.user_attrs.get("base") else "",
            "best" if top is not None and t.number == top.number else "",
            "Pareto" if t.number in front else "",
            t.user_attrs.get("pruned", ""),
            "reused " + t.user_attrs["reused_run"][:8] if "reused_run" in t.user_attrs else "",
            t.user_attrs.get("failure", "")[:80],
        ]
        params = [_fmt(t.params[k]) if k in t.params else "" for k in keys]
        row = [
            str(t.number),
            t.state.name,
            *values,
            *params,
            t.user_attrs.get("run_key", ""),
            "; ".join(n for n in note if n),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _values(search: Search, trial: optuna.trial.FrozenTrial) -> str:
    return ", ".join(f"{_label(m)} {_shown(m, v):.2f}" for m, v in zip(search.cfg.objective, trial.values))


def best_suite(search: Search, trials: list[optuna.trial.FrozenTrial]) -> dict:
    """A suite file that runs the best trial's config (the suite's base, the overrides, the trial's
    values); of a two-objective study, one run per Pareto trial: the base with an `include` entry
    of each trial's values, and the bare base left out (`exclude: [{}]` matches it) unless it is one."""
    from harness.config import read_suite_file

    base = copy.deepcopy(read_suite_file(search.path).base)
    for key, value in search.overrides_and({} if search.multi else trials[0].params):
        node = base
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    if not search.multi:
        described = f"Trial {trials[0].number} of search {search.study_name} ({_values(search, trials[0])})"
        return {"name": f"{search.name}_best", "description": f"{described}, written by `qbench report`.", "base": base}
    front = "; ".join(f"{t.number} ({_values(search, t)})" for t in trials)
    return {
        "name": f"{search.name}_pareto",
        "description": f"The Pareto set of search {search.study_name}, trials {front}; written by `qbench report`.",
        "base": base,
        "include": [dict(t.params) for t in trials],
        "exclude": [{}],
    }


def _versions(search: Search) -> str:
    """The versions, commits and devices of the trials' records (the study itself records none)."""
    from mlflow.tracking import MlflowClient

    from harness.tracking import Tracker

    tracker = Tracker(search.results_dir, search.name, create=False)
    if tracker.experiment_id is None:
        return ""
    runs = MlflowClient(tracker.uri).search_runs(
        [tracker.experiment_id], f"tags.`search.study` = '{search.study_name}'"
    )
    seen: dict[str, set] = {}
    for run in runs:
        for key, value in run.data.tags.items():
            if key.startswith("version.") or key in ("git_commit", "device"):
                seen.setdefault(key, set()).add(value)
    lines = [f"- {k}: {', '.join(sorted(v))}" for k, v in sorted(seen.items())]
    return f"\n\nVersions, commit and device of the {len(runs)} trial records:\n\n" + "\n".join(lines) + "\n"


def _save(fig, out: Path, stem: str) -> dict[str, Path]:
    paths = {f"{stem}.{ext}": out / f"{stem}.{ext}" for ext in ("png", "pdf")}
    fig.tight_layout()
    for path in paths.values():
        fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return paths


def report_search(search: Search) -> dict[str, Path]:
    """search.md, best_trial.yaml and the figures under results/<suite>/; returns file name -> path."""
    study = load(search)
    if study is None or not any(t.state == STATE.COMPLETE for t in study.trials):
        raise ConfigError(
            f"search {search.study_name} has no completed trial; run `nox -s search -- {search.name}` first"
        )
    out = search.results_dir / search.name
    out.mkdir(parents=True, exist_ok=True)
    written = {"search.md": out / "search.md"}
    top = best(search, study)
    front = pareto(study) if search.multi else [top]
    text = summary(search, study)
    base = [t for t in study.trials if t.user_attrs.get("base") and t.state == STATE.COMPLETE]
    if search.multi:
        text += _pareto_md(search, study, front, base[0] if base else None)
    elif base:
        cmp = ", ".join(
            f"{_label(m)} {_shown(m, b):.2f} -> {_shown(m, v):.2f}"
            for m, b, v in zip(search.cfg.objective, base[0].values, top.values)
        )
        text += f"\n\nBest trial {top.number} against the base config (trial {base[0].number}): {cmp}.\n"
    text += _versions(search)
    written["search.md"].write_text(text + "\n")
    suite = out / "best_trial.yaml"
    suite.write_text(yaml.safe_dump(best_suite(search, front), sort_keys=False))
    written["best_trial.yaml"] = suite
    objective = search.cfg.objective
    names = [_label(m) for m in objective]

    def first(t):  # in the unit of the report's tables (J&F in percent)
        return _shown(objective[0], t.values[0])

    with plt.rc_context(STYLE), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if search.multi:
            written |= _save(_pareto_figure(search, study, front), out, "pareto_front")
        else:
            ax = optuna.visualization.matplotlib.plot_optimization_history(study, target=first, target_name=names[0])
            written |= _save(ax.figure, out, "optimization_history")
            if any(t.intermediate_values for t in study.trials):
                ax = optuna.visualization.matplotlib.plot_intermediate_values(study)
                written |= _save(ax.figure, out, "intermediate_values")
        complete = [t for t in study.trials if t.state == STATE.COMPLETE]
        if len(complete) >= 2 and len({k for t in complete for k in t.params}) >= 2:
            # fANOVA explains the variance of the target whatever its direction (Optuna 5's default
            # evaluator, PED-ANOVA, ranks parameters for reaching low values, wrong for J&F).
            ax = optuna.visualization.matplotlib.plot_param_importances(
                study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0), target=first, target_name=names[0]
            )
            written |= _save(ax.figure, out, "param_importances")
    return written


def _pareto_md(search: Search, study: optuna.Study, front: list, base) -> str:
    """The Pareto trials as a table, and where the base config stands against them."""
    objective, keys = search.cfg.objective, list(search.cfg.space)
    cols = ["trial", *(_label(m) for m in objective), *keys, "run_key"]
    lines = [
        "",
        "",
        f"Pareto front: the {len(front)} trial(s) no other completed trial dominates on "
        f"{' and '.join(_label(m) for m in objective)} (best_trial.yaml runs them all):",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for t in front:
        values = [f"{_shown(m, v):.2f}" for m, v in zip(objective, t.values)]
        params = [_fmt(t.params[k]) if k in t.params else "" for k in keys]
        lines.append("| " + " | ".join([str(t.number), *values, *params, t.user_attrs.get("run_key", "")]) + " |")
    if base is not None:
        over = [t.number for t in front if _dominates(t.values, base.values, study.directions)]
        where = f"is dominated by trial(s) {', '.join(map(str, over))}" if over else "is on the front"
        lines += ["", f"The base config (trial {base.number}) {where}."]
    return "\n".join(lines) + "\n"


def _pareto_figure(search: Search, study: optuna.Study, front: list):
    """Every completed trial, the second objective across and the first up: the Pareto trials joined
    by the step line of the best first objective reachable within each value of the second, the
    dominated ones grey; each point named by its trial number."""
    (y_m, x_m), on = search.cfg.objective, {t.number for t in front}
    xy = {
        t.number: (_shown(x_m, t.values[1]), _shown(y_m, t.values[0]))
        for t in study.trials
        if t.state == STATE.COMPLETE
    }
    grey = [n for n in xy if n not in on]
    # From the best second objective to the worst: each step holds the front's value until a
    # trial that gives up some of the second objective improves the first.
    ordered = sorted(on, key=lambda n: xy[n][0], reverse=study.directions[1] == MAXIMIZE)
    fig, ax = plt.subplots(figsize=FIGSIZE)
    if grey:
        ax.scatter(*zip(*(xy[n] for n in grey)), s=12, color="0.75", zorder=2, label="dominated")
    ax.step(*zip(*(xy[n] for n in ordered)), where="post", color="C0", lw=0.9, zorder=3)
    ax.scatter(*zip(*(xy[n] for n in ordered)), s=16, color="C0", zorder=4, label="Pareto front")
    for n, (x, y) in xy.items():
        color = "C0" if n in on else "0.6"
        ax.annotate(str(n), (x, y), (3, 3), textcoords="offset points", fontsize=6, color=color)
    ax.margins(0.08)  # room for the trial numbers at the edges
    ax.set_xlabel(_label(x_m))
    ax.set_ylabel(_label(y_m))
    ax.legend()
    return fig
