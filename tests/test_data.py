"""`littune prepare`: real instruction files and real tokenizers through the CLI, checked token for token."""

import csv
import functools
import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ALPACA_335, SST2_TRAIN, assert_clean_error, copy_tokenizer, run_cli
from littune.cli import main
from littune.common import UserError
from littune.data import load_prepared, tokenizer_identity

OUTPUTS = ("train.pt", "test.pt", "prompt_style.yaml", "prepare.json")
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
    counts = meta["counts"]
    assert counts == {"read": 335, "train": len(train), "test": len(test), "truncated": 0, "dropped": 0}
    assert len(test) == round(335 * 0.03865) == 13
    assert len(train) + len(test) == 335
    for record in train + test:
        assert set(record) == {"instruction", "input", "output", "input_ids", "input_ids_no_response", "labels"}
        assert all(isinstance(record[k], str) for k in ("instruction", "input", "output"))
        assert all(record[k].dtype == torch.int64 and record[k].ndim == 1
                   for k in ("input_ids", "input_ids_no_response", "labels"))
    # every source record is in exactly one split
    source = json.loads(ALPACA_335.read_text())
    key = lambda r: (r["instruction"], r["input"], r["output"])  # noqa: E731
    assert sorted(map(key, train + test)) == sorted(map(key, source))

    assert meta["data_sha256"] == hashlib.sha256(ALPACA_335.read_bytes()).hexdigest()
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
    train, test, meta = load(alpaca_masked if masked else alpaca_unmasked)
    eos = meta["tokenizer"]["eos_id"]
    for record in train + test:
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
    """Batched, threaded tokenisation gives what litgpt's Tokenizer.encode gives one record at a time."""
    folder = checkpoint(tmp_path / family, family, block_size_file)
    records = json.loads(ALPACA_335.read_text())
    # edge cases of the BOS/EOS rules: a text that itself ends in the EOS token, unicode, an empty output
    records[0] = {**records[0], "output": records[0]["output"] + "<|endoftext|>"}
    records[1] = {**records[1], "output": "Ünïcödé — 東京 😀 \u2028 done"}
    data_file = tmp_path / "alpaca.json"
    data_file.write_text(json.dumps(records))
    assert prepare(data_file, folder, tmp_path / "out", "--test_size", "35")[0] == 0
    train, test, meta = load(tmp_path / "out")
    assert meta["tokenizer"]["backend"] == ("sentencepiece" if family == "llama" else "huggingface")
    for record in train + test:
        prompt, full = reference_tokens(folder, record)
        assert torch.equal(record["input_ids_no_response"], prompt), record["instruction"]
        assert torch.equal(record["input_ids"], full), record["instruction"]


def test_same_seed_same_bytes_other_seed_other_split(pythia, tmp_path):
    for name, seed in [("a", "7"), ("b", "7"), ("c", "8")]:
        assert prepare(ALPACA_335, pythia, tmp_path / name, "--seed", seed)[0] == 0
    for file in ("train.pt", "test.pt"):
        assert sha256(tmp_path / "a" / file) == sha256(tmp_path / "b" / file)
        assert sha256(tmp_path / "a" / file) != sha256(tmp_path / "c" / file)
    tests = [{r["instruction"] for r in load(tmp_path / name)[1]} for name in "ac"]
    assert len(tests[0]) == len(tests[1]) == 13 and tests[0] != tests[1]


def test_truncation_is_counted_and_keeps_the_window(pythia, tmp_path):
    max_len = 64
    assert prepare(ALPACA_335, pythia, tmp_path / "out", "--max_seq_length", str(max_len))[0] == 0
    train, test, meta = load(tmp_path / "out")
    long = 0
    for record in train + test:
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
    train, test, meta = load(tmp_path / "masked")
    assert meta["counts"] == {"read": 40, "train": 35, "test": 4, "truncated": meta["counts"]["truncated"],
                              "dropped": 1}
    assert "word word" not in {r["instruction"][:9] for r in train + test}
    assert all((r["labels"] != -100).any() for r in train + test)

    # unmasked, the same record still teaches something: truncated, not dropped
    assert prepare(data_file, pythia, tmp_path / "unmasked", "--max_seq_length", "150", "--test_size", "4")[0] == 0
    assert load(tmp_path / "unmasked")[2]["counts"]["dropped"] == 0


def test_sst2_tsv_with_columns_and_output_values(pythia, tmp_path, capsys):
    data_file = write_sst2_subset(tmp_path / "sst2.tsv", rows=300)
    code, out, _ = prepare(data_file, pythia, tmp_path / "out", "--columns", SST2_COLUMNS,
                           "--output_values", SST2_VALUES, "--test_split_fraction", "0.1", capsys=capsys)
    assert code == 0 and "300 records" in out and str(tmp_path / "out") in out
    train, test, meta = load(tmp_path / "out")
    assert len(test) == 30 and len(train) == 270
    with open(data_file, encoding="utf-8", newline="") as f:
        rows = {row["text"]: row["label"] for row in csv.DictReader(f, delimiter="\t")}
    for record in train + test:
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
        train, test, _ = load(tmp_path / data_file.suffix[1:])
        key = lambda r: (r["instruction"], r["input"], r["output"])  # noqa: E731
        assert sorted(map(key, train + test)) == sorted(map(key, records))


def test_default_destination_and_block_size_from_model_config(tmp_path, monkeypatch):
    folder = checkpoint(tmp_path / "falcon", "falcon", "model_config.yaml", block_size=96)
    monkeypatch.chdir(tmp_path)
    assert main(["prepare", "--data_file", str(ALPACA_335), "--checkpoint_dir", str(folder)]) == 0
    train, test, meta = load(tmp_path / "data" / ALPACA_335.stem)
    assert meta["max_seq_length"] == 96
    assert max(len(r["input_ids"]) for r in train + test) == 96


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
    no_eos = tmp / "no_eos"  # the bare GPT-NeoX file: no tokenizer_config.json or generation_config.json
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
        "test split empty": (good, pythia, ["--test_split_fraction", "0.01"], ["good.json", "test split empty"]),
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
    }


BAD_CASES = [
    "missing file", "empty file", "invalid json", "top level not a list", "record not an object", "no output",
    "no instruction", "non-string field", "invalid jsonl line", "csv row with missing field", "test split empty",
    "test split as large as data", "checkpoint without tokenizer", "tokenizer without eos", "no block size",
    "bad columns key", "column not in header", "output not in output_values", "unknown prompt style",
    "everything dropped",
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
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("littune: error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"
    assert not any((destination / name).exists() for name in OUTPUTS)


def test_failed_write_leaves_nothing_behind(pythia, tmp_path, capsys):
    destination = tmp_path / "out"
    (destination / "test.pt").mkdir(parents=True)  # test.pt cannot be written: a folder is in the way
    code, _, err = prepare(ALPACA_335, pythia, destination, capsys=capsys)
    assert code == 1 and "cannot write" in err
    assert not (destination / "train.pt").exists() and not (destination / "prepare.json").exists()


def test_cli_subprocess_error_is_one_line(tmp_path):
    result = run_cli("prepare", "--data_file", str(tmp_path / "missing.jsonl"), "--checkpoint_dir", str(tmp_path),
                     "--destination_path", str(tmp_path / "out"))
    assert_clean_error(result, "missing.jsonl: no such file")
    assert result.returncode == 1
    assert [line for line in result.stderr.splitlines() if "error" in line] == [
        f"littune: error: {tmp_path / 'missing.jsonl'}: no such file"]
    assert not (tmp_path / "out").exists()
