"""Optuna searches on the embedded default: trials as nested MLflow runs, reuse of finished runs,
pruning, several workers on one journal, resume after SIGKILL, reports, and bad search sections."""

import itertools
import re
import signal
import subprocess
import sys
import time

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from harness.cli import main
from harness.config import base_config, load_suite
from harness.errors import ConfigError
from harness.runner import prepare
from harness.search import Search, run_search
from harness.search_report import report_search

BASE = {
    "model": {"image_size": 128},
    "method": {"name": "lsq"},
    "quant": {"weight_bits": 4, "act_bits": 8},
    "data": {"synthetic": {"sequences": 2, "frames": 4, "size": "96x64", "seed": 1}, "calib": {"frames": 2}},
    "train": {
        "steps": 2,
        "batch_size": 1,
        "frames": 2,
        "eval_every": 1,
        "log_every": 1,
        "data": {"kind": "stream", "size": "96x64"},
    },
}
LR = {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}
S = optuna.trial.TrialState


def write(tmp_path, name, search, base=BASE, file=None):
    path = tmp_path / f"{file or name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "base": base, "search": search}))
    return path


def records(results, suite):
    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    exp = client.get_experiment_by_name(suite)
    return client.search_runs([exp.experiment_id], "tags.kind = 'run'"), client.search_runs(
        [exp.experiment_id], "tags.kind = 'suite'"
    )


def test_a_search_records_each_trial_as_a_child_run_and_reuses_finished_runs(tmp_path):
    results = tmp_path / "results"
    path = write(tmp_path, "s1", {"space": {"train.quant_lr": LR}, "n_trials": 3, "pruner": "none"})
    study = run_search(Search(str(path), results_dir=results))
    assert [t.state for t in study.trials] == [S.COMPLETE] * 3
    assert study.trials[0].user_attrs["base"] and study.trials[0].params == {"train.quant_lr": 1e-3}
    runs, parents = records(results, "s1")
    assert len(parents) == 1 and parents[0].data.tags["search"] == "s1"
    assert len(runs) == 3
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        trial = study.trials[int(run.data.tags["search.trial"])]
        assert trial.user_attrs["run_key"] == run.data.tags["run_key"]
        assert trial.values[0] == run.data.metrics["J_F-mean"]
        assert float(run.data.params["train.quant_lr"]) == pytest.approx(trial.params["train.quant_lr"])
        assert [
            m.step
            for m in MlflowClient(f"sqlite:///{results / 'mlflow.db'}").get_metric_history(
                run.info.run_id, "eval/J_F-mean"
            )
        ] == [1]  # the intermediate evaluation, not at the last step (run_one evaluates there)

    # A trial is a run config: another study of the same space starts from the same base config,
    # whose FINISHED record it reuses instead of running it again.
    again = write(
        tmp_path, "s1", {"space": {"train.quant_lr": LR}, "n_trials": 1, "pruner": "none", "study": "s1b"}, file="s1b"
    )
    other = run_search(Search(str(again), results_dir=results))
    assert other.trials[0].user_attrs["reused_run"] == study.trials[0].user_attrs["mlflow_run"]
    assert other.trials[0].values == study.trials[0].values
    assert len(records(results, "s1")[0]) == 3

    # The report: history, importances need 2 parameters (one here), the best trial as a suite
    # file whose run is the best trial's run.
    written = report_search(Search(str(path), results_dir=results))
    assert {"search.md", "best_trial.yaml", "optimization_history.png", "intermediate_values.png"} <= set(written)
    best = max(study.trials, key=lambda t: t.values[0])
    assert load_suite(str(written["best_trial.yaml"])).runs[0].run_key == best.user_attrs["run_key"]
    assert f"Best trial {best.number} against the base config (trial 0)" in written["search.md"].read_text()


def test_pruning_stops_the_trial_whose_intermediate_value_is_worst(tmp_path):
    results = tmp_path / "results"
    space = {"quant.weight_bits": {"type": "categorical", "choices": [2, 8]}}
    path = write(tmp_path, "s2", {"space": space, "n_trials": 2, "pruner": "median", "startup_trials": 1})
    search = Search(str(path), results_dir=results)
    search.cfg.enqueue_base = False
    study = search.study()
    study.enqueue_trial({"quant.weight_bits": 8})
    study.enqueue_trial({"quant.weight_bits": 2})  # 2-bit LSQ after one step: far below 8-bit
    study = run_search(search)
    first, second = study.trials
    assert first.state == S.COMPLETE and second.state == S.PRUNED
    assert second.intermediate_values[1] < first.intermediate_values[1]
    assert list(second.intermediate_values) == [1]  # stopped at its first evaluation, not trained on
    runs, _ = records(results, "s2")
    pruned = [r for r in runs if r.data.tags["search.trial"] == "1"][0]
    assert pruned.info.status == "KILLED" and pruned.data.tags["failure_reason"].startswith("Pruned: pruned at step 1")
    assert "J_F-mean" not in pruned.data.metrics


def test_intermediate_evaluations_do_not_change_the_trained_model(tmp_path):
    overrides = [f"{k}={v}" for k, v in {"model.image_size": 128, "method.name": "lsq", "quant.weight_bits": 4}.items()]
    overrides += ["data.synthetic.sequences=2", "data.synthetic.frames=4", "data.synthetic.size=96x64"]
    overrides += ["data.calib.frames=2", "train.steps=2", "train.batch_size=1", "train.frames=2"]
    overrides += ["train.data.kind=stream", "train.data.size=96x64"]
    states = []
    for every in (0, 1):
        model, _ = prepare(base_config(None, [*overrides, f"train.eval_every={every}"]), tmp_path, {})
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    changed = [k for k in states[0] if not (states[0][k] == states[1][k]).all()]
    assert not changed


@pytest.mark.e2e
def test_two_workers_share_one_study_without_duplicate_trials(tmp_path):
    results = tmp_path / "results"
    path = write(tmp_path, "s3", {"space": {"train.quant_lr": LR}, "n_trials": 4, "pruner": "none"})
    cmd = [sys.executable, "-m", "harness", "search", str(path), "--results", str(results), "--workers", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    study = optuna.load_study(study_name="s3", storage=Search(str(path), results_dir=results).storage())
    trials = study.trials
    # Each worker stops when the budget is used; one may have asked for a trial just before.
    assert 4 <= len(trials) <= 5 and all(t.state == S.COMPLETE for t in trials)
    assert len({t.user_attrs["pid"] for t in trials}) == 2, "both workers ran trials"
    keys = [t.user_attrs["run_key"] for t in trials]
    assert len(set(keys)) == len(keys)
    runs, _ = records(results, "s3")
    assert sorted(r.data.tags["run_key"] for r in runs if r.info.status == "FINISHED") == sorted(keys)


@pytest.mark.e2e
def test_a_killed_search_resumes_with_its_finished_trials_kept(tmp_path):
    results = tmp_path / "results"
    path = write(tmp_path, "s4", {"space": {"train.quant_lr": LR}, "n_trials": 3, "pruner": "none"})
    search = Search(str(path), results_dir=results)
    cmd = [sys.executable, "-m", "harness", "search", str(path), "--results", str(results)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, before = time.time() + 300, None
    while time.time() < deadline and before is None:
        time.sleep(0.5)
        try:
            trials = optuna.load_study(study_name="s4", storage=search.storage()).trials
        except KeyError:
            continue
        if any(t.state == S.COMPLETE for t in trials) and any(t.state == S.RUNNING for t in trials):
            proc.send_signal(signal.SIGKILL)
            before = trials
    proc.wait()
    if before is None:
        pytest.fail("the search never had a finished and a running trial at once")
    killed = [t for t in before if t.state == S.RUNNING][0]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    after = optuna.load_study(study_name="s4", storage=search.storage()).trials
    for t in before:
        if t.state == S.COMPLETE:
            assert after[t.number].state == S.COMPLETE and after[t.number].values == t.values
    assert after[killed.number].state == S.FAIL
    retry = [t for t in after if t.user_attrs.get("retry_of") == killed.number]
    assert len(retry) == 1 and retry[0].state == S.COMPLETE and retry[0].params == killed.params
    assert sum(t.state == S.COMPLETE for t in after) == 3
    runs, parents = records(results, "s4")
    assert sorted(r.info.status for r in parents) == ["FINISHED", "KILLED"]
    assert [r.info.status for r in runs if r.data.tags["run_key"] == killed.user_attrs["run_key"]].count(
        "FINISHED"
    ) == 1


PTQ = {**BASE, "method": {"name": "rtn"}, "train": {}}  # no training: a trial is calibration and evaluation
BITS = {"type": "categorical", "choices": [4, 8]}


def test_a_two_objective_search_reports_its_pareto_front(tmp_path):
    results, url = tmp_path / "results", f"sqlite:///{tmp_path / 'optuna.db'}"
    space = {"quant.weight_bits": {"type": "categorical", "choices": [2, 8]}, "quant.act_bits": BITS}
    section = {"space": space, "objective": ["jf", "size"], "n_trials": 3, "population": 2, "storage": url}
    base = {**PTQ, "quant": {"weight_bits": 8, "act_bits": 8}}
    search = Search(str(write(tmp_path, "s5", section, base=base)), results_dir=results)
    # With the base (W8A8, queued by the search): W8A4 has its packed size (activation bits store
    # nothing), so one of the two is dominated whatever the J&F values; W2A8 is the smallest.
    queue = search.study()
    for w, a in ((8, 4), (2, 8)):
        queue.enqueue_trial({"quant.weight_bits": w, "quant.act_bits": a})
    study = run_search(search)
    assert isinstance(study.sampler, optuna.samplers.NSGAIISampler)
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert optuna.load_study(study_name="s5", storage=url).directions == study.directions
    done = [t for t in study.trials if t.state == S.COMPLETE]
    assert len(done) == 3

    def dominates(u, t):  # J&F maximized, packed bytes minimized
        (uj, us), (tj, ts) = u.values, t.values
        return uj >= tj and us <= ts and (uj > tj or us < ts)

    front = {t.number for t in done if not any(dominates(u, t) for u in done)}
    assert 1 <= len(front) < len(done)
    written = report_search(Search(str(search.path), results_dir=results))
    text = written["search.md"].read_text().splitlines()
    start = next(i for i, line in enumerate(text) if line.startswith("Pareto front:"))
    rows = list(itertools.takewhile(lambda line: line.startswith("| "), text[start + 4 :]))  # after the header
    assert {int(r.split("|")[1]) for r in rows} == front
    for name in ("pareto_front.png", "pareto_front.pdf"):
        assert written[name].stat().st_size > 0
    # best_trial.yaml runs the Pareto set: one run per front trial, the bare base left out.
    runs = load_suite(str(written["best_trial.yaml"])).runs
    assert sorted(r.run_key for r in runs) == sorted({study.trials[n].user_attrs["run_key"] for n in front})


def test_the_budget_is_a_command_line_override_and_n_trials_counts_the_whole_study(tmp_path, capsys):
    results = tmp_path / "results"
    path = write(tmp_path, "s8", {"space": {"quant.weight_bits": BITS}, "n_trials": 5, "pruner": "none"}, base=PTQ)

    def trials(*overrides):
        search = Search(str(path), list(overrides), results)
        assert search.overrides == [o for o in overrides if not o.startswith("search.")]
        return len(run_search(search).trials)

    assert trials("search.n_trials=1", "quant.act_bits=8") == 1  # the base's own act_bits: the same trials
    assert trials("search.n_trials=3", "search.timeout=1e-9") == 1  # no trial starts after the timeout
    # Through the command line as a user types it: the budget grows to 2 trials in all, one more.
    assert main(["search", str(path), "--results", str(results), "search.n_trials=2"]) == 0
    assert "s8.yaml): 2 trials asked" in capsys.readouterr().out
    assert trials("search.n_trials=1") == 2  # a budget already used: nothing runs


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "search.n_trials=0",
            "command-line override: search.n_trials: input should be greater than or equal to 1 (got 0)",
        ),
        ("search.n_trials=2.5", "command-line override: search.n_trials: input should be a valid integer"),
        ("search.timeout=abc", "command-line override: search.timeout: input should be a valid number"),
        ("search.timeout=0", "command-line override: search.timeout: input should be greater than 0"),
        ("search.sampler=random", "search.sampler: only search.n_trials and search.timeout can be set"),
        ("search.n_trial=3", "did you mean 'search.n_trials'?"),
    ],
)
def test_a_bad_budget_override_is_one_line_naming_the_key(tmp_path, capsys, override, message):
    path = write(tmp_path, "s9", {"space": {"train.quant_lr": LR}})
    with pytest.raises(ConfigError, match=re.escape(message)):
        Search(str(path), [override], tmp_path / "results")
    assert main(["search", str(path), "--results", str(tmp_path / "results"), override]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "results").exists()
    # Suite runs do not read the search's budget: said so, not "unknown key 'search'".
    with pytest.raises(ConfigError, match="a search setting; `qbench search` takes it"):
        load_suite(str(path), [override])


@pytest.mark.parametrize(
    "section, message",
    [
        ({"space": {"train.quant_lr": LR}, "n_trial": 3}, "unknown key 'search.n_trial'; did you mean 'n_trials'?"),
        ({"space": {"train.qant_lr": LR}}, "search.space: unknown run-config key 'train.qant_lr'"),
        (
            {"space": {"train.quant_lr": {"type": "float", "low": 1, "high": 1}}},
            "search.space.train.quant_lr: value error, a float parameter needs low < high",
        ),
        ({"space": {"train.lr": {"type": "categorical"}}}, "needs a non-empty list of choices"),
        ({"space": {"train.lr": {"type": "float", "low": 0, "high": 1, "log": True}}}, "needs low > 0"),
        ({"space": {}}, "search.space: dictionary should have at least 1 item"),
        ({"space": {"train.lr": {**LR, "step": 1e-4}}}, "a log-scaled parameter cannot have a step"),
        (
            {"space": {"train.lr": LR}, "objective": ["jnf"]},
            "search.objective: unknown metric 'jnf'; expected one of jf,",
        ),
        (
            {"space": {"train.lr": LR}, "objective": ["jf", "fps"]},
            "search.objective: 'fps': latency is not available as an objective yet",
        ),
        (
            {"space": {"train.lr": LR}, "objective": ["jf", "size"], "pruner": "median"},
            "search.pruner: 'median'; Optuna cannot prune multi-objective",
        ),
        ({"space": {"train.lr": LR}, "sampler": "cmaes"}, "search.sampler: input should be 'tpe', 'nsga2' or 'random'"),
        (
            {"space": {"train.lr": {**LR, "when": {"quant.weight_bit": 4}}}},
            "search.space.train.lr.when: unknown run-config key 'quant.weight_bit'",
        ),
    ],
)
def test_a_bad_search_section_is_one_line_naming_the_file_and_key(tmp_path, section, message):
    path = write(tmp_path, "bad", section)
    with pytest.raises(ConfigError) as e:
        Search(str(path), results_dir=tmp_path / "results")
    assert str(e.value).startswith(str(path)) and message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "results").exists()


def test_pruning_without_intermediate_evaluations_is_refused(tmp_path):
    base = {**BASE, "train": {**BASE["train"], "eval_every": 0}}
    path = write(tmp_path, "noeval", {"space": {"train.lr": LR}}, base=base)
    with pytest.raises(
        ConfigError, match=r"search.pruner: median needs intermediate values: set base.train.eval_every"
    ):
        Search(str(path))
    cmd = [sys.executable, "-m", "harness", "search", str(path), "--results", str(tmp_path / "r")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "search.pruner" in done.stderr


def test_a_failed_trial_is_recorded_and_the_search_goes_on(tmp_path):
    results = tmp_path / "results"
    base = {**BASE, "method": {"name": "qsam2_vrc"}, "train": {}}
    space = {"method.vrc.calib_images": {"type": "categorical", "choices": [500, 2]}}
    search = Search(
        str(write(tmp_path, "s6", {"space": space, "n_trials": 2, "pruner": "none"}, base=base)), results_dir=results
    )
    search.cfg.enqueue_base = False
    study = search.study()
    for n in (500, 2):  # the generated calibration split has 4 frames: 500 cannot be had
        study.enqueue_trial({"method.vrc.calib_images": n})
    failed, done = run_search(search).trials
    assert failed.state == S.FAIL and "calibration frames asked for" in failed.user_attrs["failure"]
    assert done.state == S.COMPLETE
    runs, _ = records(results, "s6")
    status = {r.data.tags["search.trial"]: r.info.status for r in runs}
    assert status == {"0": "FAILED", "1": "FINISHED"}


def test_hyperband_and_a_database_storage(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    section = {"space": {"train.quant_lr": LR}, "pruner": "hyperband", "storage": url, "study": "hb"}
    search = Search(str(write(tmp_path, "s7", section)), results_dir=tmp_path / "results")
    study = search.study()
    assert isinstance(study.pruner, optuna.pruners.HyperbandPruner)
    assert search.journal is None and optuna.load_study(study_name="hb", storage=url).study_name == "hb"
