"""--scoring likelihood: every label scored by the log-probability the model gives its tokens after the prompt, the
most likely label predicted (as lm-evaluation-harness scores a multiple-choice task; `littune.scoring`). Every
record gets a label; predicted_norm ranks by log-probability per byte of the label instead (accuracy_norm)."""

from littune.scoring import labels_with_loss
from littune.scorings import Scoring


def score(model, tokenizer, style, records: list, labels: list, ignore_index: int, batch_size: int,
          max_new_tokens, device) -> tuple[list[dict], float, int]:
    return labels_with_loss(model, tokenizer, style, records, labels, ignore_index, batch_size, progress=True)


SCORING = Scoring(
    name="likelihood",
    summary="the most likely label after the prompt, like lm-evaluation-harness; needs a label set",
    needs_labels=True,
    score=score,
    by_bytes=True,
)
