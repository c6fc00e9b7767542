"""`littune sweep METHOD`: a hyperparameter search over finetune's own flags with Optuna (TPE sampler, median pruner
fed the validation metric at each evaluation), the study in a database (SQLite by default) so that a sweep resumes
and several machines share one study. Each trial is an ordinary run folder, OUT_DIR/trial-NNN/.

Writes to OUT_DIR: sweep.db (the default storage), trial-NNN/, trials.csv and trials.md (trial, state, metric,
seconds, flags), best.yaml (`littune finetune METHOD --config best.yaml` reproduces the best trial),
optimization_history.png, param_importances.png (>= 2 completed trials), test/ (the best trial on the test split).
The search grammar: `littune.sweep.space`.
"""

import functools
import inspect
import json
import os
import re
import socket
import sys
import time
import typing
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from littune.common import Check, UserError, check_flags, checked, first_line
from littune.methods import METHODS, get_method
from littune.outbound import redacted
from littune.sweep.space import describe, distributions, read_search, suggest

SWEEP_FLAGS = {
    "search": (Union[dict, str], inspect.Parameter.empty,
               "The search space: JSON/YAML text or a .yaml/.json file mapping finetune flags to [low, high], "
               "[low, high, \"log\"], a list of choices, {\"choices\": [...]} or a fixed value (README: Sweeps)."),
    "n_trials": (Optional[Annotated[int, Check(ge=1)]], None,
                 "Trials the study should hold (completed, pruned or running; a resumed sweep runs the rest)."),
    "budget_minutes": (Optional[Annotated[float, Check(gt=0)]], None,
                       "Minutes for this invocation: no trial starts later, and a running trial stops at its first evaluation "
                       "after them (kept as pruned, its best/ as it stands)."),
    "storage": (Optional[str], None, "An Optuna storage URL (sqlite:///x.db, postgresql://..., mysql://...); "
                                     "default sqlite:///OUT_DIR/sweep.db."),
    "study_name": (Optional[str], None, "The study's name in the storage (default METHOD-<data folder name>)."),
    "pruner": (Literal["median", "none"], "median",
               "median: stop a trial whose metric at an evaluation is worse than the median of earlier trials'."),
    "pruner_startup_trials": (Annotated[int, Check(ge=0)], 2, "Completed trials before the pruner prunes."),
    "heartbeat_seconds": (Annotated[int, Check(ge=1)], 60,
                          "A running trial without a heartbeat for twice this long is taken as interrupted: marked "
                          "failed and run again with its flags."),
    "test": (bool, True, "Evaluate the best trial once on the test split at the end (out_dir/test/)."),
}
NOT_SWEEP_FLAGS = {"resume", "overwrite"}  # a trial is always a fresh run in its own folder


@functools.cache
def command(name: str):
    """The `littune sweep NAME` function: the sweep's flags plus finetune NAME's (fixed for every trial)."""
    from littune.finetune import command as finetune_command

    finetune = finetune_command(name)
    train = [p for p in inspect.signature(finetune).parameters.values() if p.name not in NOT_SWEEP_FLAGS]
    own = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=t)
           for k, (t, d, _) in SWEEP_FLAGS.items()]
    parameters = [p for p in train + own if p.default is inspect.Parameter.empty] + \
        [p for p in train + own if p.default is not inspect.Parameter.empty]

    def run(**flags):
        return sweep(name, {k: v for k, v in flags.items() if k in SWEEP_FLAGS},
                     {k: v for k, v in flags.items() if k not in SWEEP_FLAGS})

    lines = [line for line in finetune.__doc__.split("Arguments:")[1].splitlines()
             if line.strip() and line.split(":")[0].strip() not in NOT_SWEEP_FLAGS | {"out_dir"}]
    run.__signature__ = inspect.Signature(parameters)
    run.__annotations__ = {p.name: p.annotation for p in parameters}
    run.__doc__ = (f"Search finetune {name}'s flags with Optuna; each trial is a run in OUT_DIR/trial-NNN/.\n\n"
                   "Arguments:\n" + "".join(f"    {k}: {h}\n" for k, (_, _, h) in SWEEP_FLAGS.items())
                   + "    out_dir: The sweep's folder: trial-NNN/ runs, sweep.db, trials.csv/.md, best.yaml, plots "
                     "(default out/sweep/METHOD/<data folder name>).\n" + "\n".join(lines) + "\n")
    run.__name__ = run.__qualname__ = name
    return checked(run)


def __getattr__(name: str):
    if name in METHODS:
        return command(name)
    raise AttributeError(name)


def trial_seed(seed: int, number: int) -> int:
    """Each trial samples from its own seed: the same history gives the same trial, and two processes sharing a
    study (different trial numbers) never draw the same flags."""
    return (seed * 1_000_003 + number) % 2**32


def counted(study) -> int:
    """Trials toward --n_trials: completed, pruned and running (another machine's); failed ones are run again."""
    from optuna.trial import TrialState

    return sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
               for t in study.get_trials(deepcopy=False))


def sweep(name: str, options: dict, flags: dict) -> dict:
    from littune.finetune import command as finetune_command
    from littune.finetune.args import DEFAULT_TASK_METRIC
    from littune.prepared import load_prepare_json, validation_split_name

    method = get_method(name)
    finetune = finetune_command(name)
    hints = typing.get_type_hints(finetune, include_extras=True)
    space = distributions(read_search(options["search"]), hints)
    defaults = {k: p.default for k, p in inspect.signature(finetune).parameters.items()}
    both = [f for f in space if f in flags and flags[f] != defaults[f]]
    if both:
        raise UserError(f"--{both[0]} is given and searched; give it in --search only")
    if options["n_trials"] is None and options["budget_minutes"] is None:
        raise UserError("give --n_trials, --budget_minutes or both: when should the sweep stop?")
    if flags["devices"] != 1 or flags["num_nodes"] != 1:
        raise UserError("a sweep runs its trials in this process on one device: --devices 1 --num_nodes 1 (start "
                        "the same sweep on several machines to run trials in parallel)")
    check_flags(finetune.checks, flags)
    data_dir = Path(flags["data_dir"])
    meta = load_prepare_json(data_dir)
    if validation_split_name(data_dir) != "val":
        raise UserError(f"{data_dir}: no validation split (val.pt); a sweep selects on it and keeps the test split "
                        f"for the end: prepare the data again with --val_size")
    metric = flags["best_metric"] or (DEFAULT_TASK_METRIC if meta.get("labels") is not None else "val_loss")
    if metric != "val_loss" and meta.get("labels") is None:
        raise UserError(f"--best_metric {metric}: {data_dir} is not a label task; use --best_metric val_loss")
    out_dir = Path(flags["out_dir"] or Path("out") / "sweep" / name / data_dir.name)
    url = options["storage"] or f"sqlite:///{out_dir / 'sweep.db'}"
    study_name = options["study_name"] or f"{name}-{data_dir.name}"
    engine = check_storage_url(url)
    out_dir.mkdir(parents=True, exist_ok=True)
    study = open_study(url, engine, study_name, options, flags["seed"], "minimize" if metric == "val_loss" else
                       "maximize")
    record = {"method": name, "metric": metric, "space": describe(space),
              "fixed": {k: str(v) if isinstance(v, Path) else v for k, v in sorted(flags.items())
                        if k not in ("out_dir", "logger", "mlflow_tracking_uri")}}
    check_same_study(study, record, study_name)
    print(f"sweep {study_name} in {redacted(url)}: {counted(study)} trials so far, {metric} "
          f"({study.direction.name.lower()}), runs in {out_dir}", file=sys.stderr)
    deadline = time.monotonic() + options["budget_minutes"] * 60 if options["budget_minutes"] else None
    objective = make_objective(method, finetune, flags, space, metric, out_dir, deadline)
    try:
        run_trials(study, objective, options["n_trials"], options["budget_minutes"])
    finally:
        from littune.sweep.report import write_table

        write_table(study, metric, out_dir)
    from littune.sweep.report import finish

    return finish(study, name, metric, flags, defaults, space, out_dir, options["test"])


def check_storage_url(url: str) -> dict:
    """A URL SQLAlchemy can read, before anything is written; the engine options for it."""
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
    except Exception as e:  # SQLAlchemy's ArgumentError and friends: any of them means "not a URL"
        raise UserError(f"--storage {redacted(url)}: not a database URL ({first_line(e)}); e.g. "
                        f"sqlite:///sweep.db or postgresql://user@host/db") from None
    if parsed.get_backend_name() == "sqlite":  # two processes on one file wait for each other's writes
        return {"connect_args": {"timeout": 60}}
    return {}


def open_study(url: str, engine: dict, study_name: str, options: dict, seed: int, direction: str):
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # littune prints one line per trial itself
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats are "experimental"
    try:
        storage = RDBStorage(url, engine_kwargs=engine, heartbeat_interval=options["heartbeat_seconds"],
                             grace_period=2 * options["heartbeat_seconds"],
                             heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3))
    except Exception as e:  # a driver not installed, a host not reached, a file not writable
        raise UserError(f"--storage {redacted(url)}: cannot open ({type(e).__name__}: "
                        f"{redacted(first_line(e))})") from None
    pruner = optuna.pruners.MedianPruner(n_startup_trials=options["pruner_startup_trials"], n_warmup_steps=0) \
        if options["pruner"] == "median" else optuna.pruners.NopPruner()
    return optuna.create_study(study_name=study_name, storage=storage, direction=direction, load_if_exists=True,
                               sampler=optuna.samplers.TPESampler(seed=trial_seed(seed, 0)), pruner=pruner)


def check_same_study(study, record: dict, study_name: str) -> None:
    saved = study.user_attrs.get("littune")
    if saved is None:
        study.set_user_attr("littune", json.loads(json.dumps(record)))
        return
    differ = [k for k in ("method", "metric", "space") if saved.get(k) != record[k]]
    differ += [f"--{k}" for k in record["fixed"] if saved["fixed"].get(k) != record["fixed"][k]]
    if differ:
        raise UserError(f"study {study_name} holds a sweep with other settings ({', '.join(differ[:4])}); give "
                        f"the same flags to resume it, or another --study_name")


def make_objective(method, finetune, flags: dict, space: dict, metric: str, out_dir: Path,
                   deadline: Optional[float] = None):
    import optuna

    from littune.finetune import loop
    from littune.finetune.args import TrainArgs

    train_names = {f.name for f in fields(TrainArgs)}
    seed = flags["seed"]

    def objective(trial) -> float:
        trial.study.sampler = optuna.samplers.TPESampler(seed=trial_seed(seed, trial.number))
        values = {flag: suggest(trial, flag, dist) for flag, dist in space.items()}
        folder = out_dir / f"trial-{trial.number:03d}"
        trial.set_user_attr("run", folder.name)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        run_flags = {**flags, **values, "out_dir": folder, "resume": None, "overwrite": False}
        check_flags(finetune.checks, run_flags)
        pruned_at, why = [], []

        def on_evaluation(step: int, figures: dict) -> bool:  # the loop's hook: report, and stop when pruned
            trial.report(figures[metric], step)
            if trial.should_prune():
                pruned_at.append(step)
            elif deadline is not None and time.monotonic() > deadline:  # the user's minutes are spent
                pruned_at.append(step)
                why.append("budget")
            return bool(pruned_at)

        print(f"trial {trial.number}: {' '.join(f'--{k} {v}' for k, v in values.items())}", file=sys.stderr)
        started = time.perf_counter()
        try:
            loop.finetune(method, TrainArgs(**{k: v for k, v in run_flags.items() if k in train_names}),
                          method.args(**{k: v for k, v in run_flags.items() if k not in train_names}),
                          on_evaluation=on_evaluation)
        except UserError as e:
            trial.set_user_attr("error", redacted(str(e)))
            raise
        finally:
            trial.set_user_attr("seconds", round(time.perf_counter() - started, 1))
        info = json.loads((folder / "best" / "adapter_info.json").read_text(encoding="utf-8"))
        trial.set_user_attr("best_value", info["value"])
        trial.set_user_attr("best_step", info["step"])
        if pruned_at:
            trial.set_user_attr("pruned_at", pruned_at[0])
            if why:
                trial.set_user_attr("stopped_by", "budget")
            raise optuna.TrialPruned(f"{'stopped by --budget_minutes' if why else 'pruned'} at step {pruned_at[0]}")
        return info["value"]

    return objective


def run_trials(study, objective, n_trials: Optional[int], budget_minutes: Optional[float]) -> None:
    from tqdm import tqdm

    done = counted(study)
    if n_trials is not None and done >= n_trials:
        print(f"the study holds {done} trials already (--n_trials {n_trials})", file=sys.stderr)
        return
    bar = tqdm(total=n_trials, initial=done, desc="Sweep", unit="trial", file=sys.stderr, dynamic_ncols=True,
               position=1)

    def after_trial(study, trial) -> None:
        value = trial.user_attrs.get("best_value")
        bar.write(f"trial {trial.number}: {trial.state.name.lower()}"
                  f"{f', best {value:.4f}' if value is not None else ''} in {trial.user_attrs.get('seconds', 0)}s")
        bar.n = counted(study)
        bar.refresh()
        if n_trials is not None and bar.n >= n_trials:
            study.stop()

    try:
        study.optimize(objective, timeout=budget_minutes * 60 if budget_minutes else None, callbacks=[after_trial],
                       catch=())
    finally:
        bar.close()
