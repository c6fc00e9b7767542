"""Evaluate: test loss, predictions and (for label tasks) classification metrics on a prepared split.

    littune evaluate --checkpoint_dir checkpoints/EleutherAI/pythia-160m --adapter_path out/adapter_v2/sst2 \
        --data_dir data/sst2

Two ways to predict (--scoring, one file each in `littune/scorings/`, the registry SCORINGS):
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

import json
import math
import sys
import time
from pathlib import Path
from typing import Annotated, Literal, Optional

from littune.common import Check, UserError, checked, save_json, save_text
from littune.decision import fit_bias, load_rule, logprobs_of, predictions, save_rule
from littune.inputs import RunInputs, load_for_inference
from littune.metrics import (SET_JOINER, check_expected_in_labels, detect_labels, exact_match, normalize,
                             parse_labels, task_metrics)
from littune.model import Precision, check_precision, inference_precision
from littune.plots import write_plots
from littune.quantize import Quantize, check_quantize
from littune.sampling import check_fits
from littune.scorings import Scoring, ScoringName, default_scoring, get_scoring


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
    scoring: Optional[ScoringName] = None,
    precision: Optional[Precision] = None,
    quantize: Optional[Quantize] = None,
    decision_rule: Literal["auto", "argmax", "fit"] = "auto",
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
        precision: 32-true, bf16-true, bf16-mixed, 16-true or 16-mixed (default: bf16-true on GPUs with bfloat16; on a CPU bf16-true where one block of the model is measured >= 1.15x faster in bf16 there, else 32-true).
        quantize: The base model's linear layers in 4 bits (bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq) or 8 bits (bnb.int8) with bitsandbytes, quantized while loading (pip install 'littune[quantize]'); the adapter loads as it is.
        decision_rule: With likelihood scoring: fit (a per-label bias on the log-likelihoods that maximises the validation split's macro F1, saved as the run's decision_rule.json, then used here: for imbalanced labels), auto (the run's decision_rule.json where it has one, else argmax) or argmax (the most likely label).
    """
    checkpoint_dir, data_dir = Path(checkpoint_dir), Path(data_dir)
    label_list = parse_labels(labels) if labels is not None else None
    if precision is not None:  # a flag littune cannot use fails before any file is read
        check_precision(precision)
    check_quantize(quantize)
    inputs = RunInputs(checkpoint_dir, data_dir, adapter_path)
    run_dir = inputs.run_dir  # a bad --adapter_path fails before the data is read
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(split, data_dir, run_dir)

    records = inputs.split(split)
    expected = [r["output"] for r in records]
    label_sets = inputs.label_sets
    label_list = label_set(label_list, inputs.meta, expected, label_sets)
    chosen = choose_scoring(scoring, label_list, data_dir)
    inputs.check_data_fits(records)
    style = inputs.data_style

    import lightning as L

    precision, why = inference_precision(precision, inputs.config)
    fabric = L.Fabric(devices=1, precision=precision, accelerator="auto")
    model, tokenizer, _ = load_for_inference(fabric, checkpoint_dir, quantize=quantize, inputs=inputs)
    if chosen.generates:
        answers = label_list or ([SET_JOINER.join(label_sets["labels"])] if label_sets else None)  # the longest set
        max_new_tokens = max_new_tokens or (label_answer_tokens(tokenizer, answers) if answers else 32)
        longest_prompt = max(records, key=lambda r: len(r["input_ids_no_response"]))["input_ids_no_response"]
        check_fits(longest_prompt, max_new_tokens, inputs.config.block_size)

    bias = chosen_rule(decision_rule, chosen, label_list, run_dir or out_dir, lambda: fitted_rule(
        chosen, model, tokenizer, style, inputs, label_list, label_sets, batch_size, fabric.device, run_dir or out_dir))
    started = time.perf_counter()
    rows, loss_sum, targets = chosen.score(model, tokenizer, style, records, label_list, inputs.ignore_index,
                                           batch_size, max_new_tokens, fabric.device)
    if bias is not None:  # the argmax prediction stays in each row beside the rule's
        for row, label in zip(rows, predictions(logprobs_of(rows, label_list), label_list, bias)):
            row["predicted_argmax"], row["predicted"] = row["predicted"], label
    if targets == 0:
        raise UserError("no target tokens in the split (every label is --ignore_index); nothing to compute a loss on")
    seconds = time.perf_counter() - started
    print(f"{chosen.name} scoring and test loss: {len(records)} records in {seconds:.1f}s "
          f"({len(records) / max(seconds, 1e-9):.1f} records/s), precision {precision}{f' ({why})' if why else ''}",
          file=sys.stderr)

    metrics = {
        "split": split,
        "records": len(records),
        "checkpoint_dir": str(checkpoint_dir),
        "adapter_path": None if adapter_path is None else str(adapter_path),
        "data_dir": str(data_dir),
        "scoring": chosen.name,
        "precision": precision,
        "quantize": quantize,
        "max_new_tokens": max_new_tokens if chosen.generates else None,
        "decision_rule": dict(zip(label_list, bias)) if bias is not None else None,
        **figures(expected, rows, label_list, loss_sum / targets, chosen, label_sets),
    }
    written = write_outputs(out_dir, records, rows, metrics) + write_plots(metrics, out_dir, run_dir)
    print(format_table(metrics))
    print(f"Wrote {', '.join(written)} to {out_dir}", file=sys.stderr)
    return metrics


def chosen_rule(rule: str, chosen: Scoring, label_list: Optional[list[str]], rule_dir: Path, fit) -> Optional[list]:
    """The per-label bias to predict with (None: argmax): fitted now (`fit()`), or the run's saved one."""
    if rule == "argmax" or (rule == "auto" and (label_list is None or not chosen.by_bytes)):
        return None
    if not chosen.by_bytes or label_list is None:  # by_bytes: the scoring ranks every label by its log-likelihood
        raise UserError(f"--decision_rule {rule}: a bias on the labels' log-likelihoods needs --scoring likelihood and "
                        f"a label set; use --decision_rule argmax")
    return fit() if rule == "fit" else load_rule(rule_dir, label_list)


def fitted_rule(chosen: Scoring, model, tokenizer, style, inputs: RunInputs, label_list: list[str],
                label_sets: Optional[dict], batch_size: int, device, rule_dir: Path) -> list[float]:
    """The bias fitted on the validation split (never the test split), saved in rule_dir."""
    try:
        records = inputs.split("val")
    except UserError as e:
        raise UserError(f"--decision_rule fit: the validation split is needed to fit it ({e})") from None
    rows, _, _ = chosen.score(model, tokenizer, style, records, label_list, inputs.ignore_index, batch_size, None,
                              device)
    bias, before, after = fit_bias(logprobs_of(rows, label_list), label_list, [r["output"] for r in records],
                                   label_sets)
    path = save_rule(rule_dir, label_list, bias, before, after, len(records))
    print(f"decision rule fitted on {len(records)} validation records: macro F1 {before:.4f} with argmax, "
          f"{after:.4f} with the bias; wrote {path}", file=sys.stderr)
    return bias


def default_out_dir(split: str, data_dir: Path, run_dir: Optional[Path]) -> Path:
    """RUN_FOLDER/eval with an adapter, else out/eval/<data folder name>; eval-SPLIT for another split than test."""
    folder = "eval" if split == "test" else f"eval-{split}"
    return run_dir / folder if run_dir is not None else Path("out") / folder / data_dir.resolve().name


def choose_scoring(name: Optional[str], label_list: Optional[list[str]], data_dir: Path) -> Scoring:
    """--scoring, else the first scoring of the registry this split can be scored with; refused where it needs a
    label set the split does not have."""
    chosen = get_scoring(name or default_scoring(label_list is not None))
    if chosen.needs_labels and label_list is None:
        without = default_scoring(False)
        raise UserError(f"--scoring {chosen.name} needs a label set, and the expected outputs of {data_dir} are free "
                        f"text (no labels in prepare.json, none detected); give --labels, or use --scoring {without}")
    return chosen


def figures(expected: list[str], rows: list[dict], label_list: Optional[list[str]], loss: float,
            chosen: Scoring, label_sets: Optional[dict] = None) -> dict:
    """test_loss, perplexity, exact_match, the classification metrics (label tasks; the set metrics of a multi-label
    one) and accuracy_norm."""
    predicted = [row["predicted"] for row in rows]
    return {
        "test_loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "exact_match": exact_match(expected, predicted),
        **task_metrics(expected, predicted, label_list, label_sets),
        "multi_label": label_sets is not None,
        "accuracy_norm": (task_metrics(expected, [row["predicted_norm"] for row in rows], label_list,
                                       label_sets)["accuracy"] if chosen.by_bytes else None),
    }


def write_outputs(out_dir: Path, records: list, rows: list[dict], metrics: dict) -> list[str]:
    """predictions.jsonl (one line per record, in the split's order) and metrics.json; returns the names."""
    lines = [
        json.dumps({"instruction": r["instruction"], "input": r["input"], "expected": r["output"], **row},
                   ensure_ascii=False)
        for r, row in zip(records, rows)
    ]
    save_text("".join(line + "\n" for line in lines), out_dir / "predictions.jsonl")
    save_json(metrics, out_dir / "metrics.json")
    return ["predictions.jsonl", "metrics.json"]


def label_answer_tokens(tokenizer, labels: list[str]) -> int:
    """Tokens enough for any answer that is a label once trimmed and lowercased: the longest label in any of the
    casings and with or without a leading space, plus 4 for whitespace tokens around it."""
    variants = [v for label in labels for word in (label, label.capitalize(), label.upper()) for v in (word, " " + word)]
    return 4 + max(len(tokenizer.encode(v, bos=False, eos=False)) for v in variants)


def label_set(given: Optional[list[str]], meta: dict, expected: list[str],
              label_sets: Optional[dict] = None) -> Optional[list[str]]:
    """--labels (every expected output must be one); else prepare.json's "labels" where they cover the split's
    expected outputs; else the label set detected from the expected outputs, or None (free text). A multi-label
    task's: the candidate sets of its training records (a test set none of them is cannot be predicted exactly, and
    still counts label by label), or None where there are too many (its answers are then generated)."""
    if label_sets is not None:
        if given is not None:
            raise UserError(f"--labels: a multi-label task's labels are the ones prepare recorded "
                            f"({', '.join(label_sets['labels'])}); drop --labels")
        recorded = meta.get("labels")
        return [normalize(s) for s in recorded] if isinstance(recorded, list) and len(recorded) >= 2 else None
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
