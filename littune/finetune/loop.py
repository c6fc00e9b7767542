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
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
import yaml

from littune.checkpoints import check_checkpoint_dir, load_model_config
from littune.common import UserError, save_text, save_torch
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
    extra: dict = field(default_factory=dict)


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
        log_interval=log_interval,
    )
    fabric = L.Fabric(
        accelerator="auto", devices=devices, num_nodes=num_nodes, precision=precision,
        strategy=fabric_strategy(strategy, world_size, method),
    )
    fabric.launch()
    return fit(fabric, method, config, hparams, train_data, test_data, data_meta)


def fit(fabric, method: Method, config, hp: Hyperparameters, train_data: list, test_data: list, data_meta: dict) -> Path:
    from litgpt.prompts import load_prompt_style, save_prompt_style

    out_dir, checkpoint_dir = Path(hp.out_dir), Path(hp.checkpoint_dir)
    fabric.seed_everything(hp.seed)  # the same seed in every process: identical adapter initialisation
    with fabric.init_module(empty_init=fabric.world_size > 1 and hp.strategy == "fsdp"):
        model = method.build_model(config)
    for name, param in model.named_parameters():
        param.requires_grad = method.is_trainable(name)
    load_base_weights(model, checkpoint_dir / "lit_model.pth", method)
    trainable = [p for p in model.parameters() if p.requires_grad]
    fabric.print(
        f"{method.name}: {sum(p.numel() for p in trainable):,} trainable parameters, "
        f"{sum(p.numel() for p in model.parameters() if not p.requires_grad):,} frozen"
    )
    model = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(make_optimizer(model, hp))

    world, rank = fabric.world_size, fabric.global_rank
    lengths = [len(r["input_ids"]) for r in train_data]
    steps_per_epoch = math.ceil(len(train_data) / hp.batch_size)
    total_steps = hp.max_steps if hp.max_steps is not None else hp.epochs * steps_per_epoch
    if hp.epochs is not None and hp.max_steps is not None:
        total_steps = min(hp.max_steps, hp.epochs * steps_per_epoch)

    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_text(yaml.dump(asdict(hp), sort_keys=False), out_dir / "hyperparameters.yaml")
        save_prompt_style(load_prompt_style(Path(hp.data_dir)), out_dir)
        metrics_path = out_dir / "metrics.csv"
        write_metrics_header(metrics_path)
    from litgpt import Tokenizer

    tokenizer = Tokenizer(checkpoint_dir)
    ignore_index = int(data_meta.get("ignore_index", -100))

    progress = make_progress(fabric, total_steps)
    tokens_seen, start = 0, time.perf_counter()
    step, epoch = 0, 0
    while step < total_steps:
        plan = plan_epoch(lengths, hp.batch_size, hp.micro_batch_size, world, hp.seed, epoch)
        for step_batches in plan:
            if step >= total_steps:
                break
            step += 1
            lr = learning_rate_at(step, hp.learning_rate, hp.warmup_steps, total_steps, hp.lr_schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr
            step_loss, step_tokens = train_step(
                fabric, model, optimizer, method, train_data, step_batches, ignore_index, hp.grad_clip
            )
            tokens_seen += step_tokens
            elapsed = time.perf_counter() - start

            val_loss = None
            if step % hp.eval_interval == 0 or step == total_steps:
                val_loss = validate(fabric, model, method, test_data, hp.micro_batch_size, hp.eval_iters, ignore_index)
                if rank == 0:
                    answer = sample_response(model, method, test_data[0], tokenizer, config)
                    progress.write(f"step {step}: val loss {val_loss:.4f} | "
                                   f"{test_data[0]['instruction'][:60]!r} -> {answer!r}")
            if rank == 0 and (step % hp.log_interval == 0 or step == total_steps or val_loss is not None):
                append_metrics(metrics_path, {
                    "step": step, "epoch": epoch, "train_loss": step_loss, "learning_rate": lr,
                    "val_loss": "" if val_loss is None else val_loss,
                    "tokens": tokens_seen, "tokens_per_sec": tokens_seen / elapsed, "elapsed_sec": elapsed,
                })
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_seen / elapsed:,.0f}")
            progress.update(1)
            if step % hp.save_interval == 0 and step != total_steps:
                save_adapter(fabric, model, method, out_dir / f"step-{step:06d}" / ADAPTER_FILE, hp)
        epoch += 1
    progress.close()

    final = out_dir / ADAPTER_FILE
    save_adapter(fabric, model, method, final, hp)
    elapsed = time.perf_counter() - start
    fabric.print(
        f"Done: {step} steps, {tokens_seen:,} target-bearing tokens trained in {elapsed:.1f}s "
        f"({tokens_seen / max(elapsed, 1e-9):,.0f} tokens/s), peak memory {peak_memory_gb(fabric):.2f} GB. "
        f"Adapter: {final}"
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
    """Sum of next-token cross-entropies over the positions whose label is not ignore_index."""
    logits = logits[:, :-1].reshape(-1, logits.size(-1)).float()
    targets = labels[:, 1:].reshape(-1)
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")


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


def plan_epoch(lengths: list, batch_size: int, micro_batch_size: int, world_size: int, seed: int, epoch: int) -> list:
    """The epoch's optimizer steps; each is, per rank, a list of micro-batches (lists of record indices).

    A pure function of its arguments: every rank computes the same plan without talking to the others, and a
    resumed run recomputes it. Records are shuffled with a generator seeded by (seed, epoch); every record is seen
    once per epoch (the last step may be smaller).
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    steps = []
    for start in range(0, len(order), batch_size):
        records = order[start:start + batch_size]
        per_rank = [records[r::world_size] for r in range(world_size)]
        steps.append([[share[i:i + micro_batch_size] for i in range(0, len(share), micro_batch_size)]
                      for share in per_rank])
    return steps


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


def save_adapter(fabric, model, method: Method, path: Path, hp) -> None:
    """The trainable parameters only, written atomically (gathered from every rank under FSDP)."""
    state = fabric.strategy.get_module_state_dict(model) if hasattr(fabric.strategy, "get_module_state_dict") \
        else model.state_dict()
    adapter = {k: v.detach().cpu().clone() for k, v in state.items() if method.is_trainable(k)}
    if fabric.global_rank == 0:
        save_torch(adapter, path)
        if path.parent != Path(hp.out_dir):
            for name in ("hyperparameters.yaml", "prompt_style.yaml"):
                source = Path(hp.out_dir) / name
                if source.is_file():
                    save_text(source.read_text(), path.parent / name)
    fabric.barrier()


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


def make_progress(fabric, total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc="Fine-tuning", unit="step", disable=fabric.global_rank != 0, file=sys.stderr,
                dynamic_ncols=True)


def write_metrics_header(path: Path) -> None:
    save_text(",".join(METRIC_COLUMNS) + "\n", path)


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
