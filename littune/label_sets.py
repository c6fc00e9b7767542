"""Multi-label tasks (a record has a *set* of labels: the unfair-clause types of a Terms-of-Service clause, LexGLUE's
UNFAIR-ToS), as `littune prepare` writes them.

A record's labels come as a JSON array (`"output": ["Arbitration", "Jurisdiction"]`), or as a text column split at
--label_separator (`Arbitration,Jurisdiction` with `--label_separator ,`). Its target text, what the model learns
to answer, is the set in a fixed order: its labels sorted by name (compared lowercased and trimmed, as every label
is), each in its most frequent spelling in the data, joined by ", " (`SET_JOINER`); a record without a label
answers --none_label (LexGLUE's convention: UNFAIR-ToS scores a "none" column beside the 8 types). So the same set
is always the same text, whatever order the file listed it in.

prepare.json records `label_sets`: {"labels": the labels, sorted; "none_label"}, read by evaluate and the training
loop's task metrics (`littune.metrics.set_metrics`), and as `labels` the distinct sets of the training records
(their target texts), at most MAX_CANDIDATE_SETS of them: likelihood scoring picks the most likely of these, so a
prediction is always a set seen in training, never one invented. With more distinct sets than that, `labels` is
null and the answers are generated and parsed (`--scoring generate`).
"""

from collections import Counter
from typing import Callable, Optional

from littune.common import UserError
from littune.metrics import SET_JOINER, normalize

MAX_CANDIDATE_SETS = 64  # candidate sets likelihood scoring ranks per record (each one is one continuation scored)


def is_multi_label(outputs: list, label_separator: Optional[str]) -> bool:
    return label_separator is not None or any(isinstance(output, list) for output in outputs)


def set_texts(outputs: list, label_separator: Optional[str], none_label: Optional[str],
              where: Callable[[int], str]) -> tuple[list[str], dict]:
    """(each record's target text, prepare.json's label_sets) of multi-label outputs: lists of strings, or strings
    split at label_separator. `where(i)`: the record's place, for the one-line errors."""
    if none_label is not None and (not none_label.strip() or "," in none_label):
        raise UserError(f"--none_label {none_label!r}: a non-empty name without commas, e.g. none")
    none = normalize(none_label) if none_label is not None else None
    sets, spellings = [], {}
    for index, output in enumerate(outputs):
        parts = output if isinstance(output, list) else (output.split(label_separator) if label_separator else [output])
        names = [part.strip() for part in parts if part.strip()]
        for name in names:
            if "," in name:
                raise UserError(f"{where(index)}: label {name[:60]!r} holds a comma, which separates the labels of a "
                                f"set in its answer; rename it, or split it with --label_separator ,")
            if normalize(name) != none:
                spellings.setdefault(normalize(name), Counter())[name] += 1
        chosen = sorted({normalize(name) for name in names} - {none})
        if not chosen and none is None:
            raise UserError(f"{where(index)} has no label; give --none_label none to name the empty set (a record "
                            f"without a label then answers \"none\", as LexGLUE scores it)")
        sets.append(chosen)
    if len(spellings) < 2:
        raise UserError(f"the outputs name {len(spellings)} label(s) ({', '.join(spellings) or 'none'}); a multi-label "
                        f"task needs at least 2")
    spelled = {label: counts.most_common(1)[0][0] for label, counts in spellings.items()}
    texts = [SET_JOINER.join(spelled[label] for label in chosen) if chosen else none_label.strip() for chosen in sets]
    return texts, {"labels": sorted(spelled), "none_label": none}


def candidate_sets(train_texts: list[str]) -> Optional[list[str]]:
    """The distinct sets of the training records (their texts, lowercased), sorted; None above MAX_CANDIDATE_SETS."""
    distinct = sorted({normalize(text) for text in train_texts})
    return distinct if 2 <= len(distinct) <= MAX_CANDIDATE_SETS else None
