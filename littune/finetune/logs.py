"""Logging of a run: metrics.csv (always), the progress bar, and Lightning's experiment loggers (TensorBoard,
MLflow, Weights & Biases)."""

import csv
import os
import sys
from pathlib import Path
from typing import Optional

from littune.common import UserError, atomic_path
from littune.scorings import TASK_METRICS  # label tasks: likelihood-scored validation records (`littune.scorings`)

METRIC_COLUMNS = ["step", "epoch", "train_loss", "learning_rate", "val_loss", *TASK_METRICS, "tokens",
                  "tokens_per_sec", "elapsed_sec", "eval_sec"]


def make_progress(fabric, total: int, done: int = 0):
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc="Fine-tuning", unit="step", disable=fabric.global_rank != 0,
                file=sys.stderr, dynamic_ncols=True)


def keep_metrics_until(path: Path, step: int) -> None:
    """metrics.csv with the rows of steps <= step (a resumed run drops rows logged after its saved state)."""
    rows = []
    if step > 0 and path.is_file():
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= step]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in METRIC_COLUMNS} for r in rows)


def wandb_mode() -> str:
    """How a W&B run logs: WANDB_MODE where set; online where an API key is (WANDB_API_KEY, or `wandb login`'s
    ~/.netrc entry); else offline, into out_dir/wandb (`wandb sync` uploads it later). Online by default would
    fail without a key, and send a run before its user said where it goes."""
    return os.environ.get("WANDB_MODE") or ("online" if wandb_key_present() else "offline")


def wandb_key_present() -> bool:
    """WANDB_API_KEY, or the ~/.netrc entry `wandb login` writes for the W&B host (its value is never read here)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    import netrc

    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].split("/")[0]
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def wandb_settings():
    """No system metadata in the run: W&B would record the command line (flags such as a tracking URI with its
    password), the program's and the run's absolute paths, the host and the git remote."""
    import wandb

    try:
        return wandb.Settings(x_disable_meta=True, disable_git=True, save_code=False)
    except Exception:  # wandb before 0.19 named it _disable_meta
        return wandb.Settings(_disable_meta=True, disable_git=True, save_code=False)


def check_loggers(logger: list) -> Optional[str]:
    """Before anything is written: every named logger's package imports. Returns the line that says how W&B logs
    (None without --logger wandb)."""
    if "mlflow" in logger:
        try:
            from lightning.pytorch.loggers import MLFlowLogger  # noqa: F401
            import mlflow  # noqa: F401
        except ModuleNotFoundError as e:
            raise UserError("--logger mlflow needs MLflow: pip install 'littune[mlflow]'") from e
    if "tensorboard" in logger:
        try:
            import tensorboard  # noqa: F401
        except ModuleNotFoundError:
            try:
                import tensorboardX  # noqa: F401
            except ModuleNotFoundError as e:
                raise UserError("--logger tensorboard needs TensorBoard: pip install 'littune[tensorboard]'") from e
    if "wandb" not in logger:
        return None
    try:
        import wandb  # noqa: F401  (Lightning's WandbLogger imports it only when the run starts)
        from lightning.pytorch.loggers import WandbLogger  # noqa: F401
    except ModuleNotFoundError as e:
        raise UserError("--logger wandb needs Weights & Biases: pip install 'littune[wandb]'") from e
    mode = wandb_mode()
    if mode == "online" and not wandb_key_present():
        raise UserError("--logger wandb with WANDB_MODE=online needs an API key: run `wandb login` or set "
                        "WANDB_API_KEY, or unset WANDB_MODE to log offline into OUT_DIR/wandb")
    if mode == "offline":
        return ("wandb: offline, into OUT_DIR/wandb (no API key, WANDB_MODE unset; `wandb sync` uploads it, "
                "WANDB_MODE=online or `wandb login` logs online)")
    return f"wandb: {mode} (WANDB_MODE or an API key says so)"


def make_loggers(hparams: dict, out_dir: Path, mlflow_run_id: Optional[str] = None,
                 wandb_run_id: Optional[str] = None) -> list:
    """Fabric/Lightning experiment loggers besides metrics.csv (which is always written); a resumed run passes the
    MLflow and W&B run ids it logged to, and goes on logging there."""
    loggers = []
    if "tensorboard" in hparams["logger"]:
        from lightning.fabric.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(root_dir=out_dir, name="tensorboard"))
    if "mlflow" in hparams["logger"]:
        from lightning.pytorch.loggers import MLFlowLogger  # check_loggers made sure it imports
        uri = hparams["mlflow_tracking_uri"]
        if uri is None:  # a local out_dir/mlruns store: MLflow 3 wants this opt-in for file stores
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        loggers.append(MLFlowLogger(experiment_name=f"littune-{hparams['method']}", run_name=out_dir.name,
                                    run_id=mlflow_run_id, tracking_uri=uri or (out_dir / "mlruns").resolve().as_uri()))
    if "wandb" in hparams["logger"]:
        from lightning.pytorch.loggers import WandbLogger

        (out_dir / "wandb").mkdir(parents=True, exist_ok=True)
        # the key comes from `wandb login` or WANDB_API_KEY, never from littune's flags or files
        loggers.append(WandbLogger(project=f"littune-{hparams['method']}", name=out_dir.name, save_dir=str(out_dir),
                                   id=wandb_run_id, resume="allow" if wandb_run_id else None,
                                   offline=wandb_mode() == "offline", settings=wandb_settings()))
    return loggers


def logger_run_ids(loggers: list) -> dict:
    """The MLflow and W&B run ids the loggers log to, kept with the training state so a resumed run continues them."""
    ids = {}
    for experiment_logger in loggers:
        if type(experiment_logger).__name__ == "MLFlowLogger":
            ids["mlflow_run_id"] = experiment_logger.run_id
        elif type(experiment_logger).__name__ == "WandbLogger":
            ids["wandb_run_id"] = experiment_logger.experiment.id
    return ids


def close_loggers(loggers: list, status: str) -> None:
    """Flush and mark every logger's run with how the session ended ("success", "FAILED", "KILLED"); a W&B run is
    finished (uploaded, or synced to its offline folder) now, not at interpreter exit, so that a resumed session
    continues a closed run."""
    for experiment_logger in loggers:
        experiment_logger.finalize(status)
        if type(experiment_logger).__name__ == "WandbLogger":  # started by logger_run_ids
            experiment_logger.experiment.finish(exit_code=0 if status == "success" else 1)


def log_row(path: Path, loggers: list, row: dict) -> None:
    """One row of metrics.csv, and the same figures to every experiment logger."""
    with open(path, "a", newline="", encoding="utf-8") as f:
        csv.DictWriter(f, METRIC_COLUMNS).writerow({k: _fmt(row.get(k, "")) for k in METRIC_COLUMNS})
    for experiment_logger in loggers:
        experiment_logger.log_metrics({k: v for k, v in row.items() if v != "" and k != "step"}, row["step"])


def _fmt(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)
