"""The model, shared by training and inference: precision, building and loading (base weights, then a method's
trained weights), run folders, and token losses.

Loading order: the module is built, set up by Fabric, and only then are the weights copied in. Under FSDP the
module is built on the meta device and `setup_module` materialises it with fresh random values; weights copied
before that would be lost, so FSDP would train a random model. Set up first, then load, is right for every strategy.
"""

import resource
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Literal, NamedTuple, Optional

import torch
import yaml

from littune.checkpoints import load_model_config
from littune.common import UserError, check_fields, json_type, load_torch
from littune.methods import Method, get_method

Precision = Literal["32-true", "bf16-true", "bf16-mixed", "16-true", "16-mixed"]


# -------------------------------------------------------------------------------------------- devices, precision


def default_precision(training: bool = False, config=None) -> str:
    """bf16-true on GPUs that have bfloat16, else float16 (mixed for training, whose updates need float32). On CPU
    32-true, or, given the model's config, bf16 where one block of it is measured faster in bf16 on this CPU
    (`littune.precision.cpu_precision`: bf16-mixed for training, bf16-true for inference)."""
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bf16-true"
        return "16-mixed" if training else "16-true"
    if config is None:
        return "32-true"
    from littune.precision import cpu_precision

    return cpu_precision(config, training)[0]


def inference_precision(given: Optional[str], config) -> tuple[str, str]:
    """(precision, why) of evaluate, generate and serve: the flag (why ""); on a GPU the device's rule; on a CPU
    bf16-true where one block of this model runs at least 1.15x faster in bf16 there (measured on the user's machine
    and cached, `littune.precision.cpu_precision`), else 32-true; checked before it is used."""
    if given is not None:
        chosen, why = given, ""
    elif torch.cuda.is_available():
        chosen, why = default_precision(), ""
    else:
        from littune.precision import cpu_precision

        chosen, why = cpu_precision(config, training=False)
    check_precision(chosen)
    return chosen, why


def check_precision(precision: str) -> None:
    if torch.cuda.is_available():
        if precision.startswith("bf16") and not torch.cuda.is_bf16_supported():
            raise UserError(f"--precision {precision}: this GPU has no bfloat16; use 16-mixed or 32-true")
    elif precision in ("16-mixed", "16-true"):
        raise UserError(f"--precision {precision} needs a CUDA GPU; on CPU use 32-true, bf16-true or bf16-mixed")


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated on a CUDA device, else the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model itself, not Fabric's wrapper (whose parameter names are prefixed)."""
    return getattr(model, "module", model)


def checkpoint_activations(model: torch.nn.Module, block_class: type, before_forward) -> None:
    """Each transformer block of `model` keeps only its inputs in the forward and recomputes its activations in the
    backward (torch.utils.checkpoint, non-reentrant). Parameter names stay as they are (the block's forward is
    wrapped, the module is not). `before_forward(block)` runs before the forward and again before the recomputation:
    adapter_v2 caches its prefix K/V on every forward, and a cache kept from the first pass would make the
    recomputation take another path (no K/V computed, different tensors saved)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.modules():
        if isinstance(block, block_class):
            block.forward = _checkpointed(block, block.forward, before_forward, checkpoint)


def _checkpointed(block, forward, before_forward, checkpoint):
    def run(*args, **kwargs):
        before_forward(block)
        return forward(*args, **kwargs)

    def checkpointed_forward(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation and sampling: nothing to recompute
            return run(*args, **kwargs)
        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    return checkpointed_forward


def is_sharded(fabric) -> bool:
    from lightning.fabric.strategies import FSDPStrategy

    return isinstance(fabric.strategy, FSDPStrategy)


# ------------------------------------------------------------------------------------------------------ loading


def build_model(config, method: Optional[Method] = None, method_args=None) -> torch.nn.Module:
    """litgpt's GPT, or the method's model class (the base model plus the method's extra parameters)."""
    if method is None:
        from litgpt import GPT

        return GPT(config)
    return method.build_model(config, method_args if method_args is not None else method.args())


def load_model(fabric, checkpoint_dir: Path, method: Optional[Method] = None, method_args=None,
               adapter: Optional[dict] = None, trainable: bool = False, sharded: Optional[bool] = None,
               quantize: Optional[str] = None, config=None):
    """Build, set up, then load: the base weights of `checkpoint_dir`, then `adapter` (a method's trained weights).

    trainable: training; the method's parameters keep their initialisation where `adapter` is None and are the only
    ones with requires_grad. Inference leaves nothing initialised: every parameter comes from a file.
    quantize: the frozen linear layers in bitsandbytes' 4 or 8 bits, quantized while loading (`littune.quantize`;
    one device, never sharded: built, loaded, then set up). config: the checkpoint's, where the caller has it
    (`littune.inputs`), else read here.
    """
    checkpoint_dir = Path(checkpoint_dir)
    config = config if config is not None else load_model_config(checkpoint_dir)
    sharded = is_sharded(fabric) if sharded is None else sharded
    path = checkpoint_dir / "lit_model.pth"
    if quantize is not None:
        from littune.quantize import load_quantized

        state = {**load_torch(path, "base weights"), **(adapter or {})}
        model, missing, unexpected = load_quantized(
            fabric, lambda: build_model(config, method, method_args), state, quantize,
            method.is_trainable if method is not None else (lambda name: False), trainable and method is not None)
    else:
        with fabric.init_module(empty_init=sharded or not trainable):
            model = build_model(config, method, method_args)
        for name, param in model.named_parameters():
            param.requires_grad = trainable and method is not None and method.is_trainable(name)
        model = fabric.setup_module(model)  # FSDP materialises (random values) here: load after it, never before
        state = {**load_torch(path, "base weights"), **(adapter or {})}  # the adapter's norms replace the base ones
        missing, unexpected = load_state(model, state, sharded)
    # names as the model reports them (litgpt's method models rename some base weights while loading)
    missing = [k for k in missing if adapter is not None or method is None or not method.is_trainable(k)]
    if missing or unexpected:
        raise UserError(f"{path}: weights do not fit {checkpoint_dir / 'model_config.yaml'} (missing "
                        f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); convert the checkpoint again")
    if method is not None:
        method.before_forward(unwrap(model))  # litgpt's cached adapter K/V would be stale after loading weights
    return model


def load_state(model, state: dict, sharded: bool) -> tuple[list, list]:
    """Copy a full (unsharded) state dict into a set-up model: (missing, unexpected) names. Under FSDP each rank
    keeps its own shard of it (torch.distributed.checkpoint's set_model_state_dict, which runs the module's own
    load_state_dict and so litgpt's renaming hooks, but reports no missing names)."""
    module = unwrap(model)
    if not sharded:
        return module.load_state_dict(state, strict=False)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    return set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True, strict=False))


# ------------------------------------------------------------------------------------------------- run folders


def read_run(run_dir: Path) -> tuple[Method, object]:
    """(method, its flags) of a fine-tuning run folder, from its hyperparameters.yaml (adapter_v2 without one)."""
    path = Path(run_dir) / "hyperparameters.yaml"
    hparams = {}
    if path.is_file():
        try:
            hparams = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{path}: invalid YAML ({str(e).splitlines()[0]}); restore it from the run") from e
    if not isinstance(hparams, dict):
        raise UserError(f"{path}: holds {json_type(hparams)}, not a run's flags (name: value); restore it from the run")
    name = hparams.get("method", "adapter_v2")
    if not isinstance(name, str):
        raise UserError(f"{path}: method is {json_type(name)}; it must be the name of a fine-tuning method")
    try:
        method = get_method(name)
    except UserError as e:
        raise UserError(f"{path}: {e}") from e
    # the method's own flags decide the shapes built (LoRA's rank, targets): checked like the flags were
    return method, method.args(**check_fields(method.args, hparams, str(path)))


class Adapter(NamedTuple):
    """A trained adapter, resolved: where its weights and its run's files are, and how it was trained."""

    file: Path  # the weights file
    run_dir: Path  # the folder with its hyperparameters.yaml and prompt_style.yaml
    method: Method
    args: object  # the method's flags


def resolve_adapter(adapter_path: Path) -> Adapter:
    """The Adapter of a trained adapter given as its file or as a run folder (then: its final weights)."""
    adapter_path = Path(adapter_path)
    run_dir = adapter_path if adapter_path.is_dir() else adapter_path.parent
    if not run_dir.is_dir():
        raise UserError(f"--adapter_path {adapter_path}: no such file or folder")
    method, method_args = read_run(run_dir)
    adapter_file = adapter_path / method.adapter_file if adapter_path.is_dir() else adapter_path
    if not adapter_file.is_file():
        hint = f"a run folder must hold the final adapter {method.adapter_file}" if adapter_path.is_dir() \
            else "no such file"
        raise UserError(f"--adapter_path {adapter_path}: {hint}")
    return Adapter(adapter_file, run_dir, method, method_args)


def check_adapter_fits(adapter: dict, adapter_file: Path, checkpoint_dir: Path, method: Method, method_args,
                       config=None) -> None:
    """An adapter trained on another model has other names or shapes: say which, instead of a wall of errors.
    config: the checkpoint's, where the caller has it."""
    if not isinstance(adapter, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in adapter.items()):
        raise UserError(f"{adapter_file}: not adapter weights (a mapping of parameter names to tensors, as littune "
                        f"finetune saves them); give the run folder or its {method.adapter_file}")
    with torch.device("meta"):
        model = build_model(config if config is not None else load_model_config(checkpoint_dir), method, method_args)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if method.is_trainable(k)}
    got = {k: tuple(v.shape) for k, v in adapter.items()}
    unknown = sorted(set(got) - set(expected))
    wrong = [f"{k} {got[k]} vs {expected[k]}" for k in sorted(set(got) & set(expected)) if got[k] != expected[k]]
    missing = sorted(set(expected) - set(got))
    if unknown or wrong or missing:
        detail = "; ".join(
            ([f"shapes differ: {', '.join(wrong[:2])}"] if wrong else [])
            + ([f"names not in this model: {', '.join(unknown[:2])}"] if unknown else [])
            + ([f"missing: {', '.join(missing[:2])}"] if missing else [])
        )
        raise UserError(f"{adapter_file}: not an adapter for {checkpoint_dir} ({detail})")


def check_data_fits_model(data_dir: Path, meta: dict, records: list, checkpoint_dir: Path, config,
                          tokenizer=None) -> None:
    """Refuse data prepared with another tokenizer, or records the model cannot take. tokenizer: the checkpoint's,
    where the caller has it."""
    from littune.prepared import tokenizer_identity, tokenizer_identity_of

    mine = tokenizer_identity_of(tokenizer, Path(checkpoint_dir)) if tokenizer is not None \
        else tokenizer_identity(checkpoint_dir)
    theirs = meta.get("tokenizer", {})
    differing = [k for k in ("sha256", "vocab_size", "eos_id", "bos_id") if k in theirs and theirs.get(k) != mine.get(k)]
    if differing:
        raise UserError(
            f"{data_dir}: prepared with another tokenizer than {checkpoint_dir} ({', '.join(differing)} differ); "
            f"re-run littune prepare --checkpoint_dir {checkpoint_dir}"
        )
    longest = max(len(r["input_ids"]) for r in records)
    if longest > config.block_size:
        raise UserError(
            f"{data_dir}: records of up to {longest} tokens exceed the model's block size {config.block_size}; "
            f"re-run littune prepare with --max_seq_length {config.block_size}"
        )
    top = max(int(r["input_ids"].max()) for r in records)
    if top >= config.padded_vocab_size:
        raise UserError(f"{data_dir}: token id {top} is outside the model's vocabulary ({config.padded_vocab_size})")


@contextmanager
def sequence_length(model, length: int) -> Iterator[torch.nn.Module]:
    """Within the block, the model's max_seq_length (its RoPE table, and the default KV-cache length) is `length`;
    afterwards the KV cache is dropped and the length restored, whatever happened inside."""
    module = unwrap(model)
    before = module.max_seq_length
    module.max_seq_length = length
    try:
        yield module
    finally:
        module.clear_kv_cache()
        module.max_seq_length = before


@contextmanager
def final_norm_keeps(model, select) -> Iterator[None]:
    """Within the block the model's final norm returns `select(its output)` (B x T x C), e.g. `lambda out: out[:, -1:]`
    for the last position: the vocabulary projection (lm_head, litgpt's last step, 49,152 x 576 for SmolLM2) then
    runs only on the positions kept (a prefill needs its last one; scoring and the loss their target ones), and
    litgpt's forward returns logits for those alone."""
    handle = unwrap(model).transformer.ln_f.register_forward_hook(lambda _, __, out: select(out))
    try:
        yield
    finally:
        handle.remove()


# --------------------------------------------------------------------------------------------------- token losses


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


def count_targets(data: list, indices: list, ignore_index: int = -100) -> int:
    """Positions that contribute to the loss (the first label is never a target: nothing predicts it)."""
    return sum(int((data[i]["labels"][1:] != ignore_index).sum()) for i in indices)


def shifted_targets(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """The target of each position: the next label (the last position predicts nothing: ignore_index)."""
    return torch.cat([labels[:, 1:], labels.new_full((labels.size(0), 1), ignore_index)], dim=1)


def token_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Sum of next-token cross-entropies over the positions whose label is not ignore_index.

    The targets are shifted instead of the logits (position t predicts label t+1, the last position gets
    ignore_index): slicing off the last logit would copy all of them. Measured with scripts/bench_finetune.py, a
    chunked lm_head + cross-entropy (litgpt's lm_head_chunk_size=128) saved 7% of peak RSS but cost 30% of the
    tokens/s on CPU bf16, so the logits are computed in one piece.
    """
    targets = shifted_targets(labels, ignore_index)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )


def forward_loss_sum(model, input_ids: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """`token_cross_entropy_sum` of the model's logits, the vocabulary projected only where there is a target (see
    `target_loss_sum`)."""
    return target_loss_sum(model, lambda: model(input_ids), shifted_targets(labels, ignore_index), ignore_index)


def target_loss_sum(model, forward: Callable[[], torch.Tensor], targets: torch.Tensor, ignore_index: int = -100,
                    weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum of the cross-entropies of `forward()`'s logits (B x T x vocab, from `model`) against `targets` (B x T,
    the target of each position, ignore_index where none), each times its `weights` entry where given.

    With masked inputs a classification record has a few target tokens among dozens of prompt tokens, and the
    lm_head (49,152 x 576 for SmolLM2) on every position is about a fifth of a step's FLOPs and its largest
    activation. As in `scoring`, the final norm returns only the target positions (`final_norm_keeps`), so lm_head
    projects those alone. Where most positions are targets (unmasked instruction data) and nothing is weighted,
    gathering them would cost more than it saves: the logits are computed whole.
    """
    keep = targets != ignore_index
    if weights is None and int(keep.sum()) > keep.numel() // 2:
        logits = forward()
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                                                 ignore_index=ignore_index, reduction="sum")
    with final_norm_keeps(model, lambda out: out[keep]):
        logits = forward()
    if weights is None:
        return torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum")
    losses = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="none")
    return (losses * weights[keep]).sum()
