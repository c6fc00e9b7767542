#!/usr/bin/env python
"""One fine-tuning step on a CPU, profiled: littune's own step against a plain litgpt step, per precision (issue 25).

    python scripts/profile_step.py --checkpoint_dir CKPT --data_dir DATA          # 32-true and bf16-true
    python scripts/profile_step.py ... --precisions 32-true,bf16-true,bf16-mixed --steps 4 --micro_batch_size 4

CKPT: a converted checkpoint (SmolLM2-135M-Instruct in the issue); DATA: a prepared folder (SST-2 with the chat
template, as scripts/bench_accuracy.py prepares it). Each precision, in this process, one torch thread per core:
- littune: `littune.finetune.loop.train_step` (adapter_v2, the micro-batch's shared prefix where it pays, the loss
  projected at the label positions only, AdamW, gradient clipping) through Fabric with that precision;
- plain litgpt: the same model and records padded to the longest, `model(input_ids)` and cross-entropy over every
  position's logits (litgpt's own finetune_adapter_v2 step), AdamW, clipping.
Both run --steps steps on the same micro-batch (the first of littune's plan) after one warm-up step; printed: the
median step time and records/s of each, the ratios bf16 / 32-true, and the top ops (self CPU time) of one step of
each under torch.profiler. Run it alone on the machine.
"""

import argparse
import statistics
import time
from pathlib import Path

import lightning as L
import torch

from bench_accuracy import cpu_flags  # noqa: E402 (scripts/ is on sys.path when a script in it runs)
from littune.finetune.loop import train_step
from littune.finetune.prefix import shared_prefix_length
from littune.finetune.schedule import make_optimizer, plan_epoch
from littune.methods import get_method
from littune.model import collate, load_model, unwrap


def plain_step(fabric, model, optimizer, data, indices, ignore_index, method) -> float:
    input_ids, labels = collate(data, indices, ignore_index, fabric.device)
    method.before_forward(unwrap(model))
    logits = model(input_ids)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(),
                                             labels[:, 1:].reshape(-1), ignore_index=ignore_index)
    fabric.backward(loss)
    fabric.clip_gradients(model, optimizer, max_norm=1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def measure(precision: str, args, data: list, indices: list) -> dict:
    method = get_method("adapter_v2")
    fabric = L.Fabric(accelerator="cpu", devices=1, precision=precision)
    results = {}
    for name in ("littune", "plain litgpt"):
        torch.manual_seed(0)
        model = load_model(fabric, args.checkpoint_dir, method, method.args(), trainable=True, sharded=False)
        optimizer = fabric.setup_optimizers(make_optimizer(model, 1e-3, 0.02))
        model.train()
        if name == "littune":
            def step():
                return train_step(fabric, model, optimizer, method, data, [[indices]], -100, 1.0, shared_prefix=True)
        else:
            def step():
                return plain_step(fabric, model, optimizer, data, indices, -100, method)
        step()  # warm-up
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
            step()
        results[name] = {"seconds": statistics.median(times),
                         "table": profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)}

    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_dir", type=Path, required=True)
    parser.add_argument("--data_dir", type=Path, required=True)
    parser.add_argument("--precisions", default="32-true,bf16-true")
    parser.add_argument("--micro_batch_size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--top", type=int, default=12, help="profiler rows per table")
    args = parser.parse_args()
    data = torch.load(args.data_dir / "train.pt", weights_only=True)
    lengths = [len(r["input_ids"]) for r in data]
    indices = plan_epoch(lengths, 16, args.micro_batch_size, 1, seed=1337, epoch=0)[0][0][0]
    shared = shared_prefix_length(data, indices)
    print(f"CPU: {cpu_flags()}, torch {torch.__version__}, {torch.get_num_threads()} threads\nmicro-batch: "
          f"{len(indices)} records of {[lengths[i] for i in indices]} tokens, {shared} shared")
    measured = {p: measure(p, args, data, indices) for p in args.precisions.split(",")}
    print("\n| precision | littune step | plain litgpt step | littune / plain (speed) |\n| --- | --- | --- | --- |")
    for precision, r in measured.items():
        a, b = r["littune"]["seconds"], r["plain litgpt"]["seconds"]
        print(f"| {precision} | {a:.3f} s | {b:.3f} s | {b / a:.2f}x |")
    base = measured.get("32-true")
    if base:
        for precision, r in measured.items():
            if precision != "32-true":
                print(f"{precision} vs 32-true: littune {base['littune']['seconds'] / r['littune']['seconds']:.2f}x, "
                      f"plain litgpt {base['plain litgpt']['seconds'] / r['plain litgpt']['seconds']:.2f}x")
    for precision, r in measured.items():
        for name, result in r.items():
            print(f"\n## {name}, {precision}: top ops by self CPU time\n{result['table']}")


if __name__ == "__main__":
    main()
