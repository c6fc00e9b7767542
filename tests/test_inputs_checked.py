"""Crafted or data-driven inputs (issue 36, finding 5): `--labels` as a JSON list or commas, a data file whose
header names a column twice, an adapter file that is not a mapping of tensors: one `littune: error:` line each,
through the real CLI, nothing written."""

import json

import pytest
import torch

from conftest import SST2_TRAIN, assert_clean_error, make_adapter_run, run_main

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def reviews(small_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("reviews")
    (folder / "reviews.tsv").write_text("\n".join(SST2_TRAIN.read_text(encoding="utf-8").splitlines()[:41]) + "\n")
    data = folder / "data"
    from littune.cli import main

    assert main(["prepare", "--data_file", str(folder / "reviews.tsv"), "--checkpoint_dir", str(small_checkpoint),
                 "--destination_path", str(data), "--columns",
                 json.dumps({"instruction": "=Positive or negative?", "input": "text", "output": "label"}),
                 "--output_values", '{"1": "positive", "0": "negative"}', "--test_size", "8"]) == 0
    return data


def evaluate(capsys, checkpoint, data, out, *flags):
    return run_main(capsys, "evaluate", "--checkpoint_dir", checkpoint, "--data_dir", data, "--out_dir", out,
                    "--precision", "32-true", *flags)


@pytest.mark.parametrize("labels", ['["positive", "negative"]', "positive,negative", ' ["negative","positive"]'])
def test_labels_as_a_json_list_or_commas(small_checkpoint, reviews, tmp_path, capsys, labels):
    result = evaluate(capsys, small_checkpoint, reviews, tmp_path / "eval", "--labels", labels)
    assert result.returncode == 0, result.stderr[-2000:]
    assert set(json.loads((tmp_path / "eval" / "metrics.json").read_text())["labels"]) == {"positive", "negative"}


@pytest.mark.parametrize("labels, fragment", [
    ('["pos", "pos"]', "'pos' given twice"),
    ("pos,Pos", "'pos' given twice"),
    ('["pos", "neg"', "not a JSON list"),
    ('["pos", 3]', "a JSON list of strings"),
    ('["pos"]', "at least 2 labels"),
])
def test_bad_labels_are_one_line(small_checkpoint, reviews, tmp_path, capsys, labels, fragment):
    result = evaluate(capsys, small_checkpoint, reviews, tmp_path / "eval", "--labels", labels)
    assert_clean_error(result, "--labels", fragment)
    assert not (tmp_path / "eval").exists()


def test_a_header_naming_a_column_twice_is_refused(small_checkpoint, tmp_path, capsys):
    source = tmp_path / "records.csv"
    source.write_text("instruction,output,output\nSay hi,hi,hello\nSay bye,bye,goodbye\n")
    result = run_main(capsys, "prepare", "--data_file", source, "--checkpoint_dir", small_checkpoint,
                      "--destination_path", tmp_path / "data")
    assert_clean_error(result, str(source), "'output' more than once")
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("content", [[1, 2], {"weight": [1.0]}, {3: torch.zeros(2)}])
def test_an_adapter_file_that_is_not_tensors_is_one_line(small_checkpoint, reviews, tmp_path, capsys, content):
    run = make_adapter_run(small_checkpoint, tmp_path / "run", "lora")
    torch.save(content, run / "lit_model_lora_finetuned.pth")
    result = evaluate(capsys, small_checkpoint, reviews, tmp_path / "eval", "--adapter_path", run)
    assert_clean_error(result, "lit_model_lora_finetuned.pth", "not adapter weights")
    for command in (["generate", "--prompt", "hi", "--max_new_tokens", "2"],
                    ["export", "--format", "peft", "--out_dir", tmp_path / "export"]):
        result = run_main(capsys, *command, "--checkpoint_dir", small_checkpoint, "--adapter_path", run)
        assert_clean_error(result, "not adapter weights")
    assert not (tmp_path / "export").exists()
