"""Scorings: how `littune evaluate --scoring NAME` turns a model's answers into predictions, one small file each.
Adding a scoring = one file defining SCORING + one line in SCORINGS; `--scoring`'s choices, its default and the
training loop's task metrics (the choices of `--best_metric`) follow from here.

The order of SCORINGS is the order of preference: a split is scored by default with the first scoring it can be
scored with (one that needs a label set comes first; free-text outputs fall through to one that needs none).
"""

from dataclasses import dataclass
from importlib import import_module
from typing import Callable, Literal

# name -> module defining SCORING
SCORINGS = {
    "likelihood": "littune.scorings.likelihood",
    "generate": "littune.scorings.generate",
}
ScoringName = Literal[tuple(SCORINGS)]
# the scoring the training loop runs on the validation split of a label task (no generation: one pass gives the
# loss and the predictions), and the metrics it logs, as val_<metric> (metrics.csv, best/, early stopping)
TRAINING_SCORING = "likelihood"
TASK_METRICS = ["val_accuracy", "val_f1_macro", "val_mcc"]
BEST_METRICS = ("val_loss", *TASK_METRICS)
BestMetric = Literal[BEST_METRICS]


@dataclass(frozen=True)
class Scoring:
    """What differs between scorings."""

    name: str
    summary: str  # one line: what it predicts by
    needs_labels: bool  # a label set must be known (--labels, prepare.json's, or detected)
    # (model, tokenizer, style, records, labels or None, ignore_index, batch_size, max_new_tokens, device) ->
    # (a row per record: prompt, prompt_ids, predicted, and the scoring's own fields; the summed target-token loss of
    # the records; their number of target tokens)
    score: Callable[..., tuple[list[dict], float, int]]
    generates: bool = False  # answers are generated: --max_new_tokens applies, and must fit the context
    by_bytes: bool = False  # rows also carry predicted_norm (by score per byte): metrics.json's accuracy_norm


def get_scoring(name: str) -> Scoring:
    from littune.common import UserError

    if name not in SCORINGS:
        raise UserError(f"unknown scoring {name!r} (known: {', '.join(SCORINGS)})")
    return import_module(SCORINGS[name]).SCORING


def default_scoring(has_labels: bool) -> str:
    """The first scoring of SCORINGS that a split with (or without) a label set can be scored with."""
    return next(name for name in SCORINGS if has_labels or not get_scoring(name).needs_labels)
