"""Prepare: an instruction file -> tokenised train.pt / test.pt for fine-tuning, as Lit-GPT's prepare_alpaca made them.

    littune prepare --data_file alpaca.json --checkpoint_dir checkpoints/EleutherAI/pythia-160m
    littune prepare --data_file sst2/train.tsv --checkpoint_dir checkpoints/EleutherAI/pythia-160m \\
        --columns '{"instruction": "=Is the sentiment of this review positive or negative?", "input": "text",
                    "output": "label"}' --output_values '{"1": "positive", "0": "negative"}'

Every record becomes `prompt = style.apply(instruction, input=input)` and `prompt + output`, tokenised with the
checkpoint's own tokenizer exactly as litgpt's `Tokenizer.encode` does it one string at a time, but in batches on
two threads. Everything is validated and built in memory first; the files are written at the very end, each
atomically, so a failed run leaves no train.pt, test.pt or prepare.json behind.
"""

import csv
import functools
import gc
import io
import json
import os
import sys
import tempfile
from array import array
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import yaml
from tqdm import tqdm

import littune
from littune.common import UserError, atomic_path, first_line, load_torch, save_json, sha256_file, write_torch

FIELDS = ("instruction", "input", "output")
REQUIRED_FIELDS = ("instruction", "output")
PREPARED_FILES = ("train.pt", "test.pt", "prompt_style.yaml", "prepare.json")
COLUMNS_EXAMPLE = '{"instruction": "=Classify the sentiment.", "input": "text", "output": "label"}'
CHUNK_SIZE = 1024  # strings per tokenizer call: big enough to amortise the call, small enough for a live progress bar


# ----------------------------------------------------------------------------------------------------- command


def prepare(
    data_file: Path,
    checkpoint_dir: Path,
    destination_path: Optional[Path] = None,
    seed: int = 42,
    test_split_fraction: float = 0.03865,
    test_size: Optional[int] = None,
    max_seq_length: Optional[int] = None,
    mask_inputs: bool = False,
    ignore_index: int = -100,
    prompt_style: str = "alpaca",
    columns: Optional[dict[str, str]] = None,
    output_values: Optional[dict[str, str]] = None,
) -> None:
    """Tokenise an instruction file with a checkpoint's tokenizer and split it into train.pt and test.pt.

    The file is a JSON list of records, JSON Lines (.jsonl, one record per line) or a table (.csv, .tsv with a header
    line). A record has `instruction`, `output` and optionally `input`, all strings. Records whose prompt fills the
    whole --max_seq_length while --mask_inputs is on have nothing to learn from and are dropped (and counted).

    Arguments:
        data_file: The instruction file: .json (a list of records), .jsonl, .csv or .tsv.
        checkpoint_dir: The model folder whose tokenizer (tokenizer.json or tokenizer.model) to use.
        destination_path: Where train.pt, test.pt, prompt_style.yaml and prepare.json go (default: data/<file stem>).
        seed: Seed of the random train/test split; the same seed and inputs give byte-identical files.
        test_split_fraction: Fraction of the records held out for testing (default 0.03865: 2,000 of Alpaca's 52K).
        test_size: Number of test records, instead of --test_split_fraction.
        max_seq_length: Truncate records to this many tokens (default: the model's block size, from model_config.yaml or config.json).
        mask_inputs: Set the labels of the prompt tokens to --ignore_index, so only the response is learned.
        ignore_index: The label value the loss ignores.
        prompt_style: A litgpt prompt style name (alpaca, flan, longform, ...) that turns instruction and input into a prompt.
        columns: Where each field comes from, as FIELD: COLUMN, or FIELD: =TEXT for the same fixed text in every record, e.g. {"instruction": "=Classify the sentiment.", "input": "text", "output": "label"}; unnamed fields come from the column of the same name.
        output_values: Replace whole output values, e.g. {"1": "positive", "0": "negative"}; an output not listed is an error.
    """
    data_file, checkpoint_dir = Path(data_file), Path(checkpoint_dir)
    destination_path = Path(destination_path) if destination_path is not None else Path("data") / data_file.stem
    sources = parse_columns(columns)
    style = load_style(prompt_style)
    check_split_arguments(test_split_fraction, test_size)

    rows, lines = read_rows(data_file)
    instructions, inputs, outputs = extract_fields(rows, lines, sources, output_values, data_file)
    del rows
    n_read = len(instructions)
    count_test(n_read, test_split_fraction, test_size, data_file)  # fail before tokenising; checked again below

    tokenizer = load_tokenizer(checkpoint_dir)
    identity = tokenizer_identity_of(tokenizer, checkpoint_dir)
    max_seq_length = max_seq_length if max_seq_length is not None else model_block_size(checkpoint_dir)
    if max_seq_length < 1:
        raise UserError(f"--max_seq_length must be >= 1, got {max_seq_length}")

    prompt_ids, full_ids, truncated = tokenize(tokenizer, style, instructions, inputs, outputs, max_seq_length)
    # Labels copy the full ids with the first `masked` positions set to ignore_index (Lit-GPT's rule); a record whose
    # labels would all be ignored (its prompt filled the window) has nothing to learn and is dropped
    masked = [len(ids) if mask_inputs else 0 for ids in prompt_ids]
    kept = [i for i in range(n_read) if not all(t == ignore_index for t in full_ids[i][masked[i]:])]
    if not kept:
        raise UserError(
            f"{data_file}: all {n_read} records dropped: with --mask_inputs the prompt fills all "
            f"--max_seq_length {max_seq_length} tokens, leaving no response to learn; raise --max_seq_length"
        )

    n_test = count_test(len(kept), test_split_fraction, test_size, data_file)
    permutation = torch.randperm(len(kept), generator=torch.Generator().manual_seed(seed)).tolist()
    test_order = [kept[j] for j in permutation[:n_test]]
    train_order = [kept[j] for j in permutation[n_test:]]

    texts = (instructions, inputs, outputs)
    train = to_records(train_order, texts, full_ids, prompt_ids, masked, ignore_index)
    test = to_records(test_order, texts, full_ids, prompt_ids, masked, ignore_index)
    counts = {"read": n_read, "train": len(train), "test": len(test), "truncated": truncated,
              "dropped": n_read - len(kept)}
    meta = {
        "littune_version": littune.__version__,
        "data_file": str(data_file.resolve()),
        "data_sha256": sha256_file(data_file),
        "checkpoint_dir": str(checkpoint_dir.resolve()),
        "columns": columns,
        "output_values": output_values,
        "seed": seed,
        "test_split_fraction": test_split_fraction,
        "test_size": test_size,
        "counts": counts,
        "max_seq_length": max_seq_length,
        "longest_record": max(len(full_ids[i]) for i in kept),
        "mask_inputs": mask_inputs,
        "ignore_index": ignore_index,
        "prompt_style": prompt_style,
        "tokenizer": identity,
        "vocab_size": identity["vocab_size"],
    }
    write_prepared(destination_path, train, test, style, meta)

    print(
        f"Read {n_read:,} records from {data_file}: {counts['train']:,} train, {counts['test']:,} test, "
        f"{truncated:,} truncated to {max_seq_length} tokens, {counts['dropped']:,} dropped (nothing left to learn)"
    )
    print(f"Longest record: {meta['longest_record']} tokens. Wrote {', '.join(PREPARED_FILES)} to {destination_path}")


# --------------------------------------------------------------------------------------------- public helpers


def tokenizer_identity(checkpoint_dir: Path) -> dict:
    """What makes token ids mean the same thing: compare it to prepare.json's "tokenizer" before training on the data.

    Keys: backend (huggingface or sentencepiece), file (the one litgpt loads), sha256 (of that file), vocab_size (ids
    the tokenizer can produce, added tokens included), bos_id, eos_id, use_bos.
    """
    checkpoint_dir = Path(checkpoint_dir)
    return tokenizer_identity_of(load_tokenizer(checkpoint_dir), checkpoint_dir)


def load_prepared(data_dir: Path) -> tuple[list[dict], list[dict], dict]:
    """(train records, test records, prepare.json) of a folder written by `littune prepare`.

    A record: instruction, input, output (str); input_ids, input_ids_no_response, labels (1-D int64 tensors). The
    tensors of one file are views into one storage (fast to save and load): clone a record before saving it alone.
    """
    data_dir = Path(data_dir)
    for name in PREPARED_FILES:
        if not (data_dir / name).is_file():
            raise UserError(
                f"{data_dir}: no {name}; prepare the data first: "
                f"littune prepare --data_file FILE --checkpoint_dir DIR --destination_path {data_dir}"
            )
    meta_path = data_dir / "prepare.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{meta_path}: not valid JSON ({e}); re-run littune prepare") from e
    train = load_torch(data_dir / "train.pt", "prepared training data")
    test = load_torch(data_dir / "test.pt", "prepared test data")
    for name, records in (("train.pt", train), ("test.pt", test)):
        if not (isinstance(records, list) and records and isinstance(records[0], dict)
                and {"input_ids", "input_ids_no_response", "labels"} <= records[0].keys()):
            raise UserError(f"{data_dir / name}: not a list of prepared records; re-run littune prepare")
    return train, test, meta


# ----------------------------------------------------------------------------------------------- arguments


def parse_columns(columns: Optional[dict[str, str]]) -> dict[str, tuple[bool, str]]:
    """--columns as field -> (is_fixed_text, column name or the text); unnamed fields read their own column."""
    sources = {field: (False, field) for field in FIELDS}
    for field, source in (columns or {}).items():
        if field not in FIELDS:
            raise UserError(
                f"--columns: {field!r} is not a field; the keys are {', '.join(FIELDS)} and each value a column "
                f"name or =fixed text, e.g. {COLUMNS_EXAMPLE}"
            )
        if not isinstance(source, str) or not source:
            raise UserError(f"--columns: the source of {field!r} must be a column name or =fixed text, got {source!r}")
        sources[field] = (True, source[1:]) if source.startswith("=") else (False, source)
    return sources


def load_style(name: str):
    from litgpt.prompts import PromptStyle, prompt_styles

    if name not in prompt_styles:
        raise UserError(f"--prompt_style {name!r} is not a litgpt prompt style; choose one of {', '.join(prompt_styles)}")
    return PromptStyle.from_name(name)


def check_split_arguments(test_split_fraction: float, test_size: Optional[int]) -> None:
    if test_size is None and not 0 < test_split_fraction < 1:
        raise UserError(f"--test_split_fraction must be between 0 and 1 (exclusive), got {test_split_fraction}")
    if test_size is not None and test_size < 1:
        raise UserError(f"--test_size must be >= 1, got {test_size}")


def count_test(n: int, test_split_fraction: float, test_size: Optional[int], data_file: Path) -> int:
    """Test records out of n; both splits must hold at least one record."""
    n_test = test_size if test_size is not None else round(n * test_split_fraction)
    asked = f"--test_size {test_size}" if test_size is not None else f"--test_split_fraction {test_split_fraction}"
    if n_test < 1:
        raise UserError(f"{data_file}: {asked} of {n} usable records leaves the test split empty; raise it or use --test_size")
    if n_test >= n:
        raise UserError(f"{data_file}: {asked} holds out {n_test} of {n} usable records, leaving none to train on; lower it")
    return n_test


# ----------------------------------------------------------------------------------------------- tokenizer


def load_tokenizer(checkpoint_dir: Path):
    """litgpt's Tokenizer of the folder; a UserError when it has none or it cannot end a response (no EOS)."""
    from litgpt import Tokenizer

    if not checkpoint_dir.is_dir():
        raise UserError(f"{checkpoint_dir}: no such checkpoint folder (littune download --repo_id ORG/NAME --tokenizer_only true)")
    if not any((checkpoint_dir / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise UserError(
            f"{checkpoint_dir}: no tokenizer.json or tokenizer.model; get them with "
            f"littune download --repo_id ORG/NAME --tokenizer_only true"
        )
    try:
        tokenizer = Tokenizer(checkpoint_dir)
    except Exception as e:  # a corrupt tokenizer file, or a special token the vocabulary lacks
        raise UserError(f"{checkpoint_dir}: cannot load the tokenizer ({type(e).__name__}: {first_line(e)})") from e
    if tokenizer.eos_id is None:
        raise UserError(
            f"{checkpoint_dir}: the tokenizer has no end-of-sequence token (eos_token in tokenizer_config.json or "
            f"eos_token_id in generation_config.json); responses could not be ended"
        )
    if tokenizer.use_bos and tokenizer.bos_id is None:
        raise UserError(f"{checkpoint_dir}: tokenizer_config.json asks for a BOS token but defines none (bos_token)")
    return tokenizer


def tokenizer_identity_of(tokenizer, checkpoint_dir: Path) -> dict:
    # litgpt loads tokenizer.json when both files are there
    path = checkpoint_dir / ("tokenizer.json" if tokenizer.backend == "huggingface" else "tokenizer.model")
    if tokenizer.backend == "huggingface":
        vocab_size = tokenizer.processor.get_vocab_size(with_added_tokens=True)
    else:
        vocab_size = tokenizer.processor.vocab_size()
    return {
        "backend": tokenizer.backend,
        "file": path.name,
        "sha256": sha256_file(path),
        "vocab_size": vocab_size,
        "bos_id": tokenizer.bos_id,
        "eos_id": tokenizer.eos_id,
        "use_bos": bool(tokenizer.use_bos),
    }


def model_block_size(checkpoint_dir: Path) -> int:
    """The default --max_seq_length: block_size of model_config.yaml, else max_position_embeddings of config.json."""
    from littune.checkpoints import load_hf_config

    yaml_path = checkpoint_dir / "model_config.yaml"
    if yaml_path.is_file():
        try:
            config = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise UserError(f"{yaml_path}: invalid YAML ({first_line(e)})") from e
        if isinstance(config, dict) and isinstance(config.get("block_size"), int):
            return config["block_size"]
    hf = load_hf_config(checkpoint_dir)
    if isinstance(hf, dict) and isinstance(hf.get("max_position_embeddings"), int):
        return hf["max_position_embeddings"]
    raise UserError(
        f"{checkpoint_dir}: no block_size in model_config.yaml nor max_position_embeddings in config.json; "
        f"pass --max_seq_length"
    )


def without_gc(fn):
    """Run fn with CPython's cyclic garbage collector paused.

    Tokenising and building the records makes ~10 container objects per record, none in a reference cycle; the
    collector would rescan all of them again and again as they pile up (a third of the build and save time).
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        was_enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was_enabled:
                gc.enable()

    return wrapper


@without_gc
def tokenize(tokenizer, style, instructions: list[str], inputs: list[str], outputs: list[str], max_seq_length: int):
    """(prompt ids, full ids, how many were truncated) of every record, as Lit-GPT's prepare_alpaca made them.

    full = encode(prompt + output) + [EOS]. The prompt and the full text are tokenised separately, not prompt and
    response: BPE can merge across the seam, so the response's tokens alone may differ. Truncation keeps the first
    max_seq_length tokens (a cut record loses its EOS: its response does not end there).
    """
    prompts = [style.apply(instruction, input=input) for instruction, input in zip(instructions, inputs)]
    full_texts = [prompt + output for prompt, output in zip(prompts, outputs)]
    token_ids = encode_batch(tokenizer, prompts + full_texts)
    n = len(prompts)
    prompt_ids = [litgpt_special_tokens(ids, tokenizer) for ids in token_ids[:n]]
    full_ids = [litgpt_special_tokens(ids, tokenizer) + [tokenizer.eos_id] for ids in token_ids[n:]]
    truncated = sum(len(ids) > max_seq_length for ids in full_ids)
    prompt_ids = [ids if len(ids) <= max_seq_length else ids[:max_seq_length] for ids in prompt_ids]
    full_ids = [ids if len(ids) <= max_seq_length else ids[:max_seq_length] for ids in full_ids]
    return prompt_ids, full_ids, truncated


def encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """The processor's raw ids of every text, what litgpt's `Tokenizer.encode` starts from, in ordered batches.

    Two threads at most: the Hugging Face tokenizer releases the GIL inside a batch, so two Python threads run two
    batches at once whatever TOKENIZERS_PARALLELISM says; SentencePiece holds the GIL but threads a batch itself.
    """
    threads = min(2, os.cpu_count() or 1)
    chunks = [texts[i : i + CHUNK_SIZE] for i in range(0, len(texts), CHUNK_SIZE)]
    processor = tokenizer.processor
    ids: list[list[int]] = []
    with tqdm(total=len(texts), desc="Tokenizing", unit=" texts", disable=None, file=sys.stderr) as progress:
        for chunk_ids in _encode_chunks(processor, tokenizer.backend, chunks, threads):
            ids.extend(chunk_ids)
            progress.update(len(chunk_ids))
    return ids


def _encode_chunks(processor, backend: str, chunks: list[list[str]], threads: int) -> Iterator[list[list[int]]]:
    if backend == "huggingface":
        # as `processor.encode(text)` does (special tokens added by the post-processor); no offsets needed
        encode = getattr(processor, "encode_batch_fast", processor.encode_batch)
        with ThreadPoolExecutor(threads) as pool:
            yield from pool.map(lambda chunk: [encoding.ids for encoding in encode(chunk)], chunks)
    else:
        for chunk in chunks:
            yield processor.encode(chunk, num_threads=threads)


def litgpt_special_tokens(ids: list[int], tokenizer) -> list[int]:
    """litgpt `Tokenizer.encode(text)`'s rules (bos=None, eos=False) applied to the processor's raw ids.

    BOS first if the tokenizer uses one, else a leading BOS the processor added is removed; a trailing EOS the
    processor added is removed (prepare appends its own to the full text).
    """
    if tokenizer.use_bos:
        if not ids or ids[0] != tokenizer.bos_id:
            ids = [tokenizer.bos_id] + ids
    elif ids and ids[0] == tokenizer.bos_id:
        ids = ids[1:]
    if ids and ids[-1] == tokenizer.eos_id:
        ids = ids[:-1]
    return ids


# ------------------------------------------------------------------------------------------------- reading


def read_rows(data_file: Path) -> tuple[list, Optional[list[int]]]:
    """The file's records, and the line each starts on (None for a JSON list: its records are named by index)."""
    if not data_file.is_file():
        raise UserError(f"{data_file}: no such file")
    try:
        text = data_file.read_text(encoding="utf-8-sig")  # -sig: tolerate the BOM that spreadsheet exports add
    except UnicodeDecodeError as e:
        raise UserError(f"{data_file}: not UTF-8 text (byte {e.start}); save it as UTF-8") from e
    if not text.strip():
        raise UserError(f"{data_file}: the file is empty; it needs instruction records")
    suffix = data_file.suffix.lower()
    if suffix in (".csv", ".tsv"):
        rows, lines = _read_table(text, "\t" if suffix == ".tsv" else ",", data_file)
    elif suffix == ".jsonl":
        rows, lines = _read_json_lines(text, data_file)
    else:
        rows, lines = _read_json_list(text, data_file), None
    if not rows:
        raise UserError(f"{data_file}: no records in the file")
    return rows, lines


def _read_json_list(text: str, data_file: Path) -> list:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (one record per line? name the file .jsonl)" if e.msg == "Extra data" else ""
        raise UserError(f"{data_file}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}{hint}") from e
    if not isinstance(rows, list):
        raise UserError(
            f"{data_file}: the top level is {_json_type(rows)}, expected a list of records "
            f'[{{"instruction": ..., "input": ..., "output": ...}}, ...]'
        )
    return rows


def _read_json_lines(text: str, data_file: Path) -> tuple[list, list[int]]:
    rows, lines = [], []
    # split on "\n" only: str.splitlines() would also break at U+2028 and friends, which JSON strings may hold raw
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise UserError(
                f"{data_file}: line {line_number} (record {len(rows)}) is not valid JSON: {e.msg} at column {e.colno}"
            ) from e
        lines.append(line_number)
    return rows, lines


def _read_table(text: str, delimiter: str, data_file: Path) -> tuple[list, list[int]]:
    # newline="": quoted fields may hold line breaks; standard CSV quoting for .tsv too
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
        rows, lines = [], []
        start = reader.line_num + 1
        for values in reader:
            if len(values) != len(header):
                if not any(value.strip() for value in values):
                    start = reader.line_num + 1
                    continue  # blank line
                raise UserError(
                    f"{data_file}: record {len(rows)} (line {start}) has {len(values)} fields, the header has "
                    f"{len(header)} ({', '.join(header)}); check the delimiter and quoting"
                )
            rows.append(dict(zip(header, values)))
            lines.append(start)
            start = reader.line_num + 1
    except csv.Error as e:
        raise UserError(f"{data_file}: line {reader.line_num}: {e}") from e
    return rows, lines


def extract_fields(
    rows: list, lines: Optional[list[int]], sources: dict, output_values: Optional[dict[str, str]], data_file: Path
) -> tuple[list[str], list[str], list[str]]:
    """Instructions, inputs and outputs of every record, each checked to be a string (input may be absent)."""
    if lines is not None and rows:  # a table: every row has the header's columns, so check the names once
        for field, (fixed, column) in sources.items():
            if not fixed and column not in rows[0] and (field in REQUIRED_FIELDS or column != field):
                raise UserError(
                    f"{data_file}: no column {column!r} for {field!r} (the header has {', '.join(rows[0])}); "
                    f"map columns with --columns, e.g. '{COLUMNS_EXAMPLE}'"
                )
    fields: dict[str, list[str]] = {field: [] for field in FIELDS}
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"{_where(data_file, index, lines)} is {_json_type(row)}, expected an object with "
                            f"instruction, input and output")
        for field, (fixed, column) in sources.items():
            if fixed:
                fields[field].append(column)
                continue
            value = row.get(column)
            if value is None:
                if field in REQUIRED_FIELDS:
                    named = repr(field) if column == field else f"{column!r} (--columns {field})"
                    raise UserError(f"{_where(data_file, index, lines)} has no {named}; every record needs "
                                    f"instruction and output (map other names with --columns)")
                value = ""
            elif not isinstance(value, str):
                raise UserError(f"{_where(data_file, index, lines)}: field {column!r} is {_json_type(value)} "
                                f"({json.dumps(value)[:40]}), expected a string")
            fields[field].append(value)
    if output_values is not None:
        for index, output in enumerate(fields["output"]):
            if output not in output_values:
                raise UserError(f"{_where(data_file, index, lines)}: output {output!r} is not in --output_values "
                                f"({', '.join(map(repr, output_values))})")
        fields["output"] = [output_values[output] for output in fields["output"]]
    return fields["instruction"], fields["input"], fields["output"]


def _where(data_file: Path, index: int, lines: Optional[list[int]]) -> str:
    return f"{data_file}: record {index}" + (f" (line {lines[index]})" if lines is not None else "")


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# ------------------------------------------------------------------------------------------------- writing


@without_gc
def to_records(
    order: list[int], texts: tuple, full_ids: list, prompt_ids: list, masked: list[int], ignore_index: int
) -> list[dict]:
    """The records in `order`, their token tensors views into one int64 buffer.

    One storage per file instead of three per record: torch.save and torch.load cost per storage, and the file holds
    only this split's tokens, so sharing loses nothing.
    """
    instructions, inputs, outputs = texts
    flat, sizes = array("q"), []
    for i in order:
        full, prompt, n_masked = full_ids[i], prompt_ids[i], masked[i]
        flat.extend(full)
        flat.extend([ignore_index] * n_masked)  # labels: the prompt positions masked out (Lit-GPT's rule)
        flat.extend(full[n_masked:])
        flat.extend(prompt)
        sizes += (len(full), len(full), len(prompt))
    buffer = torch.frombuffer(flat, dtype=torch.int64).clone()  # own its memory, not the array's
    pieces = iter(buffer.split(sizes))
    return [
        {"instruction": instructions[i], "input": inputs[i], "output": outputs[i],
         "input_ids": next(pieces), "labels": next(pieces), "input_ids_no_response": next(pieces)}
        for i in order
    ]


def write_prepared(destination: Path, train: list, test: list, style, meta: dict) -> None:
    """All four files, each atomically; if one cannot be written, the ones this run wrote are removed again."""
    from litgpt.prompts import save_prompt_style

    def write_style(tmp: Path) -> None:  # litgpt writes prompt_style.yaml into a folder; give it a private one
        with tempfile.TemporaryDirectory(dir=tmp.parent) as folder:
            save_prompt_style(style, Path(folder))
            os.replace(Path(folder) / "prompt_style.yaml", tmp)

    writers = {
        "train.pt": lambda tmp: without_gc(write_torch)(train, tmp),
        "test.pt": lambda tmp: without_gc(write_torch)(test, tmp),
        "prompt_style.yaml": write_style,
    }
    written = []
    try:
        for name, write in writers.items():
            with atomic_path(destination / name) as tmp:
                write(tmp)
            written.append(destination / name)
        save_json(meta, destination / "prepare.json")  # last: its presence says the other three are complete
    except BaseException as e:
        for path in written:
            path.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise UserError(f"{destination}: cannot write the prepared data ({e.strerror or e}: {e.filename or ''})") from e
        raise

