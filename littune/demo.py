"""`littune demo`: the whole workflow, offline, in a few minutes on a laptop CPU.

No model can be downloaded on a fresh offline machine, so the demo writes its own Hub-format checkpoint: a small
random-init GPT-NeoX (the Pythia architecture) as `config.json` + `model.safetensors`, with a byte-level BPE
tokenizer trained on the demo data by `tokenizers`. From there on every step is the real command:
convert -> prepare -> finetune adapter_v2 -> generate, each printed as the `littune ...` line a user would type.
"""

import csv
import json
import random
import shlex
import sys
import time
from pathlib import Path

import torch

from littune.checkpoints import convert
from littune.common import save_json, save_text
from littune.data import prepare
from littune.finetune import command
from littune.generate import generate

# Demo task: answer in a fixed, recognisable shape, so that what the adapter learned shows in the final answer.
ANTONYMS = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"), ("up", "down"),
    ("open", "closed"), ("early", "late"), ("full", "empty"), ("hard", "soft"), ("high", "low"), ("long", "short"),
    ("loud", "quiet"), ("rich", "poor"), ("strong", "weak"), ("young", "old"), ("wet", "dry"), ("thick", "thin"),
    ("clean", "dirty"), ("near", "far"), ("first", "last"), ("true", "false"), ("inside", "outside"),
    ("day", "night"), ("begin", "end"), ("win", "lose"), ("push", "pull"), ("buy", "sell"), ("give", "take"),
    ("heavy", "light"), ("sweet", "sour"), ("brave", "afraid"), ("easy", "difficult"), ("north", "south"),
    ("east", "west"), ("left", "right"), ("friend", "enemy"), ("love", "hate"), ("question", "answer"),
    ("arrive", "leave"), ("above", "below"), ("before", "after"), ("cheap", "expensive"), ("wide", "narrow"),
    ("deep", "shallow"), ("start", "finish"), ("more", "less"), ("always", "never"),
]


def demo_records() -> list[dict]:
    records = []
    for word, opposite in ANTONYMS:
        for a, b in ((word, opposite), (opposite, word)):
            records.append({
                "instruction": "Give the opposite of the word.",
                "input": a,
                "output": f"The opposite of {a} is {b}.",
            })
    random.Random(0).shuffle(records)
    return records


def demo(workdir: Path = Path("littune-demo"), max_steps: int = 100, seed: int = 42) -> None:
    """Run the whole workflow offline on a tiny embedded model: convert, prepare, finetune, generate.

    Arguments:
        workdir: Folder for everything the demo writes (checkpoint, data, run).
        max_steps: Optimizer steps of fine-tuning.
        seed: Seed of the data split and of training.
    """
    workdir = Path(workdir)
    started = time.perf_counter()
    checkpoint_dir = workdir / "checkpoints" / "littune" / "demo-neox"
    data_file = workdir / "demo_instructions.json"
    data_dir = workdir / "data" / "demo"
    out_dir = workdir / "out" / "adapter_v2" / "demo"

    records = demo_records()
    save_text(json.dumps(records, indent=1) + "\n", data_file)
    _banner("0. Write a small random-init GPT-NeoX in Hugging Face format (stands in for `littune download`)")
    write_demo_checkpoint(checkpoint_dir, [json.dumps(r) for r in records], seed)

    _step("1. Convert it to Lit-GPT format", "convert", checkpoint_dir=checkpoint_dir)
    convert(checkpoint_dir)

    _step("2. Tokenise the instructions, split train/test", "prepare", data_file=data_file,
          checkpoint_dir=checkpoint_dir, destination_path=data_dir, seed=seed, test_size=8)
    prepare(data_file=data_file, checkpoint_dir=checkpoint_dir, destination_path=data_dir, seed=seed, test_size=8)

    train_flags = dict(checkpoint_dir=checkpoint_dir, data_dir=data_dir, out_dir=out_dir, max_steps=max_steps,
                       batch_size=8, micro_batch_size=8, learning_rate=0.1, warmup_steps=5, eval_interval=25,
                       eval_iters=2, save_interval=50, seed=seed)
    _step("3. Fine-tune with adapter_v2", "finetune adapter_v2", **train_flags)
    command("adapter_v2")(**train_flags)

    question = dict(prompt="Give the opposite of the word.", input="hot")
    _step("4. Answer with the base model alone", "generate", checkpoint_dir=checkpoint_dir, temperature=0,
          max_new_tokens=16, **question)
    generate(checkpoint_dir=checkpoint_dir, temperature=0, max_new_tokens=16, **question)
    _step("5. Answer with the trained adapter", "generate", checkpoint_dir=checkpoint_dir, adapter_path=out_dir,
          temperature=0, max_new_tokens=16, **question)
    generate(checkpoint_dir=checkpoint_dir, adapter_path=out_dir, temperature=0, max_new_tokens=16, **question)

    with open(out_dir / "metrics.csv") as f:
        losses = [float(row["train_loss"]) for row in csv.DictReader(f)]
    _banner(f"Training loss {losses[0]:.2f} -> {losses[-1]:.2f} over {len(losses)} steps. "
            f"Done in {time.perf_counter() - started:.0f}s. Outputs:")
    for label, path in [("checkpoint", checkpoint_dir), ("instructions", data_file), ("prepared data", data_dir),
                        ("adapter", out_dir / "lit_model_adapter_finetuned.pth"),
                        ("training log", out_dir / "metrics.csv")]:
        print(f"  {label:14s} {path}")


def write_demo_checkpoint(folder: Path, texts: list[str], seed: int, vocab_size: int = 512,
                          block_size: int = 256) -> None:
    """A Pythia-shaped GPT-NeoX in the Hub's file layout: config.json, model.safetensors, tokenizer files."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts + [_ALPACA_HEADER], trainer=trainer)
    tokenizer.save(str(folder / "tokenizer.json"))
    eos_id = tokenizer.token_to_id("<|endoftext|>")
    save_json({"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "add_bos_token": False,
               "tokenizer_class": "GPTNeoXTokenizer"}, folder / "tokenizer_config.json")
    save_json({"bos_token_id": eos_id, "eos_token_id": eos_id}, folder / "generation_config.json")

    hidden, layers, heads, inner = 128, 4, 4, 512
    config = {
        "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "vocab_size": vocab_size,
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "intermediate_size": inner, "max_position_embeddings": block_size, "rotary_pct": 0.25, "rotary_emb_base": 10000,
        "hidden_act": "gelu", "layer_norm_eps": 1e-5, "use_parallel_residual": True, "tie_word_embeddings": False,
        "bos_token_id": eos_id, "eos_token_id": eos_id, "torch_dtype": "float32",
    }
    save_json(config, folder / "config.json")

    generator = torch.Generator().manual_seed(seed)

    def normal(*shape):
        return torch.randn(*shape, generator=generator) * 0.02

    weights = {"gpt_neox.embed_in.weight": normal(vocab_size, hidden), "embed_out.weight": normal(vocab_size, hidden),
               "gpt_neox.final_layer_norm.weight": torch.ones(hidden),
               "gpt_neox.final_layer_norm.bias": torch.zeros(hidden)}
    for i in range(layers):
        p = f"gpt_neox.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            weights[p + norm + ".weight"], weights[p + norm + ".bias"] = torch.ones(hidden), torch.zeros(hidden)
        for name, (rows, cols) in {"attention.query_key_value": (3 * hidden, hidden),
                                   "attention.dense": (hidden, hidden), "mlp.dense_h_to_4h": (inner, hidden),
                                   "mlp.dense_4h_to_h": (hidden, inner)}.items():
            weights[p + name + ".weight"], weights[p + name + ".bias"] = normal(rows, cols), torch.zeros(rows)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


_ALPACA_HEADER = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n\n\n### Input:\n\n\n"
    "### Response:\n"
)


def _banner(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def _step(title: str, command: str, **flags) -> None:
    """Print the title and the exact command line that does this step by hand."""
    args = " ".join(f"--{k} {shlex.quote(str(v))}" for k, v in flags.items())
    _banner(title)
    print(f"    $ littune {command} {args}", flush=True)
    sys.stdout.flush()
