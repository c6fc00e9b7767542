"""Accuracy benchmark: SST-2 with a real pretrained model, through the real CLI, measured like a user would.

    python scripts/bench_accuracy.py                                  # littune's defaults plus --epochs 1
    python scripts/bench_accuracy.py --name lr1e-3 --finetune_args "--learning_rate 1e-3"
    python scripts/bench_accuracy.py --name alpaca --prepare_args "--prompt_style alpaca"
    python scripts/bench_accuracy.py --task rotten_tomatoes --seed 1   # another task, another training sample
    python scripts/bench_accuracy.py --table                          # the runs recorded so far, and per seeds

The work: SmolLM2-135M-Instruct (the Q4_1 GGUF in ../shared/data/models, converted by `littune convert`), a seeded
sample of 2,000 SST-2 training sentences (`--train_records`), the whole SST-2 dev split (872) as `--test_file`, the
sentence as the input of a fixed instruction and "positive"/"negative" as the answer. Then
`littune prepare`, `littune finetune adapter_v2 --epochs 1` (`--method lora`), and `littune evaluate` under each scoring (likelihood:
the log-probability of each label; generate: greedy answers compared with the labels), on the base model once
(zero-shot) and on the adapter. Each command runs as a subprocess; its wall time is measured. Every run appends one
JSON line to WORKDIR/accuracy_runs.jsonl; `--table` prints them as the README's table.

Two cores are easily oversubscribed: run this alone on the machine, or the times mean nothing.
"""

import argparse
import json
import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LITTUNE_SHARED_DATA", REPO.parent / "shared" / "data"))
GGUF = SHARED_DATA / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CLASSIFICATION = SHARED_DATA / "classification"
# task -> (the fixed instruction, the label values): each file has columns text, label
TASKS = {
    "sst2": ("Is the sentiment of this movie review positive or negative?", {"1": "positive", "0": "negative"}),
    "rotten_tomatoes": ("Is the sentiment of this movie review positive or negative?",
                        {"1": "positive", "0": "negative"}),
    "cola": ("Is this sentence grammatically acceptable or unacceptable?",
             {"1": "acceptable", "0": "unacceptable"}),
}
RT_TEST_RECORDS = 1066  # the size of HF's rotten_tomatoes test split (10%), drawn once with seed 0


PEAK_RSS_GB: dict = {}  # command name -> the peak resident memory of its last run, GB (os.wait4's ru_maxrss)


def littune(*args: str, log: Path) -> float:
    """Run `littune ARGS` (this checkout's), its output to log; the wall time in seconds (its peak RSS goes to
    PEAK_RSS_GB)."""
    command = [sys.executable, "-m", "littune.cli", *args]
    start = time.perf_counter()
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"$ littune {shlex.join(args)}\n")
        f.flush()
        process = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
        _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage (Linux: ru_maxrss in KiB)
    PEAK_RSS_GB[args[0]] = round(usage.ru_maxrss / 2**20, 2)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"littune {args[0]} failed (exit {code}); see {log}")
    return time.perf_counter() - start


def checkpoint(workdir: Path, log: Path, gguf: Path = GGUF) -> Path:
    """The model converted under WORKDIR/checkpoints (SmolLM2 as the demo lays it out; another GGUF by its name)."""
    name = "HuggingFaceTB/SmolLM2-135M-Instruct" if gguf == GGUF else gguf.stem
    folder = workdir / "checkpoints" / name
    if not (folder / "lit_model.pth").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / gguf.name).write_bytes(gguf.read_bytes())
        littune("convert", "--checkpoint_dir", str(folder), log=log)
    return folder


def cpu_flags() -> str:
    """The CPU model, cores and the flags that decide a matmul's speed (avx2, avx512f, avx512_bf16, amx_bf16), as
    littune's precision choice reads them (`littune.precision.cpu_info`)."""
    from littune.precision import cpu_info

    cpu = cpu_info()
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in cpu["flags"]]
    return f"{cpu['name']}, {os.cpu_count()} cores, {' '.join(wanted) or 'no avx2'}"


def rotten_tomatoes_rows() -> tuple[list[str], list[str]]:
    """Rotten Tomatoes has no official split: a fixed test set (seed 0, balanced) and the rest to sample from."""
    rows = {label: [f"{line.strip()}\t{label}\n" for line in
                    (CLASSIFICATION / "rotten_tomatoes" / f"rt-polarity.{name}").read_text(encoding="utf-8").splitlines()
                    if line.strip()] for label, name in (("1", "pos"), ("0", "neg"))}
    test, rest = [], []
    for label in ("1", "0"):
        shuffled = random.Random(0).sample(rows[label], len(rows[label]))
        test += shuffled[:RT_TEST_RECORDS // 2]
        rest += shuffled[RT_TEST_RECORDS // 2:]
    return test, rest


def task_files(workdir: Path, task: str, n: int, seed: int) -> tuple[Path, Path]:
    """(a seeded sample of n training records, the test file) for the task, as TSV with columns text, label."""
    header = "text\tlabel\n"
    if task == "rotten_tomatoes":
        test, pool = rotten_tomatoes_rows()
        test_file = workdir / "rotten_tomatoes_test.tsv"
        test_file.write_text(header + "".join(test), encoding="utf-8")
    else:
        lines = (CLASSIFICATION / task / "train.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
        pool, test_file = lines[1:], CLASSIFICATION / task / "dev.tsv"
    path = workdir / f"{task}_train_{n}_seed{seed}.tsv"
    path.write_text(header + "".join(random.Random(seed).sample(pool, n)), encoding="utf-8")
    return path, test_file


def evaluate(ckpt: Path, data: Path, out: Path, scoring: str, log: Path, adapter=None,
             quantize=None) -> tuple[dict, float]:
    args = ["evaluate", "--checkpoint_dir", str(ckpt), "--data_dir", str(data), "--out_dir", str(out),
            "--scoring", scoring] + (["--adapter_path", str(adapter)] if adapter else []) + \
        (["--quantize", quantize] if quantize else [])
    seconds = littune(*args, log=log)
    metrics = json.loads((out / "metrics.json").read_text())
    return {k: metrics.get(k) for k in ("accuracy", "mcc", "f1_macro", "accuracy_norm", "not_a_label")}, seconds


def run(args) -> dict:
    workdir = args.workdir.resolve()
    run_dir = workdir / "runs" / args.name
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "commands.log"
    log.write_text("")
    ckpt = checkpoint(workdir, log, args.gguf.resolve())
    train_file, test_file = task_files(workdir, args.task, args.train_records, args.seed)
    instruction, values = TASKS[args.task]
    columns = {"instruction": f"={instruction}", "input": "text", "output": "label"}
    data = run_dir / "data"
    prepare_seconds = littune("prepare", "--data_file", str(train_file), "--test_file", str(test_file),
                              "--checkpoint_dir", str(ckpt), "--destination_path", str(data),
                              "--columns", json.dumps(columns), "--output_values", json.dumps(values),
                              *shlex.split(args.prepare_args), log=log)
    test_records = len(test_file.read_text(encoding="utf-8").splitlines()) - 1
    result = {"name": args.name, "model": ckpt.name, "task": args.task, "method": args.method, "seed": args.seed,
              "prepare_args": args.prepare_args, "finetune_args": args.finetune_args, "cpu_flags": cpu_flags(),
              "train_records": args.train_records, "test_records": test_records,
              "prepare_sec": round(prepare_seconds, 1)}
    if not args.skip_base:
        for scoring in args.scorings:
            metrics, seconds = evaluate(ckpt, data, run_dir / f"eval-base-{scoring}", scoring, log)
            result[f"base_{scoring}"] = {**metrics, "seconds": round(seconds, 1)}
    out = run_dir / "out"
    result["finetune_sec"] = round(littune("finetune", args.method, "--checkpoint_dir", str(ckpt), "--data_dir",
                                           str(data), "--out_dir", str(out), "--epochs", "1",
                                           "--seed", str(1337 + args.seed), *shlex.split(args.finetune_args),
                                           log=log), 1)
    result["finetune_peak_rss_gb"] = PEAK_RSS_GB["finetune"]
    hparams = (out / "hyperparameters.yaml").read_text()
    result["hyperparameters"] = {k: v for k, v in (line.split(": ", 1) for line in hparams.splitlines()
                                                   if ": " in line and not line.startswith(" "))
                                 if k in ("precision", "batch_size", "micro_batch_size", "learning_rate",
                                          "warmup_steps", "epochs", "lr_schedule")}
    for scoring in args.scorings:
        metrics, seconds = evaluate(ckpt, data, run_dir / f"eval-{scoring}", scoring, log, adapter=out)
        result[scoring] = {**metrics, "seconds": round(seconds, 1)}
    for quantize in args.evaluate_quantize:  # the same adapter on a quantized base, scored by likelihood
        metrics, seconds = evaluate(ckpt, data, run_dir / f"eval-likelihood-{quantize}", "likelihood", log,
                                    adapter=out, quantize=quantize)
        result[f"likelihood_{quantize}"] = {**metrics, "seconds": round(seconds, 1),
                                            "peak_rss_gb": PEAK_RSS_GB["evaluate"]}
    default_scoring = args.scorings[0]
    result["finetune_plus_evaluate_sec"] = round(result["finetune_sec"] + result[default_scoring]["seconds"], 1)
    with open(workdir / "accuracy_runs.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(result) + "\n")
    return result


def flags_of(r: dict) -> str:
    method = "" if r.get("method", "adapter_v2") == "adapter_v2" else f"finetune {r['method']} "
    return (method + " ".join(x for x in (r["prepare_args"], r["finetune_args"]) if x)).strip() or "(none)"


def summary(rows: list[dict]) -> str:
    """Runs of the same task, method and flags over several seeds: mean and spread (min-max) of each figure."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r.get("model", "SmolLM2-135M-Instruct"), r.get("task", "sst2"), r.get("method", "adapter_v2"),
                           flags_of(r)), []).append(r)
    lines = ["| model | task | method | flags | seeds | accuracy mean (min-max) | MCC mean (min-max) "
             "| fine-tune + evaluate, mean |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (model, task, method, flags), runs in groups.items():
        def stat(key):
            values = [r["likelihood"][key] for r in runs]
            return f"{sum(values) / len(values):.3f} ({min(values):.3f}-{max(values):.3f})"
        seconds = sum(r["finetune_plus_evaluate_sec"] for r in runs) / len(runs)
        seeds = ",".join(str(r.get("seed", 0)) for r in runs)
        lines.append(f"| {model} | {task} | {method} | `{flags}` | {seeds} | {stat('accuracy')} | {stat('mcc')} | {seconds:.0f} s |")
    return "\n".join(lines)


def table(workdir: Path) -> str:
    rows = [json.loads(line) for line in (workdir / "accuracy_runs.jsonl").read_text().splitlines() if line.strip()]
    lines = ["| run | flags beyond the defaults | dev accuracy (likelihood) | MCC | macro F1 | accuracy (generate) "
             "| base model, likelihood / generate | fine-tune + evaluate |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        flags = flags_of(r)
        like, gen = r["likelihood"], r.get("generate")
        base = " / ".join(f"{r[k]['accuracy']:.3f}" if k in r else "-" for k in ("base_likelihood", "base_generate"))
        generated = f"{gen['accuracy']:.3f}" if gen else "-"
        lines.append(f"| {r['name']} | `{flags}` | {like['accuracy']:.3f} | {like['mcc']:.3f} | {like['f1_macro']:.3f} | "
                     f"{generated} | {base} | {r['finetune_sec']:.0f} s + {like['seconds']:.0f} s |")
    return "\n".join(lines) + "\n\n" + summary(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/littune-bench-accuracy"))
    parser.add_argument("--name", default="defaults")
    parser.add_argument("--train_records", type=int, default=2000)
    parser.add_argument("--gguf", type=Path, default=GGUF,
                        help="the model, a GGUF file (default: SmolLM2-135M-Instruct from ../shared)")
    parser.add_argument("--task", default="sst2", choices=sorted(TASKS),
                        help="sst2 (SST-2 dev as the test file), rotten_tomatoes (a fixed balanced 1,066-sentence "
                             "test set), cola (GLUE dev; score with MCC)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the training sample; finetune runs with --seed 1337 + this")
    parser.add_argument("--method", default="adapter_v2", choices=["adapter_v2", "lora"])
    parser.add_argument("--prepare_args", default="", help="extra littune prepare flags, one string")
    parser.add_argument("--finetune_args", default="", help="extra littune finetune flags, one string")
    parser.add_argument("--scorings", nargs="+", default=["likelihood", "generate"])
    parser.add_argument("--evaluate_quantize", nargs="*", default=[],
                        help="also evaluate the adapter on the base quantized so (e.g. bnb.nf4), by likelihood")
    parser.add_argument("--skip_base", action="store_true", help="do not evaluate the base model")
    parser.add_argument("--table", action="store_true", help="print the recorded runs and exit")
    args = parser.parse_args()
    if args.table:
        print(table(args.workdir))
        return
    print(json.dumps(run(args), indent=1))
    print(table(args.workdir))


if __name__ == "__main__":
    main()
