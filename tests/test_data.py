"""`littune prepare`: real instruction files and real tokenizers through the CLI, checked token for token."""

import csv
import functools
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import (ALPACA_335, SMOLLM2_CHAT_TEMPLATE, SST2_DEV, SST2_TRAIN, assert_clean_error, copy_tokenizer,
                      one_error_line, run_cli, smollm2_gguf)
from littune.cli import main
from littune.common import UserError
from littune.data import split_sizes
from littune.prepared import load_prepared, load_split, tokenizer_identity, validation_split_name
from littune.prompts import load_style_file, save_style, style_by_name

OUTPUTS = ("train.pt", "val.pt", "test.pt", "prompt_style.yaml", "prepare.json")
SST2_COLUMNS = json.dumps({"instruction": "=Classify the sentiment of this movie review as positive or negative.",
                           "input": "text", "output": "label"})
SST2_VALUES = json.dumps({"1": "positive", "0": "negative"})


# ------------------------------------------------------------------------------------------------- fixtures


def checkpoint(folder: Path, family: str, block_size_file: str = "config.json", block_size: int = 2048) -> Path:
    """A folder with only a family's real tokenizer files and the model's block size."""
    copy_tokenizer(family, folder)
    if block_size_file == "config.json":
        (folder / "config.json").write_text(json.dumps({"max_position_embeddings": block_size}))
    elif block_size_file == "model_config.yaml":
        (folder / "model_config.yaml").write_text(yaml.dump({"name": "tiny", "block_size": block_size}))
    return folder


def with_chat_template(folder: Path, template: str, family: str = "pythia", **config) -> Path:
    """A checkpoint() folder whose tokenizer_config.json carries `template` (and `config`'s keys)."""
    checkpoint(folder, family)
    path = folder / "tokenizer_config.json"
    existing = json.loads(path.read_text()) if path.is_file() else {}
    path.write_text(json.dumps({**existing, "chat_template": template, **config}))
    return folder


@pytest.fixture(scope="module")
def pythia(tmp_path_factory) -> Path:
    return checkpoint(tmp_path_factory.mktemp("ckpt") / "pythia", "pythia")


def prepare(data_file: Path, checkpoint_dir: Path, destination: Path, *flags: str, capsys=None) -> tuple:
    """Run `littune prepare` in this process; returns (exit code, stdout, stderr) when capsys is given."""
    code = main(["prepare", "--data_file", str(data_file), "--checkpoint_dir", str(checkpoint_dir),
                 "--destination_path", str(destination), *flags])
    if capsys is None:
        return code, "", ""
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def alpaca_masked(pythia, tmp_path_factory) -> Path:
    destination = tmp_path_factory.mktemp("data") / "masked"
    assert prepare(ALPACA_335, pythia, destination, "--mask_inputs", "true")[0] == 0
    return destination


@pytest.fixture(scope="module")
def alpaca_unmasked(pythia, tmp_path_factory) -> Path:
    destination = tmp_path_factory.mktemp("data") / "unmasked"
    assert prepare(ALPACA_335, pythia, destination)[0] == 0
    return destination


def load(destination: Path) -> tuple[list, list, dict]:
    """The files as any consumer reads them: plain torch.load with weights_only=True."""
    train = torch.load(destination / "train.pt", weights_only=True)
    test = torch.load(destination / "test.pt", weights_only=True)
    return train, test, json.loads((destination / "prepare.json").read_text())


def load_val(destination: Path) -> list:
    """val.pt's records; [] when prepare wrote none."""
    path = destination / "val.pt"
    return torch.load(path, weights_only=True) if path.is_file() else []


def load_all(destination: Path) -> list:
    train, test, _ = load(destination)
    return train + load_val(destination) + test


@functools.cache
def litgpt_tokenizer(checkpoint_dir: Path):
    from litgpt import Tokenizer

    return Tokenizer(checkpoint_dir)


def reference_tokens(checkpoint_dir: Path, record: dict) -> tuple:
    """(prompt ids, full ids) the slow way: litgpt's Tokenizer.encode, one string at a time, as Lit-GPT did."""
    from litgpt.prompts import Alpaca

    tokenizer = litgpt_tokenizer(checkpoint_dir)
    prompt = Alpaca().apply(record["instruction"], input=record["input"])
    full = torch.cat([tokenizer.encode(prompt + record["output"]), torch.tensor([tokenizer.eos_id])])
    return tokenizer.encode(prompt).long(), full.long()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_sst2_subset(path: Path, rows: int = 300) -> Path:
    with open(SST2_TRAIN, encoding="utf-8") as f:
        lines = f.readlines()[: rows + 1]  # header + rows
    path.write_text("".join(lines), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ good data


def test_alpaca_counts_schema_and_metadata(alpaca_masked, pythia):
    train, test, meta = load(alpaca_masked)
    val = load_val(alpaca_masked)
    counts = meta["counts"]
    assert counts == {"read": 335, "train": len(train), "val": len(val), "test": len(test), "truncated": 0,
                      "dropped": 0}
    assert len(test) == round(335 * 0.03865) == 13
    assert len(val) == round((335 - 13) * 0.05) == 16  # the default validation split: 5% of the training records
    assert len(train) + len(val) + len(test) == 335
    for record in train + val + test:
        assert set(record) == {"instruction", "input", "output", "input_ids", "input_ids_no_response", "labels"}
        assert all(isinstance(record[k], str) for k in ("instruction", "input", "output"))
        assert all(record[k].dtype == torch.int64 and record[k].ndim == 1
                   for k in ("input_ids", "input_ids_no_response", "labels"))
    # every source record is in exactly one split
    source = json.loads(ALPACA_335.read_text())
    key = lambda r: (r["instruction"], r["input"], r["output"])  # noqa: E731
    assert sorted(map(key, train + val + test)) == sorted(map(key, source))

    assert meta["data_sha256"] == hashlib.sha256(ALPACA_335.read_bytes()).hexdigest()
    assert meta["test_file"] is None and meta["test_sha256"] is None and meta["val_size"] is None
    assert meta["labels"] is None  # free-text answers are no label set
    assert meta["system"] is None
    assert meta["seed"] == 42 and meta["max_seq_length"] == 2048 and meta["mask_inputs"] is True
    assert meta["ignore_index"] == -100 and meta["prompt_style"] == "alpaca"
    assert meta["tokenizer"] == tokenizer_identity(pythia)
    assert meta["tokenizer"]["sha256"] == sha256(pythia / "tokenizer.json")
    assert meta["tokenizer"]["vocab_size"] == meta["vocab_size"] == 50278
    assert meta["tokenizer"]["eos_id"] == 0 and meta["tokenizer"]["use_bos"] is False
    assert "littune_version" in meta
    assert (alpaca_masked / "prompt_style.yaml").read_text() == "class_path: litgpt.prompts.Alpaca\n"


@pytest.mark.parametrize("masked", [True, False])
def test_labels_eos_and_prompt_prefix(masked, alpaca_masked, alpaca_unmasked):
    folder = alpaca_masked if masked else alpaca_unmasked
    eos = load(folder)[2]["tokenizer"]["eos_id"]
    for record in load_all(folder):
        ids, prompt, labels = record["input_ids"], record["input_ids_no_response"], record["labels"]
        n = len(prompt)
        assert ids[-1] == eos
        assert len(prompt) < len(ids) and torch.equal(ids[:n], prompt)
        if masked:
            assert (labels[:n] == -100).all() and torch.equal(labels[n:], ids[n:])
        else:
            assert torch.equal(labels, ids)
        assert labels.data_ptr() != ids.data_ptr()  # a copy, not the same memory


@pytest.mark.parametrize("family, block_size_file", [("pythia", "config.json"), ("falcon", "model_config.yaml"),
                                                     ("llama", "config.json")])
def test_batched_tokens_equal_litgpt_encode_per_record(family, block_size_file, tmp_path):
    """Batched, threaded tokenisation gives what litgpt's Tokenizer.encode gives one record at a time (for texts
    that do not begin with the BOS text: littune keeps a BOS the text writes, see
    test_chat_prompt_ids_equal_apply_chat_template_ids)."""
    folder = checkpoint(tmp_path / family, family, block_size_file)
    records = json.loads(ALPACA_335.read_text())
    # edge cases of the BOS/EOS rules: a text that itself ends in the EOS token, unicode, an empty output
    records[0] = {**records[0], "output": records[0]["output"] + "<|endoftext|>"}
    records[1] = {**records[1], "output": "Ünïcödé — 東京 😀 \u2028 done"}
    data_file = tmp_path / "alpaca.json"
    data_file.write_text(json.dumps(records))
    assert prepare(data_file, folder, tmp_path / "out", "--test_size", "35")[0] == 0
    meta = load(tmp_path / "out")[2]
    assert meta["tokenizer"]["backend"] == ("sentencepiece" if family == "llama" else "huggingface")
    for record in load_all(tmp_path / "out"):
        prompt, full = reference_tokens(folder, record)
        assert torch.equal(record["input_ids_no_response"], prompt), record["instruction"]
        assert torch.equal(record["input_ids"], full), record["instruction"]


def test_same_seed_same_bytes_other_seed_other_split(pythia, tmp_path):
    for name, seed in [("a", "7"), ("b", "7"), ("c", "8")]:
        assert prepare(ALPACA_335, pythia, tmp_path / name, "--seed", seed)[0] == 0
    for file in ("train.pt", "val.pt", "test.pt"):
        assert sha256(tmp_path / "a" / file) == sha256(tmp_path / "b" / file)
        assert sha256(tmp_path / "a" / file) != sha256(tmp_path / "c" / file)
    tests = [{r["instruction"] for r in load(tmp_path / name)[1]} for name in "ac"]
    assert len(tests[0]) == len(tests[1]) == 13 and tests[0] != tests[1]


def test_truncation_is_counted_and_keeps_the_window(pythia, tmp_path):
    max_len = 64
    assert prepare(ALPACA_335, pythia, tmp_path / "out", "--max_seq_length", str(max_len))[0] == 0
    meta = load(tmp_path / "out")[2]
    long = 0
    for record in load_all(tmp_path / "out"):
        prompt, full = reference_tokens(pythia, record)
        long += len(full) > max_len
        assert torch.equal(record["input_ids"], full[:max_len])
        assert torch.equal(record["input_ids_no_response"], prompt[:max_len])
    assert 0 < long < 335
    assert meta["counts"]["truncated"] == long and meta["max_seq_length"] == max_len


def test_record_whose_prompt_fills_the_window_is_dropped(pythia, tmp_path, capsys):
    records = json.loads(ALPACA_335.read_text())[:40]
    records[5] = {"instruction": "word " * 200, "input": "", "output": "short"}
    data_file = tmp_path / "data.json"
    data_file.write_text(json.dumps(records))

    code, out, _ = prepare(data_file, pythia, tmp_path / "masked", "--max_seq_length", "150", "--mask_inputs", "true",
                           "--test_size", "4", capsys=capsys)
    assert code == 0 and "1 dropped" in out
    meta = load(tmp_path / "masked")[2]
    records = load_all(tmp_path / "masked")
    assert meta["counts"] == {"read": 40, "train": 33, "val": 2, "test": 4, "truncated": meta["counts"]["truncated"],
                              "dropped": 1}
    assert "word word" not in {r["instruction"][:9] for r in records}
    assert all((r["labels"] != -100).any() for r in records)

    # unmasked, the same record still teaches something: truncated, not dropped
    assert prepare(data_file, pythia, tmp_path / "unmasked", "--max_seq_length", "150", "--test_size", "4")[0] == 0
    assert load(tmp_path / "unmasked")[2]["counts"]["dropped"] == 0


def test_open_ended_data_is_not_masked_by_default(alpaca_unmasked):
    train, _, meta = load(alpaca_unmasked)
    assert meta["labels"] is None and meta["mask_inputs"] is False
    assert all(torch.equal(r["labels"], r["input_ids"]) for r in train)


def test_sst2_tsv_with_columns_and_output_values(pythia, tmp_path, capsys):
    data_file = write_sst2_subset(tmp_path / "sst2.tsv", rows=300)
    code, out, _ = prepare(data_file, pythia, tmp_path / "out", "--columns", SST2_COLUMNS,
                           "--output_values", SST2_VALUES, "--test_split_fraction", "0.1", capsys=capsys)
    assert code == 0 and "300 records" in out and str(tmp_path / "out") in out
    train, test, meta = load(tmp_path / "out")
    assert len(test) == 30 and len(load_val(tmp_path / "out")) == 14 and len(train) == 256  # 14: 5% of 270
    assert meta["labels"] == ["negative", "positive"]
    # a label task: by default only the label is learned (the prompt tokens masked)
    assert meta["mask_inputs"] is True and "prompt tokens are masked" in out
    for record in train + test:
        n_prompt = len(record["input_ids_no_response"])
        assert (record["labels"][:n_prompt] == -100).all() and (record["labels"][n_prompt:] != -100).all()
    with open(data_file, encoding="utf-8", newline="") as f:
        rows = {row["text"]: row["label"] for row in csv.DictReader(f, delimiter="\t")}
    for record in load_all(tmp_path / "out"):
        assert record["instruction"] == json.loads(SST2_COLUMNS)["instruction"][1:]
        assert record["output"] == {"1": "positive", "0": "negative"}[rows[record["input"]]]
    assert meta["columns"] == json.loads(SST2_COLUMNS)


def test_jsonl_and_csv_inputs(pythia, tmp_path):
    records = json.loads(ALPACA_335.read_text())[:30]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records[:15]) + "\n\n" +
                     "\n".join(json.dumps(r) for r in records[15:]) + "\n")
    table = tmp_path / "data.csv"
    with open(table, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(records)  # outputs with commas, quotes and newlines: quoted by the csv module
    for data_file in (jsonl, table):
        assert prepare(data_file, pythia, tmp_path / data_file.suffix[1:], "--test_size", "3")[0] == 0
        key = lambda r: (r["instruction"], r["input"], r["output"])  # noqa: E731
        assert sorted(map(key, load_all(tmp_path / data_file.suffix[1:]))) == sorted(map(key, records))


def test_default_destination_and_block_size_from_model_config(tmp_path, monkeypatch):
    folder = checkpoint(tmp_path / "falcon", "falcon", "model_config.yaml", block_size=96)
    monkeypatch.chdir(tmp_path)
    assert main(["prepare", "--data_file", str(ALPACA_335), "--checkpoint_dir", str(folder)]) == 0
    meta = load(tmp_path / "data" / ALPACA_335.stem)[2]
    assert meta["max_seq_length"] == 96
    assert max(len(r["input_ids"]) for r in load_all(tmp_path / "data" / ALPACA_335.stem)) == 96


def test_load_prepared_and_tokenizer_identity(alpaca_masked, pythia, tmp_path):
    train, test, meta = load_prepared(alpaca_masked)
    assert len(train) == meta["counts"]["train"] and len(test) == meta["counts"]["test"]
    assert torch.equal(train[0]["input_ids"], load(alpaca_masked)[0][0]["input_ids"])
    falcon = tokenizer_identity(checkpoint(tmp_path / "falcon", "falcon"))
    assert falcon["sha256"] != meta["tokenizer"]["sha256"] and falcon["eos_id"] == 11
    llama = tokenizer_identity(checkpoint(tmp_path / "llama", "llama"))
    assert llama["backend"] == "sentencepiece" and llama["vocab_size"] == 32000 and llama["eos_id"] == 2

    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "train.pt").write_bytes((alpaca_masked / "train.pt").read_bytes())
    with pytest.raises(UserError, match="no test.pt"):
        load_prepared(tmp_path / "partial")
    with pytest.raises(UserError, match="no tokenizer.json or tokenizer.model"):
        tokenizer_identity(tmp_path / "partial")


# ------------------------------------------------------------------------------------------------- bad input


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


GOOD = [{"instruction": f"Say {i}.", "input": "", "output": str(i)} for i in range(20)]


def bad_files(tmp: Path, pythia: Path) -> dict:
    """name -> (data file, checkpoint, extra flags, fragments the one error line must hold)."""
    no_tokenizer = tmp / "no_tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text('{"max_position_embeddings": 64}')
    no_eos = tmp / "no_eos"  # a bare GPT-NeoX tokenizer.json: no tokenizer_config.json or generation_config.json
    copy_tokenizer("gpt_neox", no_eos)
    no_block_size = copy_tokenizer("pythia", tmp / "no_block_size")
    good = write(tmp / "good.json", json.dumps(GOOD))
    missing_output = [dict(r) for r in GOOD]
    del missing_output[7]["output"]
    number_output = [dict(r) for r in GOOD]
    number_output[3]["output"] = 3
    no_instruction = [dict(r) for r in GOOD]
    del no_instruction[12]["instruction"]
    jsonl = "\n".join(json.dumps(r) for r in GOOD[:5]) + '\n{"instruction": "x", "output": \n'
    csv_text = "instruction,input,output\nA,,B\nC,D\nE,,F\n"
    sst2 = write_sst2_subset(tmp / "sst2_train.tsv", 20)
    other_header = write(tmp / "dev_other.tsv", "sentence\tlabel\na fine film\t1\na dull film\t0\n")
    unmapped_label = write(tmp / "dev_unmapped.tsv", "text\tlabel\na fine film\t1\nso so\t2\n")
    sst2_flags = ["--columns", SST2_COLUMNS, "--output_values", SST2_VALUES]
    broken_template = with_chat_template(tmp / "broken_template", "{% for m in messages %}{{ m['content'] }")
    refusing_template = with_chat_template(
        tmp / "refusing_template", "{% if messages[0]['role'] != 'system' %}{{ raise_exception('a system message "
        "is required') }}{% endif %}{{ messages[0]['content'] }}")
    return {
        "missing file": (tmp / "nope.json", pythia, [], ["nope.json", "no such file"]),
        "empty file": (write(tmp / "empty.json", "  \n"), pythia, [], ["empty.json", "empty"]),
        "invalid json": (write(tmp / "broken.json", '[\n {"instruction": "a",\n  "output": }\n]'), pythia, [],
                         ["broken.json", "invalid JSON at line 3 column"]),
        "top level not a list": (write(tmp / "dict.json", json.dumps(GOOD[0])), pythia, [],
                                 ["dict.json", "top level is an object", "list of records"]),
        "record not an object": (write(tmp / "strings.json", json.dumps(["a", "b"])), pythia, [],
                                 ["strings.json: record 0 is a string"]),
        "no output": (write(tmp / "no_output.json", json.dumps(missing_output)), pythia, [],
                      ["no_output.json: record 7 has no 'output'"]),
        "no instruction": (write(tmp / "no_instr.json", json.dumps(no_instruction)), pythia, [],
                           ["no_instr.json: record 12 has no 'instruction'"]),
        "non-string field": (write(tmp / "number.json", json.dumps(number_output)), pythia, [],
                             ["number.json: record 3", "field 'output' is a number", "expected a string"]),
        "invalid jsonl line": (write(tmp / "broken.jsonl", jsonl), pythia, [],
                               ["broken.jsonl: line 6 (record 5) is not valid JSON"]),
        "csv row with missing field": (write(tmp / "short.csv", csv_text), pythia, [],
                                       ["short.csv: record 1 (line 3) has 2 fields, the header has 3"]),
        "one usable record": (write(tmp / "one.json", json.dumps(GOOD[:1])), pythia, [],
                              ["one.json: 1 usable record", "at least 2", "--test_file"]),
        "test split as large as data": (good, pythia, ["--test_size", "20"], ["good.json", "--test_size 20",
                                                                             "none to train on"]),
        "checkpoint without tokenizer": (good, no_tokenizer, [], ["no_tokenizer: no tokenizer.json or tokenizer.model"]),
        "tokenizer without eos": (good, no_eos, ["--max_seq_length", "64"], ["no_eos", "end-of-sequence"]),
        "no block size": (good, no_block_size, [], ["no_block_size", "pass --max_seq_length"]),
        "bad columns key": (good, pythia, ["--columns", '{"text": "input"}'], ["--columns: 'text' is not a field"]),
        "column not in header": (write_sst2_subset(tmp / "sst2.tsv", 20), pythia, ["--columns", '{"input": "text"}'],
                                 ["sst2.tsv: no column 'instruction'", "header has text, label"]),
        "output not in output_values": (write_sst2_subset(tmp / "sst2b.tsv", 20), pythia,
                                        ["--columns", SST2_COLUMNS, "--output_values", '{"1": "positive"}'],
                                        ["sst2b.tsv: record 0 (line 2): output '0' is not in --output_values"]),
        "unknown prompt style": (good, pythia, ["--prompt_style", "nope"], ["--prompt_style 'nope'", "alpaca"]),
        "everything dropped": (good, pythia, ["--mask_inputs", "true", "--max_seq_length", "20"],
                               ["good.json: all 20 records dropped", "raise --max_seq_length"]),
        "test file with other columns": (sst2, pythia, ["--test_file", str(other_header), *sst2_flags],
                                         ["dev_other.tsv: no column 'text'", "header has sentence, label"]),
        "test file output not in output_values": (sst2, pythia, ["--test_file", str(unmapped_label), *sst2_flags],
                                                  ["dev_unmapped.tsv: record 1 (line 3): output '2' is not in "
                                                   "--output_values"]),
        "missing test file": (good, pythia, ["--test_file", str(tmp / "nope.tsv")], ["nope.tsv: no such file"]),
        "test_size with test_file": (good, pythia, ["--test_file", str(good), "--test_size", "3"],
                                     ["--test_size and --test_file exclude each other"]),
        "negative val_size": (good, pythia, ["--val_size", "-1"], ["--val_size -1: must be >= 0"]),
        "val split as large as training data": (good, pythia, ["--val_size", "19"],
                                                ["good.json: --val_size 19", "of the 19 usable training records",
                                                 "none to train on"]),
        "system without chat": (good, pythia, ["--system", "Be brief."],
                                ["--system goes with --prompt_style chat", "'alpaca'"]),
        "chat without template": (good, pythia, ["--prompt_style", "chat"],
                                  ["pythia: --prompt_style chat needs the model's chat template", "has none",
                                   "--prompt_style alpaca"]),
        "invalid chat template": (good, broken_template, ["--prompt_style", "chat"],
                                  ["broken_template/tokenizer_config.json (chat_template): not a valid Jinja "
                                   "template (line 1"]),
        "chat template raises": (good, refusing_template, ["--prompt_style", "chat"],
                                 ["the model's chat template failed", "a system message is required"]),
    }


BAD_CASES = [
    "missing file", "empty file", "invalid json", "top level not a list", "record not an object", "no output",
    "no instruction", "non-string field", "invalid jsonl line", "csv row with missing field",
    "test split as large as data", "checkpoint without tokenizer", "tokenizer without eos", "no block size",
    "bad columns key", "column not in header", "output not in output_values", "unknown prompt style",
    "everything dropped", "one usable record", "test file with other columns",
    "test file output not in output_values", "missing test file", "test_size with test_file", "negative val_size",
    "val split as large as training data", "system without chat", "chat without template", "invalid chat template",
    "chat template raises",
]


@pytest.fixture(scope="module")
def bad(tmp_path_factory, pythia) -> dict:
    cases = bad_files(tmp_path_factory.mktemp("bad"), pythia)
    assert sorted(cases) == sorted(BAD_CASES)
    return cases


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_clear_line_and_writes_nothing(case, bad, tmp_path, capsys):
    data_file, checkpoint_dir, flags, fragments = bad[case]
    destination = tmp_path / "out"
    code, _, err = prepare(data_file, checkpoint_dir, destination, *flags, capsys=capsys)
    line = one_error_line(SimpleNamespace(returncode=code, stderr=err), code=1)
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    assert not any((destination / name).exists() for name in OUTPUTS)


def test_failed_write_leaves_nothing_behind(pythia, tmp_path, capsys):
    destination = tmp_path / "out"
    (destination / "test.pt").mkdir(parents=True)  # test.pt cannot be written: a folder is in the way
    code, _, err = prepare(ALPACA_335, pythia, destination, capsys=capsys)
    assert code == 1 and "holds prepared data (test.pt)" in err and "--overwrite" in err  # refused before reading
    code, _, err = prepare(ALPACA_335, pythia, destination, "--overwrite", "true", capsys=capsys)
    assert code == 1 and "cannot write" in err
    assert not (destination / "train.pt").exists() and not (destination / "prepare.json").exists()


def test_existing_destination_is_refused_unless_overwrite(pythia, tmp_path, capsys):
    destination = tmp_path / "data"
    assert prepare(ALPACA_335, pythia, destination, "--test_size", "5", "--seed", "1")[0] == 0
    before = {name: (destination / name).read_bytes() for name in OUTPUTS}
    code, _, err = prepare(ALPACA_335, pythia, destination, "--test_size", "5", "--seed", "2", capsys=capsys)
    one_error_line(SimpleNamespace(returncode=code, stderr=err), "holds prepared data", code=1, alone=True)
    assert {name: (destination / name).read_bytes() for name in OUTPUTS} == before  # untouched
    assert prepare(ALPACA_335, pythia, destination, "--test_size", "5", "--seed", "2", "--overwrite", "true")[0] == 0
    assert (destination / "train.pt").read_bytes() != before["train.pt"]


def test_cli_subprocess_error_is_one_line(tmp_path):
    result = run_cli("prepare", "--data_file", str(tmp_path / "missing.jsonl"), "--checkpoint_dir", str(tmp_path),
                     "--destination_path", str(tmp_path / "out"))
    assert_clean_error(result, "missing.jsonl: no such file")
    assert result.returncode == 1
    assert [line for line in result.stderr.splitlines() if "error" in line] == [
        f"littune: error: {tmp_path / 'missing.jsonl'}: no such file"]
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------ official test file, validation split


def write_tsv_slice(source: Path, path: Path, start: int, rows: int) -> Path:
    """Rows start..start+rows of a TSV file (after its header), with the header."""
    with open(source, encoding="utf-8") as f:
        lines = f.readlines()
    path.write_text("".join([lines[0], *lines[1 + start : 1 + start + rows]]), encoding="utf-8")
    return path


def tsv_rows(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def test_sst2_official_test_file(pythia, tmp_path, capsys):
    """--test_file: GLUE dev as the test split, in its own order; --columns/--output_values apply to both files; the
    validation split comes out of the training file only."""
    train_file = write_tsv_slice(SST2_TRAIN, tmp_path / "train.tsv", 0, 200)
    dev_file = write_tsv_slice(SST2_DEV, tmp_path / "dev.tsv", 0, 60)
    code, out, err = prepare(train_file, pythia, tmp_path / "out", "--test_file", str(dev_file), "--columns",
                             SST2_COLUMNS, "--output_values", SST2_VALUES, capsys=capsys)
    assert code == 0, err
    assert "200 records from" in out and "60 test records from" in out
    assert "190 train, 10 val, 60 test, 0 truncated" in out and "Labels: negative, positive" in out
    train, test, meta = load(tmp_path / "out")
    val = load_val(tmp_path / "out")
    assert (len(train), len(val), len(test)) == (190, 10, 60)  # val: 5% of the 200 training records
    assert meta["counts"] == {"read": 260, "train": 190, "val": 10, "test": 60, "truncated": 0, "dropped": 0}

    names = {"1": "positive", "0": "negative"}
    assert [(r["input"], r["output"]) for r in test] == [(row["text"], names[row["label"]]) for row in tsv_rows(dev_file)]
    key = lambda r: (r["input"], r["output"])  # noqa: E731
    assert sorted(map(key, train + val)) == sorted((row["text"], names[row["label"]]) for row in tsv_rows(train_file))
    assert all(r["instruction"] == json.loads(SST2_COLUMNS)["instruction"][1:] for r in train + val + test)

    assert meta["data_file"] == str(train_file.resolve()) and meta["data_sha256"] == sha256(train_file)
    assert meta["test_file"] == str(dev_file.resolve()) and meta["test_sha256"] == sha256(dev_file)
    assert meta["labels"] == ["negative", "positive"]
    assert meta["test_split_fraction"] is None and meta["test_size"] is None

    # the same seed gives the same bytes; another seed another validation split, the same test split
    assert prepare(train_file, pythia, tmp_path / "again", "--test_file", str(dev_file), "--columns", SST2_COLUMNS,
                   "--output_values", SST2_VALUES)[0] == 0
    assert prepare(train_file, pythia, tmp_path / "other", "--test_file", str(dev_file), "--columns", SST2_COLUMNS,
                   "--output_values", SST2_VALUES, "--seed", "1")[0] == 0
    for name in ("train.pt", "val.pt", "test.pt"):
        assert sha256(tmp_path / "out" / name) == sha256(tmp_path / "again" / name)
    assert sha256(tmp_path / "out" / "val.pt") != sha256(tmp_path / "other" / "val.pt")
    assert sha256(tmp_path / "out" / "test.pt") == sha256(tmp_path / "other" / "test.pt")


def test_label_set_counts_the_test_file_too(pythia, tmp_path):
    """A label seen once in the training file and once in the test file still makes a label set."""
    records = [{"instruction": "Sort.", "input": str(i), "output": ["a", "b"][i % 2]} for i in range(10)]
    records.append({"instruction": "Sort.", "input": "10", "output": "c"})
    (tmp_path / "train.json").write_text(json.dumps(records))
    (tmp_path / "test.json").write_text(json.dumps([{"instruction": "Sort.", "input": "x", "output": "c"}]))
    assert prepare(tmp_path / "train.json", pythia, tmp_path / "alone")[0] == 0
    assert load(tmp_path / "alone")[2]["labels"] is None
    assert prepare(tmp_path / "train.json", pythia, tmp_path / "both", "--test_file", str(tmp_path / "test.json"))[0] == 0
    assert load(tmp_path / "both")[2]["labels"] == ["a", "b", "c"]


@pytest.mark.parametrize("records, flags, sizes", [
    (2, [], (1, 0, 1)),  # (train, val, test): the smallest file still has a test record
    (3, [], (1, 1, 1)),
    (20, [], (18, 1, 1)),
    (20, ["--val_size", "0"], (19, 0, 1)),
    (20, ["--val_size", "5", "--test_size", "4"], (11, 5, 4)),
    (20, ["--test_split_fraction", "0.99"], (1, 0, 19)),  # a fraction never takes the last training record
])
def test_split_sizes(records, flags, sizes, pythia, tmp_path):
    data_file = write(tmp_path / "data.json", json.dumps(GOOD[:records]))
    assert prepare(data_file, pythia, tmp_path / "out", *flags)[0] == 0
    train, test, meta = load(tmp_path / "out")
    val = load_val(tmp_path / "out")
    assert (len(train), len(val), len(test)) == sizes
    assert (meta["counts"]["train"], meta["counts"]["val"], meta["counts"]["test"]) == sizes
    assert (tmp_path / "out" / "val.pt").is_file() == (sizes[1] > 0)
    assert validation_split_name(tmp_path / "out") == ("val" if sizes[1] else "test")
    key = lambda r: r["output"]  # noqa: E731
    assert sorted(map(key, train + val + test)) == sorted(r["output"] for r in GOOD[:records])


def test_split_sizes_helper_caps_the_validation_split():
    data_file = Path("data.json")
    assert split_sizes(20_000, 0.03865, None, None, None, data_file) == (773, 500)  # 5% would be 961
    assert split_sizes(1_000, 0.03865, None, None, None, data_file) == (39, 48)
    assert split_sizes(1, 0.03865, None, None, Path("test.json"), data_file) == (0, 0)  # the one record trains
    assert split_sizes(4, 0.03865, None, None, Path("test.json"), data_file) == (0, 1)


def test_val_size_zero_removes_a_stale_val_file(pythia, tmp_path):
    data_file = write(tmp_path / "data.json", json.dumps(GOOD))
    assert prepare(data_file, pythia, tmp_path / "out")[0] == 0
    assert validation_split_name(tmp_path / "out") == "val"
    assert prepare(data_file, pythia, tmp_path / "out", "--val_size", "0", "--overwrite", "true")[0] == 0
    assert not (tmp_path / "out" / "val.pt").exists() and validation_split_name(tmp_path / "out") == "test"
    with pytest.raises(UserError, match="no val.pt: prepared without a validation split"):
        load_split(tmp_path / "out", "val")


def test_load_split(alpaca_masked, tmp_path):
    train, test, _ = load_prepared(alpaca_masked)
    assert [r["instruction"] for r in load_split(alpaca_masked, "train")] == [r["instruction"] for r in train]
    assert [r["instruction"] for r in load_split(alpaca_masked, "test")] == [r["instruction"] for r in test]
    val = load_split(alpaca_masked, "val")
    assert len(val) == 16 and torch.equal(val[0]["input_ids"], load_val(alpaca_masked)[0]["input_ids"])
    assert validation_split_name(alpaca_masked) == "val"

    with pytest.raises(UserError, match="split 'dev': unknown; choose one of train, val, test"):
        load_split(alpaca_masked, "dev")
    with pytest.raises(UserError, match="no train.pt; prepare the data first: littune prepare"):
        load_split(tmp_path, "train")
    (tmp_path / "val.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match=r"val.pt: cannot read .*; re-run littune prepare"):
        load_split(tmp_path, "val")
    torch.save({"not": "records"}, tmp_path / "test.pt")
    with pytest.raises(UserError, match="test.pt: not a list of prepared records; re-run littune prepare"):
        load_split(tmp_path, "test")
    # a folder from before val.pt: model selection falls back on the test split
    (tmp_path / "val.pt").unlink()
    assert validation_split_name(tmp_path) == "test"


def test_truncation_is_printed_and_warned_when_most_records_are_cut(pythia, tmp_path, capsys):
    code, out, err = prepare(ALPACA_335, pythia, tmp_path / "short", "--max_seq_length", "24", capsys=capsys)
    truncated = load(tmp_path / "short")[2]["counts"]["truncated"]
    assert code == 0 and truncated > 335 / 2
    assert f"{truncated} truncated to 24 tokens" in out
    warnings = [line for line in err.splitlines() if line.startswith("littune: warning:")]
    assert warnings == [f"littune: warning: {truncated} of 335 records were truncated to --max_seq_length 24 tokens, "
                        f"cutting off their responses; raise --max_seq_length"]

    code, out, err = prepare(ALPACA_335, pythia, tmp_path / "long", capsys=capsys)
    assert code == 0 and "0 truncated to 2048 tokens" in out and "warning" not in err


# ----------------------------------------------------------------------------------------- chat template style


SMOLLM2_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 in SmolLM2's vocabulary


def write_smollm2_like_gguf(path: Path) -> Path:
    """A small GGUF laid out as SmolLM2-135M-Instruct's tokenizer metadata, with its real chat template
    (tests/data/smollm2): a byte-level BPE of 1,024 tokens trained on the Alpaca records, the special tokens as
    control tokens 0, 1, 2, BOS <|im_start|> and EOS <|im_end|>. It stands in for the 98 MB file where that is absent."""
    import gguf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=SMOLLM2_SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # every byte: any text encodes
    tokenizer.train_from_iterator([json.dumps(r) for r in json.loads(ALPACA_335.read_text())], trainer)
    model = json.loads(tokenizer.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SMOLLM2_SPECIAL else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model["merges"]])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(SMOLLM2_CHAT_TEMPLATE.read_text(encoding="utf-8"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def smollm2_files(tmp_path_factory) -> tuple[Path, str]:
    """SmolLM2-135M-Instruct's tokenizer (vocabulary, merges, special tokens) and chat template, rebuilt from a GGUF
    file's metadata as tokenizer.json; returns (folder holding tokenizer.json, the template). The GGUF is the real
    one where this machine has it (see conftest.smollm2_gguf), else a small one written as SmolLM2's is laid out."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    real = smollm2_gguf()
    source = real or write_smollm2_like_gguf(tmp_path_factory.mktemp("gguf") / "smollm2-like.gguf")
    fields = gguf.GGUFReader(source).fields
    tokens = fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(merge.split(" ", 1)) for merge in fields["tokenizer.ggml.merges"].contents()]
    special = [token for token, kind in zip(tokens, fields["tokenizer.ggml.token_type"].contents()) if kind == 3]
    tokenizer = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(token, special=True) for token in special])
    folder = tmp_path_factory.mktemp("smollm2")
    tokenizer.save(str(folder / "tokenizer.json"))
    template = fields["tokenizer.chat_template"].contents()
    if real:  # the shipped copy of the template is the real file's
        assert template == SMOLLM2_CHAT_TEMPLATE.read_text(encoding="utf-8")
    return folder, template


def smollm2_checkpoint(smollm2_files, folder: Path, eos_token: str = "<|im_end|>") -> Path:
    """A SmolLM2 tokenizer folder with tokenizer_config.json as the Hub repo has it (eos_token may be changed)."""
    tokenizer_dir, template = smollm2_files
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": eos_token, "pad_token": "<|im_end|>", "unk_token": "<|endoftext|>",
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": 8192, "chat_template": template}))
    (folder / "config.json").write_text(json.dumps({"max_position_embeddings": 8192}))
    return folder


@functools.cache
def hf_tokenizer(checkpoint_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint_dir)


def transformers_prompt(checkpoint_dir: Path, instruction: str, input: str = "", system=None) -> str:
    """What transformers renders for the same conversation: the reference the chat style must equal."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": instruction + (f"\n\n{input}" if input else "")})
    return hf_tokenizer(checkpoint_dir).apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


CHAT_CASES = [("Name three primary colors.", "", None),
              ("Classify the sentiment.", "a charming and often affecting journey", None),
              ("Translate to German.", "Ünïcödé — 東京 😀", "You answer in one line.")]


def test_chat_style_renders_like_transformers(smollm2_files, tmp_path):
    folder = smollm2_checkpoint(smollm2_files, tmp_path / "smollm2")
    for instruction, input, system in CHAT_CASES:
        style = style_by_name("chat", folder, system)
        assert style.apply(instruction, input=input) == transformers_prompt(folder, instruction, input, system)
    style = style_by_name("chat", folder)
    assert style.apply("Hi.").startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert style.apply("Hi.", sys_prompt="Be brief.").startswith("<|im_start|>system\nBe brief.<|im_end|>")


@pytest.mark.parametrize("case", ["chatml, BOS is <|im_start|>, not added", "chatml with --system",
                                  "BOS added by the tokenizer"])
def test_chat_prompt_ids_equal_apply_chat_template_ids(smollm2_files, tmp_path, case):
    """prepare's prompt ids are the ids transformers' apply_chat_template(tokenize=True) gives: no special token the
    template writes is dropped. SmolLM2's BOS token is <|im_start|>, its turn marker: litgpt's Tokenizer.encode
    drops a leading BOS id where the tokenizer does not add one, which cut the prompt's first <|im_start|>."""
    records = [{"instruction": instruction, "input": input, "output": "ok"} for instruction, input, _ in CHAT_CASES]
    data_file = write(tmp_path / "records.json", json.dumps(records * 4))
    flags, system = [], None
    if case.startswith("BOS added"):  # a tokenizer that adds BOS (add_bos_token) whose template writes it too
        folder = with_chat_template(tmp_path / "neox-chat", "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] "
                                    "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] "
                                    "{% endif %}", bos_token="<|endoftext|>", add_bos_token=True)
    else:  # a folder name litgpt does not special-case: its Tokenizer does not add BOS here
        folder = smollm2_checkpoint(smollm2_files, tmp_path / "my-chat-model")
        if case.endswith("--system"):
            flags, system = ["--system", "You are terse."], "You are terse."
    assert prepare(data_file, folder, tmp_path / "out", "--prompt_style", "chat", "--test_size", "4",
                   "--val_size", "0", *flags)[0] == 0
    tokenizer = hf_tokenizer(folder)
    for record in load_all(tmp_path / "out"):
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": record["instruction"] + (
            f"\n\n{record['input']}" if record["input"] else "")})
        expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        expected = list(expected["input_ids"] if hasattr(expected, "keys") else expected)
        assert record["input_ids_no_response"].tolist() == expected, case
        assert expected[0] == tokenizer.bos_token_id  # the case this test is about: the prompt starts with BOS


def test_chat_style_template_features_match_transformers(tmp_path):
    """bos_token, tojson (no HTML escaping), loop controls, raise_exception and {% generation %} as transformers has
    them."""
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] not in ['system', 'user'] %}"
        "{{ raise_exception('unexpected role') }}{% endif %}[{{ m['role'] | upper }}] {{ m['content'] | tojson }}\n"
        "{% if loop.index > 5 %}{% break %}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{% generation %}[ASSISTANT]{% endgeneration %}{% endif %}"
    )
    folder = with_chat_template(tmp_path / "falcon", template, family="falcon", bos_token="<|endoftext|>")
    for instruction, input, system in CHAT_CASES + [("a <b> & 'c'", "", None)]:
        style = style_by_name("chat", folder, system)
        assert style.apply(instruction, input=input) == transformers_prompt(folder, instruction, input, system)


def test_stop_tokens_include_the_end_of_turn_token(smollm2_files, tmp_path):
    from litgpt import Tokenizer

    # SmolLM2 base and Qwen end text with <|endoftext|> but a chat turn with <|im_end|>
    folder = smollm2_checkpoint(smollm2_files, tmp_path / "smollm2", eos_token="<|endoftext|>")
    tokenizer = Tokenizer(folder)
    style = style_by_name("chat", folder)
    im_end = tokenizer.token_to_id("<|im_end|>")
    assert (tokenizer.eos_id, im_end) == (0, 2)
    assert style.end_of_turn() == "<|im_end|>"
    assert style.stop_tokens(tokenizer) == ([0], [2])
    # the Hub's tokenizer_config: EOS is <|im_end|> already, listed once
    instruct = smollm2_checkpoint(smollm2_files, tmp_path / "instruct")
    assert style_by_name("chat", instruct).stop_tokens(Tokenizer(instruct)) == ([2],)
    # a template whose end-of-turn text is not one token of the vocabulary adds nothing
    pythia_chatml = with_chat_template(tmp_path / "pythia", smollm2_files[1])
    assert style_by_name("chat", pythia_chatml).stop_tokens(Tokenizer(pythia_chatml)) == ([0],)


def test_prepare_chat_writes_a_style_that_round_trips(smollm2_files, tmp_path, capsys):
    """prepare --prompt_style chat on SmolLM2-Instruct: prompt_style.yaml restores the same style, and every prompt
    is token for token what transformers' rendering tokenises to."""
    from litgpt import Tokenizer

    # named as the Hub repo: litgpt adds SmolLM2-Instruct's BOS (<|im_start|>) itself, so the style strips its text
    folder = smollm2_checkpoint(smollm2_files, tmp_path / "SmolLM2-135M-Instruct")
    records = json.loads(ALPACA_335.read_text())[:30]
    data_file = write(tmp_path / "alpaca30.json", json.dumps(records))
    code, _, err = prepare(data_file, folder, tmp_path / "out", "--prompt_style", "chat", "--system",
                           "You are terse.", capsys=capsys)
    assert code == 0, err
    meta = load(tmp_path / "out")[2]
    assert meta["prompt_style"] == "chat" and meta["system"] == "You are terse."
    config = yaml.safe_load((tmp_path / "out" / "prompt_style.yaml").read_text())
    assert config["class_path"] == "littune.prompts.ChatTemplate"
    assert config["init_args"] == {"template": smollm2_files[1], "bos_token": "<|im_start|>",
                                   "eos_token": "<|im_end|>", "system": "You are terse.", "strip_bos": True}

    restored = load_style_file(tmp_path / "out")
    assert restored == style_by_name("chat", folder, "You are terse.")
    # a file written before prompt styles had their own module (class_path littune.data.ChatTemplate) still loads
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "prompt_style.yaml").write_text(yaml.safe_dump({**config, "class_path": "littune.data.ChatTemplate"}))
    assert load_style_file(legacy) == restored
    tokenizer = Tokenizer(folder)
    for record in load_all(tmp_path / "out"):
        expected = transformers_prompt(folder, record["instruction"], record["input"], "You are terse.")
        assert restored.apply(record["instruction"], input=record["input"]) == expected.removeprefix("<|im_start|>")
        assert record["input_ids_no_response"].tolist() == tokenizer.processor.encode(expected).ids
        assert record["input_ids"][-1] == tokenizer.eos_id == 2

    # save_style writes the same file again, atomically, and litgpt's own files still load
    save_style(restored, tmp_path / "copy")
    assert (tmp_path / "copy" / "prompt_style.yaml").read_text() == (tmp_path / "out" / "prompt_style.yaml").read_text()
    from litgpt.prompts import Alpaca, save_prompt_style

    save_prompt_style("alpaca", tmp_path)
    assert isinstance(load_style_file(tmp_path), Alpaca)


def test_chat_prompt_has_one_bos(smollm2_files, tmp_path):
    """Where litgpt's Tokenizer adds BOS itself, a template's leading BOS text is dropped: one BOS, not two."""
    from litgpt import Tokenizer

    # litgpt adds BOS for a folder named SmolLM2-*-Instruct; SmolLM2's BOS is <|im_start|>, the template's first text
    folder = smollm2_checkpoint(smollm2_files, tmp_path / "SmolLM2-135M-Instruct")
    tokenizer = Tokenizer(folder)
    assert tokenizer.use_bos and tokenizer.bos_id == 1
    style = style_by_name("chat", folder)
    expected = transformers_prompt(folder, "Hi.")
    assert style.apply("Hi.") == expected.removeprefix("<|im_start|>")
    ids = tokenizer.encode(style.apply("Hi.")).tolist()
    assert ids == tokenizer.processor.encode(expected).ids and ids[0] == 1 and ids[1] != 1

    # SentencePiece (Llama 2's template starts with {{ bos_token }}): "<s>" as text would be the pieces <, s, >
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                "{% else %}{{ m['content'] }} {{ eos_token }}{% endif %}{% endfor %}")
    llama = with_chat_template(tmp_path / "llama", template, family="llama", bos_token="<s>", eos_token="</s>",
                               tokenizer_class="LlamaTokenizer", add_bos_token=True)
    data_file = write(tmp_path / "data.json", json.dumps(GOOD))
    assert prepare(data_file, llama, tmp_path / "out", "--prompt_style", "chat")[0] == 0
    sp = Tokenizer(llama)
    for record in load_all(tmp_path / "out"):
        prompt = record["input_ids_no_response"].tolist()
        assert prompt[0] == sp.bos_id and sp.bos_id not in prompt[1:]
        assert sp.decode(record["input_ids_no_response"]).startswith(f"[INST] {record['instruction']}")
    assert style_by_name("chat", llama).stop_tokens(sp) == ([sp.eos_id],)  # </s> is the EOS


def test_chat_template_sources(tmp_path):
    """chat_template.jinja wins over tokenizer_config.json (as in transformers); a list of named templates gives its
    default one; a checkpoint without any asked for chat is one line."""
    folder = with_chat_template(tmp_path / "named", [{"name": "tool_use", "template": "TOOLS"},
                                                     {"name": "default", "template": "DEFAULT {{ messages[0]['content'] }}"}])
    assert style_by_name("chat", folder).apply("x") == "DEFAULT x"
    (folder / "chat_template.jinja").write_text("JINJA {{ messages[-1]['content'] }}")
    assert style_by_name("chat", folder).apply("x", input="y") == "JINJA x\n\ny"
    with pytest.raises(UserError, match="has none"):
        style_by_name("chat", checkpoint(tmp_path / "plain", "pythia"))


def test_load_style_file_errors(tmp_path):
    with pytest.raises(UserError, match="no prompt_style.yaml; prepare the data with littune prepare"):
        load_style_file(tmp_path)
    cases = {
        "class_path: [unclosed\n": "invalid YAML",
        "- a list\n": "expected 'class_path: MODULE.CLASS'",
        "class_path: os.system\n": "unknown prompt style class 'os.system'",
        "class_path: litgpt.prompts.Nope\n": "unknown prompt style class 'litgpt.prompts.Nope'",
        "class_path: littune.data.ChatTemplate\n": "needs init_args with a template string",
        "class_path: littune.data.ChatTemplate\ninit_args: {template: x, colour: red}\n": "needs init_args",
        "class_path: littune.data.ChatTemplate\ninit_args: 3\n": "init_args must be a mapping",
        "class_path: littune.data.ChatTemplate\ninit_args: {template: '{% if %}'}\n": "not a valid Jinja template",
        "class_path: litgpt.prompts.Alpaca\ninit_args: {colour: red}\n": "cannot build litgpt.prompts.Alpaca",
    }
    for text, message in cases.items():
        (tmp_path / "prompt_style.yaml").write_text(text)
        with pytest.raises(UserError, match=message) as error:
            load_style_file(tmp_path)
        assert "\n" not in str(error.value)
    (tmp_path / "prompt_style.yaml").write_text("class_path: litgpt.prompts.ChatML\ninit_args: {system_message: Hi}\n")
    assert load_style_file(tmp_path).system_message == "Hi"
