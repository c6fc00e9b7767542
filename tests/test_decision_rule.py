"""The fitted decision rule: a per-label bias on the log-likelihoods, fitted on the validation split to its macro F1,
saved with the run, used by evaluate from then on (`--decision_rule auto`)."""

import json
import random

import pytest

from conftest import SST2_TRAIN, finetune_argv, one_error_line, run_main
from littune.cli import main
from littune.decision import fit_bias, predictions

pytestmark = pytest.mark.usefixtures("one_torch_thread")
COLUMNS = json.dumps({"instruction": "=Is the sentiment of this review positive or negative?", "input": "text",
                      "output": "label"})
VALUES = json.dumps({"1": "positive", "0": "negative"})


def test_the_fitted_bias_finds_the_best_threshold_of_two_labels():
    from sklearn.metrics import f1_score

    rng = random.Random(0)
    # "a" nearly always more likely, yet the margin separates the classes: argmax says "a" for almost every record
    expected = [rng.choice("ab") for _ in range(200)]
    logprobs = [[0.0, -3.0 + (1.5 if e == "b" else 0.0) + rng.gauss(0, 0.5)] for e in expected]
    bias, before, after = fit_bias(logprobs, ["a", "b"], expected)
    argmax = ["b" if lp[1] > lp[0] else "a" for lp in logprobs]
    assert bias[0] == 0.0 and before == pytest.approx(f1_score(expected, argmax, average="macro"))
    best = max(f1_score(expected, ["b" if lp[1] + t > lp[0] else "a" for lp in logprobs], average="macro")
               for t in [x / 100 for x in range(0, 600)])  # every threshold on a fine grid
    assert after == pytest.approx(f1_score(expected, predictions(logprobs, ["a", "b"], bias), average="macro"))
    assert after >= best - 1e-9 and after > before + 0.3


@pytest.fixture(scope="module")
def imbalanced_run(small_checkpoint, tmp_path_factory):
    """A short run on an SST-2 slice of 4 positives to 1 negative."""
    folder = tmp_path_factory.mktemp("imbalanced")
    lines = SST2_TRAIN.read_text(encoding="utf-8").splitlines(keepends=True)
    positives = [x for x in lines[1:] if x.rstrip().endswith("\t1")][:96]
    negatives = [x for x in lines[1:] if x.rstrip().endswith("\t0")][:24]
    (folder / "sst2.tsv").write_text(lines[0] + "".join(random.Random(1).sample(positives + negatives, 120)))
    data, out = folder / "data", folder / "run"
    assert main(["prepare", "--data_file", str(folder / "sst2.tsv"), "--checkpoint_dir", str(small_checkpoint),
                 "--destination_path", str(data), "--test_size", "30", "--val_size", "30", "--columns", COLUMNS,
                 "--output_values", VALUES]) == 0
    assert main(finetune_argv(small_checkpoint, data, out, "--max_steps", 2, "--batch_size", 8, "--micro_batch_size",
                              8, "--precision", "32-true", "--seed", 3, "--eval_interval", 10)) == 0
    return data, out


def evaluate(capsys, checkpoint, data, run, out, *flags):
    result = run_main(capsys, "evaluate", "--checkpoint_dir", checkpoint, "--data_dir", data, "--adapter_path", run,
                      "--out_dir", out, *flags)
    assert result.returncode == 0, result.stderr
    return result, json.loads((out / "metrics.json").read_text()), \
        [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_fit_saves_the_rule_with_the_run_and_evaluate_uses_it_after(small_checkpoint, imbalanced_run, tmp_path,
                                                                     capsys):
    data, run = imbalanced_run
    plain = evaluate(capsys, small_checkpoint, data, run, tmp_path / "argmax", "--decision_rule", "argmax")[1]
    result, fitted, rows = evaluate(capsys, small_checkpoint, data, run, tmp_path / "fit", "--decision_rule", "fit")
    rule = json.loads((run / "decision_rule.json").read_text())
    assert rule["fitted_on"] == "val" and rule["records"] == 30 and rule["labels"] == ["negative", "positive"]
    assert rule["val_fitted"] >= rule["val_argmax"] and "fitted on 30 validation records" in result.stderr
    assert fitted["decision_rule"] == dict(zip(rule["labels"], rule["bias"])) and plain["decision_rule"] is None
    for row in rows:  # the prediction is the argmax after the bias; the plain one stays beside it
        scores = {label: row["choices"][label]["logprob"] + b for label, b in fitted["decision_rule"].items()}
        assert row["predicted"] == max(rule["labels"], key=scores.__getitem__)
        assert row["predicted_argmax"] == max(rule["labels"], key=lambda label: row["choices"][label]["logprob"])
    again = evaluate(capsys, small_checkpoint, data, run, tmp_path / "auto")[1]  # auto: the saved rule
    assert again["decision_rule"] == fitted["decision_rule"] and again["f1_macro"] == fitted["f1_macro"]
    assert again["test_loss"] == plain["test_loss"]  # the rule changes predictions, not the model


def test_a_rule_that_does_not_fit_or_a_scoring_without_likelihoods_is_one_line(small_checkpoint, imbalanced_run,
                                                                                tmp_path, capsys):
    data, run = imbalanced_run
    result = run_main(capsys, "evaluate", "--checkpoint_dir", small_checkpoint, "--data_dir", data, "--adapter_path",
                      run, "--out_dir", tmp_path / "gen", "--scoring", "generate", "--decision_rule", "fit")
    one_error_line(result, "--decision_rule fit", "--scoring likelihood", code=1)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "decision_rule.json").write_text(json.dumps({"labels": ["x", "y"], "bias": [0, 1]}))
    bad_run = tmp_path / "other"
    for name in ("lit_model_adapter_finetuned.pth", "hyperparameters.yaml", "prompt_style.yaml"):
        (bad_run / name).write_bytes((run / name).read_bytes())
    result = run_main(capsys, "evaluate", "--checkpoint_dir", small_checkpoint, "--data_dir", data, "--adapter_path",
                      bad_run, "--out_dir", tmp_path / "bad")
    one_error_line(result, "decision_rule.json", "do not fit", "--decision_rule", code=1)
