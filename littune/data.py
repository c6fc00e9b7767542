"""Prepare: instruction files -> tokenised train.pt / val.pt / test.pt for fine-tuning and evaluation.

    littune prepare --data_file alpaca.json --checkpoint_dir checkpoints/EleutherAI/pythia-160m
    littune prepare --data_file sst2/train.tsv --test_file sst2/dev.tsv \\
        --checkpoint_dir checkpoints/EleutherAI/pythia-160m \\
        --columns '{"instruction": "=Is the sentiment of this review positive or negative?", "input": "text",
                    "output": "label"}' --output_values '{"1": "positive", "0": "negative"}'

Every record becomes `prompt = style.apply(instruction, input=input)` and `prompt + output`, tokenised with the
checkpoint's own tokenizer exactly as litgpt's `Tokenizer.encode` does it one string at a time, but in batches on
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
import os
import re
import sys
from array import array
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import jinja2
import jinja2.ext
import torch
import yaml
from tqdm import tqdm

import littune
from littune.common import (Check, UserError, atomic_path, checked, first_line, load_torch, replace_outputs,
                            save_json, save_text, sha256_file, write_torch)
from littune.metrics import detect_labels

FIELDS = ("instruction", "input", "output")
REQUIRED_FIELDS = ("instruction", "output")
PREPARED_FILES = ("train.pt", "test.pt", "prompt_style.yaml", "prepare.json")  # what every prepared folder has
SPLITS = ("train", "val", "test")
COLUMNS_EXAMPLE = '{"instruction": "=Classify the sentiment.", "input": "text", "output": "label"}'
CHUNK_SIZE = 1024  # strings per tokenizer call: big enough to amortise the call, small enough for a live progress bar
VAL_FRACTION, VAL_MAX = 0.05, 500  # the default validation split: 5% of the training records, at most 500
CHAT_STYLE = "chat"
STYLE_FILE = "prompt_style.yaml"


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
        overwrite: Replace the prepared data already in --destination_path.
    """
    data_file, checkpoint_dir = Path(data_file), Path(checkpoint_dir)
    test_file = Path(test_file) if test_file is not None else None
    destination_path = Path(destination_path) if destination_path is not None else Path("data") / data_file.stem
    sources = parse_columns(columns)
    prompt_style = prompt_style or default_style_name(checkpoint_dir)
    check_style_name(prompt_style, system)
    check_split_arguments(test_size, test_file)
    existing = [destination_path / name for name in ("train.pt", "val.pt", "test.pt", STYLE_FILE, "prepare.json")]
    replace_outputs(destination_path, [p for p in existing if p.exists()], overwrite, "prepared data", remove=False)

    # the training file's records first, then the test file's: one tokenizer pass over both
    instructions, inputs, outputs = read_fields(data_file, sources, output_values)
    n_train_read = len(instructions)
    n_test_read = 0
    if test_file is not None:
        test_fields = read_fields(test_file, sources, output_values)
        n_test_read = len(test_fields[0])
        for texts, more in zip((instructions, inputs, outputs), test_fields):
            texts.extend(more)
        del test_fields
    n_read = n_train_read + n_test_read
    if mask_inputs is None:
        mask_inputs = detect_labels(outputs) is not None
    # fail before tokenising; checked again on the records that survive
    split_sizes(n_train_read, test_split_fraction, test_size, val_size, test_file, data_file)

    tokenizer = load_tokenizer(checkpoint_dir)
    style = style_by_name(prompt_style, checkpoint_dir, system, tokenizer=tokenizer)
    identity = tokenizer_identity_of(tokenizer, checkpoint_dir)
    max_seq_length = max_seq_length if max_seq_length is not None else model_block_size(checkpoint_dir)

    prompt_ids, full_ids, truncated = tokenize(tokenizer, style, instructions, inputs, outputs, max_seq_length)
    # Labels copy the full ids with the first `masked` positions set to ignore_index (Lit-GPT's rule); a record whose
    # labels would all be ignored (its prompt filled the window) has nothing to learn and is dropped
    masked = [len(ids) if mask_inputs else 0 for ids in prompt_ids]
    usable = [not all(t == ignore_index for t in full_ids[i][masked[i]:]) for i in range(n_read)]
    kept_train = [i for i in range(n_train_read) if usable[i]]
    kept_test = [i for i in range(n_train_read, n_read) if usable[i]]
    for file, n, kept in ((data_file, n_train_read, kept_train), (test_file, n_test_read, kept_test)):
        if n and not kept:
            raise UserError(
                f"{file}: all {n} records dropped: with --mask_inputs the prompt fills all "
                f"--max_seq_length {max_seq_length} tokens, leaving no response to learn; raise --max_seq_length"
            )

    n_test, n_val = split_sizes(len(kept_train), test_split_fraction, test_size, val_size, test_file, data_file)
    permutation = torch.randperm(len(kept_train), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [kept_train[j] for j in permutation]
    # an official test file keeps its own order; a random hold-out takes the first n_test of the shuffled records
    test_order = kept_test if test_file is not None else shuffled[:n_test]
    val_order = shuffled[n_test : n_test + n_val]
    train_order = shuffled[n_test + n_val :]

    texts = (instructions, inputs, outputs)
    splits = {name: to_records(order, texts, full_ids, prompt_ids, masked, ignore_index)
              for name, order in (("train", train_order), ("val", val_order), ("test", test_order))}
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
        "labels": detect_labels([outputs[i] for i in kept_train + kept_test]),
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

    sources_read = f"{n_train_read:,} records from {data_file}"
    if test_file is not None:
        sources_read += f" and {n_test_read:,} test records from {test_file}"
    print(
        f"Read {sources_read}: {counts['train']:,} train, {counts['val']:,} val, {counts['test']:,} test, "
        f"{truncated:,} truncated to {max_seq_length} tokens, {counts['dropped']:,} dropped (nothing left to learn)"
    )
    if meta["labels"] is not None:
        print(f"Labels: {', '.join(meta['labels'])}" + (" (the prompt tokens are masked: only the label is learned)"
                                                         if mask_inputs else ""))
    print(f"Longest record: {meta['longest_record']} tokens. Wrote {', '.join(written)} to {destination_path}")
    if truncated * 2 > n_read:  # most records lose their end: a too-small --max_seq_length, not a few outliers
        print(f"littune: warning: {truncated:,} of {n_read:,} records were truncated to --max_seq_length "
              f"{max_seq_length} tokens, cutting off their responses; raise --max_seq_length", file=sys.stderr)


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
    The validation split, where there is one, is `load_split(data_dir, "val")`.
    """
    data_dir = Path(data_dir)
    for name in PREPARED_FILES:
        if not (data_dir / name).is_file():
            raise UserError(f"{data_dir}: no {name}; {_prepare_hint(data_dir)}")
    return load_split(data_dir, "train"), load_split(data_dir, "test"), load_prepare_json(data_dir)


def load_split(data_dir: Path, split: str) -> list[dict]:
    """The records of one split ("train", "val" or "test") of a prepared folder, in the format of `load_prepared`."""
    data_dir = Path(data_dir)
    if split not in SPLITS:
        raise UserError(f"split {split!r}: unknown; choose one of {', '.join(SPLITS)}")
    path = data_dir / f"{split}.pt"
    if not path.is_file():
        if split == "val" and (data_dir / "prepare.json").is_file():
            raise UserError(
                f"{data_dir}: no val.pt: prepared without a validation split (--val_size 0, too few records, or an "
                f"older littune); re-run littune prepare with --val_size > 0, or use the test split"
            )
        raise UserError(f"{data_dir}: no {split}.pt; {_prepare_hint(data_dir)}")
    try:
        records = load_torch(path, f"prepared {split} data")
    except UserError as e:
        raise UserError(f"{e}; re-run littune prepare") from e
    if not (isinstance(records, list) and records and isinstance(records[0], dict)
            and {"input_ids", "input_ids_no_response", "labels"} <= records[0].keys()):
        raise UserError(f"{path}: not a list of prepared records; re-run littune prepare")
    return records


def validation_split_name(data_dir: Path) -> str:
    """The split to select models on: "val" where the folder has val.pt, else "test" (folders of older littunes)."""
    return "val" if (Path(data_dir) / "val.pt").is_file() else "test"


def load_prepare_json(data_dir: Path) -> dict:
    meta_path = Path(data_dir) / "prepare.json"
    if not meta_path.is_file():
        raise UserError(f"{data_dir}: no prepare.json; {_prepare_hint(data_dir)}")
    try:
        return json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{meta_path}: not valid JSON ({e}); re-run littune prepare") from e


def _prepare_hint(data_dir: Path) -> str:
    return (f"prepare the data first: littune prepare --data_file FILE --checkpoint_dir DIR "
            f"--destination_path {data_dir}")


def style_by_name(name: str, checkpoint_dir: Path, system: Optional[str] = None, *, tokenizer=None):
    """The prompt style called `name`: "chat" (the checkpoint's own chat template) or a litgpt style name.

    `system` (a system message) only goes with "chat". `tokenizer`: the checkpoint's litgpt Tokenizer if already
    loaded (chat needs to know whether it adds BOS itself).
    """
    check_style_name(name, system)
    if name == CHAT_STYLE:
        return chat_style(Path(checkpoint_dir), system, tokenizer)
    from litgpt.prompts import PromptStyle

    return PromptStyle.from_name(name)


def save_style(style, folder: Path) -> None:
    """Write folder/prompt_style.yaml atomically: litgpt's format (class_path) plus init_args for a chat template."""
    save_text(style_yaml(style), Path(folder) / STYLE_FILE)


def load_style_file(folder: Path):
    """The prompt style of folder/prompt_style.yaml, written by `save_style` or by litgpt's `save_prompt_style`.

    Only littune's ChatTemplate and the classes of litgpt.prompts are built: the file names a class to instantiate,
    and importing whatever module a data folder names would run code from it.
    """
    path = Path(folder) / STYLE_FILE
    if not path.is_file():
        raise UserError(f"{folder}: no {STYLE_FILE}; prepare the data with littune prepare, which writes it")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: invalid YAML ({first_line(e)}); re-run littune prepare") from e
    if not isinstance(config, dict) or not isinstance(config.get("class_path"), str):
        raise UserError(f"{path}: expected 'class_path: MODULE.CLASS' (and init_args); re-run littune prepare")
    init_args = config.get("init_args") or {}
    if not isinstance(init_args, dict):
        raise UserError(f"{path}: init_args must be a mapping, got {_json_type(init_args)}; re-run littune prepare")
    return style_from_class_path(config["class_path"], init_args, path)


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


def check_style_name(name: str, system: Optional[str]) -> None:
    from litgpt.prompts import prompt_styles

    if name != CHAT_STYLE and name not in prompt_styles:
        raise UserError(f"--prompt_style {name!r} is not a prompt style; choose {CHAT_STYLE} (the model's chat "
                        f"template) or a litgpt style: {', '.join(prompt_styles)}")
    if system is not None and name != CHAT_STYLE:
        raise UserError(f"--system goes with --prompt_style {CHAT_STYLE}; litgpt's {name!r} style has its own fixed "
                        f"text")


def check_split_arguments(test_size: Optional[int], test_file: Optional[Path]) -> None:
    """The combination of flags (each flag's own range is declared with it)."""
    if test_file is not None and test_size is not None:
        raise UserError("--test_size and --test_file exclude each other: the test file is the whole test split")


def split_sizes(
    n: int, test_split_fraction: float, test_size: Optional[int], val_size: Optional[int],
    test_file: Optional[Path], data_file: Path,
) -> tuple[int, int]:
    """(test, validation) records held out of the n usable records of the training file; training keeps >= 1.

    A random hold-out keeps at least one test record; the default validation split takes 5% of what the test split
    leaves (at least 1, at most 500) while at least one training record remains.
    """
    if test_file is not None:
        n_test = 0
    elif test_size is not None:
        if test_size >= n:
            raise UserError(f"{data_file}: --test_size {test_size} holds out {test_size} of {n} usable records, "
                            f"leaving none to train on; lower it")
        n_test = test_size
    else:
        if n < 2:
            raise UserError(f"{data_file}: {n} usable record; a random train/test split needs at least 2 "
                            f"(or give the test split with --test_file)")
        n_test = min(max(1, round(n * test_split_fraction)), n - 1)
    left = n - n_test
    if val_size is None:
        return n_test, min(VAL_MAX, max(1, round(left * VAL_FRACTION)), left - 1)
    if val_size >= left:
        raise UserError(f"{data_file}: --val_size {val_size} holds out {val_size} of the {left} usable training "
                        f"records, leaving none to train on; lower it (0: no validation split)")
    return n_test, val_size


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


def style_yaml(style) -> str:
    """prompt_style.yaml's text: litgpt's `class_path`, plus `init_args` for a style that carries data (a chat
    template), which litgpt's `save_prompt_style` would drop."""
    cls = type(style)
    config: dict[str, Any] = {"class_path": f"{cls.__module__}.{cls.__name__}"}
    if isinstance(style, chat_template_class()):
        config["init_args"] = style.init_args()
    # multi-line text as a block and no folding of long lines, so the file reads as the template does
    return yaml.dump(config, Dumper=BlockTextDumper, sort_keys=False, allow_unicode=True, width=1 << 30)


class BlockTextDumper(yaml.SafeDumper):
    """safe_dump that writes multi-line strings as `|` blocks (PyYAML falls back to quotes where a block would not
    read back exactly, e.g. trailing spaces)."""


BlockTextDumper.add_representer(
    str, lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)
)


def style_from_class_path(class_path: str, init_args: dict, path: Path):
    module_name, _, class_name = class_path.rpartition(".")
    if class_path == f"{__name__}.ChatTemplate":
        unknown = sorted(set(init_args) - set(CHAT_TEMPLATE_ARGS))
        if unknown or not isinstance(init_args.get("template"), str):
            raise UserError(f"{path}: a chat template style needs init_args with a template string and only "
                            f"{', '.join(CHAT_TEMPLATE_ARGS)}; re-run littune prepare")
        return chat_template_class()(**init_args)
    if module_name == "litgpt.prompts":
        import litgpt.prompts

        cls = getattr(litgpt.prompts, class_name, None)
        if isinstance(cls, type) and issubclass(cls, litgpt.prompts.PromptStyle):
            try:
                return cls(**init_args)
            except TypeError as e:
                raise UserError(f"{path}: cannot build {class_path} from init_args ({first_line(e)})") from e
    raise UserError(f"{path}: unknown prompt style class {class_path!r}; littune reads litgpt.prompts styles and "
                    f"{__name__}.ChatTemplate; re-run littune prepare")


# ----------------------------------------------------------------------------------------- chat template style

CHAT_TEMPLATE_ARGS = ("template", "bos_token", "eos_token", "system", "strip_bos")
# the assistant's answer in the conversation rendered to find what the template writes after an answer
ANSWER_MARKER = "LITTUNE_ANSWER_f3a9"
# a special-token-looking text right after the answer: <|im_end|>, <|eot_id|>, <end_of_turn>, </s>,
# <｜end▁of▁sentence｜>
END_OF_TURN = re.compile(r"<[^<>\s]{1,64}>")


def __getattr__(name: str):
    # ChatTemplate subclasses litgpt's PromptStyle, and importing litgpt takes seconds: the class is built on first
    # use, so importing this module (littune --help, commands that never prompt) stays fast
    if name == "ChatTemplate":
        return chat_template_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def chat_template_class() -> type:
    from litgpt.prompts import PromptStyle

    class ChatTemplate(PromptStyle):
        """A model's own chat template (Jinja, as on the Hub) as a litgpt prompt style.

        The prompt is the conversation [system (when given), user: instruction + "\\n\\n" + input] rendered with
        add_generation_prompt=True, exactly as transformers' `apply_chat_template(..., tokenize=False)` renders it;
        with strip_bos (litgpt's Tokenizer adds BOS itself) a leading BOS text is dropped, or it would be doubled.
        """

        def __init__(self, template: str, bos_token: Optional[str] = None, eos_token: Optional[str] = None,
                     system: Optional[str] = None, strip_bos: bool = False):
            self.template, self.bos_token, self.eos_token = template, bos_token, eos_token
            self.system, self.strip_bos = system, bool(strip_bos)
            compile_chat_template(template)  # a broken template fails now, not at the first record

        def init_args(self) -> dict:
            return {name: getattr(self, name) for name in CHAT_TEMPLATE_ARGS}

        def __eq__(self, other) -> bool:
            return type(other) is type(self) and other.init_args() == self.init_args()

        __hash__ = None  # mutable attributes; equal by value

        def __repr__(self) -> str:
            return f"ChatTemplate(system={self.system!r}, bos_token={self.bos_token!r}, strip_bos={self.strip_bos})"

        def apply(self, prompt: str, *, sys_prompt: Optional[str] = None, input: str = "", **kwargs: str) -> str:
            system = sys_prompt if sys_prompt is not None else self.system
            messages = [{"role": "system", "content": system}] if system else []
            messages.append({"role": "user", "content": prompt + (f"\n\n{input}" if input else "")})
            text = self.render(messages, add_generation_prompt=True)
            if self.strip_bos and self.bos_token and text.startswith(self.bos_token):
                text = text[len(self.bos_token):]
            return text

        def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
            special_tokens = {name: value for name, value in (("bos_token", self.bos_token),
                                                               ("eos_token", self.eos_token)) if value is not None}
            return render_chat_template(self.template, messages, add_generation_prompt, special_tokens)

        def end_of_turn(self) -> Optional[str]:
            """The special token the template writes right after an assistant answer (<|im_end|> for ChatML), or
            None when it writes none or cannot render an answer."""
            messages = [{"role": "system", "content": self.system}] if self.system else []
            messages += [{"role": "user", "content": "?"}, {"role": "assistant", "content": ANSWER_MARKER}]
            try:
                text = self.render(messages, add_generation_prompt=False)
            except UserError:  # a template that refuses this conversation: no end-of-turn token known
                return None
            _, found, after = text.partition(ANSWER_MARKER)
            match = END_OF_TURN.match(after.lstrip()) if found else None
            return match.group() if match else None

        def stop_tokens(self, tokenizer) -> tuple[list[int], ...]:
            """EOS, and the end-of-turn token where the template has one in this vocabulary (chat models end their
            answer with it, often never with EOS)."""
            stops = [[tokenizer.eos_id]]
            marker = self.end_of_turn()
            marker_id = token_id(tokenizer, marker) if marker is not None else None
            if marker_id is not None and [marker_id] not in stops:
                stops.append([marker_id])
            return tuple(stops)

    ChatTemplate.__qualname__ = "ChatTemplate"  # littune.data.ChatTemplate, the name prompt_style.yaml stores
    return ChatTemplate


def token_id(tokenizer, token: str) -> Optional[int]:
    """The id of `token` when it is one token of the vocabulary, else None."""
    try:
        found = tokenizer.token_to_id(token)
    except ValueError:  # litgpt: not in the Hugging Face vocabulary
        return None
    if tokenizer.backend == "sentencepiece" and found == tokenizer.processor.unk_id():
        return None  # SentencePiece answers an unknown piece with <unk>'s id
    return found


def chat_style(checkpoint_dir: Path, system: Optional[str], tokenizer=None):
    """The checkpoint's chat template (chat_template.jinja, else tokenizer_config.json's chat_template) as a style."""
    config = read_tokenizer_config(checkpoint_dir)
    template, source = read_chat_template(checkpoint_dir, config)
    if template is None:
        raise UserError(
            f"{checkpoint_dir}: --prompt_style {CHAT_STYLE} needs the model's chat template, and it has none (no "
            f"chat_template in tokenizer_config.json, no chat_template.jinja); use an instruct model's checkpoint or "
            f"a litgpt style, e.g. --prompt_style alpaca"
        )
    compile_chat_template(template, source)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(checkpoint_dir)
    return chat_template_class()(
        template, bos_token=special_token_text(config.get("bos_token")),
        eos_token=special_token_text(config.get("eos_token")), system=system, strip_bos=tokenizer.use_bos,
    )


def has_chat_template(checkpoint_dir: Path) -> bool:
    checkpoint_dir = Path(checkpoint_dir)
    return read_chat_template(checkpoint_dir, read_tokenizer_config(checkpoint_dir))[0] is not None


def default_style_name(checkpoint_dir: Path) -> str:
    """The prompt style when none is asked for: an instruction model answers best in its own chat template."""
    return CHAT_STYLE if has_chat_template(checkpoint_dir) else "alpaca"


def read_tokenizer_config(checkpoint_dir: Path) -> dict:
    path = checkpoint_dir / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({first_line(e)})") from e
    return config if isinstance(config, dict) else {}


def read_chat_template(checkpoint_dir: Path, config: dict) -> tuple[Optional[str], str]:
    """(template text or None, where it comes from). transformers gives chat_template.jinja priority; a list of
    named templates in tokenizer_config.json contributes its "default" one."""
    jinja_path = checkpoint_dir / "chat_template.jinja"
    if jinja_path.is_file():
        return jinja_path.read_text(encoding="utf-8"), str(jinja_path)
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    source = f"{checkpoint_dir / 'tokenizer_config.json'} (chat_template)"
    return (template if isinstance(template, str) and template.strip() else None), source


def special_token_text(value: Any) -> Optional[str]:
    """A special token of tokenizer_config.json: a string, or an AddedToken object with its text in "content"."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, which transformers defines to mark assistant text: rendered as its
    body (templates with it must compile here too; littune needs no masks from it)."""

    tags = frozenset({"generation"})

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


@functools.lru_cache(maxsize=16)
def compile_chat_template(template: str, source: str = "the chat template"):
    """The template compiled as transformers compiles it: sandboxed (a template from the Hub must not reach Python
    objects), trim_blocks and lstrip_blocks, with its tojson, raise_exception and strftime_now."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"{source}: not a valid Jinja template (line {e.lineno}: {e.message})") from e


def render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool, special_tokens: dict) -> str:
    try:
        return compile_chat_template(template).render(
            messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **special_tokens
        )
    except Exception as e:  # the template is the model's code: whatever it raises is a fault of the template
        raise UserError(f"the model's chat template failed ({type(e).__name__}: {first_line(e)})") from e


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # as transformers: Jinja's own tojson escapes HTML characters, which a prompt must not get
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(format: str) -> str:
    from datetime import datetime

    return datetime.now().strftime(format)
