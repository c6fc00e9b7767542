#!/usr/bin/env python
"""littune generate vs litgpt generate: decode tokens/s on the same checkpoint, side by side in one run (issue 5).

    python scripts/bench_generate.py                          # Pythia-160M shape, 200 new tokens, 3 rounds
    python scripts/bench_generate.py --model small --rounds 2 # Pythia-70M shape
    python scripts/bench_generate.py --checkpoint_dir checkpoints/EleutherAI/pythia-160m

Both tools run as the user runs them (`littune generate ...`, `python -m litgpt generate ...`), greedy
(temperature 0) so both produce the same number of tokens, on the same converted checkpoint (a random-init Pythia
shape with the real Pythia tokenizer, built as in bench_finetune.py), in alternating order (ABBA...) so drifting
load hits both alike. Each tool's own timing line is parsed: littune's "N new tokens in S s (X tokens/s)" and
litgpt's "Time for inference 1: S sec total, X tokens/sec" (both include the prompt's prefill; a random model never
stops early at EOS, and the token counts are printed to show it). Process start-up and model loading are not timed.
"""

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_finetune import add_model_arguments, build_checkpoint, load_average  # noqa: E402  (the same checkpoint builder)

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
LITTUNE_TIMING = re.compile(r"(\d+) new tokens in ([\d.]+)s \(([\d.]+) tokens/s\)")
LITGPT_TIMING = re.compile(r"Time for inference 1: ([\d.]+) sec total, ([\d.]+) tokens/sec")


def run_littune(checkpoint_dir: Path, max_new_tokens: int, precision: str) -> dict:
    command = [sys.executable, "-m", "littune.cli", "generate", "--prompt", PROMPT, "--checkpoint_dir",
               str(checkpoint_dir), "--max_new_tokens", str(max_new_tokens), "--temperature", "0",
               "--precision", precision]
    result = subprocess.run(command, capture_output=True, text=True)
    match = LITTUNE_TIMING.search(result.stderr)
    if result.returncode or not match:
        raise SystemExit(f"littune generate failed:\n{result.stderr[-3000:]}")
    return {"tokens": int(match[1]), "seconds": float(match[2]), "tokens_per_s": float(match[3])}


def run_litgpt(checkpoint_dir: Path, max_new_tokens: int, precision: str) -> dict:
    command = [sys.executable, "-m", "litgpt", "generate", str(checkpoint_dir), "--prompt", PROMPT,
               "--max_new_tokens", str(max_new_tokens), "--temperature", "0", "--precision", precision]
    result = subprocess.run(command, capture_output=True, text=True,
                            env={**os.environ, "JSONARGPARSE_DEPRECATION_WARNINGS": "off"})
    match = LITGPT_TIMING.search(result.stderr)
    if result.returncode or not match:
        raise SystemExit(f"litgpt generate failed:\n{result.stderr[-3000:]}")
    seconds, rate = float(match[1]), float(match[2])
    return {"tokens": round(seconds * rate), "seconds": seconds, "tokens_per_s": rate}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--max_new_tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default="32-true", help="the same for both (32-true on CPU; bf16-true on GPU)")
    args = parser.parse_args(argv)
    checkpoint_dir = (args.checkpoint_dir or build_checkpoint(args.model, args.workdir.resolve())).resolve()
    print(f"checkpoint {checkpoint_dir}, {args.max_new_tokens} new tokens, greedy, precision {args.precision}, "
          f"load {load_average()}", flush=True)
    runners = {"littune": run_littune, "litgpt": run_litgpt}
    rates = {name: [] for name in runners}
    for round_index in range(args.rounds):
        order = list(runners) if round_index % 2 == 0 else list(runners)[::-1]
        for name in order:
            result = runners[name](checkpoint_dir, args.max_new_tokens, args.precision)
            rates[name].append(result["tokens_per_s"])
            print(f"round {round_index + 1}: {name:<8} {result['tokens']} tokens in {result['seconds']:.2f}s = "
                  f"{result['tokens_per_s']:.1f} tokens/s", flush=True)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    for name, value in medians.items():
        print(f"{name:<8} median {value:.1f} tokens/s over {args.rounds} rounds")
    print(f"littune / litgpt: {medians['littune'] / medians['litgpt']:.2f}x decode tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
