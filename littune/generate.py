"""Generate: answer a prompt with the base model plus a trained adapter, streaming the response to stdout.

    littune generate --prompt "Name three primary colors." --checkpoint_dir checkpoints/tiiuae/falcon-7b \
        --adapter_path out/adapter_v2/my

The prompt is formatted with the prompt style the adapter was trained with, sampled with litgpt's KV-cached
`generate_fn` (temperature 0 = greedy, top-k, top-p) and stops at the tokenizer's EOS or the style's stop tokens.
stdout holds only the response; timings go to stderr.
"""

import sys
import time
from pathlib import Path
from typing import Iterator, Literal, Optional

import torch
import yaml

from littune.checkpoints import check_checkpoint_dir, load_model_config
from littune.common import UserError, load_torch
from littune.finetune.loop import ADAPTER_FILE
from littune.finetune import get_method


def generate(
    prompt: str,
    checkpoint_dir: Path,
    input: str = "",
    adapter_path: Optional[Path] = None,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: Optional[int] = 200,
    top_p: float = 1.0,
    num_samples: int = 1,
    seed: int = 1234,
    precision: Optional[Literal["32-true", "bf16-true", "16-true"]] = None,
    prompt_style: Optional[str] = None,
) -> list[str]:
    """Answer an instruction with the fine-tuned model (or the base model without --adapter_path).

    Arguments:
        prompt: The instruction.
        checkpoint_dir: The converted base model the adapter was trained on.
        input: Optional input/context for the instruction (the Alpaca style's "### Input:").
        adapter_path: An adapter file, or a run folder (its final adapter). Without it, the base model answers.
        max_new_tokens: Most tokens to generate.
        temperature: Sampling temperature; 0 is greedy (always the most likely token).
        top_k: Sample only among the k most likely tokens.
        top_p: Sample only among the most likely tokens whose probabilities add up to top_p (1.0 = off).
        num_samples: How many answers to sample.
        seed: Random seed: the same seed gives the same sampled text.
        precision: 32-true, bf16-true or 16-true (default: bf16-true on GPUs that have it, else 32-true).
        prompt_style: The prompt template (default: the one saved with the adapter, else alpaca).
    """
    import lightning as L

    if not prompt.strip():
        raise UserError("--prompt is empty: give the instruction to answer")
    if max_new_tokens < 1 or num_samples < 1:
        raise UserError("--max_new_tokens and --num_samples must be >= 1")
    if not 0.0 <= top_p <= 1.0:
        raise UserError(f"--top_p must be in [0, 1], got {top_p}")

    fabric = L.Fabric(devices=1, precision=precision or default_inference_precision(), accelerator="auto")
    model, tokenizer, style = load_for_inference(fabric, checkpoint_dir, adapter_path, prompt_style)
    text = style.apply(prompt, input=input)
    prompt_ids = tokenizer.encode(text, device=fabric.device)
    check_fits(prompt_ids, max_new_tokens, model.config.block_size)
    stop_tokens = style.stop_tokens(tokenizer)

    L.seed_everything(seed, verbose=False)
    answers = []
    for sample_index in range(num_samples):
        if num_samples > 1:
            print(f"--- sample {sample_index + 1}", file=sys.stderr)
        start = time.perf_counter()
        pieces, n_new = [], 0
        for piece, n_new in stream_text(tokenizer, generate_tokens(
            model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            stop_tokens=stop_tokens,
        )):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print(flush=True)
        elapsed = time.perf_counter() - start
        answers.append("".join(pieces))
        print(
            f"prompt {prompt_ids.numel()} tokens, {n_new} new tokens in {elapsed:.2f}s "
            f"({n_new / max(elapsed, 1e-9):.1f} tokens/s){memory_note(fabric)}",
            file=sys.stderr,
        )
    return answers


# ------------------------------------------------------------------------------------------------------ loading


def load_for_inference(fabric, checkpoint_dir: Path, adapter_path: Optional[Path], prompt_style: Optional[str]):
    """(model in eval mode on fabric's device, tokenizer, prompt style) for a base checkpoint plus optional adapter."""
    from litgpt import Tokenizer
    from litgpt.prompts import PromptStyle, has_prompt_style, load_prompt_style

    checkpoint_dir = Path(checkpoint_dir)
    check_checkpoint_dir(checkpoint_dir)
    config = load_model_config(checkpoint_dir)
    adapter_file, run_dir = resolve_adapter(adapter_path) if adapter_path is not None else (None, None)
    method = get_method(run_method(run_dir)) if adapter_file else None

    with fabric.init_module(empty_init=True):
        if method:
            model = method.build_model(config)
        else:
            from litgpt import GPT

            model = GPT(config)
    state = load_torch(checkpoint_dir / "lit_model.pth", "base weights")
    if adapter_file:
        adapter = load_torch(adapter_file, "adapter weights")
        check_adapter_fits(model, adapter, adapter_file, checkpoint_dir, method)
        state = {**state, **adapter}  # the adapter's norms replace the base ones (adapter_v2 trains them)
    model.load_state_dict(state, strict=method is None)
    if method:
        method.before_forward(model)  # litgpt's cached adapter K/V would be stale after loading weights
    model = fabric.setup_module(model.eval())

    if prompt_style:
        style = PromptStyle.from_name(prompt_style)
    elif run_dir is not None and has_prompt_style(run_dir):
        style = load_prompt_style(run_dir)
    else:
        style = PromptStyle.from_name("alpaca")
    return model, Tokenizer(checkpoint_dir), style


def resolve_adapter(adapter_path: Path) -> tuple[Path, Path]:
    """(adapter file, the folder with its hyperparameters and prompt style) for a file or a run folder."""
    adapter_path = Path(adapter_path)
    adapter_file = adapter_path / ADAPTER_FILE if adapter_path.is_dir() else adapter_path
    if not adapter_file.is_file():
        hint = "a run folder must hold the final adapter " + ADAPTER_FILE if adapter_path.is_dir() else "no such file"
        raise UserError(f"--adapter_path {adapter_path}: {hint}")
    return adapter_file, adapter_file.parent


def run_method(run_dir: Path) -> str:
    hparams = run_dir / "hyperparameters.yaml"
    if hparams.is_file():
        return (yaml.safe_load(hparams.read_text()) or {}).get("method", "adapter_v2")
    return "adapter_v2"


def check_adapter_fits(model, adapter: dict, adapter_file: Path, checkpoint_dir: Path, method) -> None:
    """An adapter trained on another model has other names or shapes: say which, instead of a wall of errors."""
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


def check_fits(prompt_ids: torch.Tensor, max_new_tokens: int, block_size: int) -> None:
    if prompt_ids.numel() + max_new_tokens > block_size:
        raise UserError(
            f"the prompt ({prompt_ids.numel()} tokens) plus --max_new_tokens {max_new_tokens} exceeds the model's "
            f"context of {block_size} tokens; shorten the prompt or lower --max_new_tokens"
        )


# --------------------------------------------------------------------------------------------------- sampling


@torch.inference_mode()
def generate_tokens(
    model, prompt_ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0, top_k: Optional[int] = None,
    top_p: float = 1.0, stop_tokens: tuple = (),
) -> Iterator[int]:
    """New token ids, one at a time, from litgpt's KV-cached `generate_fn`; stops before a stop sequence."""
    from litgpt.generate.base import generate_fn

    module = getattr(model, "module", model)
    device = prompt_ids.device
    full_length = module.max_seq_length
    module.max_seq_length = prompt_ids.numel() + max_new_tokens  # a KV cache (and RoPE table) this long, no longer
    module.set_kv_cache(batch_size=1, device=device)
    try:
        for token in generate_fn(
            module, prompt_ids, prompt_ids.numel() + max_new_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, stop_tokens=stop_tokens, include_prompt=False, include_eos=False,
        ):
            yield int(token)
    finally:
        module.clear_kv_cache()
        module.max_seq_length = full_length


def stream_text(tokenizer, tokens: Iterator[int]) -> Iterator[tuple[str, int]]:
    """(new text, tokens so far) as tokens arrive. Decodes the whole answer each time and emits the difference:
    per-token decoding drops the spaces of SentencePiece and splits multi-byte characters of byte-level BPE."""
    ids, emitted = [], ""
    for token in tokens:
        ids.append(token)
        text = tokenizer.decode(torch.tensor(ids))
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            continue
        if text.startswith(emitted):
            yield text[len(emitted):], len(ids)
            emitted = text
    text = tokenizer.decode(torch.tensor(ids)) if ids else ""
    if text != emitted and text.startswith(emitted):
        yield text[len(emitted):], len(ids)
    elif ids:
        yield "", len(ids)


def default_inference_precision() -> str:
    if torch.cuda.is_available():
        return "bf16-true" if torch.cuda.is_bf16_supported() else "16-true"
    return "32-true"


def memory_note(fabric) -> str:
    if fabric.device.type == "cuda":
        return f", peak GPU memory {torch.cuda.max_memory_allocated(fabric.device) / 1e9:.2f} GB"
    import resource

    return f", peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB"
