"""GGUF import on a real file: SmolLM2-135M-Instruct Q4_1 (98 MB), littune against transformers' GGUF loading.

    python scripts/check_gguf_smollm2.py                  # ../shared/data/models/smollm2-135m-instruct/...Q4_1.gguf
    python scripts/check_gguf_smollm2.py --gguf FILE.gguf --keep out/

1. `littune convert` (a subprocess, as a user runs it) on a folder holding the file (a symlink to it), named
   SmolLM2-135M-Instruct: wall time and peak RSS of that process.
2. transformers: `AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)` in float32 and its GGUF tokenizer.
3. Logits of litgpt's GPT on the converted checkpoint against transformers' on a few prompts (plain and rendered with
   the chat template from the GGUF metadata): max |diff|; greedy answers of both to a question.
4. Token ids of litgpt's `Tokenizer` on the converted folder against transformers' GGUF tokenizer, on plain text and
   on the chat template rendered, and the bos/eos each of them reports.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_GGUF = REPO.parent / "shared/data/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = [
    "Hello world! 123",
    "  multiple   spaces",
    "The quick brown fox jumps over the lazy dog. It's 3.14159, isn't it? Ünïcödé, émojis 🙂 and 中文.\n\n\tTabs.",
    "def add(a, b):\n    return a + b  # 2024-01-02\n",
]
QUESTION = "What is the capital of France?"


def run_convert(folder: Path) -> tuple[float, float]:
    """`littune convert --checkpoint_dir folder` in a child process: (seconds, peak RSS in MB)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "littune.cli", "convert", "--checkpoint_dir", str(folder)],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"littune convert failed:\n{stderr}")
    return seconds, usage.ru_maxrss / 1024


def greedy(step, ids: list[int], eos: int, n: int = 20) -> list[int]:
    """Greedy decoding without a cache (the model is small): `step(ids) -> logits of the last position`."""
    out = []
    for _ in range(n):
        token = int(step(ids + out).argmax())
        if token == eos:
            break
        out.append(token)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=DEFAULT_GGUF, help="the GGUF file")
    parser.add_argument("--keep", type=Path, default=None, help="convert into this folder and keep it")
    args = parser.parse_args()
    if not args.gguf.is_file():
        sys.exit(f"{args.gguf}: no such file (see ../shared/data/models/smollm2-135m-instruct/SOURCE.txt)")

    with tempfile.TemporaryDirectory() as tmp:
        folder = (args.keep or Path(tmp)) / "SmolLM2-135M-Instruct"
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / args.gguf.name
        if not link.exists():
            link.symlink_to(args.gguf.resolve())
        print(f"GGUF file: {args.gguf} ({args.gguf.stat().st_size / 1e6:.1f} MB)")

        seconds, rss = run_convert(folder)
        print(f"littune convert: {seconds:.1f} s wall, peak RSS {rss:.0f} MB "
              f"(lit_model.pth {(folder / 'lit_model.pth').stat().st_size / 1e6:.0f} MB float32)")

        import torch
        import transformers
        from litgpt import GPT, Config, Tokenizer

        transformers.logging.set_verbosity_error()
        start = time.perf_counter()
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(
            str(folder), gguf_file=args.gguf.name, dtype=torch.float32).eval()
        hf_load = time.perf_counter() - start
        start = time.perf_counter()
        hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=args.gguf.name)
        hf_tok_load = time.perf_counter() - start
        print(f"transformers from_pretrained(gguf_file=...): model {hf_load:.1f} s, tokenizer {hf_tok_load:.1f} s")

        start = time.perf_counter()
        lit = GPT(Config.from_file(folder / "model_config.yaml"))
        lit.load_state_dict(torch.load(folder / "lit_model.pth", weights_only=True))
        lit.eval()
        ours = Tokenizer(folder)
        print(f"litgpt GPT + Tokenizer on the converted folder: {time.perf_counter() - start:.1f} s")

        config = json.loads((folder / "tokenizer_config.json").read_text())
        import jinja2

        template = jinja2.Environment().from_string(config["chat_template"])
        chat = template.render(messages=[{"role": "user", "content": QUESTION}], add_generation_prompt=True)

        print("\n-- logits (float32), litgpt on littune's conversion vs transformers' GGUF loading")
        worst = 0.0
        for text in TEXTS[:3] + [chat]:
            ids = hf_tok(text, add_special_tokens=False)["input_ids"]
            with torch.inference_mode():
                diff = (lit(torch.tensor([ids])) - hf_model(torch.tensor([ids])).logits).abs().max().item()
            worst = max(worst, diff)
            print(f"  {len(ids):3d} tokens  max |diff| {diff:.3e}  {text[:50]!r}")
        print(f"  worst: {worst:.3e}")

        ids = ours.encode(chat, bos=True).tolist()  # the template starts with <|im_start|>, the BOS token
        with torch.inference_mode():
            lit_answer = greedy(lambda x: lit(torch.tensor([x]))[0, -1], ids, ours.eos_id)
            hf_answer = greedy(lambda x: hf_model(torch.tensor([x])).logits[0, -1], ids, ours.eos_id)
        print(f"  greedy answer to {QUESTION!r}:\n    littune/litgpt: {ours.decode(torch.tensor(lit_answer))!r}"
              f"\n    transformers:   {hf_tok.decode(hf_answer)!r}\n    same tokens: {lit_answer == hf_answer}")

        print("\n-- token ids, litgpt Tokenizer on the converted folder vs transformers' GGUF tokenizer")
        all_equal = True
        for text in TEXTS + [chat]:
            a = ours.encode(text, bos=text.startswith("<|im_start|>")).tolist()
            b = hf_tok(text, add_special_tokens=False)["input_ids"]
            all_equal &= a == b
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else 0)
            print(f"  {'equal' if a == b else f'DIFFER at {first}'}  {len(a):3d} ids  {text[:50]!r}")
            if a != b:
                print(f"    littune:      {a}\n    transformers: {b}")
        print(f"  all equal: {all_equal}")
        print(f"  chat template rendered ({len(ids)} ids): {chat!r}")
        print(f"  littune: bos {config.get('bos_token')!r} = {ours.bos_id}, eos {config.get('eos_token')!r} = "
              f"{ours.eos_id}, add_bos_token {config.get('add_bos_token')}")
        print(f"  transformers' GGUF tokenizer: bos {hf_tok.bos_token!r}, eos {hf_tok.eos_token!r}")


if __name__ == "__main__":
    main()
