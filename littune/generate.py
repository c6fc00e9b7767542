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
from typing import Annotated, Optional

from littune.common import Check, UserError, checked
from littune.inputs import RunInputs, load_for_inference
from littune.model import Precision, check_precision, inference_precision, peak_memory_gb
from littune.prepared import encode
from littune.quantize import Quantize, check_quantize
from littune.sampling import check_fits, generate_tokens, stream_text


@checked
def generate(
    prompt: str,
    checkpoint_dir: Path,
    input: str = "",
    adapter_path: Optional[Path] = None,
    max_new_tokens: Annotated[int, Check(ge=1)] = 100,
    temperature: Annotated[float, Check(ge=0)] = 0.8,
    top_k: Optional[Annotated[int, Check(ge=1)]] = 200,
    top_p: Annotated[float, Check(gt=0, le=1)] = 1.0,
    num_samples: Annotated[int, Check(ge=1)] = 1,
    seed: int = 1234,
    precision: Optional[Precision] = None,
    quantize: Optional[Quantize] = None,
    prompt_style: Optional[str] = None,
    system: Optional[str] = None,
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
        precision: 32-true, bf16-true, bf16-mixed, 16-true or 16-mixed (default: bf16-true on GPUs with bfloat16; on a CPU bf16-true where one block of the model is measured >= 1.15x faster in bf16 there, else 32-true).
        quantize: The base model's linear layers in 4 bits (bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq) or 8 bits (bnb.int8) with bitsandbytes, quantized while loading (pip install 'littune[quantize]'); any adapter loads as it is.
        prompt_style: The prompt template: chat (the model's own chat template) or a litgpt style name (default: the one saved with the adapter, else chat where the model has a template, else alpaca).
        system: A system message for the chat prompt style.
    """
    import lightning as L

    if not prompt.strip():
        raise UserError("--prompt is empty: give the instruction to answer")

    check_quantize(quantize)
    if precision is not None:
        check_precision(precision)
    inputs = RunInputs(checkpoint_dir, adapter_path=adapter_path)
    precision, why = inference_precision(precision, inputs.config)
    fabric = L.Fabric(devices=1, precision=precision, accelerator="auto")
    model, tokenizer, run_dir = load_for_inference(fabric, checkpoint_dir, quantize=quantize, inputs=inputs)
    style = inputs.prompt_style(prompt_style, system, run_dir)
    text = style.apply(prompt, input=input)
    prompt_ids = encode(tokenizer, text).to(fabric.device)
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
            f"({n_new / max(elapsed, 1e-9):.1f} tokens/s), peak memory {peak_memory_gb(fabric.device):.2f} GB, "
            f"precision {precision}{f' ({why})' if why and sample_index == 0 else ''}",
            file=sys.stderr,
        )
    return answers
