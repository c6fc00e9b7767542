"""What a sweep leaves beside its trials: the results table, best.yaml, Optuna's plots, the best trial's test split."""

import csv
import io
import sys
import warnings
from pathlib import Path

from littune.common import atomic_path, save_text

COLUMNS = ["trial", "state", "value", "best_step", "seconds", "flags", "run", "note"]


def trial_rows(study, metric: str) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        stopped = "stopped by --budget_minutes" if attrs.get("stopped_by") == "budget" else "pruned"
        note = f"{stopped} at step {attrs['pruned_at']}" if "pruned_at" in attrs else attrs.get("error", "")
        if t.system_attrs.get("failed_trial") is not None:
            note = f"rerun of trial {t.system_attrs['failed_trial']} (interrupted) {note}".strip()
        value = attrs.get("best_value")
        rows.append({"trial": t.number, "state": t.state.name.lower(),
                     "value": "" if value is None else f"{value:.6g}", "best_step": attrs.get("best_step", ""),
                     "seconds": attrs.get("seconds", ""), "flags": " ".join(f"--{k} {v}" for k, v in t.params.items()),
                     "run": attrs.get("run", ""), "note": note})
    return rows


def write_table(study, metric: str, out_dir: Path) -> None:
    """trials.csv and trials.md: one row per trial ("value" is the trial's best METRIC, as best/ holds it)."""
    rows = trial_rows(study, metric)
    text = io.StringIO()
    writer = csv.DictWriter(text, COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    save_text(text.getvalue(), out_dir / "trials.csv")
    header = [c if c != "value" else metric for c in COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    save_text("\n".join(lines) + "\n", out_dir / "trials.md")


def best_config(best, flags: dict, defaults: dict, space: dict) -> dict:
    """The finetune flags of the best trial: the data, the seed, the flags given that differ from finetune's
    defaults, and the searched values (out_dir left to finetune; no tracking URI, which may hold a password)."""
    from littune.sweep.space import suggest

    class Fixed:  # replays the trial's recorded values through the space (a list choice is stored as its JSON)
        params = best.params

        def suggest_categorical(self, name, choices):
            return self.params[name]

        def suggest_int(self, name, *args, **kwargs):
            return self.params[name]

        suggest_float = suggest_int

    values = {flag: suggest(Fixed(), flag, dist) for flag, dist in space.items()}
    config = {k: v for k, v in flags.items() if k in ("checkpoint_dir", "data_dir", "seed") or
              (v != defaults.get(k) and k not in ("out_dir", "mlflow_tracking_uri"))}
    config.update(values)
    return {k: str(v) if isinstance(v, Path) else v for k, v in config.items()}


def save_plots(study, out_dir: Path) -> list[str]:
    """Optuna's optimization history and parameter importances as PNG; importance needs >= 2 completed trials."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as plots

    written = []
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    wanted = [("optimization_history.png", plots.plot_optimization_history, 1),
              ("param_importances.png", plots.plot_param_importances, 2)]
    for name, plot, needs in wanted:
        if len(complete) < needs:
            print(f"{name}: not drawn ({len(complete)} completed trials; it needs {needs})", file=sys.stderr)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna's matplotlib plots are marked experimental
            try:
                axes = plot(study)
            except (ValueError, RuntimeError) as e:  # e.g. importances of flags that never varied
                print(f"{name}: not drawn ({e})", file=sys.stderr)
                continue
        figure = axes.figure
        figure.tight_layout()
        with atomic_path(out_dir / name) as tmp:
            figure.savefig(tmp, format="png", dpi=100)
        plt.close(figure)
        written.append(name)
    return written


def finish(study, name: str, metric: str, flags: dict, defaults: dict, space: dict, out_dir: Path,
           test: bool) -> dict:
    """best.yaml, the plots and (once, at the end) the best trial's test split; returns what it found."""
    import optuna
    import yaml

    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    written = ["trials.csv", "trials.md"] + save_plots(study, out_dir)
    if not complete:
        print(f"no completed trial yet: no best.yaml. Wrote {', '.join(written)} to {out_dir}", file=sys.stderr)
        return {"best_trial": None}
    best = study.best_trial
    config = best_config(best, flags, defaults, space)
    save_text(f"# littune finetune {name} --config best.yaml: trial {best.number} of study {study.study_name}, "
              f"{metric} {best.value:.6g}\n" + yaml.safe_dump(config, sort_keys=False), out_dir / "best.yaml")
    written.append("best.yaml")
    result = {"best_trial": best.number, "value": best.value, "flags": config, "test": None}
    run = out_dir / best.user_attrs["run"] / "best"
    if test and (Path(flags["data_dir"]) / "test.pt").is_file():
        from littune.evaluate import evaluate

        result["test"] = evaluate(checkpoint_dir=flags["checkpoint_dir"], data_dir=flags["data_dir"],
                                  adapter_path=run, split="test", out_dir=out_dir / "test")
        written.append("test/")
    print(f"best: trial {best.number}, {metric} {best.value:.4f} ({' '.join(f'--{k} {v}' for k, v in best.params.items())}"
          f"). Wrote {', '.join(written)} to {out_dir}", file=sys.stderr)
    return result
