"""Benchmark `littune evaluate`'s batched greedy generation against one-by-one `littune generate`, side by side.

    python scripts/bench_evaluate.py                       # 64 SST-2 dev records, batch size 16, 32 new tokens
    python scripts/bench_evaluate.py --max_new_tokens 4    # the short answers of a trained classifier
    python scripts/bench_evaluate.py --threads 1           # one torch thread (faster on a busy shared machine)

The model is a random-init GPT-NeoX (the Pythia architecture: hidden 256, 4 layers, 8 heads, the real Pythia
tokenizer and its 50K vocabulary: 29M parameters, most of them in the embedding and the output layer), written with `transformers`' save_pretrained and converted
by `littune convert`. The records are the first SST-2 dev sentences as instruction records, prepared by the real
`littune prepare --columns`. Both sides run the same model on the same prompts in the same process, alternating
round by round (a shared machine's load hits both alike); wall clock and process CPU seconds are printed.
An untrained model seldom says EOS, so nearly every record generates all --max_new_tokens tokens, on both sides.
The one-by-one side is `littune.sampling.generate_tokens` (litgpt's KV-cached generate_fn, temperature 0), what
`littune generate --temperature 0` runs per prompt; the batched side is `littune.sampling.batched_greedy`.
Both must give the same tokens for every record; the script checks it.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from littune.checkpoints import convert  # noqa: E402
from littune.data import load_prepared, prepare  # noqa: E402
from littune.model import load_for_inference  # noqa: E402
from littune.sampling import batched_greedy, generate_tokens  # noqa: E402

SHARED_DATA = Path(os.environ.get("LITTUNE_SHARED_DATA", REPO.parent / "shared" / "data"))
SST2_DEV = SHARED_DATA / "classification" / "sst2" / "dev.tsv"
PYTHIA_TOKENIZER = SHARED_DATA / "tokenizers" / "pythia"
COLUMNS = {"instruction": "=Is the sentiment of this movie review positive or negative?", "input": "text",
           "output": "label"}
OUTPUT_VALUES = {"1": "positive", "0": "negative"}


def main(records: int, batch_size: int, max_new_tokens: int, rounds: int, workdir: Path) -> None:
    import lightning as L

    checkpoint_dir = make_checkpoint(workdir / "pythia-bench")
    data_dir = make_data(workdir, checkpoint_dir, records)
    fabric = L.Fabric(devices=1, accelerator="cpu", precision="32-true")
    from litgpt.prompts import Alpaca

    model, tokenizer, _ = load_for_inference(fabric, checkpoint_dir)
    style = Alpaca()
    test = load_prepared(data_dir)[1]
    prompts = [r["input_ids_no_response"] for r in test]
    stops = style.stop_tokens(tokenizer)
    lengths = sorted(len(p) for p in prompts)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{len(prompts)} SST-2 dev records (prompts of {lengths[0]}-{lengths[-1]} tokens, median "
          f"{lengths[len(lengths) // 2]}), GPT-NeoX {n_params / 1e6:.1f}M parameters, float32, "
          f"max_new_tokens {max_new_tokens}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}")

    def one_by_one():
        return [list(generate_tokens(model, p, max_new_tokens, temperature=0.0, stop_tokens=stops)) for p in prompts]

    def batched():
        return batched_greedy(model, prompts, max_new_tokens, stops, batch_size=batch_size)

    # warm-up: first-call allocations and kernels, for both sides alike
    batched_greedy(model, prompts[:batch_size], 2, stops, batch_size=batch_size)
    [list(generate_tokens(model, p, 2, temperature=0.0, stop_tokens=stops)) for p in prompts[:2]]
    times = {"one-by-one": [], "batched": []}
    outputs = {}
    for _ in range(rounds):
        for name, fn in (("one-by-one", one_by_one), ("batched", batched)):
            result, wall, cpu = timed(fn)
            times[name].append((wall, cpu))
            outputs[name] = result
    same = sum(a == b for a, b in zip(outputs["one-by-one"], outputs["batched"]))
    new_tokens = sum(len(o) for o in outputs["batched"])

    print(f"\n{'':<24}{'records/s':>10}{'new tokens/s':>14}{'wall s':>9}{'CPU s':>8}   (best of {rounds})")
    best = {}
    for name, label in (("one-by-one", "one-by-one (generate)"), ("batched", f"batched (batch {batch_size})")):
        wall, cpu = min(times[name])
        best[name] = wall
        print(f"{label:<24}{len(prompts) / wall:>10.2f}{new_tokens / wall:>14.1f}{wall:>9.2f}{cpu:>8.2f}")
    print(f"\nbatched / one-by-one: {best['one-by-one'] / best['batched']:.2f}x records/s; identical tokens for "
          f"{same}/{len(prompts)} records; {new_tokens} new tokens in all")
    if same != len(prompts):
        sys.exit("batched and one-by-one generation differ")


def make_checkpoint(folder: Path) -> Path:
    import transformers

    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(
        vocab_size=50304, hidden_size=256, num_hidden_layers=4, num_attention_heads=8, intermediate_size=1024,
        rotary_pct=0.25, max_position_embeddings=2048, use_parallel_residual=True, tie_word_embeddings=False,
    )
    transformers.GPTNeoXForCausalLM(config).save_pretrained(folder)
    for source in PYTHIA_TOKENIZER.glob("*.json"):
        shutil.copyfile(source, folder / source.name)
    convert(folder)
    return folder


def make_data(workdir: Path, checkpoint_dir: Path, records: int) -> Path:
    """The first records+16 dev sentences through `littune prepare --columns`; `records` of them are the test split."""
    lines = SST2_DEV.read_text(encoding="utf-8").splitlines(keepends=True)[:records + 17]  # header + rows
    tsv = workdir / "sst2_dev.tsv"
    tsv.write_text("".join(lines), encoding="utf-8")
    destination = workdir / "sst2"
    prepare(data_file=tsv, checkpoint_dir=checkpoint_dir, destination_path=destination, test_size=records,
            columns=COLUMNS, output_values=OUTPUT_VALUES)
    return destination


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1, help="timed rounds per side (the best is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not SST2_DEV.is_file():
        sys.exit(f"{SST2_DEV} not found (set LITTUNE_SHARED_DATA)")
    with tempfile.TemporaryDirectory(prefix="bench_evaluate_") as tmp:
        main(args.records, args.batch_size, args.max_new_tokens, args.rounds, Path(tmp))
