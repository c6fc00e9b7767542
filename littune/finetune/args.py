"""The fine-tuning flags, declared once: name, type, default, valid range (`Check`), help text (the attribute
docstring) and whether a resumed run must keep it (`same_run`). The `littune finetune METHOD` signature and its
`--help`, the checks run before anything is read, hyperparameters.yaml and the resume fingerprint all derive from
these declarations (plus the method's own dataclass of flags, e.g. LoRA's rank).
"""

import inspect
import math
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from littune.common import Check, UserError
from littune.model import Precision
from littune.quantize import Quantize
from littune.scorings import BestMetric


def same_run(default):
    """A flag that decides the trained weights: a resumed run must keep it (it is part of the run's fingerprint)."""
    return field(default=default, metadata={"same_run": True})


@dataclass
class TrainArgs:
    checkpoint_dir: Path
    """The converted base model (from `littune download` or `littune convert`)."""
    data_dir: Path
    """The prepared data (from `littune prepare`): trains on train.pt, validates on val.pt (else test.pt)."""
    out_dir: Optional[Path] = None
    """Where adapters, logs and checkpoints go (default: out/METHOD/<data folder name>)."""
    precision: Optional[Precision] = same_run(None)
    """32-true, bf16-true, bf16-mixed, 16-true or 16-mixed (default: bf16-true on GPUs that have it, 16-mixed on older
    ones; on a CPU bf16-mixed where one block of the model is measured faster in it on this CPU, else 32-true)."""
    quantize: Optional[Quantize] = same_run(None)
    """The frozen base in 4 bits (bnb.nf4, bnb.fp4; -dq: double-quantized statistics, QLoRA) or 8 bits (bnb.int8),
    with bitsandbytes, quantized while loading; the adapter trains and is saved in --precision. One device, no FSDP;
    pip install 'littune[quantize]'."""
    devices: Annotated[int, Check(ge=1)] = same_run(1)
    """Devices (GPUs, or CPU processes) per node."""
    num_nodes: Annotated[int, Check(ge=1)] = same_run(1)
    """Machines in the cluster (see README: several machines)."""
    strategy: Literal["auto", "ddp", "fsdp"] = "auto"
    """auto (one device, DDP for several), ddp, or fsdp (shards the model over GPUs; for models too big for one)."""
    seed: int = same_run(1337)
    """Random seed: the same seed gives the same batches and the same weights."""
    learning_rate: Optional[Annotated[float, Check(gt=0)]] = same_run(None)
    """Peak learning rate of AdamW (default: the method's, measured on SST-2: adapter_v2 1e-3, lora 3e-3)."""
    batch_size: Optional[Annotated[int, Check(ge=1)]] = same_run(None)
    """Records per optimizer step, over all devices (default: about 100 steps per epoch, at most 64 records)."""
    micro_batch_size: Optional[Annotated[int, Check(ge=1)]] = same_run(None)
    """Records per forward pass on one device; batch_size / (micro_batch_size x devices) are accumulated (default: 8
    where the records share most of their tokens, so that 8 run with one shared prefix hold no more tokens than 4
    whole records and the batch size is a multiple of 8 per device; else 4)."""
    epochs: Optional[Annotated[int, Check(ge=1)]] = same_run(None)
    """Passes over the training data (default: 1 when --max_steps is not given)."""
    max_steps: Optional[Annotated[int, Check(ge=1)]] = same_run(None)
    """Optimizer steps to train (stops at whichever of --epochs and --max_steps comes first)."""
    warmup_steps: Optional[Annotated[int, Check(ge=0)]] = same_run(None)
    """Steps of linear learning-rate warmup, 0 allowed (default: 10% of the run's steps, at most 100)."""
    weight_decay: Annotated[float, Check(ge=0)] = same_run(0.02)
    """AdamW decoupled weight decay, on matrix and embedding parameters."""
    grad_clip: Annotated[float, Check(ge=0)] = same_run(1.0)
    """Clip the global gradient norm to this (0 turns clipping off)."""
    lr_schedule: Literal["constant", "cosine"] = same_run("cosine")
    """After warmup: constant, or cosine decay over the remaining steps."""
    group_by_length: bool = same_run(True)
    """Put records of similar length in the same micro-batch (less padding; batches stay shuffled)."""
    shared_prefix: bool = same_run(True)
    """Run the first tokens the records of a micro-batch share (a chat template's system message, an instruction)
    once, packed with the rest of each record, where that pays: at most 4/5 of the padded micro-batch's tokens and
    at most 512 (measured; see README). The loss and gradients are the plain forward's; false runs every record
    whole. Off under FSDP, with --lora_dropout > 0 and with --activation_checkpointing (said in the run's header)."""
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward instead of keeping them: less memory for long
    inputs and large models, about a third more compute per step; the loss and gradients are the same. Under FSDP
    through Fabric's policy; turns the shared prefix off."""
    eval_interval: Annotated[int, Check(ge=1)] = 100
    """Steps between evaluations on the validation split: loss, task metrics (label tasks), one sample answer."""
    eval_iters: Union[Annotated[int, Check(ge=1)], Literal["all"]] = 100
    """Validation micro-batches per evaluation (the first ones, the same each time), or all: the whole split."""
    best_metric: Optional[BestMetric] = same_run(None)
    """What best/ and early stopping follow (default: val_mcc for label tasks, val_loss for open-ended outputs)."""
    save_interval: Annotated[int, Check(ge=1)] = 100
    """Steps between resumable checkpoints (out_dir/step-NNNNNN/)."""
    log_interval: Annotated[int, Check(ge=1)] = 1
    """Steps between rows of metrics.csv."""
    early_stopping_patience: Optional[Annotated[int, Check(ge=1)]] = None
    """Stop after this many evaluations without a better --best_metric."""
    resume: Optional[str] = None
    """Continue a run: `auto` (the newest complete state in out_dir) or a step-NNNNNN folder."""
    overwrite: bool = False
    """Start over in an out_dir that holds another run: its checkpoints, best/, eval folders and logs are removed."""
    logger: list[Literal["csv", "tensorboard", "mlflow", "wandb"]] = field(default_factory=lambda: ["csv"])
    """Where metrics go besides out_dir/metrics.csv: csv, tensorboard (out_dir/tensorboard), mlflow, wandb (Weights & Biases, files in out_dir/wandb; WANDB_MODE=offline to log without network; pip install 'littune[wandb]')."""
    mlflow_tracking_uri: Optional[str] = None
    """MLflow tracking URI (default: a local out_dir/mlruns store)."""


DEFAULT_TASK_METRIC = "val_mcc"  # see README: which checkpoint is best
MULTI_LABEL_METRIC = "val_f1_macro"  # a multi-label task's (LexGLUE's headline metric: rare labels count as much)
NOT_HYPERPARAMETERS = {"resume", "overwrite"}  # how this invocation starts, not what the run is


def hyperparameters(method_name: str, args: TrainArgs, method_args) -> dict:
    """hyperparameters.yaml: the method, every flag of the run (defaults resolved) and the method's own flags."""
    values = {k: v for k, v in asdict(args).items() if k not in NOT_HYPERPARAMETERS}
    values = {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}
    return {"method": method_name, **values, **asdict(method_args)}


def same_run_values(args: TrainArgs, method_args) -> dict:
    """The flags a resumed run must keep (every flag of the method counts)."""
    return {**{f.name: getattr(args, f.name) for f in fields(args) if f.metadata.get("same_run")},
            **asdict(method_args)}


def total_steps(n_train: int, batch_size: int, epochs: Optional[int], max_steps: Optional[int]) -> int:
    """Optimizer steps of the run: --max_steps, --epochs (default 1), or the fewer of the two."""
    by_epochs = (epochs or 1) * math.ceil(n_train / batch_size)
    if max_steps is None:
        return by_epochs
    return max_steps if epochs is None else min(max_steps, by_epochs)


def resolve_defaults(args: TrainArgs, method_name: str, n_train: int, default_precision: Optional[str],
                     label_task: bool, eight_pack_small: bool = False, multi_label: bool = False,
                     default_learning_rate: float = 3e-3) -> TrainArgs:
    """The flags left to littune, decided for this run and data: out_dir, precision, micro-batch and batch size,
    warmup, the metric that picks the best checkpoint. default_precision None leaves an unset precision None (the
    loop decides it once it knows the state a run resumes: `littune.precision`). eight_pack_small: 8 records of this
    data run packed hold no more tokens than 4 whole ones (`littune.finetune.prefix.eight_pack_small`): the default
    micro-batch is 8 then (measured on SmolLM2 + SST-2: 1.4x the tokens/s of 4, see the README)."""
    world = args.devices * args.num_nodes

    def default_batch(per_step: int) -> int:  # about 100 steps per epoch, whole micro-batches per device, <= 64
        return max(per_step, min(64, n_train // 100) // per_step * per_step)

    micro_batch_size = args.micro_batch_size
    if micro_batch_size is None:  # 8 only where the batch (as with 4) holds whole micro-batches of 8
        micro_batch_size = 8 if eight_pack_small and (args.batch_size or default_batch(4 * world)) % (8 * world) == 0 \
            else 4
    per_step = micro_batch_size * world
    batch_size = args.batch_size if args.batch_size is not None else default_batch(per_step)
    if batch_size % per_step:
        raise UserError(
            f"--batch_size {batch_size} must be divisible by --micro_batch_size {micro_batch_size} x devices "
            f"{world} (gradient accumulation = batch_size / (micro_batch_size * devices))"
        )
    best_metric = args.best_metric or ((MULTI_LABEL_METRIC if multi_label else DEFAULT_TASK_METRIC) if label_task
                                       else "val_loss")
    if best_metric != "val_loss" and not label_task:
        raise UserError(f"--best_metric {best_metric}: {args.data_dir} is not a label task (prepare.json has no label "
                        f"set: its outputs are free text); use --best_metric val_loss")
    steps = total_steps(n_train, batch_size, args.epochs, args.max_steps)
    warmup = args.warmup_steps if args.warmup_steps is not None else min(100, math.ceil(0.1 * steps))
    return replace(
        args, batch_size=batch_size, micro_batch_size=micro_batch_size, warmup_steps=warmup,
        precision=args.precision or default_precision, best_metric=best_metric,
        learning_rate=args.learning_rate if args.learning_rate is not None else default_learning_rate,
        epochs=args.epochs if args.epochs is not None or args.max_steps is not None else 1,
        out_dir=Path(args.out_dir) if args.out_dir is not None else Path("out") / method_name / Path(args.data_dir).name,
    )


# ------------------------------------------------------------------------------------- the command's signature


def flag_parameters(*dataclasses: type) -> list[inspect.Parameter]:
    """One keyword parameter per field: what jsonargparse builds flat flags from (--learning_rate, not
    --train.learning_rate, which it would make of a dataclass-typed parameter)."""
    parameters = []
    for cls in dataclasses:
        for f in fields(cls):
            default = f.default if f.default is not MISSING else (
                f.default_factory() if f.default_factory is not MISSING else inspect.Parameter.empty)
            parameters.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                                annotation=f.type))
    required = [p for p in parameters if p.default is inspect.Parameter.empty]
    return required + [p for p in parameters if p.default is not inspect.Parameter.empty]


def flag_help(*dataclasses: type) -> str:
    """The "Arguments:" section of a docstring, from the fields' attribute docstrings."""
    from docstring_parser import parse_from_object

    lines = ["Arguments:"]
    for cls in dataclasses:
        for param in parse_from_object(cls).params:
            lines.append(f"    {param.arg_name}: {' '.join((param.description or '').split())}")
    return "\n".join(lines)
