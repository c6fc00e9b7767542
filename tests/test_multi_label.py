"""Multi-label tasks through the real CLI: prepare reads a record's labels as a list (a separator in a TSV column, or
a JSON array) and writes the set as one deterministic text; finetune's task metrics and evaluate score sets, their
figures equal scikit-learn's (LexGLUE's way: f1_score on the binarised label matrix) on the same predictions."""

import json
from pathlib import Path

import pytest
import torch

from conftest import finetune_argv, one_error_line, read_metrics, run_main
from littune.cli import main

UNFAIR = Path(__file__).parent / "data" / "unfair_tos"
COLUMNS = json.dumps({"instruction": "=Which unfair-clause types does this Terms of Service clause have?",
                      "input": "text", "output": "labels"})

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def prepare_argv(checkpoint, destination, *flags) -> list[str]:
    return ["prepare", "--data_file", str(UNFAIR / "train.tsv"), "--test_file", str(UNFAIR / "test.tsv"),
            "--checkpoint_dir", str(checkpoint), "--destination_path", str(destination), "--columns", COLUMNS,
            "--val_size", "16", *flags]


@pytest.fixture(scope="module")
def unfair(small_checkpoint, tmp_path_factory) -> Path:
    destination = tmp_path_factory.mktemp("unfair") / "data"
    assert main(prepare_argv(small_checkpoint, destination, "--label_separator", ",", "--none_label", "none")) == 0
    return destination


def sets_of(texts: list[str], labels: list[str]) -> list[set]:
    return [{part.strip().lower() for part in t.split(",")} & set(labels) for t in texts]


def test_prepare_writes_each_set_sorted_and_records_the_labels_and_candidate_sets(unfair):
    meta = json.loads((unfair / "prepare.json").read_text())
    assert meta["label_sets"] == {"labels": ["arbitration", "choice of law", "content removal", "contract by using",
                                             "jurisdiction", "limitation of liability", "unilateral change",
                                             "unilateral termination"], "none_label": "none"}
    assert meta["counts"]["dropped"] == 0
    assert meta["mask_inputs"] is True
    train = torch.load(unfair / "train.pt", weights_only=True) + torch.load(unfair / "val.pt", weights_only=True)
    test = torch.load(unfair / "test.pt", weights_only=True)
    by_text = {r["input"]: r["output"] for r in train + test}
    rows = [line.split("\t") for line in (UNFAIR / "test.tsv").read_text(encoding="utf-8").splitlines()[1:]]
    for text, labels in rows:  # the file's order ("Unilateral termination,Unilateral change") becomes sorted
        names = sorted((n.strip() for n in labels.split(",") if n.strip()), key=str.lower)
        assert by_text[text] == (", ".join(names) if names else "none")
    assert meta["labels"] == sorted({r["output"].lower() for r in train})  # candidates: the training sets only


def test_finetune_and_evaluate_score_sets_as_scikit_learn_does(small_checkpoint, unfair, tmp_path, capsys):
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
    from sklearn.preprocessing import MultiLabelBinarizer

    out = tmp_path / "run"
    assert main(finetune_argv(small_checkpoint, unfair, out, "--max_steps", 4, "--batch_size", 8,
                              "--micro_batch_size", 8, "--eval_interval", 2, "--eval_iters", "all",
                              "--learning_rate", 0.05, "--precision", "32-true", "--seed", 3)) == 0
    hyper = (out / "hyperparameters.yaml").read_text()
    assert "best_metric: val_f1_macro" in hyper  # a multi-label task's default
    logged = [r for r in read_metrics(out) if r["val_loss"]]
    assert [int(r["step"]) for r in logged] == [2, 4] and all(r["val_f1_macro"] != "" for r in logged)

    meta = json.loads((unfair / "prepare.json").read_text())
    columns = meta["label_sets"]["labels"] + ["none"]
    for scoring in ("likelihood", "generate"):
        evaluated = tmp_path / f"eval-{scoring}"
        result = run_main(capsys, "evaluate", "--checkpoint_dir", small_checkpoint, "--data_dir", unfair,
                          "--adapter_path", out, "--out_dir", evaluated, "--scoring", scoring)
        assert result.returncode == 0, result.stderr
        metrics = json.loads((evaluated / "metrics.json").read_text())
        rows = [json.loads(line) for line in (evaluated / "predictions.jsonl").read_text().splitlines()]
        expected = [s or {"none"} for s in sets_of([r["expected"] for r in rows], columns[:-1])]
        predicted = [s or {"none"} for s in sets_of([r["predicted"] for r in rows], columns[:-1])]
        if scoring == "likelihood":  # a prediction is always one of the training sets
            assert {r["predicted"] for r in rows} <= set(meta["labels"])
        binarizer = MultiLabelBinarizer(classes=columns)
        y_true, y_pred = binarizer.fit_transform(expected), binarizer.transform(predicted)
        assert metrics["multi_label"] is True and metrics["labels"] == columns
        assert metrics["f1_micro"] == pytest.approx(f1_score(y_true, y_pred, average="micro", zero_division=0))
        assert metrics["f1_macro"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
        per_label = f1_score(y_true, y_pred, average=None, zero_division=0)
        assert [metrics["per_class"][c]["f1"] for c in columns] == pytest.approx(list(per_label))
        texts = [",".join(sorted(s)) for s in expected], [",".join(sorted(s)) for s in predicted]
        assert metrics["accuracy"] == pytest.approx(accuracy_score(*texts))
        assert metrics["mcc"] == pytest.approx(matthews_corrcoef(*texts))
        assert "F1 macro" in result.stdout and "unilateral termination" in result.stdout


def test_the_same_set_in_any_order_or_as_a_json_list_is_the_same_answer(small_checkpoint, tmp_path):
    records = [{"instruction": "Tag it.", "input": f"clause {i}", "output": output} for i, output in enumerate(
        [["b", "a"], ["a", "b"], "a", ["B"], [], ["a"], ["b"], []])]
    (tmp_path / "sets.json").write_text(json.dumps(records))
    assert main(["prepare", "--data_file", str(tmp_path / "sets.json"), "--checkpoint_dir", str(small_checkpoint),
                 "--destination_path", str(tmp_path / "data"), "--test_size", "1", "--val_size", "0",
                 "--none_label", "none"]) == 0
    records = torch.load(tmp_path / "data" / "train.pt", weights_only=True) + \
        torch.load(tmp_path / "data" / "test.pt", weights_only=True)
    answers = {r["input"]: r["output"] for r in records}
    assert [answers[f"clause {i}"] for i in range(8)] == ["a, b", "a, b", "a", "b", "none", "a", "b", "none"]


@pytest.mark.parametrize("flags, records, fragments", [
    ([], [["a"], []], ["record 1", "has no label", "--none_label none"]),
    (["--none_label", "none"], [["a, b"], ["a"]], ["record 0", "holds a comma"]),
    (["--none_label", "none"], [["a"], ["a"]], ["at least 2"]),
    (["--output_values", '{"x": "y"}'], [["a"], ["b"]], ["record 0", "--output_values", "list of labels"]),
])
def test_bad_multi_label_input_is_one_line_and_writes_nothing(small_checkpoint, tmp_path, capsys, flags, records,
                                                              fragments):
    rows = [{"instruction": "Tag it.", "input": str(i), "output": r} for i, r in enumerate(records * 2)]
    (tmp_path / "bad.json").write_text(json.dumps(rows))
    result = run_main(capsys, "prepare", "--data_file", tmp_path / "bad.json", "--checkpoint_dir", small_checkpoint,
                      "--destination_path", tmp_path / "data", "--test_size", "1", *flags)
    one_error_line(result, *fragments, code=1)
    assert not (tmp_path / "data").exists()


def test_none_label_on_single_label_outputs_is_refused(small_checkpoint, tmp_path, capsys):
    rows = [{"instruction": "Rate it.", "input": str(i), "output": ["pos", "neg"][i % 2]} for i in range(6)]
    (tmp_path / "single.json").write_text(json.dumps(rows))
    result = run_main(capsys, "prepare", "--data_file", tmp_path / "single.json", "--checkpoint_dir",
                      small_checkpoint, "--destination_path", tmp_path / "data", "--none_label", "none")
    one_error_line(result, "--none_label", "--label_separator", code=1)
