"""Evaluate: test loss, predictions and (for label tasks) classification metrics on a prepared split.

    littune evaluate --checkpoint_dir checkpoints/EleutherAI/pythia-160m --adapter_path out/adapter_v2/sst2 \
        --data_dir data/sst2

Two ways to predict (--scoring):
- likelihood (the default for a label task): every label is scored by the log-probability the model gives its
  tokens after the prompt, and the most likely label is the prediction, as lm-evaluation-harness scores a
  multiple-choice task (`littune.scoring`). Every record gets a label; accuracy_norm ranks by log-probability per
  byte of the label instead.
- generate (open-ended outputs): batched greedy answers (`littune.sampling.batched_greedy`: the tokens `littune
  generate --temperature 0` gives one prompt at a time), compared with the expected outputs as text.
The label set: --labels, else the one prepare recorded in prepare.json, else detected from the expected outputs
(`littune.metrics`). The test loss (mean cross-entropy over the target tokens, masked as in training) comes from the
same forward passes as the likelihood scores.

Writes to OUT_DIR (default: the adapter's run folder /eval, or out/eval/<data folder name> for the base model):
    predictions.jsonl     one line per record, in the split's order: instruction, input, expected, predicted,
                          prompt (the text tokenised; a tokenizer that adds BOS adds it), prompt_ids (the ids fed
                          to the model); with likelihood scoring also
                          predicted_norm and choices: {label: {"ids", "logprob"}}, prompt_ids + ids being exactly the
                          sequence scored
    metrics.json          scoring, precision, exact_match, test_loss, perplexity; accuracy, accuracy_norm
                          (likelihood), f1_macro, f1_micro, mcc, per_class, confusion_matrix, labels, not_a_label for
                          label tasks (null otherwise)
    confusion_matrix.png  label tasks only
    loss.png              training/validation loss over steps, when the run folder has metrics.csv
    curves.png            the loss and the task metrics logged while training (label tasks), against the step
"""

import csv
import json
import math
import sys
import time
from pathlib import Path
from typing import Annotated, Literal, Optional

import torch

from littune.common import Check, UserError, atomic_path, checked, save_json, save_text
from littune.metrics import (OTHER, check_expected_in_labels, classification_metrics, detect_labels, exact_match,
                             normalize, parse_labels)
from littune.model import Precision, unwrap
from littune.quantize import Quantize, check_quantize



@checked
def evaluate(
    checkpoint_dir: Path,
    data_dir: Path,
    adapter_path: Optional[Path] = None,
    split: Literal["test", "val", "train"] = "test",
    batch_size: Annotated[int, Check(ge=1)] = 16,
    max_new_tokens: Optional[Annotated[int, Check(ge=1)]] = None,
    out_dir: Optional[Path] = None,
    labels: Optional[str] = None,
    scoring: Optional[Literal["likelihood", "generate"]] = None,
    precision: Optional[Precision] = None,
    quantize: Optional[Quantize] = None,
) -> dict:
    """Evaluate a fine-tuned adapter (or the base model) on a prepared split: loss, predictions, metrics, plots.

    Arguments:
        checkpoint_dir: The converted base model the adapter was trained on.
        data_dir: The prepared data (from `littune prepare`); its prompt style formats the prompts.
        adapter_path: An adapter file, or a run folder (its final adapter). Without it, the base model is evaluated.
        split: The prepared split to evaluate: test, val or train.
        batch_size: Records per batch, for scoring, generation and the test loss.
        max_new_tokens: With --scoring generate: most tokens to generate per record (generation also stops at EOS / the prompt style's stop tokens). Default: for a label task the longest label's tokens + 4 (a longer answer, trimmed, is no label; a model that answers in sentences costs minutes otherwise), else 32.
        out_dir: Where predictions, metrics and plots go (default: RUN_FOLDER/eval with an adapter, else out/eval/<data folder name>; eval-train for --split train).
        labels: The label set of a classification task, comma-separated, e.g. positive,negative (default: the one prepare recorded, else detected from the expected outputs); ties in likelihood scoring go to the first label.
        scoring: likelihood (the most likely label after the prompt, like lm-evaluation-harness; needs a label set) or generate (greedy answers compared as text). Default: likelihood when the label set is known, else generate.
        precision: 32-true, bf16-true, bf16-mixed, 16-true or 16-mixed (default: as littune finetune's: bf16-true on GPUs with bfloat16, 32-true on CPU).
        quantize: The base model's linear layers in 4 bits (bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq) or 8 bits (bnb.int8) with bitsandbytes, quantized while loading (pip install 'littune[quantize]'); the adapter loads as it is.
    """
    checkpoint_dir, data_dir = Path(checkpoint_dir), Path(data_dir)
    label_list = parse_labels(labels) if labels is not None else None
    from littune.checkpoints import load_model_config
    from littune.generate import check_fits
    from littune.model import (check_data_fits_model, check_precision, default_precision, load_for_inference,
                               resolve_adapter)
    from littune.prepared import load_prepare_json, load_split
    from littune.prompts import load_style_file

    precision = precision or default_precision()
    check_precision(precision)
    check_quantize(quantize)
    run_dir = resolve_adapter(adapter_path)[1] if adapter_path is not None else None
    if out_dir is None:
        folder = "eval" if split == "test" else f"eval-{split}"
        out_dir = run_dir / folder if run_dir is not None else Path("out") / folder / data_dir.resolve().name
    out_dir = Path(out_dir)

    records = load_split(data_dir, split)
    meta = load_prepare_json(data_dir)
    expected = [r["output"] for r in records]
    label_list = label_set(label_list, meta, expected)
    scoring = scoring or ("likelihood" if label_list is not None else "generate")
    if scoring == "likelihood" and label_list is None:
        raise UserError(f"--scoring likelihood needs a label set, and the expected outputs of {data_dir} are free "
                        f"text (no labels in prepare.json, none detected); give --labels, or use --scoring generate")
    config = load_model_config(checkpoint_dir)
    check_data_fits_model(data_dir, meta, records, checkpoint_dir, config)
    style = load_style_file(data_dir)
    ignore_index = int(meta.get("ignore_index", -100))

    import lightning as L

    fabric = L.Fabric(devices=1, precision=precision, accelerator="auto")
    model, tokenizer, _ = load_for_inference(fabric, checkpoint_dir, adapter_path, quantize)
    if scoring == "generate" and max_new_tokens is None:
        max_new_tokens = label_answer_tokens(tokenizer, label_list) if label_list else 32
    if scoring == "generate":
        longest_prompt = max(records, key=lambda r: len(r["input_ids_no_response"]))["input_ids_no_response"]
        check_fits(longest_prompt, max_new_tokens, config.block_size)

    started = time.perf_counter()
    if scoring == "likelihood":
        rows, loss = score_by_likelihood(model, tokenizer, style, records, label_list, ignore_index, batch_size)
    else:
        rows, loss = score_by_generation(model, tokenizer, style, records, max_new_tokens, ignore_index,
                                         batch_size, fabric.device)
    predicted = [row["predicted"] for row in rows]
    seconds = time.perf_counter() - started
    print(f"{scoring} scoring and test loss: {len(records)} records in {seconds:.1f}s "
          f"({len(records) / max(seconds, 1e-9):.1f} records/s), precision {precision}", file=sys.stderr)

    metrics = {
        "split": split,
        "records": len(records),
        "checkpoint_dir": str(checkpoint_dir),
        "adapter_path": None if adapter_path is None else str(adapter_path),
        "data_dir": str(data_dir),
        "scoring": scoring,
        "precision": precision,
        "quantize": quantize,
        "max_new_tokens": max_new_tokens if scoring == "generate" else None,
        "test_loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "exact_match": exact_match(expected, predicted),
        **classification_metrics(expected, predicted, label_list),
        "accuracy_norm": (classification_metrics(expected, [row["predicted_norm"] for row in rows],
                                                 label_list)["accuracy"] if scoring == "likelihood" else None),
    }
    lines = [
        json.dumps({"instruction": r["instruction"], "input": r["input"], "expected": r["output"], **row},
                   ensure_ascii=False)
        for r, row in zip(records, rows)
    ]
    save_text("".join(line + "\n" for line in lines), out_dir / "predictions.jsonl")
    save_json(metrics, out_dir / "metrics.json")
    written = ["predictions.jsonl", "metrics.json"]
    if metrics["labels"] is not None:
        plot_confusion_matrix(metrics, out_dir / "confusion_matrix.png")
        written.append("confusion_matrix.png")
    metrics_csv = find_metrics_csv(run_dir)
    if metrics_csv is not None and plot_loss(metrics_csv, out_dir / "loss.png"):
        written.append("loss.png")
    if metrics_csv is not None and plot_curves(metrics_csv, out_dir / "curves.png"):
        written.append("curves.png")
    print(format_table(metrics))
    print(f"Wrote {', '.join(written)} to {out_dir}", file=sys.stderr)
    return metrics


# ------------------------------------------------------------------------------------------------------ scoring


def score_by_likelihood(model, tokenizer, style, records: list, labels: list[str], ignore_index: int,
                        batch_size: int) -> tuple[list[dict], float]:
    """(a row per record: predicted, predicted_norm, choices, prompt, prompt_ids; the test loss): every label scored
    by its log-probability after the prompt, the test loss's targets riding in the same forward passes."""
    from littune.scoring import label_requests, label_result, label_texts

    texts = label_texts([r["output"] for r in records], labels)
    requests = label_requests(tokenizer, style, records, texts, unwrap(model).config.block_size)
    results, loss = scored_with_loss(model, requests, records, ignore_index, batch_size, "Scoring labels")
    return [label_result(request, result, labels, texts) for request, result in zip(requests, results)], loss


def score_by_generation(model, tokenizer, style, records: list, max_new_tokens: int, ignore_index: int,
                        batch_size: int, device) -> tuple[list[dict], float]:
    """(a row per record: prompt, prompt_ids, predicted: the greedy answer; the test loss)."""
    from littune.sampling import batched_greedy

    requests = [{"prompt": style.apply(r["instruction"], input=r["input"]),
                 "context": r["input_ids_no_response"].tolist(), "continuations": []} for r in records]
    _, loss = scored_with_loss(model, requests, records, ignore_index, batch_size, "Test loss")
    generated = batched_greedy(model, [r["input_ids_no_response"] for r in records], max_new_tokens,
                               style.stop_tokens(tokenizer), batch_size, device, progress=True)
    return [{"prompt": request["prompt"], "prompt_ids": request["context"],
             "predicted": tokenizer.decode(torch.tensor(ids, dtype=torch.int64))}
            for request, ids in zip(requests, generated)], loss


def scored_with_loss(model, requests: list, records: list, ignore_index: int, batch_size: int,
                     desc: str) -> tuple[list, float]:
    """(the requests' continuation scores, the records' mean target-token loss) from one scoring pass."""
    from littune.scoring import loss_terms, token_logprobs, with_loss

    scored, plans = with_loss(requests, records, ignore_index)
    results = token_logprobs(model, scored, batch_size, progress=True, desc=desc)
    loss_sum, targets = loss_terms(scored, results, plans)
    if targets == 0:
        raise UserError("no target tokens in the split (every label is --ignore_index); nothing to compute a loss on")
    return results, loss_sum / targets


def label_answer_tokens(tokenizer, labels: list[str]) -> int:
    """Tokens enough for any answer that is a label once trimmed and lowercased: the longest label in any of the
    casings and with or without a leading space, plus 4 for whitespace tokens around it."""
    variants = [v for label in labels for word in (label, label.capitalize(), label.upper()) for v in (word, " " + word)]
    return 4 + max(len(tokenizer.encode(v, bos=False, eos=False)) for v in variants)


def label_set(given: Optional[list[str]], meta: dict, expected: list[str]) -> Optional[list[str]]:
    """--labels (every expected output must be one); else prepare.json's "labels" where they cover the split's
    expected outputs; else the label set detected from the expected outputs, or None (free text)."""
    if given is not None:
        check_expected_in_labels(expected, given)
        return given
    recorded = meta.get("labels")
    if isinstance(recorded, list) and len(recorded) >= 2:
        known = {normalize(label) for label in recorded}
        if all(normalize(e) in known for e in expected):
            return [normalize(label) for label in recorded]
    return detect_labels(expected)


# ------------------------------------------------------------------------------------------------------ metrics


def format_table(metrics: dict) -> str:
    rows = [("records", f"{metrics['records']}"), ("scoring", metrics.get("scoring") or "generate"),
            ("test loss", f"{metrics['test_loss']:.4f}"), ("perplexity", f"{metrics['perplexity']:.3f}"),
            ("exact match", f"{metrics['exact_match']:.4f}")]
    if metrics["labels"] is not None:
        rows.append(("accuracy", f"{metrics['accuracy']:.4f}"))
        if metrics.get("accuracy_norm") is not None:
            rows.append(("accuracy (per byte)", f"{metrics['accuracy_norm']:.4f}"))
        rows += [("F1 macro", f"{metrics['f1_macro']:.4f}"),
                 ("F1 micro", f"{metrics['f1_micro']:.4f}"), ("MCC", f"{metrics['mcc']:.4f}"),
                 ("not a label", f"{metrics['not_a_label']}")]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    if metrics["labels"] is not None:
        corner = "expected \\ predicted"
        name_width = max(len(corner), *(len(label) for label in metrics["labels"]))
        lines += ["", f"{'label':<{name_width}}  precision  recall  f1      support"]
        for label, v in metrics["per_class"].items():
            lines.append(f"{label:<{name_width}}  {v['precision']:<9.4f}  {v['recall']:<6.4f}  {v['f1']:<6.4f}  "
                         f"{v['support']}")
        columns = metrics["confusion_matrix_columns"]
        cell = max(6, *(len(c) for c in columns))
        lines += ["", f"{corner:<{name_width}}  " + "  ".join(f"{c:>{cell}}" for c in columns)]
        for label, row in zip(metrics["labels"], metrics["confusion_matrix"]):
            lines.append(f"{label:<{name_width}}  " + "  ".join(f"{v:>{cell}}" for v in row))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------- plots


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


def plot_confusion_matrix(metrics: dict, path: Path) -> None:
    labels, columns, matrix = metrics["labels"], metrics["confusion_matrix_columns"], metrics["confusion_matrix"]
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
