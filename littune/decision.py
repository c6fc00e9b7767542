"""The decision rule of likelihood scoring: argmax over the labels' log-likelihoods, or argmax after a per-label bias
fitted to the validation split's macro F1 (`littune evaluate --decision_rule fit`).

Why: where the labels are imbalanced (CoLA: 69% acceptable; UNFAIR-ToS: ~1 clause in 9 unfair) a model that learned
the prior answers the majority label for every record, and the argmax of its log-likelihoods reads MCC 0. A bias
b[label] added to each label's log-likelihood moves the boundary; fitted on val (never on test) to maximise the
task's macro F1 (of the sets, for a multi-label task whose "labels" are its candidate sets), it is the decision rule
that the metric the README recommends for such tasks prefers. It is saved in the run folder as decision_rule.json
and used from then on by evaluate (`--decision_rule auto`, the default).

The fit: coordinate ascent, the first label's bias fixed at 0, each other label's chosen among the values where a
record's prediction changes (by quantile where there are more than TRIES // 2 // (labels - 1)), a few rounds or until
nothing improves. With two labels and up to 4,096 records that is an exact search over the one threshold that
matters.
"""

import json
from pathlib import Path
from typing import Optional

from littune.common import UserError, save_json
from littune.metrics import task_metrics

RULE_FILE = "decision_rule.json"
TRIES = 8192  # bias values tried per round, shared by the labels: with two labels every flip up to 4,096 records
ROUNDS = 3


def predictions(logprobs: list[list[float]], labels: list[str], bias: list[float]) -> list[str]:
    """Each record's label by argmax of log-likelihood + bias (ties: the first label, as `scoring.predict`)."""
    return [labels[max(range(len(labels)), key=lambda k: row[k] + bias[k])] for row in logprobs]


def fit_bias(logprobs: list[list[float]], labels: list[str], expected: list[str],
             label_sets: Optional[dict] = None) -> tuple[list[float], float, float]:
    """(the per-label bias, macro F1 with argmax, macro F1 with the bias) on these records."""

    def score(bias: list[float]) -> float:
        return task_metrics(expected, predictions(logprobs, labels, bias), labels, label_sets)["f1_macro"]

    bias = [0.0] * len(labels)
    before = best = score(bias)
    for _ in range(ROUNDS):
        improved = False
        for k in range(1, len(labels)):
            # the bias at which record r's prediction flips to or from label k: its best other score - its k score
            flips = sorted({max(row[j] + bias[j] for j in range(len(labels)) if j != k) - row[k] for row in logprobs})
            most = max(2, TRIES // 2 // (len(labels) - 1))
            if len(flips) > most:
                flips = [flips[i * (len(flips) - 1) // (most - 1)] for i in range(most)]
            tried = [f + 1e-6 for f in flips] + [f - 1e-6 for f in flips]  # just past each flip, both sides
            for value in tried:
                candidate = bias[:k] + [value] + bias[k + 1:]
                figure = score(candidate)
                if figure > best + 1e-12:
                    best, bias, improved = figure, candidate, True
        if not improved:
            break
    return bias, before, best


def save_rule(run_dir: Path, labels: list[str], bias: list[float], before: float, after: float, records: int) -> Path:
    path = Path(run_dir) / RULE_FILE
    save_json({"labels": labels, "bias": bias, "fitted_on": "val", "records": records, "metric": "f1_macro",
               "val_argmax": before, "val_fitted": after}, path)
    return path


def load_rule(run_dir: Optional[Path], labels: list[str]) -> Optional[list[float]]:
    """The run's fitted bias for these labels, None where it has none; one line where the file does not fit them."""
    path = Path(run_dir) / RULE_FILE if run_dir is not None else None
    if path is None or not path.is_file():
        return None
    try:
        rule = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); fit it again with --decision_rule fit") from e
    bias = rule.get("bias") if isinstance(rule, dict) else None
    if not (isinstance(rule, dict) and rule.get("labels") == labels and isinstance(bias, list)
            and len(bias) == len(labels) and all(isinstance(b, (int, float)) and abs(b) < 1e6 for b in bias)):
        raise UserError(f"{path}: its labels or bias do not fit this task's labels ({', '.join(labels)[:200]}); fit "
                        f"it again with --decision_rule fit, or use --decision_rule argmax")
    return [float(b) for b in bias]


def logprobs_of(rows: list[dict], labels: list[str]) -> list[list[float]]:
    """The labels' log-likelihoods of likelihood-scored rows (their "choices"), in the labels' order."""
    return [[row["choices"][label]["logprob"] for label in labels] for row in rows]
