#!/usr/bin/env python
"""Shared-prefix training (issue 25 #1), measured two ways: where packing pays, and what it gives a real run.

    python scripts/bench_shared_prefix.py grid               # one micro-batch, plain vs packed, over a grid of shapes
    python scripts/bench_shared_prefix.py grid --rows 4,8 --prefixes 37 --lengths 59
    python scripts/bench_shared_prefix.py finetune           # littune finetune on SmolLM2 + SST-2, on vs off

grid: one micro-batch's forward + backward, plain (padded rows) against packed (the shared prefix once,
`littune.finetune.prefix`), for micro-batch sizes, record lengths and shared prefix lengths, on litgpt's SmolLM2-135M
config with random weights (the time does not depend on the values; no download), adapter_v2 with its gates opened,
float32. Each record has a few loss targets at its end (a masked label task). Plain and packed alternate, --repeats
times each after a warm-up; each figure is the fastest of its repeats in CPU seconds of this process
(`time.process_time`: less disturbed by other processes than wall time on a shared machine; with --threads 1 it is
the step's own time). The last column is what `sharing_pays` decides: its constants come from this table.

finetune: `littune finetune adapter_v2` on SmolLM2-135M-Instruct and SST-2 training sentences prepared as
scripts/bench_accuracy.py prepares them (the chat template, prompts masked), --steps steps of --batch_size records,
with --shared_prefix true and false alternating --rounds times. Tokens/s: the records' tokens (as littune counts
them, padding and sharing aside) of steps 2.. over their training time (metrics.csv), the first step a warm-up.
CPU s: the whole command's CPU seconds (start-up included), which other processes on the machine disturb less than
wall time. Run it alone on the machine; the ratio of runs made back to back is the figure to compare.
"""

import argparse
import csv
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def cpu_flags() -> str:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "?")
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags]
    return f"{model}, {' '.join(isa)}, torch {torch.__version__}"


def grid(args) -> None:
    from litgpt import Config

    from littune.finetune.prefix import packed_batch, packed_loss_sum, sharing_pays
    from littune.methods import get_method
    from littune.model import collate, forward_loss_sum

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    method = get_method("adapter_v2")
    config = Config.from_name(args.model)
    model = method.build_model(config, method.args())
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.requires_grad = method.is_trainable(name)
            if "gating_factor" in name:
                p.fill_(0.5)
    model.train()
    print(f"{args.model} (width {config.n_embd}, {config.n_layer} layers), adapter_v2, float32, {args.threads} "
          f"thread(s); {cpu_flags()}")
    print(f"{'rows':>4} {'prefix':>6} {'length':>6} {'plain s':>8} {'packed s':>8} {'speed-up':>8} "
          f"{'tokens':>7} {'rule':>5}")

    def step(compute) -> float:
        method.before_forward(model)
        started = time.process_time()
        compute().backward()
        seconds = time.process_time() - started
        model.zero_grad(set_to_none=True)
        return seconds

    for rows in map(int, args.rows.split(",")):
        for length in map(int, args.lengths.split(",")):
            for prefix in map(int, args.prefixes.split(",")):
                if prefix >= length - 3:
                    continue
                shared = torch.randint(0, config.vocab_size, (prefix,))
                data = []
                for _ in range(rows):
                    ids = torch.cat([shared, torch.randint(0, config.vocab_size, (length - prefix,))])
                    labels = torch.full_like(ids, -100)
                    labels[-3:] = ids[-3:]
                    data.append({"input_ids": ids, "labels": labels})
                indices = list(range(rows))
                input_ids, labels = collate(data, indices, -100, "cpu")
                packed = packed_batch(data, indices, prefix, -100)
                runs = {"plain": lambda: forward_loss_sum(model, input_ids, labels),
                        "packed": lambda: packed_loss_sum(model, packed, -100, method.before_forward)}
                times = {name: [] for name in runs}
                for repeat in range(args.repeats + 1):
                    for name, compute in runs.items():
                        seconds = step(compute)
                        if repeat:  # the first is a warm-up
                            times[name].append(seconds)
                plain, shared_s = min(times["plain"]), min(times["packed"])
                tokens = rows * length / (prefix + rows * (length - prefix))
                rule = sharing_pays(prefix, [length] * rows, config.block_size)
                print(f"{rows:>4} {prefix:>6} {length:>6} {plain:>8.3f} {shared_s:>8.3f} {plain / shared_s:>7.2f}x "
                      f"{tokens:>6.2f}x {'pack' if rule else 'plain':>5}", flush=True)


def finetune(args) -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_accuracy  # the same checkpoint, SST-2 sample and prepare flags as the accuracy benchmark

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "commands.log"
    checkpoint = bench_accuracy.checkpoint(workdir, log)
    data = workdir / f"sst2-{args.train_records}"
    if not (data / "train.pt").is_file():
        bench_accuracy.littune("prepare", "--data_file", str(bench_accuracy.sample_train(workdir, args.train_records,
                                                                                          42)),
                               "--checkpoint_dir", str(checkpoint), "--destination_path", str(data), "--columns",
                               bench_accuracy.COLUMNS, "--output_values", bench_accuracy.VALUES, log=log)
    print(f"littune finetune adapter_v2, SmolLM2-135M-Instruct, SST-2 (chat template, masked), {args.steps} steps of "
          f"{args.batch_size}, micro-batch {args.micro_batch_size}, {args.precision}; {cpu_flags()}")
    rates: dict[str, list[float]] = {"true": [], "false": []}
    cpu: dict[str, list[float]] = {"true": [], "false": []}
    for round_ in range(args.rounds):
        for setting in rates:
            out = workdir / "runs" / f"shared-{setting}"
            shutil.rmtree(out, ignore_errors=True)
            cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
            bench_accuracy.littune(
                "finetune", "adapter_v2", "--checkpoint_dir", str(checkpoint), "--data_dir", str(data), "--out_dir",
                str(out), "--max_steps", str(args.steps), "--batch_size", str(args.batch_size), "--micro_batch_size",
                str(args.micro_batch_size), "--precision", args.precision, "--shared_prefix", setting,
                "--eval_interval", "100000", "--eval_iters", "1", "--save_interval", "100000", log=log)
            cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[setting].append(cpu_after.ru_utime + cpu_after.ru_stime - cpu_before.ru_utime - cpu_before.ru_stime)
            with open(out / "metrics.csv") as f:
                rows = list(csv.DictReader(f))
            tokens = float(rows[-1]["tokens"]) - float(rows[0]["tokens"])
            seconds = float(rows[-1]["elapsed_sec"]) - float(rows[0]["elapsed_sec"])
            rates[setting].append(tokens / seconds)
            print(f"round {round_ + 1} --shared_prefix {setting}: {tokens / seconds:.0f} tokens/s "
                  f"(steps 2-{args.steps}: {tokens:.0f} tokens in {seconds:.1f} s), {cpu[setting][-1]:.1f} CPU s, "
                  f"final train loss {float(rows[-1]['train_loss']):.4f}", flush=True)
    ratios = [a / b for a, b in zip(rates["true"], rates["false"])]
    cpu_ratios = [b / a for a, b in zip(cpu["true"], cpu["false"])]
    print(f"shared / plain, each round's back-to-back pair: tokens/s {', '.join(f'{r:.2f}x' for r in ratios)} "
          f"(median {statistics.median(ratios):.2f}x; {statistics.median(rates['true']):.0f} vs "
          f"{statistics.median(rates['false']):.0f}); CPU s {', '.join(f'{r:.2f}x' for r in cpu_ratios)} (median "
          f"{statistics.median(cpu_ratios):.2f}x)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    g = sub.add_parser("grid")
    g.add_argument("--model", default="SmolLM2-135M", help="a litgpt config name")
    g.add_argument("--threads", type=int, default=1)
    g.add_argument("--rows", default="2,4,8", help="records per micro-batch")
    g.add_argument("--prefixes", default="4,8,16,37", help="shared prefix lengths")
    g.add_argument("--lengths", default="59,120,220", help="record lengths (prefix included)")
    g.add_argument("--repeats", type=int, default=3)
    f = sub.add_parser("finetune")
    f.add_argument("--workdir", type=Path, default=Path("/tmp/littune-bench-shared-prefix"))
    f.add_argument("--train_records", type=int, default=320)
    f.add_argument("--steps", type=int, default=6)
    f.add_argument("--batch_size", type=int, default=16)
    f.add_argument("--micro_batch_size", type=int, default=4)
    f.add_argument("--precision", default="32-true")
    f.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    grid(args) if args.mode == "grid" else finetune(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
