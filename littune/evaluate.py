"""Evaluate: test loss, greedy predictions and (for label tasks) classification metrics on a prepared split.

    littune evaluate --checkpoint_dir checkpoints/EleutherAI/pythia-160m --adapter_path out/adapter_v2/sst2 \
        --data_dir data/sst2

Writes to OUT_DIR (default: the adapter's run folder /eval, or out/eval/<data folder name> for the base model):
    predictions.jsonl     one line per record, in the split's order: instruction, input, expected, predicted
    metrics.json          exact_match, test_loss, perplexity; accuracy, f1_macro, f1_micro, mcc, per_class,
                          confusion_matrix, labels, not_a_label for label tasks (null otherwise)
    confusion_matrix.png  label tasks only
    loss.png              training/validation loss over steps, when the run folder has metrics.csv

Generation is greedy (temperature 0) and batched with a KV cache, and gives the tokens `littune generate
--temperature 0` gives one prompt at a time. How: each batch is right-padded and every row keeps its own
positions (0 .. prompt length - 1 in the prefill, then its own next position while decoding, passed to litgpt as
a batched `input_pos` of shape (B, 1)). So each row gets the rotary angles, KV-cache slots and causal mask rows it
gets alone; litgpt's own causal mask hides the pad slots beyond a row's position, and those slots are overwritten
by the row's own tokens before its position reaches them. (Left padding with shared positions would give every row
the same relative positions, but rotary angles of other absolute positions round differently in float32, enough to
flip a near-tie.) What remains differs in the last bits only: a matrix product over a batch runs other CPU/GPU
kernels than over a single row (float32 logits differ by about 1e-6), so batched and one-by-one could only part
where the two best tokens are closer than that; the tests check every record on several architectures.

Label tasks and the "other" predictions: a prediction is compared with the expected output after trimming
whitespace and lowercasing. When the expected outputs form a small label set (at most 20 distinct values, at least
2, each appearing at least twice; or --labels), a prediction that is none of the labels is counted as the class
"other". It is always wrong; the metrics treat it like scikit-learn does when given `y_pred` with "other" in it:
- accuracy = correct / records ("other" predictions count in the denominator): accuracy_score(y_true, y_pred);
- per-class precision/recall/F1 and macro F1 over the labels only ("other" is not a class, but a record predicted
  "other" is a false negative of its expected label): f1_score(y_true, y_pred, labels=LABELS, average="macro");
- micro F1 over the labels: precision = correct / predictions that are a label, recall = correct / records, so an
  "other" prediction lowers recall but not precision: f1_score(..., labels=LABELS, average="micro");
- MCC with "other" as one more predicted class: matthews_corrcoef(y_true, y_pred);
- confusion matrix: rows = expected labels, columns = predicted labels + "other" (the last column).
Zero divisions (a label never predicted, no variance for MCC) give 0.0, as scikit-learn's zero_division=0.
"""

import csv
import json
import math
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from littune.common import UserError, atomic_path, save_json, save_text

SPLITS = ("train", "test")
OTHER = "other"  # the extra confusion-matrix column: predictions that are none of the labels
MAX_AUTO_LABELS = 20
LOSS_TOKENS_PER_FORWARD = 4096  # caps B x T of one teacher-forced forward: its logits are B x T x vocab floats


def evaluate(
    checkpoint_dir: Path,
    data_dir: Path,
    adapter_path: Optional[Path] = None,
    split: str = "test",
    batch_size: int = 16,
    max_new_tokens: int = 32,
    out_dir: Optional[Path] = None,
    labels: Optional[str] = None,
) -> dict:
    """Evaluate a fine-tuned adapter (or the base model) on a prepared split: loss, predictions, metrics, plots.

    Arguments:
        checkpoint_dir: The converted base model the adapter was trained on.
        data_dir: The prepared data (from `littune prepare`); its prompt style formats the prompts.
        adapter_path: An adapter file, or a run folder (its final adapter). Without it, the base model is evaluated.
        split: The prepared split to evaluate: test or train.
        batch_size: Records per batch, for generation and for the test loss.
        max_new_tokens: Most tokens to generate per record (generation also stops at EOS / the prompt style's stop tokens).
        out_dir: Where predictions, metrics and plots go (default: RUN_FOLDER/eval with an adapter, else out/eval/<data folder name>; eval-train for --split train).
        labels: The label set of a classification task, comma-separated, e.g. positive,negative (default: detected from the expected outputs).
    """
    checkpoint_dir, data_dir = Path(checkpoint_dir), Path(data_dir)
    if split not in SPLITS:
        raise UserError(f"--split {split!r}: unknown split; choose one of {', '.join(SPLITS)}")
    if batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {batch_size}")
    if max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
    label_list = parse_labels(labels) if labels is not None else None
    if not (data_dir / f"{split}.pt").is_file():
        raise UserError(
            f"{data_dir}: no {split}.pt; prepare the data first: littune prepare --data_file FILE "
            f"--checkpoint_dir {checkpoint_dir} --destination_path {data_dir}"
        )
    from littune.checkpoints import load_model_config
    from littune.data import load_prepared
    from littune.finetune.loop import check_data_matches_model
    from littune.generate import check_fits, default_inference_precision, load_for_inference, resolve_adapter

    run_dir = resolve_adapter(adapter_path)[1] if adapter_path is not None else None
    if out_dir is None:
        folder = "eval" if split == "test" else f"eval-{split}"
        out_dir = run_dir / folder if run_dir is not None else Path("out") / folder / data_dir.resolve().name
    out_dir = Path(out_dir)

    train, test, meta = load_prepared(data_dir)
    records = test if split == "test" else train
    del train, test
    expected = [r["output"] for r in records]
    if label_list is not None:
        check_expected_in_labels(expected, label_list)
    else:
        label_list = detect_labels(expected)

    config = load_model_config(checkpoint_dir)
    check_data_matches_model(data_dir, meta, records, checkpoint_dir, config)
    longest_prompt = max(records, key=lambda r: len(r["input_ids_no_response"]))["input_ids_no_response"]
    check_fits(longest_prompt, max_new_tokens, config.block_size)

    import lightning as L

    fabric = L.Fabric(devices=1, precision=default_inference_precision(), accelerator="auto")
    model, tokenizer, style = load_for_inference(fabric, checkpoint_dir, adapter_path, meta.get("prompt_style"))
    ignore_index = int(meta.get("ignore_index", -100))

    loss = teacher_forced_loss(model, records, batch_size, ignore_index, fabric.device, progress=True)
    prompts = [r["input_ids_no_response"] for r in records]
    generated = batched_greedy(model, prompts, max_new_tokens, style.stop_tokens(tokenizer), batch_size,
                               fabric.device, progress=True)
    predicted = [tokenizer.decode(torch.tensor(ids, dtype=torch.int64)) for ids in generated]

    metrics = {
        "split": split,
        "records": len(records),
        "checkpoint_dir": str(checkpoint_dir),
        "adapter_path": None if adapter_path is None else str(adapter_path),
        "data_dir": str(data_dir),
        "max_new_tokens": max_new_tokens,
        "test_loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "exact_match": exact_match(expected, predicted),
        **classification_metrics(expected, predicted, label_list),
    }
    lines = [
        json.dumps({"instruction": r["instruction"], "input": r["input"], "expected": r["output"], "predicted": p},
                   ensure_ascii=False)
        for r, p in zip(records, predicted)
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
    print(format_table(metrics))
    print(f"Wrote {', '.join(written)} to {out_dir}", file=sys.stderr)
    return metrics


# ---------------------------------------------------------------------------------------------- model passes


@torch.no_grad()
def teacher_forced_loss(model, records: list, batch_size: int, ignore_index: int, device, progress: bool = False
                        ) -> float:
    """Mean next-token cross-entropy over all target tokens of the records (teacher forcing, masked as in training)."""
    from tqdm import tqdm

    from littune.finetune.loop import collate, count_targets, token_cross_entropy_sum

    module = getattr(model, "module", model)
    lengths = [len(r["input_ids"]) for r in records]
    loss_sum, targets = 0.0, 0
    with _max_seq_length(module, max(lengths)), tqdm(total=len(records), desc="Test loss", unit="rec",
                                                      file=sys.stderr, dynamic_ncols=True,
                                                      disable=not progress) as bar:
        for indices in loss_batches(lengths, batch_size):
            input_ids, labels = collate(records, indices, ignore_index, device)
            loss_sum += token_cross_entropy_sum(module(input_ids), labels, ignore_index).double().item()
            targets += count_targets(records, indices, ignore_index)
            bar.update(len(indices))
    if targets == 0:
        raise UserError("no target tokens in the split (every label is --ignore_index); nothing to compute a loss on")
    return loss_sum / targets


def loss_batches(lengths: list[int], batch_size: int, max_tokens: int = LOSS_TOKENS_PER_FORWARD) -> list[list[int]]:
    """Indices by length, in batches of at most batch_size records and (unless one record is longer) max_tokens
    padded tokens, so that one forward's logits stay a bounded size."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, current = [], []
    for i in order:
        if current and (len(current) == batch_size or (len(current) + 1) * lengths[i] > max_tokens):
            batches.append(current)
            current = []
        current.append(i)
    return batches + [current] if current else batches


class StopMatcher:
    """litgpt `generate_fn`'s stop-sequence rule for one row, so batched output equals generate_fn's.

    A token advances the progress of each stop sequence it continues and resets the others; tokens that may be the
    start of a stop sequence are held back; a completed stop sequence ends the output without the held-back tokens.
    At the token limit everything generated is output.
    """

    def __init__(self, stop_tokens: Sequence[Sequence[int]]):
        self.stop_tokens = [list(seq) for seq in stop_tokens]
        self.progress = [0] * len(self.stop_tokens)
        self.tokens: list[int] = []
        self.safe = 0
        self.stopped = False

    def add(self, token: int) -> None:
        self.tokens.append(token)
        for i, seq in enumerate(self.stop_tokens):
            if token == seq[self.progress[i]]:
                self.progress[i] += 1
                if self.progress[i] == len(seq):
                    self.stopped = True
                    return
            else:
                self.progress[i] = 0
        self.safe = len(self.tokens) - max(self.progress, default=0)

    @property
    def output(self) -> list[int]:
        return self.tokens[:self.safe] if self.stopped else self.tokens


@torch.inference_mode()
def batched_greedy(
    model, prompts: list[torch.Tensor], max_new_tokens: int, stop_tokens: Sequence[Sequence[int]] = (),
    batch_size: int = 16, device=None, progress: bool = False,
) -> list[list[int]]:
    """Greedy new tokens for every prompt, in the prompts' order: the tokens `generate.generate_tokens(model, prompt,
    max_new_tokens, temperature=0, stop_tokens=...)` gives for each prompt alone, computed batch by batch.

    Prompts are sorted by length so a batch holds prompts of similar lengths (little padding). See the module
    docstring for why per-row positions make this equal to one-by-one generation.
    """
    from tqdm import tqdm

    module = getattr(model, "module", model)
    device = device or next(module.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    # the rope cache covers the longest row; each batch gets a KV cache of its own width
    with _max_seq_length(module, max(len(p) for p in prompts) + max_new_tokens), \
            tqdm(total=len(prompts), desc="Generating", unit="rec", file=sys.stderr, dynamic_ncols=True,
                 disable=not progress) as bar:
        try:
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                for i, tokens in zip(batch, _greedy_batch(module, [prompts[i] for i in batch], max_new_tokens,
                                                          stop_tokens, device)):
                    results[i] = tokens
                bar.update(len(batch))
        finally:
            module.clear_kv_cache()
    return results


def _greedy_batch(module, prompts: list[torch.Tensor], max_new_tokens: int, stop_tokens, device) -> list[list[int]]:
    rows = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = int(lengths.max())
    idx = torch.zeros((rows, width), dtype=torch.int64, device=device)
    for row, prompt in enumerate(prompts):
        idx[row, :len(prompt)] = prompt.to(device)
    module.set_kv_cache(batch_size=rows, max_seq_length=width + max_new_tokens, device=device)
    matchers = [StopMatcher(stop_tokens) for _ in prompts]

    # Prefill: every row at positions 0..width-1 (pads after a row's prompt are never attended by its real tokens);
    # only each row's last prompt position goes through the vocabulary projection
    with _only_positions(module, lengths - 1):
        logits = module(idx, torch.arange(width, device=device), input_pos_maxp1=width)
    positions = lengths.clone()
    for step in range(max_new_tokens):
        tokens = logits[:, -1].argmax(dim=-1)
        for matcher, token in zip(matchers, tokens.tolist()):
            if not matcher.stopped:
                matcher.add(token)
        if step == max_new_tokens - 1 or all(m.stopped for m in matchers):
            break
        # a stopped row keeps decoding (its tokens are ignored) so the batch stays rectangular
        logits = module(tokens[:, None], positions[:, None], input_pos_maxp1=int(positions.max()) + 1)
        positions += 1
    return [m.output for m in matchers]


@contextmanager
def _max_seq_length(module, length: int) -> Iterator[None]:
    """Within the block, the model's max_seq_length (the length of its rope cache) is `length`; restored after."""
    before = module.max_seq_length
    module.max_seq_length = length
    try:
        yield
    finally:
        module.max_seq_length = before


@contextmanager
def _only_positions(module, last: torch.Tensor) -> Iterator[None]:
    """Within the block, the model's final norm returns only position `last[b]` of each row b (shape B x 1 x C), so
    the vocabulary projection runs on one position per row instead of all of them."""
    rows = torch.arange(len(last), device=last.device)
    handle = module.transformer.ln_f.register_forward_hook(lambda _, __, out: out[rows, last][:, None])
    try:
        yield
    finally:
        handle.remove()


# ------------------------------------------------------------------------------------------------------ metrics


def normalize(text: str) -> str:
    return text.strip().lower()


def exact_match(expected: list[str], predicted: list[str]) -> float:
    return sum(normalize(e) == normalize(p) for e, p in zip(expected, predicted)) / max(len(expected), 1)


def parse_labels(labels: str) -> list[str]:
    parsed = [normalize(label) for label in labels.split(",") if label.strip()]
    if len(parsed) < 2:
        raise UserError(f"--labels {labels!r}: give at least 2 labels, comma-separated, e.g. positive,negative")
    duplicates = sorted(label for label, n in Counter(parsed).items() if n > 1)
    if duplicates:
        raise UserError(f"--labels {labels!r}: {', '.join(map(repr, duplicates))} given twice (labels are compared "
                        f"lowercased and trimmed)")
    return parsed


def check_expected_in_labels(expected: list[str], labels: list[str]) -> None:
    known = set(labels)
    for index, output in enumerate(expected):
        if normalize(output) not in known:
            raise UserError(f"--labels: the expected output {output[:60]!r} of record {index} is not one of the "
                            f"labels ({', '.join(labels)})")


def detect_labels(expected: list[str]) -> Optional[list[str]]:
    """The sorted label set when the expected outputs look like one: 2..20 distinct values, each seen twice or more."""
    counts = Counter(normalize(e) for e in expected)
    if 2 <= len(counts) <= MAX_AUTO_LABELS and min(counts.values()) >= 2:
        return sorted(counts)
    return None


def classification_metrics(expected: list[str], predicted: list[str], labels: Optional[list[str]]) -> dict:
    """Accuracy, per-class precision/recall/F1, macro/micro F1, MCC and the confusion matrix (rows: expected labels,
    columns: labels + "other"); every value None when `labels` is None. See the module docstring for "other"."""
    keys = ("labels", "not_a_label", "accuracy", "f1_macro", "f1_micro", "mcc", "per_class", "confusion_matrix",
            "confusion_matrix_columns")
    if labels is None:
        return dict.fromkeys(keys)
    k = len(labels)
    column = {label: i for i, label in enumerate(labels)}
    y_true = [column[normalize(e)] for e in expected]
    y_pred = [column.get(normalize(p), k) for p in predicted]  # k: "other"
    matrix = [[0] * (k + 1) for _ in range(k)]
    for t, p in zip(y_true, y_pred):
        matrix[t][p] += 1
    n = len(y_true)
    support = [sum(row) for row in matrix]
    predicted_as = [sum(matrix[r][c] for r in range(k)) for c in range(k + 1)]
    correct = [matrix[c][c] for c in range(k)]

    per_class = {}
    for c, label in enumerate(labels):
        precision = correct[c] / predicted_as[c] if predicted_as[c] else 0.0
        recall = correct[c] / support[c] if support[c] else 0.0
        f1_denominator = predicted_as[c] + support[c]  # 2tp + fp + fn
        per_class[label] = {"precision": precision, "recall": recall,
                            "f1": 2 * correct[c] / f1_denominator if f1_denominator else 0.0, "support": support[c]}
    total_correct = sum(correct)
    micro_denominator = sum(predicted_as[:k]) + n
    return {
        "labels": list(labels),
        "not_a_label": predicted_as[k],
        "accuracy": total_correct / n if n else 0.0,
        "f1_macro": sum(v["f1"] for v in per_class.values()) / k,
        "f1_micro": 2 * total_correct / micro_denominator if micro_denominator else 0.0,
        "mcc": matthews(matrix, n, total_correct, support, predicted_as),
        "per_class": per_class,
        "confusion_matrix": matrix,
        "confusion_matrix_columns": list(labels) + [OTHER],
    }


def matthews(matrix: list, n: int, correct: int, support: list[int], predicted_as: list[int]) -> float:
    """Multi-class Matthews correlation (Gorodkin's R_K, as scikit-learn): "other" is a class nobody expects."""
    t = support + [0]  # the "other" row: never expected
    cov_tp = correct * n - sum(a * b for a, b in zip(t, predicted_as))
    cov_pp = n * n - sum(p * p for p in predicted_as)
    cov_tt = n * n - sum(a * a for a in t)
    if cov_pp * cov_tt == 0:
        return 0.0
    return cov_tp / math.sqrt(cov_tt * cov_pp)


def format_table(metrics: dict) -> str:
    rows = [("records", f"{metrics['records']}"), ("test loss", f"{metrics['test_loss']:.4f}"),
            ("perplexity", f"{metrics['perplexity']:.3f}"), ("exact match", f"{metrics['exact_match']:.4f}")]
    if metrics["labels"] is not None:
        rows += [("accuracy", f"{metrics['accuracy']:.4f}"), ("F1 macro", f"{metrics['f1_macro']:.4f}"),
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


def plot_loss(metrics_csv: Path, path: Path) -> bool:
    """Training and validation loss over steps from a run's metrics.csv; False (no picture) when it has no rows."""
    train, val = ([], []), ([], [])
    with open(metrics_csv, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                step = int(row["step"])
            except (KeyError, TypeError, ValueError):
                continue
            for column, series in (("train_loss", train), ("val_loss", val)):
                if _is_number(row.get(column)):
                    series[0].append(step)
                    series[1].append(float(row[column]))
    if not train[0] and not val[0]:
        return False
    figure = _figure(7, 4.2)
    axes = figure.add_subplot()
    if train[0]:
        axes.plot(*train, label="training loss", linewidth=1.2)
    if val[0]:
        axes.plot(*val, "o-", label="validation loss", linewidth=1.5)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (mean token cross-entropy)")
    axes.set_title(f"{metrics_csv.parent.name}: loss over training")
    axes.grid(alpha=0.3)
    axes.legend()
    _save_png(figure, path)
    return True


def _is_number(value) -> bool:
    try:
        return value not in (None, "") and math.isfinite(float(value))
    except ValueError:
        return False
