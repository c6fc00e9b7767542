"""The training schedule as pure functions: which records each optimizer step trains on, in a resumable order; the
learning rate at a step; the optimizer. Every rank computes the same schedule without talking to the others."""

import math
from typing import Iterator

import torch


def plan_epoch(lengths: list, batch_size: int, micro_batch_size: int, world_size: int, seed: int, epoch: int,
               group_by_length: bool = True) -> list:
    """The epoch's optimizer steps; each is, per rank, a list of micro-batches (lists of record indices).

    A pure function of its arguments: every rank computes the same plan without talking to the others, and a
    resumed run recomputes it. Records are shuffled with a generator seeded by (seed, epoch); every record is seen
    once per epoch (the last step may be smaller). With group_by_length, the shuffled records are sorted by length
    within pools of 64 steps' worth, cut into steps, and the steps shuffled again: a micro-batch holds records of
    similar length (little padding), while which records share a step, and the order of steps, stay random.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if group_by_length:
        pool = batch_size * 64
        order = [i for start in range(0, len(order), pool)
                 for i in sorted(order[start:start + pool], key=lambda i: lengths[i])]
    steps = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    if group_by_length:
        steps = [steps[i] for i in torch.randperm(len(steps), generator=generator).tolist()]
    plan = []
    for records in steps:
        # contiguous micro-batches (similar lengths together), dealt to the ranks in turn
        micro = [records[i:i + micro_batch_size] for i in range(0, len(records), micro_batch_size)]
        plan.append([micro[r::world_size] for r in range(world_size)])
    return plan


def steps_from(lengths: list, batch_size: int, micro_batch_size: int, world_size: int, seed: int,
               group_by_length: bool, epoch: int, step_in_epoch: int) -> Iterator[tuple[int, int, list]]:
    """(epoch, steps done in that epoch after this one, the step's micro-batches per rank), endlessly, starting at
    a position saved by an earlier run: a resumed run continues with exactly the batches it would have had."""
    while True:
        plan = plan_epoch(lengths, batch_size, micro_batch_size, world_size, seed, epoch, group_by_length)
        for index in range(step_in_epoch, len(plan)):
            yield epoch, index + 1, plan[index]
        epoch, step_in_epoch = epoch + 1, 0


def learning_rate_at(step: int, peak: float, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warmup to `peak`, then constant or cosine.

    Step 1 of a warmup already moves (peak / warmup_steps); warmup 0 starts at the peak. The cosine reaches 0 one
    step after the last, so no step is spent at learning rate 0.
    """
    if step <= warmup_steps:
        return peak * step / warmup_steps
    if schedule == "constant":
        return peak
    progress = (step - warmup_steps - 1) / max(1, total_steps - warmup_steps)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model, learning_rate: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW on the trainable parameters; weight decay only on matrices and embeddings (nanoGPT's rule): decaying
    adapter scales, norms and biases would pull them away from their identity values."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate, betas=(0.9, 0.95))
