#!/usr/bin/env python
"""littune against a plain transformers + PEFT LoRA loop on a real model: the same batches, side by side (issue 19).

    python scripts/bench_peft.py                          # SmolLM2-135M-Instruct, SST-2, 32-true, 12 steps per run
    python scripts/bench_peft.py --precision bf16-true    # where the CPU (AVX512-BF16/AMX) or a GPU has fast bf16

The model is SmolLM2-135M-Instruct from the Q4_1 GGUF in ../shared/data/models: `littune convert` gives littune's
checkpoint; transformers' own GGUF loader gives the HF model of the same dequantized weights (saved once as
safetensors, loaded from there like a Hub model). The data: a seeded sample of SST-2 training sentences prepared by
`littune prepare` exactly as scripts/bench_accuracy.py prepares them (littune's defaults: the chat template).

Runs, each a subprocess timed on its own (peak RSS from os.wait4):
- littune lora: `littune finetune lora --lora_r 8 --lora_alpha 16 --lora_dropout D --lora_targets [query,value]`
- PEFT lora: transformers' model + `peft.get_peft_model(LoraConfig(r=8, lora_alpha=16, lora_dropout=D,
  target_modules=[q_proj, v_proj]))`, AdamW (the same learning rate, betas and weight decay), gradient clipping 1.0,
  the loss through transformers' `labels=` with the attention mask, as a plain training loop writes it. Its
  micro-batches are littune's, record for record: littune's own `schedule.plan_epoch` and `model.collate` on the
  littune run's hyperparameters.
- littune adapter_v2, beside them.
Micro-batch 4, batch 16, the same precision; the first --skip_steps steps are left out of the timing.

Model FLOPs, printed with its formula: per record of l real tokens, l x (6 x trainable + 4 x frozen matrix
parameters) + 6 x layers x attention width x l^2 (a frozen weight needs the input gradient, not its own; causal
attention: QK^T and AV are l^2/2 x width multiply-adds each, backward twice forward). The embedding lookup is not a
matmul and is left out; a tied lm_head is counted once, as the matrix it is. Achieved FLOP/s = model FLOPs of the
timed steps / their time, as a fraction of the best matmul FLOP/s this machine reaches at the model's own shapes
(micro-batch x tokens rows times each weight matrix), measured by this script in the run's dtype.

Two cores are easily oversubscribed: run this alone on the machine.
"""

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import bench_accuracy  # the same checkpoint, SST-2 sample and prepare flags as the accuracy benchmark

REPO = Path(__file__).resolve().parents[1]
NEVER = 10**9
LORA = {"r": 8, "alpha": 16}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/littune-bench-peft"))
    parser.add_argument("--train_records", type=int, default=400)
    parser.add_argument("--precision", choices=["32-true", "bf16-true"], default="32-true")
    parser.add_argument("--micro_batch_size", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_steps", type=int, default=12)
    parser.add_argument("--lora_dropout", type=float, default=0.0,
                        help="both sides (PEFT's default 0.0; littune shares a prompt prefix only without dropout)")
    parser.add_argument("--skip_steps", type=int, default=2, help="first steps left out of the timing (warm-up)")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--runs", default="littune-lora,peft-lora,littune-adapter_v2")
    parser.add_argument("--peft_worker", type=Path, help=argparse.SUPPRESS)  # internal: the PEFT loop, in a child
    args = parser.parse_args(argv)
    if args.peft_worker:
        return peft_worker(json.loads(args.peft_worker.read_text()))

    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "commands.log"
    checkpoint = bench_accuracy.checkpoint(workdir, log)
    data = prepare(workdir, checkpoint, args.train_records, log)
    hf_dir = hf_model(workdir, checkpoint)
    import torch

    print(f"model {checkpoint}\ndata {data} ({args.train_records} SST-2 training sentences)\nprecision "
          f"{args.precision}, micro-batch {args.micro_batch_size}, batch {args.batch_size}, {args.max_steps} steps "
          f"(first {args.skip_steps} not timed), torch threads {torch.get_num_threads()}, load {load_average()}",
          flush=True)
    results = []
    for name in [r.strip() for r in args.runs.split(",") if r.strip()]:
        print(f"{name} ...", flush=True)
        results.append(run(name, args, checkpoint, data, hf_dir, workdir))
        r = results[-1]
        print(f"    {r['real_tps']:,.0f} real tokens/s, peak RSS {r['peak_rss_gb']:.2f} GB, {r['wall_s']:.1f}s wall "
              f"(start-up {r['startup_s']:.1f}s), step-1 loss {r['first_loss']:.4f}", flush=True)
    print_table(results, args, checkpoint, data)
    return 0


def prepare(workdir: Path, checkpoint: Path, n: int, log: Path) -> Path:
    data = workdir / f"data-{n}"
    if not (data / "train.pt").is_file():
        train_file = bench_accuracy.sample_train(workdir, n, 0)
        bench_accuracy.littune("prepare", "--data_file", str(train_file), "--test_file",
                               str(bench_accuracy.SST2 / "dev.tsv"), "--checkpoint_dir", str(checkpoint),
                               "--destination_path", str(data), "--columns", bench_accuracy.COLUMNS,
                               "--output_values", bench_accuracy.VALUES, "--overwrite", "true", log=log)
    return data


def hf_model(workdir: Path, checkpoint: Path) -> Path:
    """The same GGUF through transformers' own loader, saved once as an HF folder (safetensors)."""
    folder = workdir / "hf" / checkpoint.name
    if (folder / "config.json").is_file():
        return folder
    import torch
    import transformers

    gguf = next(checkpoint.glob("*.gguf"))
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, gguf_file=gguf.name, dtype=torch.float32)
    model.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------------- the runs


def run(name: str, args, checkpoint: Path, data: Path, hf_dir: Path, workdir: Path) -> dict:
    out = workdir / "runs" / name
    if out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True)
    common = ["--checkpoint_dir", str(checkpoint), "--data_dir", str(data), "--out_dir", str(out),
              "--precision", args.precision, "--batch_size", str(args.batch_size), "--micro_batch_size",
              str(args.micro_batch_size), "--max_steps", str(args.max_steps), "--learning_rate",
              str(args.learning_rate), "--warmup_steps", "0", "--eval_interval", str(NEVER), "--eval_iters", "1",
              "--save_interval", str(NEVER), "--log_interval", "1", "--logger", "[csv]"]
    if name == "littune-lora":
        cmd = [sys.executable, "-m", "littune.cli", "finetune", "lora", *common, "--lora_r", str(LORA["r"]),
               "--lora_alpha", str(LORA["alpha"]), "--lora_dropout", str(args.lora_dropout),
               "--lora_targets", "[query, value]"]
    elif name == "littune-adapter_v2":
        cmd = [sys.executable, "-m", "littune.cli", "finetune", "adapter_v2", *common]
    elif name == "peft-lora":
        job = {"hf_dir": str(hf_dir), "data": str(data), "out": str(out), "precision": args.precision,
               "lora_dropout": args.lora_dropout,
               "steps": plan(data, args), "learning_rate": args.learning_rate}
        (out / "job.json").write_text(json.dumps(job))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--peft_worker", str(out / "job.json")]
    else:
        raise SystemExit(f"--runs: unknown run {name!r} (littune-lora, peft-lora, littune-adapter_v2)")
    (out / "command.txt").write_text(shlex.join(cmd) + "\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    with open(out / "log.txt", "w") as f:
        process = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        tail = (out / "log.txt").read_text(errors="replace").splitlines()[-20:]
        raise SystemExit(f"{name} failed; {out / 'log.txt'} ends with:\n" + "\n".join(tail))
    steps = read_steps(out)  # step -> (seconds since the loop started, real tokens so far, loss)
    first, last = args.skip_steps, args.max_steps
    timed = steps[last][0] - steps[first][0]
    real = steps[last][1] - steps[first][1]
    return {"name": name, "timed_s": timed, "real_tokens": real, "real_tps": real / timed, "wall_s": wall,
            "startup_s": wall - steps[last][0], "peak_rss_gb": usage.ru_maxrss / 1e6, "first_loss": steps[1][2],
            "last_loss": steps[last][2]}


def read_steps(out: Path) -> dict:
    import csv

    if (out / "steps.json").is_file():  # the PEFT worker
        return {int(k): tuple(v) for k, v in json.loads((out / "steps.json").read_text()).items()}
    with open(out / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and r.get("train_loss")]
    return {int(r["step"]): (float(r["elapsed_sec"]), int(r["tokens"]), float(r["train_loss"])) for r in rows}


def plan(data: Path, args) -> list:
    """littune's micro-batches for the first max_steps steps (its seed 42, length grouping, one device)."""
    import torch

    from littune.finetune import args as train_args
    from littune.finetune import schedule

    defaults = train_args.TrainArgs.__dataclass_fields__
    train = torch.load(data / "train.pt", weights_only=True)
    lengths = [len(r["input_ids"]) for r in train]
    steps, epoch = [], 0
    while len(steps) < args.max_steps:
        steps += schedule.plan_epoch(lengths, args.batch_size, args.micro_batch_size, 1,
                                     seed=defaults["seed"].default, epoch=epoch,
                                     group_by_length=defaults["group_by_length"].default)
        epoch += 1
    return [step[0] for step in steps[:args.max_steps]]


def peft_worker(job: dict) -> int:
    """A plain transformers + PEFT LoRA loop over littune's micro-batches; steps.json as littune's metrics.csv."""
    started = time.perf_counter()
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from littune.model import collate

    dtype = torch.bfloat16 if job["precision"] == "bf16-true" else torch.float32
    model = transformers.AutoModelForCausalLM.from_pretrained(job["hf_dir"], dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=job["lora_dropout"],
                                             target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=job["learning_rate"], betas=(0.9, 0.95), weight_decay=0.02)
    train = torch.load(Path(job["data"]) / "train.pt", weights_only=True)
    model.train()
    loop_start, tokens, steps = time.perf_counter(), 0, {}
    for step, micro_batches in enumerate(job["steps"], start=1):
        losses = []
        for indices in micro_batches:
            input_ids, labels = collate(train, indices, -100, "cpu")
            attention_mask = torch.zeros_like(input_ids)
            for row, i in enumerate(indices):
                attention_mask[row, :len(train[i]["input_ids"])] = 1
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            (loss / len(micro_batches)).backward()
            losses.append(loss.item())
            tokens += int(attention_mask.sum())
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps[step] = (time.perf_counter() - loop_start, tokens, statistics.mean(losses))
    (Path(job["out"]) / "steps.json").write_text(json.dumps(steps))
    print(f"PEFT loop: {len(steps)} steps in {time.perf_counter() - loop_start:.1f}s "
          f"({time.perf_counter() - started:.1f}s with imports and loading)")
    return 0


# ------------------------------------------------------------------------------------------------ FLOPs, peak


def model_flops(checkpoint: Path, data: Path, args, method: str) -> tuple:
    """(FLOPs of the timed steps' records, trainable, frozen matrix parameters) per the formula in the docstring."""
    import torch

    from littune.checkpoints import load_model_config
    from littune.methods import get_method

    config = load_model_config(checkpoint)
    m = get_method(method)
    with torch.device("meta"):
        model = m.build_model(config, m.args())  # littune's LoRA defaults are PEFT's settings here: r 8, q and v
    trainable = sum(p.numel() for n, p in model.named_parameters() if m.is_trainable(n))
    # every weight matrix sits in an nn.Linear (litgpt's LoRA and adapter layers wrap one); LoRA's A and B do not
    frozen = sum(mod.weight.numel() for mod in model.modules() if isinstance(mod, torch.nn.Linear))
    train = torch.load(data / "train.pt", weights_only=True)
    records = [i for step in plan(data, args)[args.skip_steps:] for mb in step for i in mb]
    width = config.n_head * config.head_size
    flops = sum(len(train[i]["input_ids"]) * (6 * trainable + 4 * frozen)
                + 6 * config.n_layer * width * len(train[i]["input_ids"]) ** 2 for i in records)
    return flops, trainable, frozen, config


def matmul_peak(config, rows: int, dtype) -> float:
    """Best FLOP/s of rows x in @ in x out over the model's weight shapes, in dtype."""
    import torch

    shapes = {(config.n_embd, (config.n_head + 2 * config.n_query_groups) * config.head_size),
              (config.n_head * config.head_size, config.n_embd), (config.n_embd, config.intermediate_size),
              (config.intermediate_size, config.n_embd), (config.n_embd, config.padded_vocab_size)}
    best = 0.0
    for k, n in sorted(shapes):
        a, b = torch.randn(rows, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
        a @ b
        seconds = min(timed(lambda: a @ b) for _ in range(5))
        best = max(best, 2 * rows * k * n / seconds)
    return best


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def print_table(results: list, args, checkpoint: Path, data: Path) -> None:
    import torch

    train = torch.load(data / "train.pt", weights_only=True)
    rows = args.micro_batch_size * round(statistics.mean(len(r["input_ids"]) for r in train))
    dtype = torch.bfloat16 if args.precision == "bf16-true" else torch.float32
    flop_counts = {m: model_flops(checkpoint, data, args, m) for m in ("lora", "adapter_v2")}
    config = flop_counts["lora"][3]
    peak = matmul_peak(config, rows, dtype)
    other = matmul_peak(config, rows, torch.float32 if dtype == torch.bfloat16 else torch.bfloat16)
    print(f"\nmatmul peak at the model's shapes ({rows} rows x each weight matrix): {peak / 1e9:.1f} GFLOP/s in "
          f"{str(dtype).replace('torch.', '')} ({other / 1e9:.1f} in "
          f"{'float32' if dtype == torch.bfloat16 else 'bfloat16'})")
    print("model FLOPs per record of l tokens = l x (6 x trainable + 4 x frozen matrix parameters) + 6 x layers x "
          "attention width x l^2")
    for m, (_, trainable, frozen, _) in flop_counts.items():
        print(f"    {m}: trainable {trainable:,}, frozen {frozen:,}, layers {config.n_layer}, width "
              f"{config.n_head * config.head_size}")
    header = ("| run | real tokens/s | vs PEFT | peak RSS GB | vs PEFT | wall s (start-up) | step-1 loss | "
              "model GFLOP/s | MFU |")
    print("\n" + header + "\n|" + " --- |" * 9)
    peft = next((r for r in results if r["name"] == "peft-lora"), None)
    for r in results:
        method = "adapter_v2" if r["name"].endswith("adapter_v2") else "lora"
        achieved = flop_counts[method][0] / r["timed_s"]
        vs = lambda key: f"x{r[key] / peft[key]:.2f}" if peft else "-"  # noqa: E731
        print(f"| {r['name']} | {r['real_tps']:,.0f} | {vs('real_tps')} | {r['peak_rss_gb']:.2f} | "
              f"{vs('peak_rss_gb')} | {r['wall_s']:.1f} ({r['startup_s']:.1f}) | {r['first_loss']:.4f} | "
              f"{achieved / 1e9:.1f} | {achieved / peak:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
