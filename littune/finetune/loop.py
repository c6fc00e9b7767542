"""The one Fabric training loop every fine-tuning method shares, read top to bottom: `finetune` checks and decides,
`fit` sets up and runs the steps (`take_step`, `evaluate_and_keep_best`, `log_step`, `maybe_save`), then saves.

A method (`littune/methods/`) says which model class to build, which parameters train and how its weights are
named; the flags are declared in `args.py`, the batch order and learning rate in `schedule.py`, resumable state in
`state.py`, logging in `logs.py`. What this loop does differently from Lit-GPT's `finetune/adapter_v2.py`:
- the loss of an optimizer step is the mean over *all target tokens of the step* (every micro-batch, every rank),
  so gradient accumulation gives the gradient of one big batch, and long records weigh what their tokens weigh;
- linear warmup that allows 0 and never spends a step at learning rate 0; clipping by global norm;
- the batch order is a pure function of (seed, epoch), so runs are reproducible and the position can be resumed;
- the base weights are loaded after Fabric sets the module up (under FSDP, before would be lost);
- `method.before_forward` runs before every forward (adapter_v2: litgpt's cached prefix K/V is cleared; left in
  place, `adapter_wte` stops getting gradients and the second backward fails).
"""

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import yaml

from littune.common import UserError, atomic_folder, replace_outputs, save_text, save_torch, write_torch
from littune.finetune.args import TrainArgs, hyperparameters, resolve_defaults, same_run_values, total_steps
from littune.finetune.evaluation import better, evaluate_now, sample_response
from littune.finetune.guard import LossWatch, blow_up_line, watch_loss
from littune.finetune.logs import (check_loggers, close_loggers, keep_metrics_until, log_row, logger_run_ids,
                                   make_loggers, make_progress)
from littune.finetune.prefix import (eight_pack_small, packed_batch, plain_reason, prefix_to_share,
                                     shared_prefix_loss_sum)
from littune.finetune.schedule import learning_rate_at, make_optimizer, steps_from
from littune.finetune.state import (Progress, StopRequest, find_resume_state, fingerprint, load_training_state,
                                    remove_stale_temporaries, save_training_state, saved_precision, step_folder,
                                    trained_state)
from littune.inputs import RunInputs
from littune.methods import Method
from littune.model import (check_precision, checkpoint_activations, collate, count_targets, default_precision,
                           forward_loss_sum, is_sharded, load_model, peak_memory_gb, unwrap)
from littune.outbound import outbound
from littune.precision import run_precision, shared_with_ranks
from littune.prepared import validation_split_name
from littune.quantize import check_quantize


def finetune(method: Method, args: TrainArgs, method_args, on_evaluation=None) -> Path:
    """Fine-tune with `method`; returns the final weights file. Everything is checked before the first step.
    on_evaluation: called in-process (no flag) after each evaluation as on_evaluation(step, figures); a true result
    stops the run there as early stopping does (`littune sweep`'s pruner)."""
    import lightning as L

    inputs = RunInputs(args.checkpoint_dir, args.data_dir)
    config, data_dir = inputs.config, inputs.data_dir
    train, val = inputs.split("train"), inputs.split(validation_split_name(data_dir))
    inputs.check_data_fits(train)
    if args.strategy == "fsdp" and not torch.cuda.is_available():
        raise UserError("--strategy fsdp needs GPUs (FSDP shards the model over CUDA devices); on CPU use "
                        "--strategy ddp")
    if args.strategy == "fsdp" and args.best_metric not in (None, "val_loss"):
        raise UserError(f"--best_metric {args.best_metric}: task metrics are not scored under --strategy fsdp (every "
                        f"rank would have to take part in each forward); use --best_metric val_loss")
    check_quantize(args.quantize, args.strategy, args.devices * args.num_nodes)
    wandb_line = check_loggers(args.logger)  # a missing package or key fails before out_dir is touched
    if wandb_line:
        print(wandb_line)
    label_task = inputs.labels is not None and args.strategy != "fsdp"  # FSDP: no task metrics (see above)
    plain = plain_reason(args.shared_prefix, args.strategy, method, method_args, config, args.activation_checkpointing)
    args = resolve_defaults(args, method.name, len(train), None, label_task,  # an unset precision: decided below
                            multi_label=inputs.label_sets is not None,
                            eight_pack_small=plain is None and eight_pack_small(train),
                            default_learning_rate=method.learning_rate)
    if args.precision is not None:  # a flag littune cannot use fails before any output is written
        check_precision(args.precision)
    print(f"shared prefix: off ({plain})" if plain else "shared prefix: on (the first tokens a micro-batch's records "
          "share run once where that pays; --shared_prefix false turns it off)")
    world = args.devices * args.num_nodes
    steps = total_steps(len(train), args.batch_size, args.epochs, args.max_steps)
    if args.resume is None and launching_process():  # other ranks would see rank 0's fresh files
        replace_outputs(args.out_dir, run_outputs(args.out_dir), args.overwrite, "another run",
                        " (its checkpoints, best/, eval/ and logs are removed) or --resume auto to continue it")
    resume_dir = find_resume_state(args.out_dir, args.resume) if args.resume else None
    # one machine's launching process measures; the ranks it starts inherit its decision (shared_with_ranks)
    precision, why = run_precision(args.precision, config, saved_precision(resume_dir) if resume_dir else None,
                                   launching_process() and args.num_nodes == 1, default_precision(training=True))
    if precision != args.precision:  # decided here (kept from the resumed run, measured, or the device's): check it
        check_precision(precision)
    args = replace(args, precision=precision)
    print(f"{steps} steps of {args.batch_size} records in micro-batches of {args.micro_batch_size} ({len(train):,} "
          f"training records), warmup {args.warmup_steps} "
          f"steps to learning rate {args.learning_rate:g}, {args.lr_schedule} after, precision {args.precision}"
          f"{f' ({why})' if why else ''}; best/ by {args.best_metric}")
    if args.warmup_steps >= steps:
        print(f"note: --warmup_steps {args.warmup_steps} >= the run's {steps} steps: it never reaches its peak "
              f"learning rate {args.learning_rate:g}; lower --warmup_steps or train longer")
    fabric = L.Fabric(accelerator="auto", devices=args.devices, num_nodes=args.num_nodes, precision=args.precision,
                      strategy=fabric_strategy(args.strategy, world, method, args.activation_checkpointing))
    with shared_with_ranks(args.precision, why):
        fabric.launch()
    run = fingerprint(same_run_values(args, method_args), args.checkpoint_dir, data_dir, data_dir / "train.pt", steps)
    return fit(fabric, method, method_args, args, inputs, train, val, run, steps, resume_dir, on_evaluation,
               label_task)


@dataclass(eq=False)
class Training:
    """What the functions of one run's steps share: set up by `fit`, `progress` (and the counters) updated as the
    steps go."""

    fabric: object
    method: Method
    args: TrainArgs
    model: object
    optimizer: object
    steps: int  # of the whole run
    progress: Progress
    val: list  # the validation split (its first record gets a sample answer at each evaluation)
    scored: list  # the validation records each evaluation scores
    ignore_index: int
    task: Optional[tuple]  # a label task: (tokenizer, prompt style, labels, label_sets), for its task metrics
    tokenizer: object
    shared_prefix: bool
    sharded: bool
    out_dir: Path
    run_files: dict  # written beside every weights file: hyperparameters.yaml, prompt_style.yaml
    metrics_path: Path
    loggers: list
    run_fingerprint: dict  # saved with every state: what a resumed run must match
    on_evaluation: Optional[Callable] = None
    watch: LossWatch = field(default_factory=LossWatch)
    session_start: float = field(default_factory=time.perf_counter)
    session_tokens: int = 0
    seconds: float = 0.0  # of this session, at the end of the last step (evaluations after it not counted)
    elapsed_before: float = 0.0  # of the sessions before a resumed one

    def tokens_per_sec(self) -> float:
        return self.session_tokens / max(self.seconds, 1e-9)


def fit(fabric, method: Method, method_args, args: TrainArgs, inputs: RunInputs, train: list, val: list,
        run_fingerprint: dict, steps: int, resume_dir=None, on_evaluation=None, label_task: bool = False) -> Path:
    """Set up, then per step: the step, an evaluation that may keep best/, a row of logs, a state that may be saved;
    at the end the final weights. label_task: the evaluations score the labels (task metrics)."""
    out_dir, rank, sharded = Path(args.out_dir), fabric.global_rank, is_sharded(fabric)
    model, optimizer, progress = set_up_model(fabric, method, method_args, args, inputs, run_fingerprint, resume_dir)

    hparams = hyperparameters(method.name, args, method_args)
    run_files = {"hyperparameters.yaml": yaml.dump(hparams, sort_keys=False),
                 "prompt_style.yaml": inputs.style_text}
    metrics_path = out_dir / "metrics.csv"
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out_dir)
        for name, text in run_files.items():
            save_text(text, out_dir / name)
        keep_metrics_until(metrics_path, progress.step)
    loggers = make_loggers(hparams, out_dir, progress.mlflow_run_id, progress.wandb_run_id) if rank == 0 else []
    for experiment_logger in loggers:
        if resume_dir is None:  # no credentials or local paths leave the machine (littune.outbound)
            experiment_logger.log_hyperparams(outbound(hparams))
    progress = replace(progress, **logger_run_ids(loggers))

    run = Training(
        fabric, method, args, model, optimizer, steps, progress, val,
        scored=val if args.eval_iters == "all" else val[:args.eval_iters * args.micro_batch_size],
        ignore_index=inputs.ignore_index, tokenizer=inputs.tokenizer,
        task=(inputs.tokenizer, inputs.data_style, inputs.labels, inputs.label_sets) if label_task else None,
        shared_prefix=plain_reason(args.shared_prefix, "fsdp" if sharded else args.strategy, method, method_args,
                                   unwrap(model).config, args.activation_checkpointing) is None,
        sharded=sharded, out_dir=out_dir, run_files=run_files, metrics_path=metrics_path, loggers=loggers,
        run_fingerprint=run_fingerprint, on_evaluation=on_evaluation, elapsed_before=progress.elapsed)
    batches = steps_from([len(r["input_ids"]) for r in train], args.batch_size, args.micro_batch_size,
                         fabric.world_size, args.seed, args.group_by_length, progress.epoch, progress.step_in_epoch)
    patience = args.early_stopping_patience
    stopped_early = patience is not None and progress.evals_since_best >= patience  # a resumed early-stopped run
    stop, bar, stopped_by_caller = StopRequest(), make_progress(fabric, steps, progress.step), False
    status = "FAILED"
    try:
        while run.progress.step < steps and not stopped_early and not stopped_by_caller:
            epoch, step_in_epoch, step_batches = next(batches)
            loss, lr = take_step(run, train, step_batches, epoch, step_in_epoch, bar)
            step, evaluation = run.progress.step, {}
            if step % args.eval_interval == 0 or step == steps:
                evaluation, stopped_by_caller = evaluate_and_keep_best(run, bar)
                stopped_early = patience is not None and run.progress.evals_since_best >= patience
            log_step(run, epoch, loss, lr, evaluation, bar)
            stop.agree(fabric)
            maybe_save(run, final=stopped_early or stopped_by_caller or stop.requested)
            if stop.requested:
                status = "KILLED"
                raise UserError(f"stopped by {stop.requested} after step {step}; the state is saved in "
                                f"{out_dir / step_folder(step)}. Resume with the same command plus --resume auto")
        if stopped_early:
            fabric.print(f"Early stopping: no better {args.best_metric} in {patience} evaluations (best "
                         f"{run.progress.best_value:.4f} at step {run.progress.best_step}, in {out_dir / 'best'})")
        status = "success"
    finally:  # whichever way the loop ends: signal handlers back, logs flushed and marked
        stop.restore()
        bar.close()
        close_loggers(loggers, status)

    save_weights(fabric, model, method, out_dir, {})
    progress, seconds = run.progress, time.perf_counter() - run.session_start
    fabric.print(f"Done: {progress.step} steps, {progress.tokens_seen:,} tokens trained in "
                 f"{run.elapsed_before + seconds:.1f}s ({run.session_tokens / max(seconds, 1e-9):,.0f} tokens/s), "
                 f"peak memory {peak_memory_gb(fabric.device):.2f} GB. Weights: {out_dir / method.adapter_file}"
                 + "".join(f"; the training loss blew up at step {b[0]} (best/: step {progress.best_step})"
                           for b in run.watch.blow_ups))
    return out_dir / method.adapter_file


def set_up_model(fabric, method: Method, method_args, args: TrainArgs, inputs: RunInputs, run_fingerprint: dict,
                 resume_dir) -> tuple:
    """(the model set up for training, its optimizer, the progress: a resumed run's, else a fresh one)."""
    sharded = is_sharded(fabric)
    fabric.seed_everything(args.seed, verbose=False)  # the same seed everywhere: the same initial weights
    model = load_model(fabric, args.checkpoint_dir, method, method_args, trainable=True, sharded=sharded,
                       quantize=args.quantize, config=inputs.config)
    if args.activation_checkpointing and not sharded:  # FSDP recomputes through its own policy (fabric_strategy)
        checkpoint_activations(unwrap(model), method.block_class, method.before_forward)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    fabric.print(f"{method.name}: {trainable:,} trainable parameters, "
                 f"{sum(p.numel() for p in model.parameters()) - trainable:,} frozen"
                 f"{f' (linear layers in {args.quantize}, counted as stored)' if args.quantize else ''}")
    optimizer = fabric.setup_optimizers(make_optimizer(model, args.learning_rate, args.weight_decay))
    progress = Progress()
    if resume_dir is not None:
        progress = load_training_state(resume_dir, model, optimizer, method, run_fingerprint, sharded)
        fabric.print(f"Resuming from {resume_dir} at step {progress.step}")
    return model, optimizer, progress


def take_step(run: Training, train: list, step_batches: list, epoch: int, step_in_epoch: int, bar) -> tuple:
    """One optimizer step at its scheduled learning rate, the progress moved on, the loss watched for a blow-up
    (best/ then gets the last healthy weights: `keep_before_blow_up`). Returns (the step's loss, learning rate)."""
    args, progress = run.args, run.progress
    step = progress.step + 1
    lr = learning_rate_at(step, args.learning_rate, args.warmup_steps, run.steps, args.lr_schedule)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    loss, tokens = train_step(run.fabric, run.model, run.optimizer, run.method, train, step_batches,
                              run.ignore_index, args.grad_clip, run.shared_prefix)
    run.session_tokens += tokens
    run.seconds = time.perf_counter() - run.session_start
    run.progress = replace(progress, step=step, epoch=epoch, step_in_epoch=step_in_epoch,
                           tokens_seen=progress.tokens_seen + tokens, elapsed=run.elapsed_before + run.seconds)
    blown = watch_loss(run.watch, step, loss, lambda: {} if run.sharded else trainable_copy(run.model))
    if blown is not None:
        kept = keep_before_blow_up(run, blown[0])
        bar.write(blow_up_line(*blown, args.learning_rate, run.progress.best_step, args.best_metric, kept))
    return loss, lr


def evaluate_and_keep_best(run: Training, bar) -> tuple[dict, bool]:
    """Evaluate the step's weights; an improvement on --best_metric replaces best/. Rank 0 writes one line with a
    sample answer. Returns (the evaluation, whether `on_evaluation` asks to stop)."""
    fabric, args, progress, step = run.fabric, run.args, run.progress, run.progress.step
    evaluation = evaluate_now(fabric, run.model, run.method, run.scored, args.micro_batch_size, run.ignore_index,
                              run.task)
    value = evaluation[args.best_metric]
    improved = progress.best_value is None or better(value, progress.best_value, args.best_metric)
    progress.evals_since_best = 0 if improved else progress.evals_since_best + 1
    if improved:
        progress.best_value, progress.best_step = value, step
        save_best(fabric, run.model, run.method, run.out_dir / "best", run.run_files,
                  info={"metric": args.best_metric, "value": value, "step": step,
                        **{k: v for k, v in evaluation.items() if k != "eval_sec"}})
    if fabric.global_rank == 0:  # FSDP would need every rank in each forward: no sample answer there
        answer = sample_response(run.model, run.method, run.val[0], run.tokenizer) if not run.sharded \
            else "(FSDP: none)"
        figures = ", ".join(f"{k} {v:.4f}" for k, v in evaluation.items() if k != "eval_sec")
        bar.write(f"step {step}: {figures}{' (best)' if improved else ''}, {len(run.scored)} records in "
                  f"{evaluation['eval_sec']:.1f}s | {run.val[0]['instruction'][:50]!r} -> {answer!r}")
    stopped = run.on_evaluation is not None and bool(run.on_evaluation(step, evaluation))  # pruned
    return evaluation, stopped


def log_step(run: Training, epoch: int, loss: float, lr: float, evaluation: dict, bar) -> None:
    """A row of metrics.csv (and the experiment loggers) every --log_interval steps, the last and each evaluated
    one; the progress bar moved on."""
    step, progress = run.progress.step, run.progress
    if run.fabric.global_rank == 0 and (step % run.args.log_interval == 0 or step == run.steps or evaluation):
        log_row(run.metrics_path, run.loggers, {
            "step": step, "epoch": epoch, "train_loss": loss, "learning_rate": lr, **evaluation,
            "tokens": progress.tokens_seen, "tokens_per_sec": run.tokens_per_sec(), "elapsed_sec": progress.elapsed})
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{run.tokens_per_sec():,.0f}")
    bar.update(1)


def maybe_save(run: Training, final: bool) -> None:
    """The resumable state every --save_interval steps, at the last step, and where the run stops (final)."""
    step = run.progress.step
    if step % run.args.save_interval == 0 or step == run.steps or final:
        save_training_state(run.fabric, run.model, run.optimizer, run.method, run.out_dir, run.progress,
                            run.run_fingerprint, run.run_files, run.sharded)


def trainable_copy(model) -> dict:
    return {n: p.detach().clone() for n, p in unwrap(model).named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable(model, weights: dict) -> None:
    parameters = dict(unwrap(model).named_parameters())
    for name, value in weights.items():
        parameters[name].copy_(value)


def keep_before_blow_up(run: Training, first_spike: int) -> Optional[float]:
    """best/ gets the weights of the last step before a loss blow-up (`littune.finetune.guard`), scored as an
    evaluation, unless best/ already holds a step from before it. Not sharded: one process holds every weight.
    Returns the kept weights' --best_metric value, None where best/ was left as it was."""
    watch, progress, args, model, method = run.watch, run.progress, run.args, run.model, run.method
    if not watch.healthy_weights or (progress.best_value is not None and progress.best_step < first_spike):
        return None
    current = trainable_copy(model)
    load_trainable(model, watch.healthy_weights)
    method.before_forward(unwrap(model))
    evaluation = evaluate_now(run.fabric, model, method, run.scored, args.micro_batch_size, run.ignore_index, run.task)
    progress.best_value, progress.best_step = evaluation[args.best_metric], watch.healthy_step
    save_best(run.fabric, model, method, run.out_dir / "best", run.run_files,
              info={"metric": args.best_metric, "value": progress.best_value, "step": watch.healthy_step,
                    "before_blow_up_at": first_spike, **{k: v for k, v in evaluation.items() if k != "eval_sec"}})
    load_trainable(model, current)
    method.before_forward(unwrap(model))
    return progress.best_value


def run_outputs(out_dir: Path) -> list[Path]:
    """What a fine-tuning run writes into its out_dir (and evaluate into its eval folders)."""
    names = ["hyperparameters.yaml", "prompt_style.yaml", "metrics.csv", "best", "tensorboard", "mlruns", "wandb"]
    patterns = ["step-*", ".step-*", "eval", "eval-*", "*_finetuned.pth"]
    return [p for p in (out_dir / n for n in names) if p.exists()] + \
        [p for pattern in patterns for p in sorted(out_dir.glob(pattern))]


def launching_process() -> bool:
    """True in the process a user (or their scheduler's rank 0) started; False in the other ranks."""
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"))


def train_step(fabric, model, optimizer, method: Method, data: list, step_batches: list, ignore_index: int,
               grad_clip: float, shared_prefix: bool = False) -> tuple:
    """One optimizer step: this rank's micro-batches, loss = sum of token losses / target tokens of the whole step.
    shared_prefix: the first tokens a micro-batch's records share run once (`littune.finetune.prefix`), where it pays.

    Returns (the step's mean token loss over all ranks, the step's input tokens over all ranks).
    """
    world = len(step_batches)
    step_targets = sum(count_targets(data, mb, ignore_index) for rank_batches in step_batches for mb in rank_batches)
    step_tokens = sum(len(data[i]["input_ids"]) for rank_batches in step_batches for mb in rank_batches for i in mb)
    mine = step_batches[fabric.global_rank]
    # Ranks with fewer micro-batches (a short last step) still take part in every gradient sync: they repeat one
    # micro-batch with weight 0.
    n_micro = max(len(b) for b in step_batches)
    loss_sum = torch.zeros((), device=fabric.device)
    for i in range(n_micro):
        weight = 1.0 if i < len(mine) else 0.0
        indices = mine[i] if i < len(mine) else (mine or step_batches[0])[0]
        prefix = prefix_to_share(data, indices, unwrap(model)) if shared_prefix else 0
        with fabric.no_backward_sync(model, enabled=i < n_micro - 1):
            method.before_forward(unwrap(model))
            if prefix:
                batch = {k: v.to(fabric.device) for k, v in packed_batch(data, indices, prefix, ignore_index).items()}
                token_loss_sum = shared_prefix_loss_sum(model, batch, ignore_index, method.before_forward)
            else:
                input_ids, labels = collate(data, indices, ignore_index, fabric.device)
                token_loss_sum = forward_loss_sum(model, input_ids, labels, ignore_index)
            # DDP averages gradients over ranks: scale by world size so the result is sum / step_targets
            fabric.backward(token_loss_sum * (weight * world / max(step_targets, 1)))
        loss_sum += token_loss_sum.detach() * weight
    if grad_clip > 0:
        try:
            fabric.clip_gradients(model, optimizer, max_norm=grad_clip)
        except RuntimeError as error:  # torch: "The total norm of order 2.0 for gradients ... is non-finite"
            if "non-finite" not in str(error):
                raise
            raise UserError("the gradient is not finite: training diverged (the loss overflowed); lower "
                            "--learning_rate or raise --batch_size") from None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    loss_sum = fabric.all_reduce(loss_sum, reduce_op="sum") if world > 1 else loss_sum
    return loss_sum.item() / max(step_targets, 1), step_tokens


def save_weights(fabric, model, method: Method, folder: Path, run_files: dict) -> None:
    """The trained weights as folder/<method's file name>, with the run's files beside them, each file atomically
    (the run's own folder holds other things: step folders, logs)."""
    weights = trained_state(fabric, model, method)
    if fabric.global_rank == 0:
        save_torch(weights, folder / method.adapter_file)
        for name, text in run_files.items():
            save_text(text, folder / name)
    fabric.barrier()


def save_best(fabric, model, method: Method, folder: Path, run_files: dict, info: dict) -> None:
    """best/: the weights, the run's files and adapter_info.json (which step, which figures), written as one folder
    that replaces the old one whole: a kill at any moment leaves the old best/ or the new one, never the weights of
    one step with the figures of another."""
    weights = trained_state(fabric, model, method)
    if fabric.global_rank == 0:
        with atomic_folder(folder) as tmp:
            write_torch(weights, tmp / method.adapter_file)
            for name, text in run_files.items():
                (tmp / name).write_text(text, encoding="utf-8")
            (tmp / "adapter_info.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    fabric.barrier()


def fabric_strategy(strategy: str, world_size: int, method: Method, activation_checkpointing: bool = False):
    if strategy == "fsdp":
        from lightning.fabric.strategies import FSDPStrategy

        # use_orig_params: frozen and trainable parameters share the flat parameters of each wrapped Block
        return FSDPStrategy(auto_wrap_policy={method.block_class}, state_dict_type="full", use_orig_params=True,
                            limit_all_gathers=True,
                            activation_checkpointing_policy={method.block_class} if activation_checkpointing else None)
    if strategy == "ddp" or (strategy == "auto" and world_size > 1):
        return "ddp"
    return "auto"
