"""Big models on this machine: peak memory of `convert`, of one `finetune adapter_v2 --quantize bnb.nf4` step and
of `generate --quantize bnb.nf4`, on random-initialised checkpoints shaped as the seeds' 7B models.

    python scripts/bench_big_models.py --model Llama-2-7b-hf      # or falcon-7b; --workdir /tmp/big
    python scripts/bench_big_models.py --table

Nothing is downloaded: the HF checkpoint (config.json, bfloat16 safetensors shards, the real tokenizer from
../shared/data/tokenizers) is made here from litgpt's config of that name, with transformers building the HF module
on the meta device for the tensor names and shapes (random values: the memory and time of a step do not depend on
them). Then the real CLI runs, each command a subprocess whose own peak RSS (os.wait4's ru_maxrss) and wall time are
recorded in WORKDIR/big_models.jsonl. The HF shards are deleted once converted (a 7B model is 13.5 GB twice over).

Two cores are easily oversubscribed: run this alone, or the seconds mean little (the peak RSS still holds).
"""

import argparse
import json
import os
import shlex
import shutil
import time
from pathlib import Path

from bench_accuracy import PEAK_RSS_GB, SHARED_DATA, littune as run_littune  # this folder's script (python puts it on sys.path)

ALPACA = SHARED_DATA / "alpaca" / "stanford_alpaca_first335.json"
# litgpt config name -> (Hub repo id the folder is named as, the tokenizer files to copy in)
MODELS = {"Llama-2-7b-hf": ("meta-llama/Llama-2-7b-hf", SHARED_DATA / "tokenizers" / "llama"),
          "falcon-7b": ("tiiuae/falcon-7b", SHARED_DATA / "tokenizers" / "falcon")}
SHARD_BYTES = 2 * 10**9


def hf_config(name: str):
    """The transformers config of litgpt's `name`, field by field (an HF config of the same model)."""
    from litgpt import Config
    from transformers import FalconConfig, LlamaConfig

    c = Config.from_name(name)
    if name.startswith("falcon"):
        return FalconConfig(vocab_size=c.padded_vocab_size, hidden_size=c.n_embd, num_hidden_layers=c.n_layer,
                            num_attention_heads=c.n_head, multi_query=c.n_query_groups == 1, parallel_attn=True,
                            bias=c.bias, new_decoder_architecture=False, layer_norm_epsilon=c.norm_eps,
                            ffn_hidden_size=c.intermediate_size, torch_dtype="bfloat16")
    return LlamaConfig(vocab_size=c.padded_vocab_size, hidden_size=c.n_embd, intermediate_size=c.intermediate_size,
                       num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
                       num_key_value_heads=c.n_query_groups, max_position_embeddings=c.block_size,
                       rms_norm_eps=c.norm_eps, rope_theta=c.rope_base, tie_word_embeddings=False,
                       torch_dtype="bfloat16")


def make_checkpoint(name: str, folder: Path) -> int:
    """A random bfloat16 HF checkpoint of litgpt's `name` in folder, written shard by shard; its parameter count."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    config = hf_config(name)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    for f in MODELS[name][1].iterdir():
        if f.name != "SOURCE.txt":
            shutil.copy(f, folder / f.name)
    generator = torch.Generator().manual_seed(0)
    weight_map, shard, shard_bytes, index = {}, {}, 0, 0

    def flush():
        nonlocal shard, shard_bytes, index
        index += 1
        file = f"model-{index:05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in shard})
        shard, shard_bytes = {}, 0

    for key, shape in shapes.items():
        norm = len(shape) == 1
        shard[key] = (torch.ones(shape, dtype=torch.bfloat16) if norm and "bias" not in key else
                      torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=generator))
        shard_bytes += shard[key].numel() * 2
        if shard_bytes >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    total = sum(torch.Size(s).numel() for s in shapes.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total * 2}, "weight_map": weight_map}, indent=1))
    return total


def littune(*args: str, log: Path) -> dict:
    """`littune ARGS` as a subprocess (bench_accuracy's runner): its wall seconds and its own peak RSS (GB)."""
    seconds = run_littune(*args, log=log)
    return {"seconds": round(seconds, 1), "peak_rss_gb": PEAK_RSS_GB[args[0]]}


def run(args) -> dict:
    from littune.precision import cpu_info

    repo_id = MODELS[args.model][0]
    workdir = args.workdir.resolve()
    folder = workdir / "checkpoints" / repo_id
    log = workdir / f"{args.model}.log"
    workdir.mkdir(parents=True, exist_ok=True)
    result = {"model": args.model, "quantize": args.quantize, "cpu": cpu_info()["name"],
              "cpu_flags": " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
                                    if f in cpu_info()["flags"]), "cores": os.cpu_count()}
    if not (folder / "lit_model.pth").is_file():
        start = time.perf_counter()
        result["parameters"] = make_checkpoint(args.model, folder)
        result["make_seconds"] = round(time.perf_counter() - start, 1)
        result["convert"] = littune("convert", "--checkpoint_dir", str(folder), log=log)
        for shard in folder.glob("model-*.safetensors"):
            shard.unlink()
    result["lit_model_gb"] = round((folder / "lit_model.pth").stat().st_size / 1e9, 2)
    data = workdir / "data" / args.model
    littune("prepare", "--data_file", str(ALPACA), "--checkpoint_dir", str(folder), "--destination_path", str(data),
            "--val_size", "4", "--test_size", "4", "--max_seq_length", "256", "--overwrite", "true", log=log)
    out = workdir / "out" / args.model
    result["finetune_step"] = littune(
        "finetune", "adapter_v2", "--checkpoint_dir", str(folder), "--data_dir", str(data), "--out_dir", str(out),
        "--quantize", args.quantize, "--max_steps", "1", "--batch_size", "1", "--micro_batch_size", "1",
        "--eval_iters", "1", "--overwrite", "true", *shlex.split(args.finetune_args), log=log)
    result["generate"] = littune("generate", "--checkpoint_dir", str(folder), "--adapter_path", str(out),
                                 "--quantize", args.quantize, "--prompt", "What is the capital of France?",
                                 "--max_new_tokens", str(args.new_tokens), log=log)
    with open(workdir / "big_models.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(result) + "\n")
    return result


def table(workdir: Path) -> str:
    rows = [json.loads(line) for line in (workdir / "big_models.jsonl").read_text().splitlines() if line.strip()]
    lines = ["| model | CPU | convert: peak RSS, time | lit_model.pth | finetune adapter_v2 step: peak RSS, time "
             "| generate: peak RSS, time |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        convert = f"{r['convert']['peak_rss_gb']} GB, {r['convert']['seconds']:.0f} s" if "convert" in r else "-"
        lines.append(f"| {r['model']} ({r['quantize']}) | {r['cpu_flags']}, {r['cores']} cores | {convert} | "
                     f"{r['lit_model_gb']} GB | {r['finetune_step']['peak_rss_gb']} GB, "
                     f"{r['finetune_step']['seconds']:.0f} s | {r['generate']['peak_rss_gb']} GB, "
                     f"{r['generate']['seconds']:.0f} s |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="Llama-2-7b-hf", choices=sorted(MODELS))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/littune-bench-big"))
    parser.add_argument("--quantize", default="bnb.nf4")
    parser.add_argument("--new_tokens", type=int, default=5)
    parser.add_argument("--finetune_args", default="", help="extra littune finetune flags, one string")
    parser.add_argument("--table", action="store_true", help="print the recorded runs and exit")
    args = parser.parse_args()
    if args.table:
        print(table(args.workdir))
        return
    print(json.dumps(run(args), indent=1))


if __name__ == "__main__":
    main()
