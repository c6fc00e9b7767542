"""LoRA, merge and the three exports on a real model: SmolLM2-135M-Instruct, each output loaded by its own reader.

    python scripts/check_export_smollm2.py                       # builds its checkpoint from the shared GGUF file
    python scripts/check_export_smollm2.py --checkpoint_dir /work/cache/checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
    python scripts/check_export_smollm2.py --workdir out/check --steps 8

1. The converted checkpoint: --checkpoint_dir, or `littune convert` of ../shared/data/models/smollm2-135m-instruct's
   .gguf file (a symlink to it in the work folder).
2. `littune prepare` of the first --records SST-2 training sentences (chat prompt style: the model's template),
   `littune finetune lora` for --steps steps on every target (the head too: SmolLM2's tied head is untied by it).
3. The reference: littune's own model with the LoRA run (litgpt's LoRA layers, unmerged, float32), on a few
   prompts of the validation split rendered with the chat template.
4. `littune merge`, then `littune export` to hf, peft and gguf (float32 and q8_0), each read back by its reader:
   littune (merged folder), transformers (hf), PEFT on the base model exported to hf (the "original HF model" of a
   GGUF-converted checkpoint), transformers' GGUF loading and littune's own GGUF import (gguf). Printed: max |logit
   difference| to the reference, and the greedy answers.
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
DEFAULT_GGUF = SHARED / "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
SST2 = SHARED / "classification/sst2/train.tsv"
COLUMNS = '{"instruction": "=Is the sentiment of this review positive or negative?", "input": "text", "output": "label"}'
OUTPUT_VALUES = '{"1": "positive", "0": "negative"}'


def littune(*args) -> None:
    """A littune command in this process, printed first as a user would type it."""
    from littune.cli import main

    print("$ littune " + " ".join(str(a) if " " not in str(a) else f"'{a}'" for a in args), flush=True)
    start = time.perf_counter()
    if main([str(a) for a in args]) != 0:
        sys.exit(f"littune {args[0]} failed")
    print(f"  ({time.perf_counter() - start:.1f} s)", flush=True)


def size_mb(folder: Path) -> str:
    return f"{sum(p.stat().st_size for p in folder.rglob('*') if p.is_file()) / 1e6:.0f} MB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint_dir", type=Path, help="a converted SmolLM2 (default: convert --gguf)")
    parser.add_argument("--gguf", type=Path, default=DEFAULT_GGUF, help="the GGUF file to convert")
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a temporary folder)")
    parser.add_argument("--records", type=int, default=64, help="SST-2 training sentences to prepare")
    parser.add_argument("--steps", type=int, default=4, help="LoRA optimizer steps")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        run_checks(args, work)


def run_checks(args, work: Path) -> None:
    import torch

    torch.manual_seed(0)
    checkpoint = args.checkpoint_dir
    if checkpoint is None:
        checkpoint = work / "SmolLM2-135M-Instruct"
        checkpoint.mkdir(exist_ok=True)
        if not (checkpoint / "lit_model.pth").is_file():
            if not args.gguf.is_file():
                sys.exit(f"{args.gguf}: no such file (see ../shared/data/models/smollm2-135m-instruct/SOURCE.txt)")
            link = checkpoint / args.gguf.name
            if not link.exists():
                link.symlink_to(args.gguf.resolve())
            littune("convert", "--checkpoint_dir", checkpoint)
    print(f"checkpoint: {checkpoint}")

    # 2. data and a few LoRA steps
    lines = SST2.read_text(encoding="utf-8").splitlines()
    records = work / "sst2_small.tsv"
    records.write_text("\n".join(lines[:args.records + 1]) + "\n", encoding="utf-8")
    data, run = work / "data" / "sst2_small", work / "out" / "lora"
    littune("prepare", "--data_file", records, "--checkpoint_dir", checkpoint, "--destination_path", data,
            "--columns", COLUMNS, "--output_values", OUTPUT_VALUES, "--prompt_style", "chat", "--mask_inputs", "true",
            "--test_size", "8", "--val_size", "8", "--max_seq_length", "128", "--overwrite", "true")
    shutil.rmtree(run, ignore_errors=True)
    littune("finetune", "lora", "--checkpoint_dir", checkpoint, "--data_dir", data, "--out_dir", run,
            "--max_steps", args.steps, "--batch_size", 8, "--micro_batch_size", 4, "--learning_rate", 2e-3,
            "--warmup_steps", 1, "--eval_interval", args.steps, "--eval_iters", 2, "--save_interval", 1000,
            "--lora_targets", "[query, key, value, projection, mlp, head]")

    # 3. the reference and the prompts
    import lightning as L

    from littune.inputs import load_for_inference

    val = torch.load(data / "val.pt", weights_only=True)
    prompts = [r["input_ids_no_response"] for r in val[:3]]
    length = min(len(p) for p in prompts)
    ids = torch.stack([p[:length] for p in prompts])  # same length: one batch, no padding
    fabric = L.Fabric(devices=1, accelerator="cpu", precision="32-true")

    def lit(folder, adapter=None):
        model, tokenizer, _ = load_for_inference(fabric, folder, adapter)
        with torch.inference_mode():
            return model(ids), greedy(lambda x: model(x)[0, -1], prompts[0], tokenizer.eos_id, tokenizer.decode)

    reference, reference_answer = lit(checkpoint, run)
    base, base_answer = lit(checkpoint)
    results = [("base (no adapter), littune", base, base_answer)]
    print(f"\nreference: littune, base + LoRA run (unmerged), float32; logits of {ids.shape[0]} prompts x {length} tokens")
    print(f"  the LoRA moves the logits by up to {diff(reference, base):.3f}")

    # 4. merge and the exports
    merged = work / "merged"
    littune("merge", "--checkpoint_dir", checkpoint, "--adapter_path", run, "--out_dir", merged, "--overwrite", "true")
    results.append(("merge -> littune (no adapter)", *lit(merged)))

    import transformers

    def hf(model, tokenizer):
        model = model.eval()
        with torch.inference_mode():
            return model(ids).logits, greedy(lambda x: model(x).logits[0, -1], prompts[0], tokenizer.eos_token_id,
                                              lambda t: tokenizer.decode(t))

    exports = work / "export"
    littune("export", "--checkpoint_dir", checkpoint, "--adapter_path", run, "--format", "hf", "--out_dir",
            exports / "hf", "--overwrite", "true")
    tokenizer = transformers.AutoTokenizer.from_pretrained(exports / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(exports / "hf", dtype=torch.float32)
    results.append((f"hf ({size_mb(exports / 'hf')}) -> transformers", *hf(model, tokenizer)))

    littune("export", "--checkpoint_dir", checkpoint, "--format", "hf", "--out_dir", exports / "hf-base",
            "--overwrite", "true")
    littune("export", "--checkpoint_dir", checkpoint, "--adapter_path", run, "--format", "peft", "--out_dir",
            exports / "peft", "--overwrite", "true")
    from peft import PeftModel

    base_model = transformers.AutoModelForCausalLM.from_pretrained(exports / "hf-base", dtype=torch.float32)
    print(f"  hf export of the base model -> transformers, vs littune's base model: "
          f"{diff(hf(base_model, tokenizer)[0], base):.2e}")
    peft_model = PeftModel.from_pretrained(base_model, exports / "peft")
    config = json.loads((exports / "peft" / "adapter_config.json").read_text())
    results.append((f"peft ({size_mb(exports / 'peft')}, r={config['r']}) -> PeftModel on the base hf",
                    *hf(peft_model, tokenizer)))

    for dtype in ("float32", "q8_0"):
        folder = exports / f"gguf-{dtype}"
        littune("export", "--checkpoint_dir", checkpoint, "--adapter_path", run, "--format", "gguf", "--dtype", dtype,
                "--out_dir", folder, "--overwrite", "true")
        (gguf_file,) = folder.glob("*.gguf")
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file.name,
                                                                  dtype=torch.float32)
        results.append((f"gguf {dtype} ({size_mb(folder)}) -> transformers' GGUF loading", *hf(model, tokenizer)))
        imported = work / f"imported-{dtype}"
        shutil.rmtree(imported, ignore_errors=True)
        imported.mkdir()
        (imported / gguf_file.name).symlink_to(gguf_file)
        littune("convert", "--checkpoint_dir", imported)
        results.append((f"gguf {dtype} -> littune convert (GGUF import)", *lit(imported)))
        if dtype == "float32":
            from litgpt import Tokenizer

            # bos=False: litgpt adds a BOS for folders named SmolLM2-*-Instruct only (a name rule, not the tokenizer)
            original, rebuilt = Tokenizer(checkpoint), Tokenizer(imported)
            texts = [original.decode(p) for p in prompts] + ["Hello world! 123  spaces\n\tand ünïcödé 🙂"]
            same = all(original.encode(t, bos=False).tolist() == rebuilt.encode(t, bos=False).tolist() for t in texts)
            print(f"  tokenizer rebuilt from the exported GGUF encodes {len(texts)} texts "
                  f"{'identically' if same else 'DIFFERENTLY'} to the original")
            compare_metadata(args.gguf, gguf_file)

    merged_logits = results[1][1]
    print(f"\nmax |logit difference| to the reference (littune, base + LoRA unmerged) and to littune's merged model; "
          f"greedy answers (reference: {reference_answer!r}) to {tokenizer.decode(prompts[0][-12:])!r}")
    print(f"  {'':58s} {'reference':>9s} {'merged':>9s}")
    for name, logits, answer in results:
        print(f"  {name:58s} {diff(logits, reference):9.2e} {diff(logits, merged_logits):9.2e}"
              + (f"   {answer!r}" if answer is not None else ""))


def compare_metadata(original_gguf: Path, exported_gguf: Path) -> None:
    """Which metadata keys llama.cpp's converter wrote into the original file and the export did not, and back."""
    if not original_gguf.is_file():
        return
    import gguf

    from littune.checkpoints.gguf import read_metadata

    theirs = read_metadata(gguf.GGUFReader(original_gguf))
    ours = read_metadata(gguf.GGUFReader(exported_gguf))
    print(f"  GGUF metadata: {len(ours)} keys; only in llama.cpp's {original_gguf.name}: "
          f"{sorted(set(theirs) - set(ours))}; only in the export: {sorted(set(ours) - set(theirs))}")
    same = [k for k in theirs if k in ours and k.startswith(("llama.", "tokenizer.")) and theirs[k] == ours[k]]
    differ = [k for k in theirs if k in ours and k.startswith(("llama.", "tokenizer.")) and theirs[k] != ours[k]]
    print(f"  llama.* and tokenizer.* keys in both: {len(same)} equal, differing: {differ}")


def greedy(step, prompt, eos_id, decode, n: int = 4) -> str:
    """A few greedy tokens without a cache (the model is small)."""
    import torch

    ids = prompt.tolist()
    out = []
    for _ in range(n):
        token = int(step(torch.tensor([ids + out])).argmax())
        if token == eos_id:
            break
        out.append(token)
    return decode(torch.tensor(out)) if out else ""


def diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


if __name__ == "__main__":
    main()
