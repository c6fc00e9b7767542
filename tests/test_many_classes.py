"""Many classes: a label set of 50 values is detected by prepare, scored by evaluate, and its confusion matrix drawn
as the 19 largest classes plus one row and column for the rest."""

import json

import pytest

from conftest import run_main
from littune.cli import main
from littune.plots import REST, condensed

pytestmark = pytest.mark.usefixtures("one_torch_thread")
NAMES = [f"product {chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(50)]


def test_fifty_labels_are_detected_and_evaluated_through_the_cli(small_checkpoint, tmp_path, capsys):
    records = [{"instruction": "Which product is this complaint about?", "input": f"complaint {i}",
                "output": NAMES[i % 50]} for i in range(150)]
    (tmp_path / "complaints.json").write_text(json.dumps(records))
    assert main(["prepare", "--data_file", str(tmp_path / "complaints.json"), "--checkpoint_dir",
                 str(small_checkpoint), "--destination_path", str(tmp_path / "data"), "--test_size", "25",
                 "--val_size", "0"]) == 0
    assert json.loads((tmp_path / "data" / "prepare.json").read_text())["labels"] == NAMES
    result = run_main(capsys, "evaluate", "--checkpoint_dir", small_checkpoint, "--data_dir", tmp_path / "data",
                      "--out_dir", tmp_path / "eval")
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["scoring"] == "likelihood" and metrics["labels"] == NAMES and len(metrics["confusion_matrix"]) == 50
    assert (tmp_path / "eval" / "confusion_matrix.png").stat().st_size > 0


def test_the_plotted_matrix_keeps_the_largest_classes_and_sums_the_rest():
    labels = [f"c{i}" for i in range(30)]
    matrix = [[(r + 1) * (r == c) + (c == 30) for c in range(31)] for r in range(30)]  # support r + 2, one "other"
    rows, columns, folded = condensed(labels, labels + ["other"], matrix)
    assert rows == [f"c{i}" for i in range(11, 30)] + [REST] and columns == rows + ["other"]
    assert sum(map(sum, folded)) == sum(map(sum, matrix))  # nothing lost
    assert folded[-1][-2] == sum(r + 1 for r in range(11)) and folded[-1][-1] == 11  # the rest: right, and "other"
    assert condensed(labels[:5], labels[:5], [row[:5] for row in matrix[:5]])[0] == labels[:5]
