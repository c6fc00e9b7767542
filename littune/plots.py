"""The pictures `littune evaluate` draws: the confusion matrix of a label task, and a run's loss and task metrics
over training from its metrics.csv. matplotlib's Figure on the Agg canvas, without pyplot (no global state, no
display needed)."""

import csv
import math
from pathlib import Path
from typing import Optional

from littune.common import atomic_path
from littune.metrics import OTHER

def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas, without pyplot (no global state, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def _save_png(figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", bbox_inches="tight")


MAX_PLOTTED = 20  # classes drawn one by one in the confusion matrix; the rest are summed into one row and column
REST = "the rest"


def condensed(labels: list, columns: list, matrix: list, keep: int = MAX_PLOTTED) -> tuple[list, list, list]:
    """(labels, columns, matrix) with at most `keep` rows: the keep - 1 labels with the most records, then one row
    and one column "the rest" summing the others (columns beyond the labels, such as "other", stay at the end)."""
    if len(labels) <= keep:
        return labels, columns, matrix
    support = [sum(row) for row in matrix]
    kept = sorted(sorted(range(len(labels)), key=lambda i: -support[i])[:keep - 1])
    rest = [i for i in range(len(labels)) if i not in kept]
    extra = list(range(len(labels), len(columns)))  # e.g. "other": not a label

    def fold(row: list) -> list:
        return [row[c] for c in kept] + [sum(row[c] for c in rest)] + [row[c] for c in extra]

    rows = [fold(matrix[r]) for r in kept] + [fold([sum(matrix[r][c] for r in rest) for c in range(len(columns))])]
    return [labels[i] for i in kept] + [REST], [columns[i] for i in kept] + [REST] + [columns[c] for c in extra], rows


def plot_confusion_matrix(metrics: dict, path: Path) -> None:
    labels, columns, matrix = condensed(metrics["labels"], metrics["confusion_matrix_columns"],
                                        metrics["confusion_matrix"])
    figure = _figure(1.6 + 0.9 * len(columns), 1.4 + 0.7 * len(labels))
    axes = figure.add_subplot()
    image = axes.imshow(matrix, cmap="Blues", aspect="auto", vmin=0)
    peak = max(max(row) for row in matrix) or 1
    for r, row in enumerate(matrix):
        for c, value in enumerate(row):
            axes.text(c, r, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black")
    axes.set_xticks(range(len(columns)), [c if c != OTHER else "other\n(not a label)" for c in columns],
                    rotation=30 if max(map(len, columns)) > 8 else 0)
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("expected")
    axes.set_title(f"{metrics['split']} split: accuracy {metrics['accuracy']:.3f}, {metrics['records']} records")
    figure.colorbar(image, ax=axes)
    _save_png(figure, path)


def find_metrics_csv(run_dir: Optional[Path]) -> Optional[Path]:
    """The training log of the run: RUN/metrics.csv, or the run's for an adapter saved in RUN/step-NNNNNN/."""
    if run_dir is None:
        return None
    for folder in (run_dir, run_dir.parent) if run_dir.name.startswith("step-") else (run_dir,):
        if (folder / "metrics.csv").is_file():
            return folder / "metrics.csv"
    return None


def read_curves(metrics_csv: Path) -> dict[str, tuple[list, list]]:
    """column -> (steps, values) of every numeric column of a run's metrics.csv (rows without it are skipped)."""
    curves: dict[str, tuple[list, list]] = {}
    with open(metrics_csv, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                step = int(row["step"])
            except (KeyError, TypeError, ValueError):
                continue
            for column, value in row.items():
                if column != "step" and _is_number(value):
                    steps, values = curves.setdefault(column, ([], []))
                    steps.append(step)
                    values.append(float(value))
    return curves


TASK_CURVES = {"val_accuracy": "accuracy", "val_f1_macro": "macro F1", "val_mcc": "MCC"}


def plot_loss(metrics_csv: Path, path: Path) -> bool:
    """Training and validation loss over steps from a run's metrics.csv; False (no picture) when it has no rows."""
    curves = read_curves(metrics_csv)
    if "train_loss" not in curves and "val_loss" not in curves:
        return False
    figure = _figure(7, 4.2)
    _loss_axes(figure.add_subplot(), curves, f"{metrics_csv.parent.name}: loss over training")
    _save_png(figure, path)
    return True


def plot_curves(metrics_csv: Path, path: Path) -> bool:
    """The loss and each task metric logged while training (label tasks), against the step, side by side; False
    (no picture) when the run logged no task metric."""
    curves = read_curves(metrics_csv)
    if not any(column in curves for column in TASK_CURVES):
        return False
    figure = _figure(12, 4.2)
    _loss_axes(figure.add_subplot(1, 2, 1), curves, "loss")
    axes = figure.add_subplot(1, 2, 2)
    for column, name in TASK_CURVES.items():
        if column in curves:
            axes.plot(*curves[column], "o-", label=f"validation {name}", linewidth=1.5)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("validation metric (likelihood scoring)")
    axes.set_title(f"{metrics_csv.parent.name}: task metrics over training")
    axes.grid(alpha=0.3)
    axes.legend()
    _save_png(figure, path)
    return True


def _loss_axes(axes, curves: dict, title: str) -> None:
    if "train_loss" in curves:
        axes.plot(*curves["train_loss"], label="training loss", linewidth=1.2)
    if "val_loss" in curves:
        axes.plot(*curves["val_loss"], "o-", label="validation loss", linewidth=1.5)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (mean token cross-entropy)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()


def _is_number(value) -> bool:
    try:
        return value not in (None, "") and math.isfinite(float(value))
    except ValueError:
        return False


def write_plots(metrics: dict, out_dir: Path, run_dir: Optional[Path]) -> list[str]:
    """An evaluation's pictures in out_dir: the confusion matrix (label tasks), and the run's loss and task-metric
    curves where it left a metrics.csv; returns the names written."""
    written = []
    if metrics["labels"] is not None:
        plot_confusion_matrix(metrics, out_dir / "confusion_matrix.png")
        written.append("confusion_matrix.png")
    metrics_csv = find_metrics_csv(run_dir)
    if metrics_csv is not None and plot_loss(metrics_csv, out_dir / "loss.png"):
        written.append("loss.png")
    if metrics_csv is not None and plot_curves(metrics_csv, out_dir / "curves.png"):
        written.append("curves.png")
    return written
