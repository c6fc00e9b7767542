"""Prepare: instruction files -> tokenised train.pt / val.pt / test.pt for fine-tuning and evaluation.

    littune prepare --data_file alpaca.json --checkpoint_dir checkpoints/EleutherAI/pythia-160m
    littune prepare --data_file sst2/train.tsv --test_file sst2/dev.tsv \\
        --checkpoint_dir checkpoints/EleutherAI/pythia-160m \\
        --columns '{"instruction": "=Is the sentiment of this review positive or negative?", "input": "text",
                    "output": "label"}' --output_values '{"1": "positive", "0": "negative"}'

Every record becomes `prompt = style.apply(instruction, input=input)` and `prompt + output`, tokenised with the
checkpoint's own tokenizer by `littune.prepared.encode_batch` (the text's own tokens, special-token text included,
BOS first where the tokenizer uses one: transformers' `apply_chat_template` ids for a chat prompt), in batches on
two threads. The test split is an official test file (--test_file) or a seeded random hold-out; the validation split
(model selection, early stopping) is always held out of the training file, so choosing a model never sees the test
split. Everything is validated and built in memory first; the files are written at the very end, each atomically, so
a failed run leaves no train.pt, val.pt, test.pt or prepare.json behind.

The prompt style is a litgpt style (alpaca, ...) or `chat`: the model's own chat template (tokenizer_config.json's
`chat_template`), rendered as transformers' `apply_chat_template` renders it. Such a style carries its template, so it
is stored with `save_style` and read back with `load_style_file` (litgpt's `load_prompt_style` calls `cls()`).
"""

import csv
import functools
import gc
import io
import json
import sys
from array import array
from pathlib import Path
from typing import Annotated, Optional

import torch
import yaml

import littune
from littune.common import (Check, UserError, atomic_path, checked, first_line, json_type, replace_outputs, save_json,
                            sha256_file, write_torch)
from littune.label_sets import candidate_sets, is_multi_label, set_texts
from littune.metrics import detect_labels
from littune.prepared import encode_batch, load_tokenizer, tokenizer_identity_of, with_eos
from littune.prompts import (STYLE_FILE, check_style_name, default_style_name, read_tokenizer_config, style_by_name,
                             style_yaml)
from littune.splits import check_split_arguments, kept_records, split_orders, split_sizes  # noqa: F401 (split_sizes: tests)

FIELDS = ("instruction", "input", "output")
REQUIRED_FIELDS = ("instruction", "output")
COLUMNS_EXAMPLE = '{"instruction": "=Classify the sentiment.", "input": "text", "output": "label"}'


# ----------------------------------------------------------------------------------------------------- command


@checked
def prepare(
    data_file: Path,
    checkpoint_dir: Path,
    destination_path: Optional[Path] = None,
    test_file: Optional[Path] = None,
    seed: int = 42,
    test_split_fraction: Annotated[float, Check(gt=0, lt=1)] = 0.03865,
    test_size: Optional[Annotated[int, Check(ge=1)]] = None,
    val_size: Optional[Annotated[int, Check(ge=0)]] = None,
    max_seq_length: Optional[Annotated[int, Check(ge=1)]] = None,
    mask_inputs: Optional[bool] = None,
    ignore_index: int = -100,
    prompt_style: Optional[str] = None,
    system: Optional[str] = None,
    columns: Optional[dict[str, str]] = None,
    output_values: Optional[dict[str, str]] = None,
    label_separator: Optional[str] = None,
    none_label: Optional[str] = None,
    overwrite: bool = False,
) -> None:
    """Tokenise instruction files with a checkpoint's tokenizer into train.pt, val.pt and test.pt.

    A file is a JSON list of records, JSON Lines (.jsonl, one record per line) or a table (.csv, .tsv with a header
    line). A record has `instruction`, `output` and optionally `input`, all strings. Records whose prompt fills the
    whole --max_seq_length while --mask_inputs is on have nothing to learn from and are dropped (and counted).

    Arguments:
        data_file: The instruction file: .json (a list of records), .jsonl, .csv or .tsv.
        checkpoint_dir: The model folder whose tokenizer (tokenizer.json or tokenizer.model) to use.
        destination_path: Where train.pt, val.pt, test.pt, prompt_style.yaml and prepare.json go (default: data/<file stem>).
        test_file: An official test split (e.g. GLUE dev) in the same format as --data_file, used as test.pt instead of a random hold-out; --columns and --output_values apply to it too.
        seed: Seed of the random splits; the same seed and inputs give byte-identical files.
        test_split_fraction: Without --test_file: the fraction of the records held out for testing, at least one (default 0.03865: 2,000 of Alpaca's 52K).
        test_size: Without --test_file: the number of test records, instead of --test_split_fraction.
        val_size: Training records held out as val.pt for model selection (default: 5% of them, at most 500, at least 1, none if that would leave no training record); 0: no validation split.
        max_seq_length: Truncate records to this many tokens (default: the model's block size, from model_config.yaml or config.json).
        mask_inputs: Set the labels of the prompt tokens to --ignore_index, so only the response is learned. Default: true when the outputs form a label set (a classification task: learn the answer, not the question; SmolLM2-135M, 2,000 SST-2 sentences, one epoch: dev accuracy 0.866 masked vs 0.858 unmasked, and 755 s vs 910 s of fine-tuning), false for open-ended instructions (as Lit-GPT).
        ignore_index: The label value the loss ignores.
        prompt_style: How instruction and input become a prompt: chat (the model's own chat template from tokenizer_config.json), or a litgpt prompt style name (alpaca, flan, longform, ...). Default: chat where the model has a chat template, else alpaca.
        system: With --prompt_style chat: a system message before every prompt.
        columns: Where each field comes from, as FIELD: COLUMN, or FIELD: =TEXT for the same fixed text in every record, e.g. {"instruction": "=Classify the sentiment.", "input": "text", "output": "label"}; unnamed fields come from the column of the same name.
        output_values: Replace whole output values, e.g. {"1": "positive", "0": "negative"}; an output not listed is an error.
        label_separator: A multi-label task whose output column lists each record's labels as text split at this, e.g. "," (a JSON array as output needs none); the answer learned is the set, sorted by name, joined by ", ".
        none_label: In a multi-label task: the answer of a record without any label, e.g. none (LexGLUE's "none" column).
        overwrite: Replace the prepared data already in --destination_path.
    """
    data_file, checkpoint_dir = Path(data_file), Path(checkpoint_dir)
    test_file = Path(test_file) if test_file is not None else None
    destination_path = Path(destination_path) if destination_path is not None else Path("data") / data_file.stem
    sources = parse_columns(columns)
    tokenizer_config = read_tokenizer_config(checkpoint_dir)  # read once: the default style and the chat style's
    prompt_style = prompt_style or default_style_name(checkpoint_dir, tokenizer_config)
    check_style_name(prompt_style, system)
    check_split_arguments(test_size, test_file)
    existing = [destination_path / name for name in ("train.pt", "val.pt", "test.pt", STYLE_FILE, "prepare.json")]
    replace_outputs(destination_path, [p for p in existing if p.exists()], overwrite, "prepared data", remove=False)

    (instructions, inputs, outputs), n_train_read, n_test_read = read_sources(data_file, test_file, sources,
                                                                              output_values)
    n_read = n_train_read + n_test_read
    label_sets = None
    if is_multi_label(outputs, label_separator):
        outputs, label_sets = set_texts(outputs, label_separator, none_label, lambda i: record_place(
            i, n_train_read, data_file, test_file))
    elif none_label is not None:
        raise UserError("--none_label names the empty set of a multi-label task; these outputs are single texts (give "
                        "--label_separator, or outputs as JSON lists)")
    if mask_inputs is None:
        mask_inputs = label_sets is not None or detect_labels(outputs) is not None
    # fail before tokenising; checked again on the records that survive
    split_sizes(n_train_read, test_split_fraction, test_size, val_size, test_file, data_file)

    tokenizer = load_tokenizer(checkpoint_dir)
    style = style_by_name(prompt_style, checkpoint_dir, system, tokenizer=tokenizer, tokenizer_config=tokenizer_config)
    identity = tokenizer_identity_of(tokenizer, checkpoint_dir)
    max_seq_length = max_seq_length if max_seq_length is not None else model_block_size(checkpoint_dir)

    prompt_ids, full_ids, truncated = tokenize(tokenizer, style, instructions, inputs, outputs, max_seq_length)
    # Labels copy the full ids with the first `masked` positions set to ignore_index (Lit-GPT's rule)
    masked = [len(ids) if mask_inputs else 0 for ids in prompt_ids]
    kept_train, kept_test = kept_records(full_ids, masked, ignore_index, n_train_read,
                                         [(data_file, n_train_read), (test_file, n_test_read)], max_seq_length)

    n_test, n_val = split_sizes(len(kept_train), test_split_fraction, test_size, val_size, test_file, data_file)
    texts = (instructions, inputs, outputs)
    splits = {name: to_records(order, texts, full_ids, prompt_ids, masked, ignore_index)
              for name, order in split_orders(kept_train, kept_test, n_test, n_val, seed, test_file).items()}
    counts = {"read": n_read, **{name: len(records) for name, records in splits.items()}, "truncated": truncated,
              "dropped": n_read - len(kept_train) - len(kept_test)}
    meta = {
        "littune_version": littune.__version__,
        "data_file": str(data_file.resolve()),
        "data_sha256": sha256_file(data_file),
        "test_file": str(test_file.resolve()) if test_file is not None else None,
        "test_sha256": sha256_file(test_file) if test_file is not None else None,
        "checkpoint_dir": str(checkpoint_dir.resolve()),
        "columns": columns,
        "output_values": output_values,
        "seed": seed,
        "test_split_fraction": test_split_fraction if test_file is None else None,
        "test_size": test_size,
        "val_size": val_size,
        "counts": counts,
        "labels": (candidate_sets([outputs[i] for i in kept_train]) if label_sets is not None
                   else detect_labels([outputs[i] for i in kept_train + kept_test])),
        "label_sets": label_sets,
        "max_seq_length": max_seq_length,
        "longest_record": max(len(full_ids[i]) for i in kept_train + kept_test),
        "mask_inputs": mask_inputs,
        "ignore_index": ignore_index,
        "prompt_style": prompt_style,
        "system": system,
        "tokenizer": identity,
        "vocab_size": identity["vocab_size"],
    }
    written = write_prepared(destination_path, splits, style, meta)
    print_summary(meta, written, destination_path, (data_file, n_train_read), (test_file, n_test_read))


def read_sources(data_file: Path, test_file: Optional[Path], sources: dict, output_values: Optional[dict[str, str]]
                 ) -> tuple[tuple[list, list, list], int, int]:
    """((instructions, inputs, outputs), records read from the training file, from the test file): the training
    file's records first, then the test file's, so that one tokenizer pass covers both."""
    instructions, inputs, outputs = read_fields(data_file, sources, output_values)
    n_train_read = len(instructions)
    if test_file is None:
        return (instructions, inputs, outputs), n_train_read, 0
    test_fields = read_fields(test_file, sources, output_values)
    for texts, more in zip((instructions, inputs, outputs), test_fields):
        texts.extend(more)
    return (instructions, inputs, outputs), n_train_read, len(test_fields[0])


def print_summary(meta: dict, written: list[str], destination_path: Path, train_read: tuple, test_read: tuple):
    """What prepare read (train_read, test_read: the file as given, its records), kept and wrote, in three lines; a
    warning where most records were truncated."""
    counts, max_seq_length, truncated = meta["counts"], meta["max_seq_length"], meta["counts"]["truncated"]
    sources_read = f"{train_read[1]:,} records from {train_read[0]}"
    if test_read[0] is not None:
        sources_read += f" and {test_read[1]:,} test records from {test_read[0]}"
    print(
        f"Read {sources_read}: {counts['train']:,} train, {counts['val']:,} val, {counts['test']:,} test, "
        f"{truncated:,} truncated to {max_seq_length} tokens, {counts['dropped']:,} dropped (nothing left to learn)"
    )
    masked = " (the prompt tokens are masked: only the label is learned)" if meta["mask_inputs"] else ""
    if meta["label_sets"] is not None:
        label_sets, sets = meta["label_sets"], meta["labels"]
        none = f" and {label_sets['none_label']!r} for none" if label_sets["none_label"] else ""
        scored = (f"{len(sets)} distinct sets in training (likelihood scoring picks one)" if sets else
                  "more distinct sets than likelihood scoring ranks: scored by generating")
        print(f"Multi-label: {', '.join(label_sets['labels'])}{none}; {scored}{masked}")
    elif meta["labels"] is not None:
        print(f"Labels: {', '.join(meta['labels'])}{masked}")
    print(f"Longest record: {meta['longest_record']} tokens. Wrote {', '.join(written)} to {destination_path}")
    n_read = counts["read"]
    if truncated * 2 > n_read:  # most records lose their end: a too-small --max_seq_length, not a few outliers
        print(f"littune: warning: {truncated:,} of {n_read:,} records were truncated to --max_seq_length "
              f"{max_seq_length} tokens, cutting off their responses; raise --max_seq_length", file=sys.stderr)


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


# ----------------------------------------------------------------------------------------------- tokenizer


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

    full = encode(prompt + output) + [EOS] (`with_eos`). The prompt and the full text are tokenised separately, not
    prompt and response: BPE can merge across the seam, so the response's tokens alone may differ. Truncation keeps
    the first max_seq_length tokens (a cut record loses its EOS: its response does not end there).
    """
    prompts = [style.apply(instruction, input=input) for instruction, input in zip(instructions, inputs)]
    full_texts = [prompt + output for prompt, output in zip(prompts, outputs)]
    token_ids = encode_batch(tokenizer, prompts + full_texts)
    n = len(prompts)
    prompt_ids = token_ids[:n]
    full_ids = [with_eos(ids, tokenizer) for ids in token_ids[n:]]
    truncated = sum(len(ids) > max_seq_length for ids in full_ids)
    prompt_ids = [ids if len(ids) <= max_seq_length else ids[:max_seq_length] for ids in prompt_ids]
    full_ids = [ids if len(ids) <= max_seq_length else ids[:max_seq_length] for ids in full_ids]
    return prompt_ids, full_ids, truncated


# ------------------------------------------------------------------------------------------------- reading


def read_fields(data_file: Path, sources: dict, output_values: Optional[dict[str, str]]) -> tuple[list, list, list]:
    """Instructions, inputs and outputs of every record of a file (see `extract_fields`)."""
    rows, lines = read_rows(data_file)
    return extract_fields(rows, lines, sources, output_values, data_file)


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
            f"{data_file}: the top level is {json_type(rows)}, expected a list of records "
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
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:  # a dict per row would keep the last such column and drop the others without a word
            raise UserError(f"{data_file}: the header names {', '.join(map(repr, repeated))} more than once; give "
                            f"each column its own name")
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
            raise UserError(f"{_where(data_file, index, lines)} is {json_type(row)}, expected an object with "
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
            elif field == "output" and isinstance(value, list) and all(isinstance(v, str) for v in value):
                pass  # a multi-label record: its labels (`littune.label_sets`)
            elif not isinstance(value, str):
                raise UserError(f"{_where(data_file, index, lines)}: field {column!r} is {json_type(value)} "
                                f"({json.dumps(value)[:40]}), expected a string")
            fields[field].append(value)
    if output_values is not None:
        for index, output in enumerate(fields["output"]):
            if isinstance(output, list):
                raise UserError(f"{_where(data_file, index, lines)}: --output_values replaces whole output texts, and "
                                f"this output is a list of labels; drop --output_values")
            if output not in output_values:
                raise UserError(f"{_where(data_file, index, lines)}: output {output!r} is not in --output_values "
                                f"({', '.join(map(repr, output_values))})")
        fields["output"] = [output_values[output] for output in fields["output"]]
    return fields["instruction"], fields["input"], fields["output"]


def record_place(index: int, n_train_read: int, data_file: Path, test_file: Optional[Path]) -> str:
    """Where the index-th record read (the data file's, then the test file's) comes from."""
    return (f"{data_file}: record {index}" if index < n_train_read or test_file is None
            else f"{test_file}: record {index - n_train_read}")


def _where(data_file: Path, index: int, lines: Optional[list[int]]) -> str:
    return f"{data_file}: record {index}" + (f" (line {lines[index]})" if lines is not None else "")


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
    buffer = torch.frombuffer(flat, dtype=torch.int64).clone() if flat else torch.empty(0, dtype=torch.int64)
    pieces = iter(buffer.split(sizes))
    return [
        {"instruction": instructions[i], "input": inputs[i], "output": outputs[i],
         "input_ids": next(pieces), "labels": next(pieces), "input_ids_no_response": next(pieces)}
        for i in order
    ]


def write_prepared(destination: Path, splits: dict[str, list], style, meta: dict) -> list[str]:
    """train.pt, val.pt (when there is a validation split), test.pt, prompt_style.yaml and prepare.json, each
    atomically; if one cannot be written, the ones this run wrote are removed again. Returns the names written."""
    writers = {f"{split}.pt": functools.partial(without_gc(write_torch), records)
               for split, records in splits.items() if records}
    writers[STYLE_FILE] = lambda tmp: tmp.write_text(style_yaml(style), encoding="utf-8")
    written = []
    try:
        for name, write in writers.items():
            with atomic_path(destination / name) as tmp:
                write(tmp)
            written.append(destination / name)
        if not splits["val"]:  # a val.pt of an earlier run would pass for this run's validation split
            (destination / "val.pt").unlink(missing_ok=True)
        save_json(meta, destination / "prepare.json")  # last: its presence says the others are complete
    except BaseException as e:
        for path in written:
            path.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise UserError(f"{destination}: cannot write the prepared data ({e.strerror or e}: {e.filename or ''})") from e
        raise
    return [path.name for path in written] + ["prepare.json"]
