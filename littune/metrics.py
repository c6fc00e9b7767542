"""Label tasks: the label set, and classification metrics (shared by `littune evaluate` and the training loop's
task metrics).

Label tasks and the "other" predictions: a prediction is compared with the expected output after trimming
whitespace and lowercasing. When the expected outputs form a small label set (at most 64 distinct values, at least
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

import json
import math
from collections import Counter
from typing import Optional

from littune.common import UserError

OTHER = "other"  # the extra confusion-matrix column: predictions that are none of the labels
MAX_AUTO_LABELS = 64  # a task of 50 classes (CFPB's products, intents) is still detected; see the README


def normalize(text: str) -> str:
    return text.strip().lower()


def exact_match(expected: list[str], predicted: list[str]) -> float:
    return sum(normalize(e) == normalize(p) for e, p in zip(expected, predicted)) / max(len(expected), 1)


def parse_labels(labels: str) -> list[str]:
    """--labels: a JSON list (labels may hold commas) or comma-separated names."""
    if labels.lstrip().startswith("["):
        try:
            given = json.loads(labels)
        except json.JSONDecodeError as e:
            raise UserError(f"--labels {labels[:100]!r}: not a JSON list ({e.msg}); give e.g. "
                            f"'[\"positive\", \"negative\"]' or positive,negative") from None
        if not isinstance(given, list) or not all(isinstance(label, str) for label in given):
            raise UserError(f"--labels {labels[:100]!r}: a JSON list of strings, e.g. '[\"positive\", \"negative\"]'")
    else:
        given = labels.split(",")
    parsed = [normalize(label) for label in given if label.strip()]
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
    """The sorted label set when the expected outputs look like one: 2..64 distinct values, each seen twice or more."""
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


# ---------------------------------------------------------------------------------------------- label sets

SET_JOINER = ", "  # between the labels of a set in its target text (`littune.label_sets.set_text`)


def parse_set(text: str, labels: list[str], none_label: Optional[str]) -> tuple[frozenset, int]:
    """(the known labels a predicted text names, how many of its parts are no label). Parts are split at commas,
    trimmed and lowercased; the none label (or an empty text) is the empty set."""
    parts = [normalize(part) for part in text.split(",") if part.strip()]
    known = set(labels)
    chosen = frozenset(p for p in parts if p in known)
    unknown = sum(1 for p in parts if p not in known and p != none_label)
    return chosen, unknown


def set_metrics(expected: list[str], predicted: list[str], labels: list[str], none_label: Optional[str]) -> dict:
    """Metrics of a multi-label task, as LexGLUE computes them: on the binarised label matrix (one column per label,
    plus a column for the none label where the task has one: on when a record has no label), per-label precision,
    recall and F1, micro and macro F1 (scikit-learn's f1_score(Y, P, average="micro"|"macro", zero_division=0));
    accuracy: the exact set right (accuracy_score on the sets); MCC: the sets as classes (matthews_corrcoef on the
    set texts); confusion_matrix: rows = expected label, columns = predicted label, the records with both (its
    diagonal: each label's true positives); not_a_label: parts of answers that name no label."""
    columns = list(labels) + ([none_label] if none_label is not None else [])
    parsed = [parse_set(p, labels, none_label) for p in predicted]
    true_sets = [parse_set(e, labels, none_label)[0] for e in expected]
    pred_sets = [s for s, _ in parsed]

    def row(labels_of: frozenset) -> list[bool]:
        return [label in labels_of for label in labels] + ([not labels_of] if none_label is not None else [])

    y_true, y_pred = [row(s) for s in true_sets], [row(s) for s in pred_sets]
    per_class, tp_all, fp_all, fn_all = {}, 0, 0, 0
    for c, label in enumerate(columns):
        tp = sum(t[c] and p[c] for t, p in zip(y_true, y_pred))
        fp = sum(p[c] and not t[c] for t, p in zip(y_true, y_pred))
        fn = sum(t[c] and not p[c] for t, p in zip(y_true, y_pred))
        per_class[label] = {"precision": tp / (tp + fp) if tp + fp else 0.0, "recall": tp / (tp + fn) if tp + fn else 0.0,
                            "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0, "support": tp + fn}
        tp_all, fp_all, fn_all = tp_all + tp, fp_all + fp, fn_all + fn
    matrix = [[sum(t[r] and p[c] for t, p in zip(y_true, y_pred)) for c in range(len(columns))]
              for r in range(len(columns))]
    n = len(expected)
    micro_denominator = 2 * tp_all + fp_all + fn_all
    return {
        "labels": columns,
        "not_a_label": sum(unknown for _, unknown in parsed),
        "accuracy": sum(t == p for t, p in zip(true_sets, pred_sets)) / n if n else 0.0,
        "f1_macro": sum(v["f1"] for v in per_class.values()) / len(columns),
        "f1_micro": 2 * tp_all / micro_denominator if micro_denominator else 0.0,
        "mcc": set_matthews(true_sets, pred_sets),
        "per_class": per_class,
        "confusion_matrix": matrix,
        "confusion_matrix_columns": columns,
    }


def set_matthews(true_sets: list[frozenset], pred_sets: list[frozenset]) -> float:
    """Multi-class MCC with each distinct set a class (scikit-learn's matthews_corrcoef on the sets' texts)."""
    classes = {s: i for i, s in enumerate(sorted(set(true_sets) | set(pred_sets), key=sorted))}
    n, k = len(true_sets), len(classes)
    t, p = [0] * k, [0] * k
    for a, b in zip(true_sets, pred_sets):
        t[classes[a]] += 1
        p[classes[b]] += 1
    correct = sum(a == b for a, b in zip(true_sets, pred_sets))
    cov_tp = correct * n - sum(x * y for x, y in zip(t, p))
    cov_pp, cov_tt = n * n - sum(x * x for x in p), n * n - sum(x * x for x in t)
    return cov_tp / math.sqrt(cov_tt * cov_pp) if cov_pp * cov_tt else 0.0


def task_metrics(expected: list[str], predicted: list[str], labels: Optional[list[str]],
                 label_sets: Optional[dict] = None) -> dict:
    """The metrics of a label task: `classification_metrics` over `labels`, or for a multi-label task
    (`label_sets`: prepare.json's {"labels", "none_label"}) `set_metrics` over its labels."""
    if label_sets is None:
        return classification_metrics(expected, predicted, labels)
    return set_metrics(expected, predicted, label_sets["labels"], label_sets.get("none_label"))
