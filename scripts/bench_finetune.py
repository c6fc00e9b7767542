#!/usr/bin/env python
"""littune vs litgpt: adapter_v2 fine-tuning throughput on the same model, data and settings (issues 9, 19).

    python scripts/bench_finetune.py                        # Pythia-160M shape, 32-true, bf16-mixed, bf16-true
    python scripts/bench_finetune.py --model small          # Pythia-70M shape: the same comparison, faster
    python scripts/bench_finetune.py --precisions 32-true --max_steps 8 --rounds 3

Each precision is measured side by side (both tools, alternating); a bf16 precision is skipped, with one line, on a
CPU whose bfloat16 matmuls run at under a tenth of float32's speed (AVX2 without AVX512-BF16/AMX: ~1 GFLOP/s, one
step would take hours). At the end, one table row per precision: the means and the ratios littune / litgpt.
    python scripts/bench_finetune.py --rounds 0 --profile 2 # only a torch-profiler table of 2 littune steps
    python scripts/bench_finetune.py --checkpoint_dir checkpoints/EleutherAI/pythia-160m   # a real converted model

What it does:
1. The model: `--model small` (the Pythia-70M shape: 6 layers, hidden 512) or `--model pythia-160m` (12 layers,
   hidden 768, 12 heads, intermediate 3072, rotary 0.25, vocab 50304), litgpt's named config sizes, random init,
   written by transformers' `save_pretrained` with the real Pythia tokenizer (../shared/data/tokenizers/pythia),
   then `littune convert`. Cached in WORKDIR/checkpoints/NAME (or pass --checkpoint_dir).
2. The data: `littune prepare --max_seq_length 512` of ../shared/data/alpaca/stanford_alpaca_long2000.json; its
   train/test split is also written as train.json/val.json, so litgpt's own JSON data module tokenises exactly the
   same records (checked once: litgpt's SFTDataset gives the same token ids for every record). Cached in WORKDIR/data.
3. Rounds: each round runs `littune finetune adapter_v2` and `python -m litgpt finetune_adapter_v2` as subprocesses
   with the same micro-batch (4), global batch (16), max_seq_length (512), precision, optimizer steps, learning rate
   and warmup; evaluation and checkpointing are pushed past the run (litgpt's 2-batch sanity validation and littune's
   end-of-run validation happen outside the timed window). The order alternates (ABBA...) so drifting load from
   other processes hits both tools alike. litgpt's DataLoader runs with --litgpt_num_workers (default 0: on 2 cores
   worker processes only compete with training; littune tokenises in `prepare`, litgpt on the fly either way).
4. Timing excludes the first --skip_steps optimizer steps (warm-up): littune from its metrics.csv (`elapsed_sec`,
   `tokens` at the end of each step), litgpt from its CSV log (`time` since its loop started, `tokens`, `lengths` =
   padded tokens, at each iteration; its CSV `step` column is the iteration, and a step ends every 4th iteration).
   Padded tokens of littune come from its own batch plan (`schedule.plan_epoch` + `model.collate` on the run's
   hyperparameters.yaml); litgpt's are logged and cross-checked against a replay of its own DataLoader.

Printed per run: real (non-padding) tokens/s, padded tokens/s, padding fraction, peak RSS (os.wait4 of the
subprocess), final training loss, and model FLOP/s = 6 * N * padded tokens / s as a fraction of this machine's
float32 (or bf16) matmul peak, timed in this process before every run (N = parameters minus the embedding lookup;
6NT is an upper bound for adapter fine-tuning: frozen weights need no weight gradients, so ~4NT is done; attention
score FLOPs are not counted). Then the mean per tool and the ratios littune / litgpt.

Logs and run folders: WORKDIR/runs/<tool>-<round>/ (the subprocess output in log.txt).
"""

import argparse
import csv
import inspect
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LITTUNE_SHARED_DATA", REPO.parent / "shared" / "data"))
MODELS = {"small": "pythia-70m", "pythia-160m": "pythia-160m"}  # --model -> litgpt config name (a real Pythia shape)
NEVER = 10**9  # an eval / save interval past any run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--data_file", type=Path, default=SHARED_DATA / "alpaca" / "stanford_alpaca_long2000.json")
    parser.add_argument("--max_seq_length", type=int, default=512)
    parser.add_argument("--micro_batch_size", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_steps", type=int, default=4, help="optimizer steps per run")
    parser.add_argument("--skip_steps", type=int, default=1, help="first steps left out of the timing (warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each tool (alternating order)")
    parser.add_argument("--precisions", default="32-true,bf16-mixed,bf16-true",
                        help="comma-separated; each measured side by side for both tools (the same for both)")
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--warmup_steps", type=int, default=100)
    parser.add_argument("--litgpt_num_workers", type=int, default=0)
    parser.add_argument("--tools", default="littune,litgpt", help="comma-separated subset of littune,litgpt")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="afterwards, run littune for STEPS steps under the torch profiler and print its top ops")
    args = parser.parse_args(argv)
    if args.max_steps <= args.skip_steps:
        parser.error("--max_steps must be larger than --skip_steps")
    if args.batch_size % args.micro_batch_size:
        parser.error("--batch_size must be a multiple of --micro_batch_size")
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    if not tools or set(tools) - {"littune", "litgpt"}:
        parser.error("--tools takes littune and/or litgpt")

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    workdir = args.workdir.resolve()
    checkpoint_dir = args.checkpoint_dir.resolve() if args.checkpoint_dir else build_checkpoint(args.model, workdir)
    data_dir = prepare_data(checkpoint_dir, args.data_file.resolve(), args.max_seq_length, workdir)
    n_flop_params = flop_parameters(checkpoint_dir)

    import torch

    parity = json.loads((data_dir / "litgpt" / "parity.json").read_text())
    print(f"model {checkpoint_dir} ({n_flop_params / 1e6:.1f}M parameters besides the embedding)\n"
          f"data {data_dir} (litgpt's JSON module tokenises {parity['same_token_ids']}/{parity['train']} train "
          f"records to littune's token ids)", flush=True)
    print(f"settings: precisions {args.precisions}, micro-batch {args.micro_batch_size}, batch {args.batch_size}, "
          f"max_seq_length {args.max_seq_length}, {args.max_steps} steps per run (first {args.skip_steps} not timed), "
          f"torch threads {torch.get_num_threads()}, cpu cores {os.cpu_count()}, load {load_average()}", flush=True)
    print(f"littune {littune_revision()}", flush=True)

    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    if set(precisions) - {"32-true", "bf16-mixed", "bf16-true"}:
        parser.error("--precisions takes 32-true, bf16-mixed and/or bf16-true")
    summary = []
    for precision in precisions:
        args.precision = precision
        print(f"\n=== precision {precision}", flush=True)
        bf16, fp32 = (matmul_peak(p, n=512, repeats=2) for p in ("bf16-true", "32-true"))  # small: bf16 may crawl
        if precision.startswith("bf16") and bf16 < fp32 / 10:
            print(f"skipped: bfloat16 matmuls run at {bf16 / 1e9:.1f} GFLOP/s on this CPU against {fp32 / 1e9:.0f} in "
                  f"float32 (no AVX512-BF16 or AMX): one step would take hours. Measure {precision} on a CPU with "
                  f"bf16 matrix instructions or a GPU.", flush=True)
            continue
        order = [tools if r % 2 == 0 else tools[::-1] for r in range(args.rounds)]  # ABBA...: drift hits both
        results, peaks = [], []
        for round_index, round_tools in enumerate(order, start=1):
            for tool in round_tools:
                peaks.append(matmul_peak(args.precision))
                print(f"round {round_index}: {tool} (matmul {peaks[-1] / 1e9:.0f} GFLOP/s just before, load "
                      f"{load_average()}) ...", flush=True)
                result = run_tool(tool, round_index, args, checkpoint_dir, data_dir, workdir)
                results.append(result)
                print(f"    {result['timed_s']:.1f}s timed, {result['wall_s']:.1f}s wall, "
                      f"{result['real_tps']:,.0f} real tokens/s", flush=True)
        if results:
            peaks.append(matmul_peak(args.precision))
            summary.append((precision, print_table(results, peaks, n_flop_params, args)))
    if summary:
        print("\n| precision | littune real tokens/s | litgpt real tokens/s | ratio | littune peak RSS GB | litgpt peak RSS "
              "GB | ratio | littune wall s | litgpt wall s |\n|" + " --- |" * 9)
        for precision, means in summary:
            a, b = means.get("littune"), means.get("litgpt")
            if a and b:
                print(f"| {precision} | {a['real_tps']:,.0f} | {b['real_tps']:,.0f} | x{a['real_tps'] / b['real_tps']:.2f} | "
                      f"{a['peak_rss_gb']:.2f} | {b['peak_rss_gb']:.2f} | x{a['peak_rss_gb'] / b['peak_rss_gb']:.2f} | "
                      f"{a['wall_s']:.0f} | {b['wall_s']:.0f} |")
    if args.profile:
        profile_littune(args, checkpoint_dir, data_dir, workdir)
    return 0


# ------------------------------------------------------------------------------------------ checkpoint and data


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model / --checkpoint_dir / --workdir, shared with bench_generate.py (resolved by build_checkpoint)."""
    parser.add_argument("--model", choices=sorted(MODELS), default="pythia-160m")
    parser.add_argument("--checkpoint_dir", type=Path, help="a converted checkpoint to use instead of --model")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/littune-bench"))


def build_checkpoint(model: str, workdir: Path) -> Path:
    """A random-init GPT-NeoX of a Pythia shape, in HF format with the real Pythia tokenizer, converted by littune.
    The folder is named after the litgpt config, so `littune convert` picks that named config."""
    name = MODELS[model]
    folder = workdir / "checkpoints" / name
    if (folder / "lit_model.pth").is_file() and (folder / "model_config.yaml").is_file():
        return folder
    import torch
    import transformers
    from litgpt import Config

    import littune.cli

    c = Config.from_name(name)
    building = workdir / "checkpoints" / ".building" / name
    shutil.rmtree(building, ignore_errors=True)
    building.mkdir(parents=True)
    print(f"building a random-init {name} checkpoint in {folder} ...", flush=True)
    torch.manual_seed(0)
    hf_config = transformers.GPTNeoXConfig(
        vocab_size=c.padded_vocab_size, hidden_size=c.n_embd, num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head, intermediate_size=c.intermediate_size, rotary_pct=c.rotary_percentage,
        rotary_emb_base=c.rope_base, max_position_embeddings=c.block_size, layer_norm_eps=c.norm_eps,
        use_parallel_residual=c.parallel_residual, hidden_act="gelu", tie_word_embeddings=False,
    )
    transformers.GPTNeoXForCausalLM(hf_config).save_pretrained(building)
    for src in (SHARED_DATA / "tokenizers" / "pythia").glob("*.json"):
        shutil.copyfile(src, building / src.name)
    if littune.cli.main(["convert", "--checkpoint_dir", str(building)]) != 0:
        raise SystemExit("littune convert failed")
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    os.replace(building, folder)
    return folder


def prepare_data(checkpoint_dir: Path, data_file: Path, max_seq_length: int, workdir: Path) -> Path:
    """`littune prepare` output plus the same split as litgpt JSON (litgpt/train.json, litgpt/val.json)."""
    folder = workdir / "data" / f"{checkpoint_dir.name}-{data_file.stem}-L{max_seq_length}"
    done = folder / "litgpt" / "parity.json"
    if done.is_file() and json.loads(done.read_text()).get("checkpoint_dir") == str(checkpoint_dir):
        return folder
    import torch

    import littune.cli
    from littune.prepared import load_prepared

    shutil.rmtree(folder, ignore_errors=True)
    if littune.cli.main(["prepare", "--data_file", str(data_file), "--checkpoint_dir", str(checkpoint_dir),
                         "--destination_path", str(folder), "--max_seq_length", str(max_seq_length)]) != 0:
        raise SystemExit("littune prepare failed")
    train, test, meta = load_prepared(folder)
    (folder / "litgpt").mkdir()
    for records, name in ((train, "train.json"), (test, "val.json")):
        rows = [{k: r[k] for k in ("instruction", "input", "output")} for r in records]
        (folder / "litgpt" / name).write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    # litgpt tokenises the JSON itself: check it gets littune's token ids, record by record
    dataset = litgpt_datamodule(folder, checkpoint_dir, max_seq_length, meta.get("prompt_style", "alpaca"), True)
    same = sum(torch.equal(dataset.train_dataset[i]["input_ids"], r["input_ids"]) for i, r in enumerate(train))
    print(f"litgpt's JSON data module tokenises {same}/{len(train)} train records to littune's token ids", flush=True)
    done.write_text(json.dumps({"checkpoint_dir": str(checkpoint_dir), "same_token_ids": same, "train": len(train)}))
    return folder


def litgpt_datamodule(data_dir: Path, checkpoint_dir: Path, max_seq_length: int, prompt_style: str = "alpaca",
                      tokenizer: bool = False, micro_batch_size: int = 1):
    """litgpt's JSON data module as `litgpt finetune_adapter_v2 --data JSON` builds it (seed 42 is its default)."""
    from litgpt import Tokenizer
    from litgpt.data import JSON

    data = JSON(json_path=data_dir / "litgpt", prompt_style=prompt_style, num_workers=0)
    data.connect(tokenizer=Tokenizer(checkpoint_dir) if tokenizer else None, batch_size=micro_batch_size,
                 max_seq_length=max_seq_length)
    data.setup()
    return data


def flop_parameters(checkpoint_dir: Path) -> int:
    """Parameters that do matmul work per token: all but the embedding lookups (the adapter model, on meta)."""
    from dataclasses import asdict

    import torch
    from litgpt.adapter_v2 import GPT, Config

    from littune.checkpoints import load_model_config

    with torch.device("meta"):
        model = GPT(Config(**asdict(load_model_config(checkpoint_dir))))
    return sum(p.numel() for name, p in model.named_parameters() if not name.endswith("wte.weight"))


# ---------------------------------------------------------------------------------------------------- the runs


def command(tool: str, args, checkpoint_dir: Path, data_dir: Path, out_dir: Path, max_steps: int) -> list:
    if tool == "littune":
        return [sys.executable, "-m", "littune.cli", "finetune", "adapter_v2",
                "--checkpoint_dir", str(checkpoint_dir), "--data_dir", str(data_dir), "--out_dir", str(out_dir),
                "--precision", args.precision, "--batch_size", str(args.batch_size),
                "--micro_batch_size", str(args.micro_batch_size), "--max_steps", str(max_steps),
                "--learning_rate", str(args.learning_rate), "--warmup_steps", str(args.warmup_steps),
                "--eval_interval", str(NEVER), "--eval_iters", "1", "--save_interval", str(NEVER),
                "--log_interval", "1"]
    optimizer = {"class_path": "torch.optim.AdamW",
                 "init_args": {"lr": args.learning_rate, "weight_decay": 0.02, "betas": [0.9, 0.95]}}
    return [sys.executable, "-m", "litgpt", "finetune_adapter_v2", str(checkpoint_dir), "--out_dir", str(out_dir),
            "--precision", args.precision, "--data", "JSON", "--data.json_path", str(data_dir / "litgpt"),
            "--data.num_workers", str(args.litgpt_num_workers),
            "--train.global_batch_size", str(args.batch_size), "--train.micro_batch_size", str(args.micro_batch_size),
            "--train.max_steps", str(max_steps), "--train.max_seq_length", str(args.max_seq_length),
            "--train.lr_warmup_steps", str(args.warmup_steps), "--train.save_interval", str(NEVER),
            "--train.log_interval", "1", "--eval.interval", str(NEVER), "--eval.max_iters", "1",
            "--eval.final_validation", "false", "--optimizer", json.dumps(optimizer), "--logger_name", "csv"]


def run_tool(tool: str, round_index: int, args, checkpoint_dir: Path, data_dir: Path, workdir: Path) -> dict:
    out_dir = workdir / "runs" / f"{tool}-{args.precision}-{round_index}"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    log_path = out_dir / "log.txt"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
           "JSONARGPARSE_DEPRECATION_WARNINGS": "off", "PYTHONWARNINGS": "ignore"}
    cmd = command(tool, args, checkpoint_dir, data_dir, out_dir, args.max_steps)
    (out_dir / "command.txt").write_text(shlex.join(cmd) + "\n")
    start, busy_start = time.perf_counter(), cpu_busy_seconds()
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=out_dir)
        _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage: its peak RSS
        process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    others = max(cpu_busy_seconds() - busy_start - usage.ru_utime - usage.ru_stime, 0.0) / wall
    if process.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-30:]
        raise SystemExit(f"{tool} failed (exit {process.returncode}); {log_path} ends with:\n" + "\n".join(tail))
    parse = parse_littune if tool == "littune" else parse_litgpt
    result = parse(out_dir, args, checkpoint_dir, data_dir)
    result.update(tool=tool, round=round_index, wall_s=wall, peak_rss_gb=usage.ru_maxrss / 1e6,  # kB on Linux
                  others_cores=others)
    result["real_tps"] = result["real_tokens"] / result["timed_s"]
    result["padded_tps"] = result["padded_tokens"] / result["timed_s"]
    result["padding"] = 1 - result["real_tokens"] / result["padded_tokens"]
    return result


def read_csv(path: Path) -> list:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def parse_littune(out_dir: Path, args, checkpoint_dir: Path, data_dir: Path) -> dict:
    rows = {int(r["step"]): r for r in read_csv(out_dir / "metrics.csv") if r.get("step", "").isdigit()}
    first, last = args.skip_steps, args.max_steps
    if last not in rows or first not in rows:
        raise SystemExit(f"{out_dir / 'metrics.csv'}: no rows for steps {first} and {last}")
    real = int(rows[last]["tokens"]) - int(rows[first]["tokens"])
    planned_real, padded = littune_planned_tokens(out_dir, data_dir, first, last)
    if planned_real != real:
        print(f"    note: littune's plan replay gives {planned_real} real tokens for steps {first + 1}-{last}, its log "
              f"{real}: the padded count below follows the replay of schedule.plan_epoch/model.collate", flush=True)
    return {"timed_s": float(rows[last]["elapsed_sec"]) - float(rows[first]["elapsed_sec"]),
            "real_tokens": real, "padded_tokens": padded, "final_loss": float(rows[last]["train_loss"]),
            "timed_steps": last - first}


def littune_planned_tokens(out_dir: Path, data_dir: Path, first: int, last: int) -> tuple:
    """(real, padded) tokens of steps first+1..last as littune's loop forms them: its own plan_epoch on the run's
    hyperparameters, each micro-batch collated by its own collate (whatever padding that does)."""
    import torch
    import yaml

    from littune import model
    from littune.prepared import load_prepared
    from littune.finetune import schedule

    hp = yaml.safe_load((out_dir / "hyperparameters.yaml").read_text())
    train, _, meta = load_prepared(data_dir)
    lengths = [len(r["input_ids"]) for r in train]
    plan_args = {"lengths": lengths, "batch_size": hp["batch_size"], "micro_batch_size": hp["micro_batch_size"],
                 "world_size": hp["devices"] * hp["num_nodes"], "seed": hp["seed"],
                 "group_by_length": hp.get("group_by_length", False)}
    accepted = inspect.signature(schedule.plan_epoch).parameters
    steps, epoch = [], 0
    while len(steps) < last:
        plan = schedule.plan_epoch(**{k: v for k, v in plan_args.items() if k in accepted}, epoch=epoch)
        steps += plan
        epoch += 1
    real = padded = 0
    ignore_index = int(meta.get("ignore_index", -100))
    for step in steps[first:last]:
        for rank_batches in step:
            for micro in rank_batches:
                real += sum(lengths[i] for i in micro)
                try:
                    padded += model.collate(train, micro, ignore_index, torch.device("cpu"))[0].numel()
                except (AttributeError, TypeError):  # collate changed: pad to the longest record
                    padded += len(micro) * max(lengths[i] for i in micro)
    return real, padded


def parse_litgpt(out_dir: Path, args, checkpoint_dir: Path, data_dir: Path) -> dict:
    logs = sorted(out_dir.glob("**/metrics.csv"))
    if not logs:
        raise SystemExit(f"{out_dir}: litgpt wrote no metrics.csv")
    by_iter = {}
    for row in read_csv(logs[-1]):  # several rows per iteration (throughput monitor, loss); `step` is the iteration
        it = int(float(row["step"]))
        by_iter.setdefault(it, {}).update({k: v for k, v in row.items() if v not in ("", None)})
    accumulation = args.batch_size // args.micro_batch_size
    first, last = args.skip_steps * accumulation, args.max_steps * accumulation
    if first not in by_iter or last not in by_iter:
        raise SystemExit(f"{logs[-1]}: no rows for iterations {first} and {last}")
    a, b = by_iter[first], by_iter[last]
    padded = int(float(b["lengths"])) - int(float(a["lengths"]))
    replayed = litgpt_replayed_padding(args, checkpoint_dir, data_dir, first, last)
    if replayed != padded:
        print(f"    note: litgpt logged {padded} padded tokens for iterations {first + 1}-{last}; a replay of its "
              f"sampler gives {replayed}", flush=True)
    return {"timed_s": float(b["time"]) - float(a["time"]), "real_tokens": int(float(b["tokens"])) -
            int(float(a["tokens"])), "padded_tokens": padded, "final_loss": float(b["loss"]),
            "timed_steps": args.max_steps - args.skip_steps}


def litgpt_replayed_padding(args, checkpoint_dir: Path, data_dir: Path, first: int, last: int) -> int:
    """litgpt's padded tokens of iterations first+1..last, from its own DataLoader (seeded shuffle, its collate).
    Iterating the loader matters: `iter(DataLoader)` draws a seed from the shared generator before the sampler."""
    import itertools

    data = litgpt_datamodule(data_dir, checkpoint_dir, args.max_seq_length, tokenizer=True,
                             micro_batch_size=args.micro_batch_size)
    batches = itertools.islice(iter(data.train_dataloader()), last)
    return sum(batch["input_ids"].numel() for i, batch in enumerate(batches) if i >= first)


# -------------------------------------------------------------------------------------------------- measuring


def matmul_peak(precision: str, n: int = 2048, repeats: int = 6) -> float:
    """Best FLOP/s of an n x n @ n x n matmul in the run's dtype, on torch's default threads."""
    import torch

    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float32
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def cpu_busy_seconds() -> float:
    """CPU seconds all processes (and the hypervisor's steal) used so far, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def littune_revision() -> str:
    """The commit the littune code comes from, and whether the working tree changes the training loop."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    changed = git("status", "--porcelain", "--", "littune/finetune")
    return f"at {git('rev-parse', '--short', 'HEAD') or '?'}" + (
        f" plus uncommitted changes in littune/finetune ({changed.replace(chr(10), ', ')})" if changed else "")


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def print_table(results: list, peaks: list, n_params: int, args) -> None:
    peak = max(peaks)
    print()
    print(f"matmul peak ({'bf16' if args.precision.startswith('bf16') else 'fp32'}, 2048^3, best of the "
          f"{len(peaks)} measurements): {peak / 1e9:.0f} GFLOP/s (lowest {min(peaks) / 1e9:.0f}: other load)")
    header = (f"{'tool':<8} {'round':>5} {'steps':>5} {'time s':>7} {'real tok/s':>10} {'padded tok/s':>12} "
              f"{'padding':>7} {'peak RSS GB':>11} {'final loss':>10} {'6NT FLOP/s':>10} {'of peak':>7} {'others':>6}")
    print(header)
    print("-" * len(header))

    def row(label, rnd, r):
        flops = 6 * n_params * r["padded_tps"]
        print(f"{label:<8} {rnd:>5} {r['timed_steps']:>5} {r['timed_s']:>7.1f} {r['real_tps']:>10,.0f} "
              f"{r['padded_tps']:>12,.0f} {r['padding']:>7.1%} {r['peak_rss_gb']:>11.2f} {r['final_loss']:>10.4f} "
              f"{flops / 1e9:>9.1f}G {flops / peak:>7.1%} {r['others_cores']:>6.2f}")

    for r in results:
        row(r["tool"], r["round"], r)
    print("-" * len(header))
    means = {}
    for tool in dict.fromkeys(r["tool"] for r in results):
        mine = [r for r in results if r["tool"] == tool]
        means[tool] = {k: statistics.mean(r[k] for r in mine) for k in
                       ("timed_s", "real_tps", "padded_tps", "padding", "peak_rss_gb", "final_loss", "real_tokens",
                        "padded_tokens", "others_cores", "wall_s")}
        means[tool]["timed_steps"] = mine[0]["timed_steps"]
        row(tool, "mean", means[tool])
    if set(means) == {"littune", "litgpt"}:
        a, b = means["littune"], means["litgpt"]
        print(f"littune / litgpt: real tokens/s x{a['real_tps'] / b['real_tps']:.2f}, padded tokens/s "
              f"x{a['padded_tps'] / b['padded_tps']:.2f}, padding {a['padding']:.1%} vs {b['padding']:.1%}, "
              f"peak RSS x{a['peak_rss_gb'] / b['peak_rss_gb']:.2f}")
    print_note(n_params)
    return means


def print_note(n_params: int) -> None:
    print("(final loss: littune = mean over the last step's target tokens; litgpt = mean of its last 4 micro-batch "
          "means. 6NT FLOP/s uses padded tokens and N = %.1fM; it over-counts adapter training, whose frozen weights "
          "need no weight gradients (~4NT), and leaves out attention scores. others = CPU cores other processes and "
          "the hypervisor's steal kept busy during the run, on average: contention.)" % (n_params / 1e6))


def profile_littune(args, checkpoint_dir: Path, data_dir: Path, workdir: Path) -> None:
    """One littune run of --profile steps under torch.profiler; loop functions are labelled with record_function."""
    out_dir = workdir / "runs" / "littune-profile"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    cmd = command("littune", args, checkpoint_dir, data_dir, out_dir, args.profile)[3:]  # the littune arguments
    code = f"""
import sys, torch
from torch.profiler import profile, record_function, ProfilerActivity
import littune.cli
from littune.finetune import evaluation, loop

def labelled(name, fn):
    def wrapper(*a, **k):
        with record_function("loop." + name):
            return fn(*a, **k)
    return wrapper

for name in ("train_step", "collate", "forward_loss_sum", "validate", "sample_response",
             "save_training_state", "save_weights"):
    for module in (loop, evaluation):  # the evaluations' passes run in evaluation.py
        if hasattr(module, name):
            setattr(module, name, labelled(name, getattr(module, name)))
with profile(activities=[ProfilerActivity.CPU]) as prof:
    rc = littune.cli.main({cmd!r})
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40, max_name_column_width=60))
sys.exit(rc)
"""
    print(f"\nprofiling littune for {args.profile} steps ({out_dir}) ...", flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=out_dir)
    (out_dir / "log.txt").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"profiling run failed; see {out_dir / 'log.txt'}:\n{result.stderr[-3000:]}")
    print(result.stdout)


if __name__ == "__main__":
    sys.exit(main())
