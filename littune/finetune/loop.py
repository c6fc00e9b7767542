"""The one Fabric training loop every fine-tuning method shares.

A method (see `adapter_v2.py`) only says which model class to build, which parameters train and how its weights are
saved. Everything else lives here, readable top to bottom: setup -> fit -> save.

What this loop does differently from Lit-GPT's `finetune/adapter_v2.py`:
- the loss of an optimizer step is the mean over *all target tokens of the step* (every micro-batch, every rank),
  so gradient accumulation gives the gradient of one big batch, and long records weigh what their tokens weigh;
- linear warmup that allows 0 and never spends a step at learning rate 0; clipping by global norm;
- the batch order is a pure function of (seed, epoch), so runs are reproducible and the position can be resumed;
- the adapter prefix K/V cache that litgpt keeps on the attention modules is cleared before every training forward
  (left in place, `adapter_wte` stops getting gradients and the second backward fails).
"""

import csv
import math
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
import yaml

from littune.checkpoints import check_checkpoint_dir, load_model_config
from littune.common import UserError, atomic_path, load_torch, save_json, save_text, save_torch, sha256_file
from littune.data import load_prepared, tokenizer_identity

ADAPTER_FILE = "lit_model_adapter_finetuned.pth"
METRIC_COLUMNS = ["step", "epoch", "train_loss", "learning_rate", "val_loss", "tokens", "tokens_per_sec", "elapsed_sec"]


@dataclass(frozen=True)
class Method:
    """What differs between fine-tuning methods."""

    name: str
    build_model: Callable[[Any], torch.nn.Module]  # base litgpt Config -> model with the method's extra parameters
    is_trainable: Callable[[str], bool]  # parameter name -> trains?
    block_class: type  # the transformer block, for FSDP wrapping and activation checkpointing
    before_forward: Callable[[torch.nn.Module], None] = lambda model: None


@dataclass
class Hyperparameters:
    """Everything that decides the result of a run (saved as hyperparameters.yaml)."""

    method: str
    checkpoint_dir: str
    data_dir: str
    out_dir: str
    precision: str
    devices: int
    num_nodes: int
    strategy: str
    seed: int
    learning_rate: float
    batch_size: int
    micro_batch_size: int
    epochs: Optional[int]
    max_steps: Optional[int]
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    lr_schedule: str
    eval_interval: int
    eval_iters: int
    save_interval: int
    log_interval: int
    group_by_length: bool = True
    early_stopping_patience: Optional[int] = None
    logger: list = field(default_factory=lambda: ["csv"])
    mlflow_tracking_uri: Optional[str] = None


def finetune(
    method: Method,
    checkpoint_dir: Path,
    data_dir: Path,
    out_dir: Optional[Path] = None,
    precision: Optional[Literal["32-true", "bf16-true", "bf16-mixed", "16-true", "16-mixed"]] = None,
    devices: int = 1,
    num_nodes: int = 1,
    strategy: Literal["auto", "ddp", "fsdp"] = "auto",
    seed: int = 1337,
    learning_rate: float = 3e-3,
    batch_size: int = 64,
    micro_batch_size: int = 4,
    epochs: Optional[int] = None,
    max_steps: Optional[int] = None,
    warmup_steps: int = 100,
    weight_decay: float = 0.02,
    grad_clip: float = 1.0,
    lr_schedule: Literal["constant", "cosine"] = "cosine",
    eval_interval: int = 100,
    eval_iters: int = 100,
    save_interval: int = 100,
    log_interval: int = 1,
    group_by_length: bool = True,
    resume: Optional[str] = None,
    early_stopping_patience: Optional[int] = None,
    logger: list[Literal["csv", "tensorboard", "mlflow"]] = ["csv"],
    mlflow_tracking_uri: Optional[str] = None,
) -> Path:
    """Fine-tune a converted checkpoint on data from `littune prepare`; returns the final adapter file.

    Arguments:
        checkpoint_dir: The converted base model (from `littune download` or `littune convert`).
        data_dir: The prepared data (train.pt, test.pt, prepare.json from `littune prepare`).
        out_dir: Where adapters, logs and checkpoints go (default: out/METHOD/<data folder name>).
        precision: 32-true, bf16-true, bf16-mixed, 16-true or 16-mixed (default: bf16-true on GPUs that have it, else 32-true).
        devices: Devices (GPUs, or CPU processes) per node.
        num_nodes: Machines in the cluster.
        strategy: auto (one device, DDP for several), ddp, or fsdp (shards the model; for models too big for one GPU).
        seed: Random seed: the same seed gives the same batches and the same weights.
        learning_rate: Peak learning rate of AdamW.
        batch_size: Records per optimizer step, over all devices.
        micro_batch_size: Records per forward pass on one device; batch_size / (micro_batch_size * devices) are accumulated.
        epochs: Passes over the training data (default: 1 when --max_steps is not given).
        max_steps: Optimizer steps to train (stops at whichever of --epochs and --max_steps comes first).
        warmup_steps: Steps of linear learning-rate warmup (0 allowed).
        weight_decay: AdamW decoupled weight decay, on matrix and embedding parameters.
        grad_clip: Clip the global gradient norm to this (0 turns clipping off).
        lr_schedule: After warmup: constant, or cosine decay over the remaining steps.
        eval_interval: Steps between validation-loss evaluations (and one sample answer).
        eval_iters: Test micro-batches per evaluation.
        save_interval: Steps between adapter checkpoints (out_dir/step-NNNNNN/).
        log_interval: Steps between rows of metrics.csv.
        group_by_length: Put records of similar length in the same micro-batch (less padding; batches stay shuffled).
        resume: Continue a run: `auto` (the newest complete state in out_dir) or a step-NNNNNN folder.
        early_stopping_patience: Stop after this many evaluations without a better validation loss.
        logger: Where metrics go besides out_dir/metrics.csv: csv, tensorboard (out_dir/tensorboard), mlflow.
        mlflow_tracking_uri: MLflow tracking URI (default: a local out_dir/mlruns store).
    """
    import lightning as L

    checkpoint_dir, data_dir = Path(checkpoint_dir), Path(data_dir)
    out_dir = Path(out_dir) if out_dir is not None else Path("out") / method.name / data_dir.name
    check_checkpoint_dir(checkpoint_dir)
    config = load_model_config(checkpoint_dir)
    train_data, test_data, data_meta = load_prepared(data_dir)
    check_data_matches_model(data_dir, data_meta, train_data, checkpoint_dir, config)
    world_size = devices * num_nodes
    if batch_size % (micro_batch_size * world_size):
        raise UserError(
            f"--batch_size {batch_size} must be divisible by --micro_batch_size {micro_batch_size} x devices "
            f"{world_size} (gradient accumulation = batch_size / (micro_batch_size * devices))"
        )
    if epochs is None and max_steps is None:
        epochs = 1
    for flag, value in [("eval_interval", eval_interval), ("save_interval", save_interval),
                        ("log_interval", log_interval), ("micro_batch_size", micro_batch_size)]:
        if value < 1:
            raise UserError(f"--{flag} must be >= 1, got {value}")
    if warmup_steps < 0:
        raise UserError(f"--warmup_steps must be >= 0, got {warmup_steps}")
    precision = precision or default_precision()
    check_precision(precision)

    hparams = Hyperparameters(
        method=method.name, checkpoint_dir=str(checkpoint_dir), data_dir=str(data_dir), out_dir=str(out_dir),
        precision=precision, devices=devices, num_nodes=num_nodes, strategy=strategy, seed=seed,
        learning_rate=learning_rate, batch_size=batch_size, micro_batch_size=micro_batch_size, epochs=epochs,
        max_steps=max_steps, warmup_steps=warmup_steps, weight_decay=weight_decay, grad_clip=grad_clip,
        lr_schedule=lr_schedule, eval_interval=eval_interval, eval_iters=eval_iters, save_interval=save_interval,
        log_interval=log_interval, group_by_length=group_by_length, early_stopping_patience=early_stopping_patience,
        logger=list(logger), mlflow_tracking_uri=mlflow_tracking_uri,
    )
    resume_dir = find_resume_state(out_dir, resume) if resume else None
    fabric = L.Fabric(
        accelerator="auto", devices=devices, num_nodes=num_nodes, precision=precision,
        strategy=fabric_strategy(strategy, world_size, method),
    )
    fabric.launch()
    fingerprint = run_fingerprint(hparams, checkpoint_dir, data_dir, len(train_data))
    return fit(fabric, method, config, hparams, train_data, test_data, data_meta, fingerprint, resume_dir)


def fit(fabric, method: Method, config, hp: Hyperparameters, train_data: list, test_data: list, data_meta: dict,
        fingerprint: dict, resume_dir: Optional[Path] = None) -> Path:
    from litgpt import Tokenizer
    from litgpt.prompts import load_prompt_style, save_prompt_style

    out_dir, checkpoint_dir = Path(hp.out_dir), Path(hp.checkpoint_dir)
    fabric.seed_everything(hp.seed)  # the same seed in every process: identical adapter initialisation
    with fabric.init_module(empty_init=fabric.world_size > 1 and hp.strategy == "fsdp"):
        model = method.build_model(config)
    for name, param in model.named_parameters():
        param.requires_grad = method.is_trainable(name)
    load_base_weights(model, checkpoint_dir / "lit_model.pth", method)
    fabric.print(
        f"{method.name}: {sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters, "
        f"{sum(p.numel() for p in model.parameters() if not p.requires_grad):,} frozen"
    )
    model = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(make_optimizer(model, hp))

    world, rank = fabric.world_size, fabric.global_rank
    lengths = [len(r["input_ids"]) for r in train_data]
    total_steps = fingerprint["total_steps"]
    tokenizer = Tokenizer(checkpoint_dir)
    ignore_index = int(data_meta.get("ignore_index", -100))
    state = {"step": 0, "epoch": 0, "step_in_epoch": 0, "tokens_seen": 0, "elapsed": 0.0,
             "best_val_loss": math.inf, "evals_since_best": 0}
    if resume_dir is not None:
        state = load_training_state(resume_dir, model, optimizer, fingerprint, state)
        fabric.print(f"Resuming from {resume_dir} at step {state['step']}")

    metrics_path = out_dir / "metrics.csv"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out_dir)
        save_text(yaml.dump(asdict(hp), sort_keys=False), out_dir / "hyperparameters.yaml")
        save_prompt_style(load_prompt_style(Path(hp.data_dir)), out_dir)
        keep_metrics_until(metrics_path, state["step"])
    loggers = make_loggers(hp, out_dir, state.get("mlflow_run_id")) if rank == 0 else []
    if resume_dir is None:
        for experiment_logger in loggers:
            experiment_logger.log_hyperparams(asdict(hp))
    for experiment_logger in loggers:  # a resumed run goes on logging into the same MLflow run
        if hasattr(experiment_logger, "run_id"):
            state["mlflow_run_id"] = experiment_logger.run_id

    stop = StopRequest()
    progress = make_progress(fabric, total_steps, state["step"])
    step, epoch = state["step"], state["epoch"]
    session_start, session_tokens = time.perf_counter(), 0
    patience = hp.early_stopping_patience
    stopped_early = patience is not None and state["evals_since_best"] >= patience  # a resumed early-stopped run
    status = "FAILED"
    try:
        while step < total_steps and not stopped_early:
            plan = plan_epoch(lengths, hp.batch_size, hp.micro_batch_size, world, hp.seed, epoch, hp.group_by_length)
            for step_batches in plan[state["step_in_epoch"]:]:
                if step >= total_steps:
                    break
                step += 1
                lr = learning_rate_at(step, hp.learning_rate, hp.warmup_steps, total_steps, hp.lr_schedule)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                step_loss, step_tokens = train_step(
                    fabric, model, optimizer, method, train_data, step_batches, ignore_index, hp.grad_clip
                )
                session_tokens += step_tokens
                now = time.perf_counter()
                state.update(step=step, epoch=epoch, step_in_epoch=state["step_in_epoch"] + 1,
                             tokens_seen=state["tokens_seen"] + step_tokens)
                elapsed = state["elapsed"] + now - session_start
                tokens_per_sec = session_tokens / max(now - session_start, 1e-9)

                val_loss = None
                if step % hp.eval_interval == 0 or step == total_steps:
                    val_loss = validate(fabric, model, method, test_data, hp.micro_batch_size, hp.eval_iters, ignore_index)
                    improved = val_loss < state["best_val_loss"]
                    state["best_val_loss"] = min(val_loss, state["best_val_loss"])
                    state["evals_since_best"] = 0 if improved else state["evals_since_best"] + 1
                    if improved:
                        save_adapter(fabric, model, method, out_dir / "best" / ADAPTER_FILE, hp,
                                     extra={"step": step, "val_loss": val_loss})
                    if rank == 0:
                        answer = sample_response(model, method, test_data[0], tokenizer, config)
                        progress.write(f"step {step}: val loss {val_loss:.4f}{' (best)' if improved else ''} | "
                                       f"{test_data[0]['instruction'][:60]!r} -> {answer!r}")
                    stopped_early = patience is not None and state["evals_since_best"] >= patience
                if rank == 0 and (step % hp.log_interval == 0 or step == total_steps or val_loss is not None):
                    row = {"step": step, "epoch": epoch, "train_loss": step_loss, "learning_rate": lr,
                           "val_loss": "" if val_loss is None else val_loss, "tokens": state["tokens_seen"],
                           "tokens_per_sec": tokens_per_sec, "elapsed_sec": elapsed}
                    append_metrics(metrics_path, row)
                    for experiment_logger in loggers:
                        experiment_logger.log_metrics({k: v for k, v in row.items() if v != "" and k != "step"}, step)
                progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_sec:,.0f}")
                progress.update(1)
                if world > 1:  # a signal may reach only some ranks: all save and stop together
                    stop.requested = stop.requested or ("SIGNAL" if fabric.strategy.reduce_boolean_decision(
                        stop.requested is not None, all=False) else None)
                if step % hp.save_interval == 0 or step == total_steps or stopped_early or stop.requested:
                    save_training_state(fabric, model, optimizer, method, out_dir, hp,
                                        {**state, "elapsed": elapsed}, fingerprint)
                if stop.requested:
                    status = "KILLED"
                    raise UserError(
                        f"stopped by {stop.requested} after step {step}; the state is saved in "
                        f"{out_dir / step_folder(step)}. Resume with the same command plus --resume auto"
                    )
                if stopped_early:
                    fabric.print(f"Early stopping: no better validation loss in {hp.early_stopping_patience} evaluations")
                    break
            else:
                epoch += 1
                state.update(epoch=epoch, step_in_epoch=0)
        status = "success"
    finally:  # whichever way the loop ends: signal handlers back, logs flushed and marked
        stop.restore()
        progress.close()
        for experiment_logger in loggers:
            experiment_logger.finalize(status)

    final = out_dir / ADAPTER_FILE
    save_adapter(fabric, model, method, final, hp)
    elapsed = state["elapsed"] + time.perf_counter() - session_start
    fabric.print(
        f"Done: {step} steps, {state['tokens_seen']:,} tokens trained in {elapsed:.1f}s "
        f"({session_tokens / max(time.perf_counter() - session_start, 1e-9):,.0f} tokens/s), "
        f"peak memory {peak_memory_gb(fabric):.2f} GB. Adapter: {final}"
    )
    return final


# --------------------------------------------------------------------------------------------- one optimizer step


def train_step(
    fabric, model, optimizer, method: Method, data: list, step_batches: list, ignore_index: int, grad_clip: float
) -> tuple:
    """One optimizer step: this rank's micro-batches, loss = sum of token losses / target tokens of the whole step.

    Returns (the step's mean token loss over all ranks, the step's input tokens over all ranks).
    """
    world = len(step_batches)
    step_targets = sum(count_targets(data, mb, ignore_index) for rank_batches in step_batches for mb in rank_batches)
    step_tokens = sum(len(data[i]["input_ids"]) for rank_batches in step_batches for mb in rank_batches for i in mb)
    my_batches = step_batches[fabric.global_rank]
    # Ranks with fewer micro-batches (a short last step) still take part in every gradient sync: they repeat one
    # micro-batch with weight 0.
    n_micro = max(len(b) for b in step_batches)
    padded = my_batches + [my_batches[0]] * (n_micro - len(my_batches)) if my_batches else None
    loss_sum = torch.zeros((), device=fabric.device)
    for i in range(n_micro):
        weight = 1.0 if i < len(my_batches) else 0.0
        indices = padded[i] if padded else step_batches[0][0]
        input_ids, labels = collate(data, indices, ignore_index, fabric.device)
        with fabric.no_backward_sync(model, enabled=i < n_micro - 1):
            method.before_forward(model)
            logits = model(input_ids)
            token_loss_sum = token_cross_entropy_sum(logits, labels, ignore_index)
            # DDP averages gradients over ranks: scale by world size so the result is sum / step_targets
            fabric.backward(token_loss_sum * (weight * world / max(step_targets, 1)))
        loss_sum += token_loss_sum.detach() * weight
    if grad_clip > 0:
        fabric.clip_gradients(model, optimizer, max_norm=grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss_sum = fabric.all_reduce(loss_sum, reduce_op="sum") if world > 1 else loss_sum
    return loss_sum.item() / max(step_targets, 1), step_tokens


def token_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Sum of next-token cross-entropies over the positions whose label is not ignore_index.

    The targets are shifted instead of the logits (position t predicts label t+1, the last position gets
    ignore_index): slicing off the last logit would copy all of them. Measured with scripts/bench_finetune.py, a
    chunked lm_head + cross-entropy (litgpt's lm_head_chunk_size=128) saved 7% of peak RSS but cost 30% of the
    tokens/s on CPU bf16, so the logits are computed in one piece.
    """
    targets = torch.cat([labels[:, 1:], labels.new_full((labels.size(0), 1), ignore_index)], dim=1)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )


def count_targets(data: list, indices: list, ignore_index: int = -100) -> int:
    """Positions that contribute to the loss (the first label is never a target: nothing predicts it)."""
    return sum(int((data[i]["labels"][1:] != ignore_index).sum()) for i in indices)


def collate(data: list, indices: list, ignore_index: int, device) -> tuple:
    """Right-pad a micro-batch to its longest record; padded positions get label ignore_index."""
    longest = max(len(data[i]["input_ids"]) for i in indices)
    input_ids = torch.zeros((len(indices), longest), dtype=torch.int64)
    labels = torch.full((len(indices), longest), ignore_index, dtype=torch.int64)
    for row, i in enumerate(indices):
        n = len(data[i]["input_ids"])
        input_ids[row, :n] = data[i]["input_ids"]
        labels[row, :n] = data[i]["labels"]
    return input_ids.to(device), labels.to(device)


# --------------------------------------------------------------------------------------------------- data order


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


# --------------------------------------------------------------------------------------------------- optimiser


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


def make_optimizer(model, hp) -> torch.optim.Optimizer:
    """AdamW on the trainable parameters; weight decay only on matrices and embeddings (nanoGPT's rule): decaying
    adapter scales, norms and biases would pull them away from their identity values."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.learning_rate, betas=(0.9, 0.95))


# ---------------------------------------------------------------------------------------------- eval and saving


@torch.no_grad()
def validate(
    fabric, model, method: Method, test_data: list, micro_batch_size: int, eval_iters: int, ignore_index: int
) -> float:
    """Mean token loss over the first eval_iters micro-batches of the test split (fixed order: comparable evals)."""
    model.eval()
    world, rank = fabric.world_size, fabric.global_rank
    batches = [list(range(i, min(i + micro_batch_size, len(test_data))))
               for i in range(0, len(test_data), micro_batch_size)][:eval_iters]
    loss_sum = torch.zeros((), device=fabric.device, dtype=torch.float64)
    targets = torch.zeros((), device=fabric.device, dtype=torch.float64)
    for indices in batches[rank::world]:
        input_ids, labels = collate(test_data, indices, ignore_index, fabric.device)
        method.before_forward(model)
        loss_sum += token_cross_entropy_sum(model(input_ids), labels, ignore_index).double()
        targets += count_targets(test_data, indices, ignore_index)
    if world > 1:
        loss_sum, targets = fabric.all_reduce(loss_sum, reduce_op="sum"), fabric.all_reduce(targets, reduce_op="sum")
    model.train()
    method.before_forward(model)
    return (loss_sum / targets.clamp(min=1)).item()


@torch.no_grad()
def sample_response(model, method: Method, record: dict, tokenizer, config, max_new_tokens: int = 50) -> str:
    """Greedy answer to one test instruction, with litgpt's KV-cached generate (shows what the model learned)."""
    from litgpt.generate.base import generate

    module = getattr(model, "module", model)
    prompt = record["input_ids_no_response"].to(next(module.parameters()).device)
    max_returned = min(len(prompt) + max_new_tokens, config.block_size)
    if max_returned <= len(prompt):
        return ""
    model.eval()
    method.before_forward(module)
    module.max_seq_length = max_returned
    module.set_kv_cache(batch_size=1)
    output = generate(module, prompt, max_returned, temperature=0.0, eos_id=tokenizer.eos_id, include_prompt=False)
    module.clear_kv_cache()
    module.max_seq_length = config.block_size
    method.before_forward(module)
    model.train()
    return tokenizer.decode(output).strip()[:120]


def adapter_state(fabric, model, method: Method) -> dict:
    """The trainable parameters, on CPU (gathered from every rank under FSDP)."""
    state = fabric.strategy.get_module_state_dict(model) if hasattr(fabric.strategy, "get_module_state_dict") \
        else model.state_dict()
    return {k: v.detach().cpu().clone() for k, v in state.items() if method.is_trainable(k)}


def save_adapter(fabric, model, method: Method, path: Path, hp, extra: Optional[dict] = None) -> None:
    """The adapter weights, written atomically, with the run's hyperparameters and prompt style beside them."""
    adapter = adapter_state(fabric, model, method)
    if fabric.global_rank == 0:
        save_torch(adapter, path)
        copy_run_files(Path(hp.out_dir), path.parent)
        if extra is not None:
            save_json(extra, path.parent / "adapter_info.json")
    fabric.barrier()


def copy_run_files(out_dir: Path, folder: Path) -> None:
    if folder != out_dir:
        for name in ("hyperparameters.yaml", "prompt_style.yaml"):
            if (out_dir / name).is_file():
                save_text((out_dir / name).read_text(), folder / name)


# ---------------------------------------------------------------------------------------- resumable training state

STATE_FILE = "training_state.pt"


def step_folder(step: int) -> str:
    return f"step-{step:06d}"


def save_training_state(fabric, model, optimizer, method: Method, out_dir: Path, hp, counters: dict,
                        fingerprint: dict) -> None:
    """out_dir/step-NNNNNN/: the adapter plus everything an exact resume needs (optimizer moments, counters, the
    place in the data, every RNG state). Built in a temporary folder and renamed into place, so a kill at any
    moment leaves either the complete folder or none."""
    adapter = adapter_state(fabric, model, method)
    optimizer_state = fabric.strategy.get_optimizer_state(optimizer) if hasattr(
        fabric.strategy, "get_optimizer_state") else optimizer.state_dict()
    if fabric.global_rank == 0:
        import random

        import numpy as np

        final = out_dir / step_folder(counters["step"])
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=out_dir))
        old = tmp.with_name(tmp.name + ".old")
        try:
            save_torch(adapter, tmp / ADAPTER_FILE)
            numpy_state = np.random.get_state()
            save_torch({
                "counters": counters,
                "fingerprint": fingerprint,
                "optimizer": optimizer_state,
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    "python": _to_lists(random.getstate()),
                    "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
                },
            }, tmp / STATE_FILE)
            copy_run_files(out_dir, tmp)
            if final.exists():  # the same step saved by an earlier attempt: set it aside, then replace it whole
                os.replace(final, old)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
    fabric.barrier()


def remove_stale_temporaries(out_dir: Path) -> None:
    """Half-written files and folders of a run that was killed while saving (their names start with '.' and end
    with '.tmp': no reader ever mistakes them for a checkpoint)."""
    for folder in (out_dir, out_dir / "best"):
        for path in folder.glob(".*.tmp*"):
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def find_resume_state(out_dir: Path, resume: str) -> Optional[Path]:
    """`auto`: the newest complete step folder in out_dir (none: start fresh); else the given folder."""
    if resume != "auto":
        folder = Path(resume)
        if not (folder / STATE_FILE).is_file():
            raise UserError(f"--resume {resume}: no {STATE_FILE} there (give a step-NNNNNN folder or 'auto')")
        return folder
    complete = sorted(p for p in Path(out_dir).glob("step-[0-9]*") if (p / STATE_FILE).is_file() and p.is_dir())
    if not complete:
        print(f"--resume auto: no saved state in {out_dir}; starting from step 0", file=sys.stderr)
        return None
    return complete[-1]


def load_training_state(folder: Path, model, optimizer, fingerprint: dict, state: dict) -> dict:
    """Restore a saved state; refuse (before touching anything) one from another model, data or settings."""
    import random

    import numpy as np

    saved = load_torch(folder / STATE_FILE, "training state")
    adapter = load_torch(folder / ADAPTER_FILE, "adapter weights")
    differing = sorted(k for k in set(fingerprint) | set(saved.get("fingerprint", {}))
                       if saved["fingerprint"].get(k) != fingerprint.get(k))
    if differing:
        details = ", ".join(f"{k}: saved {saved['fingerprint'].get(k)!r} vs now {fingerprint.get(k)!r}"
                            for k in differing[:3])
        raise UserError(f"{folder}: cannot resume, the run differs ({details})")
    module = getattr(model, "module", model)  # the model itself, not Fabric's wrapper (whose names are prefixed)
    missing = set(k for k, p in module.named_parameters() if p.requires_grad) - set(adapter)
    if missing:
        raise UserError(f"{folder / ADAPTER_FILE}: incomplete adapter (missing {sorted(missing)[:3]})")
    module.load_state_dict(adapter, strict=False)
    optimizer.load_state_dict(saved["optimizer"])
    rng = saved["rng"]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    random.setstate(_to_tuples(rng["python"]))
    np.random.set_state((rng["numpy"][0], np.array(rng["numpy"][1], dtype=np.uint32), *rng["numpy"][2:]))
    return {**state, **saved["counters"]}


def run_fingerprint(hp: Hyperparameters, checkpoint_dir: Path, data_dir: Path, n_train: int) -> dict:
    """What must be the same for a resumed run to be the same run."""
    steps_per_epoch = math.ceil(n_train / hp.batch_size)
    total_steps = hp.max_steps if hp.max_steps is not None else hp.epochs * steps_per_epoch
    if hp.epochs is not None and hp.max_steps is not None:
        total_steps = min(hp.max_steps, hp.epochs * steps_per_epoch)
    return {
        "method": hp.method,
        "model_config_sha256": sha256_file(Path(checkpoint_dir) / "model_config.yaml"),
        "base_weights_bytes": (Path(checkpoint_dir) / "lit_model.pth").stat().st_size,
        "data_sha256": sha256_file(Path(data_dir) / "train.pt"),
        "world_size": hp.devices * hp.num_nodes,
        "total_steps": total_steps,
        **{k: getattr(hp, k) for k in ("seed", "learning_rate", "batch_size", "micro_batch_size", "warmup_steps",
                                       "weight_decay", "grad_clip", "lr_schedule", "precision", "group_by_length")},
    }


def _to_lists(value):
    return [_to_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _to_tuples(value):
    return tuple(_to_tuples(v) for v in value) if isinstance(value, list) else value


class StopRequest:
    """SIGINT/SIGTERM ask the loop to finish its optimizer step, save and stop (a second signal stops at once)."""

    def __init__(self):
        self.requested = None
        self.previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self.previous[sig] = signal.signal(sig, self.handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread): no handler
                pass

    def handle(self, signum, frame):
        if self.requested:
            self.restore()
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested}: finishing this step, then saving (send again to stop at once)", file=sys.stderr)

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


def load_base_weights(model, path: Path, method: Method) -> None:
    """The checkpoint's weights into the model (non-strict: the method's new parameters keep their init)."""
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    not_method = [k for k in missing if not method.is_trainable(k)]
    if not_method or unexpected:
        raise UserError(f"{path}: weights do not fit the model config (missing {not_method[:3]}, "
                        f"unexpected {unexpected[:3]})")
    method.before_forward(model)


# ------------------------------------------------------------------------------------------------------ checks


def check_data_matches_model(data_dir: Path, meta: dict, train_data: list, checkpoint_dir: Path, config) -> None:
    """Refuse data prepared with another tokenizer, or records the model cannot take."""
    mine = tokenizer_identity(checkpoint_dir)
    theirs = meta.get("tokenizer", {})
    differing = [k for k in ("sha256", "vocab_size", "eos_id", "bos_id") if k in theirs and theirs.get(k) != mine.get(k)]
    if differing:
        raise UserError(
            f"{data_dir}: prepared with another tokenizer than {checkpoint_dir} ({', '.join(differing)} differ); "
            f"re-run littune prepare --checkpoint_dir {checkpoint_dir}"
        )
    longest = max(len(r["input_ids"]) for r in train_data)
    if longest > config.block_size:
        raise UserError(
            f"{data_dir}: records of up to {longest} tokens exceed the model's block size {config.block_size}; "
            f"re-run littune prepare with --max_seq_length {config.block_size}"
        )
    top = max(int(r["input_ids"].max()) for r in train_data)
    if top >= config.padded_vocab_size:
        raise UserError(f"{data_dir}: token id {top} is outside the model's vocabulary ({config.padded_vocab_size})")


def default_precision() -> str:
    if torch.cuda.is_available():
        return "bf16-true" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def check_precision(precision: str) -> None:
    if torch.cuda.is_available():
        if precision.startswith("bf16") and not torch.cuda.is_bf16_supported():
            raise UserError(f"--precision {precision}: this GPU has no bfloat16; use 16-mixed or 32-true")
    elif precision in ("16-mixed", "16-true"):
        raise UserError(f"--precision {precision} needs a CUDA GPU; on CPU use 32-true, bf16-true or bf16-mixed")


def fabric_strategy(strategy: str, world_size: int, method: Method):
    if strategy == "fsdp":
        from lightning.fabric.strategies import FSDPStrategy

        # use_orig_params: frozen and trainable parameters share the flat parameters of each wrapped Block
        return FSDPStrategy(auto_wrap_policy={method.block_class}, state_dict_type="full", use_orig_params=True,
                            limit_all_gathers=True)
    if strategy == "ddp" or (strategy == "auto" and world_size > 1):
        return "ddp"
    return "auto"


# ----------------------------------------------------------------------------------------------------- logging


def make_progress(fabric, total: int, done: int = 0):
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc="Fine-tuning", unit="step", disable=fabric.global_rank != 0,
                file=sys.stderr, dynamic_ncols=True)


def keep_metrics_until(path: Path, step: int) -> None:
    """metrics.csv with the rows of steps <= step (a resumed run drops rows logged after its saved state)."""
    rows = []
    if step > 0 and path.is_file():
        with open(path, newline="", encoding="utf-8") as f:
            rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= step]
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, METRIC_COLUMNS)
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in METRIC_COLUMNS} for r in rows)


def make_loggers(hp, out_dir: Path, mlflow_run_id: Optional[str] = None) -> list:
    """Fabric/Lightning experiment loggers besides metrics.csv (which is always written)."""
    loggers = []
    if "tensorboard" in hp.logger:
        from lightning.fabric.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(root_dir=out_dir, name="tensorboard"))
    if "mlflow" in hp.logger:
        try:
            from lightning.pytorch.loggers import MLFlowLogger

            if hp.mlflow_tracking_uri is None:  # the local mlruns/ folder: MLflow 3 wants this opt-in for it
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")

            loggers.append(MLFlowLogger(experiment_name=f"littune-{hp.method}", run_name=Path(hp.out_dir).name,
                                        run_id=mlflow_run_id,
                                        tracking_uri=hp.mlflow_tracking_uri or (out_dir / "mlruns").resolve().as_uri()))
        except ModuleNotFoundError as e:
            raise UserError("--logger mlflow needs MLflow: pip install 'littune[mlflow]'") from e
    return loggers


def append_metrics(path: Path, row: dict) -> None:
    with open(path, "a", newline="", encoding="utf-8") as f:
        csv.DictWriter(f, METRIC_COLUMNS).writerow({k: _fmt(row.get(k, "")) for k in METRIC_COLUMNS})


def _fmt(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def peak_memory_gb(fabric) -> float:
    if fabric.device.type == "cuda":
        return torch.cuda.max_memory_allocated(fabric.device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def command(method: Method) -> Callable:
    """The `littune finetune METHOD` function: `finetune`'s signature and docs, with the method filled in."""
    import inspect

    def run(**kwargs) -> Path:
        return finetune(method, **kwargs)

    signature = inspect.signature(finetune)
    run.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])
    run.__annotations__ = {k: v for k, v in finetune.__annotations__.items() if k != "method"}
    run.__doc__ = f"Fine-tune with {method.name}." + finetune.__doc__.split("\n", 1)[1]
    run.__name__ = run.__qualname__ = method.name
    return run
