"""Benchmark `littune evaluate`: likelihood scoring against generation scoring, on a real model, side by side.

    python scripts/bench_evaluate.py                                   # SmolLM2-135M-Instruct, all 872 SST-2 dev records
    python scripts/bench_evaluate.py --records 128 --rounds 2          # a quicker look, alternating twice
    python scripts/bench_evaluate.py --threads 1                       # one torch thread (a busy shared machine)
    python scripts/bench_evaluate.py --adapter_path out/adapter_v2/sst2 --precision bf16-true

The model: SmolLM2-135M-Instruct, converted by `littune convert` from the Q4_1 GGUF in ../shared/data/models (or
--checkpoint_dir: a converted checkpoint). The records: SST-2 dev (the first --records of 872) as the test split of
`littune prepare --test_file ... --prompt_style chat` (the model's own ChatML template; a 64-sentence slice of
train.tsv as the training file), the sentence as the input of a fixed instruction, "positive"/"negative" as the
answer. Cached in --workdir.

Each side is the whole `littune evaluate` command (the function the CLI calls, in this process): loading the model,
the test loss, the predictions, metrics.json, predictions.jsonl and the plots.
- likelihood: `--scoring likelihood`: the two labels scored after every prompt, the test loss from the same pass;
- generate: `--scoring generate --max_new_tokens N`: the test loss, then batched greedy answers compared as text.
Rounds alternate the order (ABBA...) so drifting load from other processes hits both sides alike; wall clock and
process CPU seconds (all threads) are printed, the best round of each side is compared. On a CPU shared with other
busy processes, wall clock says more about them than about littune: watch the CPU seconds, and try --threads 1
(two threads waiting on each other on a busy 2-core machine make every small op several times slower).
"""

import argparse
import contextlib
import io
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # as the littune CLI runs

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from littune.checkpoints import convert  # noqa: E402
from littune.data import prepare  # noqa: E402
from littune.evaluate import evaluate  # noqa: E402

SHARED_DATA = Path(os.environ.get("LITTUNE_SHARED_DATA", REPO.parent / "shared" / "data"))
SST2 = SHARED_DATA / "classification" / "sst2"
GGUF = SHARED_DATA / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
COLUMNS = {"instruction": "=Is the sentiment of this review positive or negative?", "input": "text",
           "output": "label"}
OUTPUT_VALUES = {"1": "positive", "0": "negative"}


def main(args) -> None:
    workdir = args.workdir.resolve()
    checkpoint_dir = args.checkpoint_dir or converted_smollm2(workdir)
    data_dir = prepared_sst2(workdir, checkpoint_dir, args.records)
    print(f"{args.records} SST-2 dev records, {checkpoint_dir.name}"
          f"{' + adapter ' + str(args.adapter_path) if args.adapter_path else ''}, precision "
          f"{args.precision or 'default'}, batch size {args.batch_size}, {os.cpu_count()} CPU cores, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; load average now "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")

    sides = {"likelihood": {"scoring": "likelihood"},
             "generate": {"scoring": "generate", "max_new_tokens": args.max_new_tokens}}
    runs: dict[str, list] = {name: [] for name in sides}
    for round_index in range(args.rounds):
        order = list(sides) if round_index % 2 == 0 else list(reversed(sides))
        for name in order:
            out = workdir / "eval" / name
            log = io.StringIO()
            with contextlib.redirect_stdout(log):  # evaluate's table; its progress bars stay on stderr
                metrics, wall, cpu = timed(evaluate, checkpoint_dir=checkpoint_dir, data_dir=data_dir,
                                           adapter_path=args.adapter_path, batch_size=args.batch_size,
                                           precision=args.precision, out_dir=out, **sides[name])
            runs[name].append((wall, cpu, metrics))
            print(f"round {round_index + 1} {name}: {wall:.1f}s wall, {cpu:.1f}s CPU", flush=True)

    print(f"\n{'':<34}{'records/s':>10}{'rec/CPU-s':>10}{'wall s':>8}{'CPU s':>8}{'accuracy':>10}"
          f"{'not a label':>13}{'test loss':>11}   (best of {args.rounds})")
    best = {}
    for name, label in (("likelihood", "likelihood (--scoring likelihood)"),
                        ("generate", f"generate ({args.max_new_tokens} new tokens)")):
        wall, cpu, metrics = min(runs[name], key=lambda run: run[0])
        best[name] = (wall, cpu)
        print(f"{label:<34}{args.records / wall:>10.2f}{args.records / cpu:>10.2f}{wall:>8.1f}{cpu:>8.1f}"
              f"{metrics['accuracy']:>10.4f}{metrics['not_a_label']:>13}{metrics['test_loss']:>11.4f}")
    likelihood = runs["likelihood"][0][2]
    print(f"\nlikelihood / generate: {best['generate'][0] / best['likelihood'][0]:.2f}x records/s (wall), "
          f"{best['generate'][1] / best['likelihood'][1]:.2f}x per CPU second; likelihood accuracy_norm "
          f"{likelihood['accuracy_norm']:.4f}, MCC {likelihood['mcc']:.4f}; every run's whole evaluate command, model "
          f"loading and files included")


def converted_smollm2(workdir: Path) -> Path:
    folder = workdir / "checkpoints" / "HuggingFaceTB" / "SmolLM2-135M-Instruct"
    if not (folder / "lit_model.pth").is_file():
        if not GGUF.is_file():
            sys.exit(f"{GGUF} not found: pass --checkpoint_dir (a converted SmolLM2-135M-Instruct) or set "
                     f"LITTUNE_SHARED_DATA")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(GGUF, folder / GGUF.name)
        convert(folder)
    return folder


def prepared_sst2(workdir: Path, checkpoint_dir: Path, records: int) -> Path:
    destination = workdir / "data" / f"sst2-dev{records}-{checkpoint_dir.name}"
    if (destination / "prepare.json").is_file():
        return destination
    train_lines = (SST2 / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)[:65]
    dev_lines = (SST2 / "dev.tsv").read_text(encoding="utf-8").splitlines(keepends=True)[:records + 1]
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    train, dev = workdir / "data" / "sst2_train64.tsv", workdir / "data" / f"sst2_dev{records}.tsv"
    train.write_text("".join(train_lines), encoding="utf-8")
    dev.write_text("".join(dev_lines), encoding="utf-8")
    prepare(data_file=train, test_file=dev, checkpoint_dir=checkpoint_dir, destination_path=destination,
            columns=COLUMNS, output_values=OUTPUT_VALUES, prompt_style="chat")
    return destination


def timed(fn, **kwargs):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn(**kwargs)
    return result, time.perf_counter() - wall, time.process_time() - cpu


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--checkpoint_dir", type=Path, default=None,
                        help="a converted SmolLM2-135M-Instruct (default: converted from the shared GGUF into WORKDIR)")
    parser.add_argument("--adapter_path", type=Path, default=None, help="evaluate an adapter instead of the base model")
    parser.add_argument("--workdir", type=Path, default=Path("bench_evaluate_work"))
    parser.add_argument("--records", type=int, default=872, help="the first N of the 872 SST-2 dev records")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=32, help="generation side (evaluate's default)")
    parser.add_argument("--precision", default=None, help="default: littune's (32-true on CPU)")
    parser.add_argument("--rounds", type=int, default=1, help="timed runs per side, alternating (the best is reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if not 1 <= args.records <= 872:
        sys.exit("--records must be 1..872")
    if not SST2.is_dir():
        sys.exit(f"{SST2} not found (set LITTUNE_SHARED_DATA)")
    main(args)
