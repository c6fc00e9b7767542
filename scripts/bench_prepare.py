"""Benchmark `littune prepare` against Lit-GPT's per-record prepare_alpaca, end to end, on 67K SST-2 instructions.

    python scripts/bench_prepare.py                 # all 67,349 SST-2 train rows, GPT-NeoX/Pythia tokenizer
    python scripts/bench_prepare.py --rows 5000     # a quicker look

Both runs read the same JSON instruction file (SST-2 train.tsv turned into records with littune's own --columns and
--output_values mapping), tokenise with the same tokenizer, split 0.03865 for testing, and save train.pt and test.pt.
The baseline is Lit-GPT's scripts/prepare_alpaca.py: `random_split`, then per record `Tokenizer.encode` of the prompt
and of prompt + response, a cloned label tensor, then torch.save. It also prints the tokenizer alone, batched and
one string at a time, since that bounds what any prepare can reach on this machine.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as the littune CLI runs

import torch
from torch.utils.data import random_split

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from littune.data import extract_fields, parse_columns, prepare, read_rows  # noqa: E402
from littune.prepared import encode_batch  # noqa: E402

SHARED_DATA = Path(os.environ.get("LITTUNE_SHARED_DATA", REPO.parent / "shared" / "data"))
SST2_TRAIN = SHARED_DATA / "classification" / "sst2" / "train.tsv"
PYTHIA_TOKENIZER = SHARED_DATA / "tokenizers" / "pythia"
COLUMNS = {"instruction": "=Classify the sentiment of this movie review as positive or negative.",
           "input": "text", "output": "label"}
OUTPUT_VALUES = {"1": "positive", "0": "negative"}
TEST_SPLIT_FRACTION = 0.03865
MAX_SEQ_LENGTH = 2048


def main(rows: int | None, workdir: Path) -> None:
    from litgpt import Tokenizer
    from litgpt.prompts import Alpaca

    data_file = write_instructions(workdir, rows)
    n = len(json.loads(data_file.read_text()))
    checkpoint_dir = workdir / "checkpoint"
    shutil.copytree(PYTHIA_TOKENIZER, checkpoint_dir)
    (checkpoint_dir / "config.json").write_text(json.dumps({"max_position_embeddings": MAX_SEQ_LENGTH}))
    print(f"{n:,} SST-2 instruction records, {data_file.stat().st_size / 1e6:.1f} MB JSON, "
          f"tokenizer {PYTHIA_TOKENIZER.name}, {os.cpu_count()} CPU cores, torch {torch.__version__}")

    # What bounds us: the tokenizer alone on the prompt and full text of every record (2 strings per record)
    records = json.loads(data_file.read_text())
    prompts = [Alpaca().apply(r["instruction"], input=r["input"]) for r in records]
    texts = prompts + [p + r["output"] for p, r in zip(prompts, records)]
    # a fresh tokenizer each time: the BPE word cache of one run must not speed up the next
    batched, batched_cpu = timed(lambda: encode_batch(Tokenizer(checkpoint_dir), texts))
    single, single_cpu = timed(lambda: encode_one_at_a_time(Tokenizer(checkpoint_dir), texts))

    ours, ours_cpu = timed(lambda: prepare(data_file=data_file, checkpoint_dir=checkpoint_dir,
                                           destination_path=workdir / "littune",
                                           test_split_fraction=TEST_SPLIT_FRACTION, max_seq_length=MAX_SEQ_LENGTH))
    baseline, baseline_cpu = timed(lambda: prepare_alpaca_baseline(data_file, checkpoint_dir, workdir / "baseline"))

    print("\nwall clock (CPU seconds of this process in brackets: other load on the machine inflates the wall clock)")
    for label, wall, cpu in [("tokenizer only, encode_batch (2 threads)", batched, batched_cpu),
                             ("tokenizer only, one string at a time", single, single_cpu),
                             ("(a) littune prepare, end to end", ours, ours_cpu),
                             ("(b) Lit-GPT prepare_alpaca, end to end", baseline, baseline_cpu)]:
        print(f"{label:41s}: {n / wall:8,.0f} records/s  {wall:6.1f} s  ({cpu:5.1f} CPU s)")
    print(f"{'speed-up (a)/(b)':41s}: {baseline / ours:8.2f} x")
    print(f"(a) is {batched / ours:.0%} batched tokenising, (b) {single / baseline:.0%} one-string tokenising; "
          f"the rest is reading, building tensors and torch.save")


def write_instructions(workdir: Path, rows: int | None) -> Path:
    """SST-2 train rows as Alpaca-style records, through littune's own --columns / --output_values mapping."""
    table, lines = read_rows(SST2_TRAIN)
    table, lines = table[:rows], lines[:rows]
    instructions, inputs, outputs = extract_fields(table, lines, parse_columns(COLUMNS), OUTPUT_VALUES, SST2_TRAIN)
    records = [{"instruction": i, "input": x, "output": o} for i, x, o in zip(instructions, inputs, outputs)]
    path = workdir / "sst2_instructions.json"
    path.write_text(json.dumps(records, indent=1))
    return path


def prepare_alpaca_baseline(data_file: Path, checkpoint_dir: Path, destination_path: Path,
                            mask_inputs: bool = False, ignore_index: int = -100, seed: int = 42) -> None:
    """Lit-GPT's scripts/prepare_alpaca.py with litgpt's Tokenizer and Alpaca prompt style, otherwise as it was."""
    from litgpt import Tokenizer
    from litgpt.prompts import Alpaca

    with open(data_file, encoding="utf-8") as file:
        data = json.load(file)
    tokenizer = Tokenizer(checkpoint_dir)
    style = Alpaca()

    test_split_size = round(len(data) * TEST_SPLIT_FRACTION)
    train_set, test_set = random_split(
        data, lengths=(len(data) - test_split_size, test_split_size), generator=torch.Generator().manual_seed(seed)
    )
    train_set, test_set = list(train_set), list(test_set)

    def prepare_sample(example: dict) -> dict:
        full_prompt = style.apply(example["instruction"], input=example["input"])
        full_prompt_and_response = full_prompt + example["output"]
        encoded_full_prompt = tokenizer.encode(full_prompt, max_length=MAX_SEQ_LENGTH)
        encoded_full_prompt_and_response = tokenizer.encode(full_prompt_and_response, eos=True, max_length=MAX_SEQ_LENGTH)
        labels = encoded_full_prompt_and_response.clone()
        if mask_inputs:
            labels[: len(encoded_full_prompt)] = ignore_index
        return {**example, "input_ids": encoded_full_prompt_and_response, "input_ids_no_response": encoded_full_prompt,
                "labels": labels}

    destination_path.mkdir(parents=True, exist_ok=True)
    torch.save([prepare_sample(sample) for sample in train_set], destination_path / "train.pt")
    torch.save([prepare_sample(sample) for sample in test_set], destination_path / "test.pt")


def encode_one_at_a_time(tokenizer, texts: list[str]) -> list[list[int]]:
    return [tokenizer.processor.encode(text).ids for text in texts]


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of fn()."""
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - start_cpu


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=None, help="use only the first ROWS SST-2 rows (default: all)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        main(args.rows, Path(tmp))
