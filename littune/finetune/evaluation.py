"""The evaluations of a training run: the validation loss every rank shares, the task metrics of a label task (the
likelihood-scoring pass `littune evaluate` runs, `littune.scoring`), and one sample answer."""

import math
import time
from typing import Optional

import torch

from littune.methods import Method
from littune.model import collate, count_targets, forward_loss_sum, unwrap
from littune.scorings import TASK_METRICS


def evaluate_now(fabric, model, method: Method, records: list, micro_batch_size: int, ignore_index: int,
                 task: Optional[tuple]) -> dict:
    """val_loss of the records; for a label task also val_accuracy, val_f1_macro and val_mcc, the labels scored by
    likelihood (`littune.scoring`, as `littune evaluate --scoring likelihood` scores them) in the same pass that
    gives the loss: rank 0 scores, every rank gets the figures (every rank decides best/ and early stopping).
    Without labels: `validate`, shared by every rank. eval_sec: how long it all took."""
    started = time.perf_counter()
    if task is None:
        evaluation = {"val_loss": validate(fabric, model, method, records, micro_batch_size, ignore_index)}
    else:
        figures = torch.zeros(1 + len(TASK_METRICS), dtype=torch.float64, device=fabric.device)
        if fabric.global_rank == 0:
            figures[:] = torch.tensor(task_figures(model, method, records, ignore_index, *task), dtype=torch.float64)
        if fabric.world_size > 1:
            figures = fabric.broadcast(figures, src=0)
        evaluation = dict(zip(["val_loss", *TASK_METRICS], figures.tolist()))
    return {**evaluation, "eval_sec": time.perf_counter() - started}


def task_figures(model, method: Method, records: list, ignore_index: int, tokenizer, style, labels: list,
                 label_sets: Optional[dict] = None) -> list:
    """[mean token loss, then TASK_METRICS] of the records from one likelihood-scoring pass, the one `littune
    evaluate --scoring likelihood` runs (`scoring.labels_with_loss`): each record's loss targets ride along with its
    labels, so the prompt runs once for both. The loss is `validate`'s: the same target tokens, summed over the
    records, over their number. It runs on the model itself, not Fabric's wrapper: under bf16-mixed in float32, as
    `littune evaluate` scores. label_sets: a multi-label task's (`labels` are then its candidate sets)."""
    from littune.metrics import task_metrics
    from littune.scoring import labels_with_loss

    model.eval()
    method.before_forward(unwrap(model))
    rows, loss_sum, targets = labels_with_loss(model, tokenizer, style, records, labels, ignore_index)
    method.before_forward(unwrap(model))
    model.train()
    metrics = task_metrics([r["output"] for r in records], [row["predicted"] for row in rows], labels, label_sets)
    return [loss_sum / max(targets, 1), *(metrics[name.removeprefix("val_")] for name in TASK_METRICS)]


def better(value: float, best: float, metric: str) -> bool:
    return value < best if metric == "val_loss" else value > best


@torch.no_grad()
def validate(fabric, model, method: Method, records: list, micro_batch_size: int, ignore_index: int) -> float:
    """Mean token loss over the records, in a fixed order (comparable evaluations). Every rank runs the same number
    of forwards (FSDP gathers weights in each), the extra ones with weight 0."""
    model.eval()
    world, rank = fabric.world_size, fabric.global_rank
    batches = [list(range(i, min(i + micro_batch_size, len(records))))
               for i in range(0, len(records), micro_batch_size)]
    mine = batches[rank::world]
    loss_sum = torch.zeros((), device=fabric.device, dtype=torch.float64)
    targets = torch.zeros((), device=fabric.device, dtype=torch.float64)
    for i in range(math.ceil(len(batches) / world)):
        indices, weight = (mine[i], 1.0) if i < len(mine) else (batches[0], 0.0)
        input_ids, labels = collate(records, indices, ignore_index, fabric.device)
        method.before_forward(unwrap(model))
        loss_sum += forward_loss_sum(model, input_ids, labels, ignore_index).double() * weight
        targets += count_targets(records, indices, ignore_index) * weight
    if world > 1:
        loss_sum, targets = fabric.all_reduce(loss_sum, reduce_op="sum"), fabric.all_reduce(targets, reduce_op="sum")
    model.train()
    method.before_forward(unwrap(model))
    return (loss_sum / targets.clamp(min=1)).item()


def sample_response(model, method: Method, record: dict, tokenizer, max_new_tokens: int = 50) -> str:
    """Greedy answer to one validation instruction (shows what the model learned)."""
    from littune.sampling import generate_tokens

    prompt = record["input_ids_no_response"].to(next(unwrap(model).parameters()).device)
    max_new_tokens = min(max_new_tokens, unwrap(model).config.block_size - len(prompt))
    if max_new_tokens < 1:
        return ""
    model.eval()
    method.before_forward(unwrap(model))
    tokens = list(generate_tokens(model, prompt, max_new_tokens, temperature=0.0, stop_tokens=([tokenizer.eos_id],)))
    method.before_forward(unwrap(model))
    model.train()
    return tokenizer.decode(torch.tensor(tokens, dtype=torch.int64)).strip()[:120]
