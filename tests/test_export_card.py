"""The model card of `littune export --format hf|peft` (littune/export/card.py): a real LoRA run on a label task,
evaluated by `littune evaluate`, exported through the CLI; the README.md parsed by huggingface_hub's ModelCard."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import SST2_TRAIN, finetune_argv
from littune.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SST2_COLUMNS = json.dumps({"instruction": "=Is this review positive or negative?", "input": "text", "output": "label"})


@pytest.fixture(scope="module")
def evaluated_run(small_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    """(base checkpoint laid out as checkpoints/ORG/NAME with the base's own model card, an evaluated LoRA run)."""
    root = tmp_path_factory.mktemp("card")
    checkpoint = shutil.copytree(small_checkpoint, root / "checkpoints" / "EleutherAI" / "tiny-neox")
    (checkpoint / "README.md").write_text("---\nlicense: apache-2.0\n---\n# the base model's card\n")
    rows = SST2_TRAIN.read_text(encoding="utf-8").splitlines()[:61]
    (root / "reviews.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    data, run = root / "data", root / "run"
    assert main(["prepare", "--data_file", str(root / "reviews.tsv"), "--checkpoint_dir", str(checkpoint),
                 "--destination_path", str(data), "--columns", SST2_COLUMNS, "--output_values",
                 '{"1": "positive", "0": "negative"}', "--test_size", "12", "--val_size", "4"]) == 0
    assert main(finetune_argv(checkpoint, data, run, "--max_steps", "1", "--micro_batch_size", "4", "--batch_size", "4",
                              method="lora")) == 0
    assert main(["evaluate", "--checkpoint_dir", str(checkpoint), "--data_dir", str(data), "--adapter_path",
                 str(run)]) == 0
    return checkpoint, run


@pytest.mark.parametrize("format", ["hf", "peft"])
def test_export_writes_a_model_card_the_hub_parses(evaluated_run, tmp_path, format):
    from huggingface_hub import ModelCard

    checkpoint, run = evaluated_run
    out = tmp_path / format
    assert main(["export", "--checkpoint_dir", str(checkpoint), "--adapter_path", str(run), "--format", format,
                 "--out_dir", str(out)]) == 0
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "EleutherAI/tiny-neox" and data["license"] == "apache-2.0"
    assert data["library_name"] == ("peft" if format == "peft" else "transformers")
    assert data["pipeline_tag"] == "text-generation" and {"littune", "lora"} <= set(data["tags"])

    # model-index: the figures of the run's own evaluation
    evaluation = json.loads((run / "eval" / "metrics.json").read_text())
    results = {r.metric_type: r for r in card.data.eval_results}
    assert set(results) == {"accuracy", "f1", "matthews_correlation"}
    assert results["accuracy"].metric_value == round(evaluation["accuracy"], 4)
    assert results["f1"].metric_value == round(evaluation["f1_macro"], 4)
    assert results["matthews_correlation"].metric_value == round(evaluation["mcc"], 4)
    assert results["accuracy"].dataset_name == "reviews.tsv" and results["accuracy"].dataset_split == "test"

    # the text: training flags (no local paths), data, a prompt example as trained, how to load it
    text = card.text
    hparams = yaml.safe_load((run / "hyperparameters.yaml").read_text())
    assert f"| `lora_r` | `{hparams['lora_r']}` |" in text and f"| `learning_rate` | `{hparams['learning_rate']}` |" in text
    assert str(checkpoint.parent.parent.parent) not in card.content and "data_dir" not in text
    prepared = json.loads((checkpoint.parent.parent.parent / "data" / "prepare.json").read_text())
    assert "`reviews.tsv`" in text and ", ".join(f"`{label}`" for label in prepared["labels"]) in text
    counts = prepared["counts"]
    assert f"- records: {counts['train']} train, {counts['val']} val, {counts['test']} test" in text
    first = json.loads((run / "eval" / "predictions.jsonl").read_text().splitlines()[0])
    assert first["prompt"] in text  # the prompt example is the exact text the model was trained and evaluated on
    assert ("PeftModel.from_pretrained" if format == "peft" else "AutoModelForCausalLM.from_pretrained") in text
    assert "README.md" in json.loads((out / "littune_export.json").read_text())["files"]


def test_a_base_model_export_has_a_card_without_training(small_checkpoint, tmp_path):
    from huggingface_hub import ModelCard

    out = tmp_path / "hf"
    assert main(["export", "--checkpoint_dir", str(small_checkpoint), "--format", "hf", "--out_dir", str(out)]) == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers" and card.data.eval_results is None
    assert "## Training" not in card.text and "no fine-tuning run" in card.text


def test_the_card_fences_a_record_whatever_backticks_it_holds_and_can_leave_it_out(small_checkpoint, tmp_path):
    """A test record whose text holds lines of ``` and ```` stays inside the card's code block (issue 36); with
    --card_example false no record of the test split is in the card at all."""
    import re

    secret = "PRIVATE-CUSTOMER-4711"
    records = [{"instruction": f"Summarise\n```\n# not a heading {secret}\n````\nend", "input": "", "output": "ok"}
               for _ in range(12)]
    (tmp_path / "records.json").write_text(json.dumps(records))
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["prepare", "--data_file", str(tmp_path / "records.json"), "--checkpoint_dir", str(small_checkpoint),
                 "--destination_path", str(data), "--test_size", "4", "--val_size", "2"]) == 0
    assert main(finetune_argv(small_checkpoint, data, run, "--max_steps", "1", "--micro_batch_size", "2", "--batch_size",
                              "2", method="lora")) == 0
    assert main(["evaluate", "--checkpoint_dir", str(small_checkpoint), "--data_dir", str(data), "--adapter_path",
                 str(run), "--scoring", "generate", "--max_new_tokens", "2"]) == 0
    assert main(["export", "--checkpoint_dir", str(small_checkpoint), "--adapter_path", str(run), "--format", "peft",
                 "--out_dir", str(tmp_path / "with")]) == 0
    text = (tmp_path / "with" / "README.md").read_text()
    assert "a record of the test split" in text and "--card_example false" in text
    # the block holding the record opens and closes with a fence longer than the record's longest backtick run
    block = re.search(r"^(`{5,})text\n(.*?)\n\1$", text, re.S | re.M)
    assert block and secret in block.group(2) and "````\nend" in block.group(2)
    assert "\n# not a heading" not in text.replace(block.group(0), "")

    assert main(["export", "--checkpoint_dir", str(small_checkpoint), "--adapter_path", str(run), "--format", "peft",
                 "--out_dir", str(tmp_path / "without"), "--card_example", "false"]) == 0
    text = (tmp_path / "without" / "README.md").read_text()
    assert secret not in text and "INSTRUCTION" in text and "## Prompt format" in text
