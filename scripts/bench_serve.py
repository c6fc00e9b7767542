#!/usr/bin/env python
"""littune serve at 1 and 4 concurrent clients beside littune generate: requests/s and tokens/s (issue 17).

    python scripts/bench_serve.py                    # SmolLM2-135M-Instruct converted from the shared GGUF file
    python scripts/bench_serve.py --checkpoint_dir /work/cache/checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
    python scripts/bench_serve.py --rounds 3 --max_tokens 128

Without --checkpoint_dir the model is built as a user builds it: the GGUF file is linked into WORKDIR/SmolLM2-135M-
Instruct and `littune convert` turns it into a Lit-GPT checkpoint (once; later runs reuse it).

Every request is greedy (temperature 0) on the same 8 instructions, so littune generate and the server produce the
same tokens, which the script checks. littune generate runs in this process (the command's own function, one
prompt at a time, its printed timing: prefill + decode, no model loading). The server is the real `littune serve`
in a subprocess; a client is a thread sending one streamed request after another through the official openai
client, and each setting sends --requests requests in all. requests/s and tokens/s are over the wall time of a
setting; latency and time to first token are per request. The settings alternate order from round to round so
drifting load hits all alike; the medians over rounds are reported.

--threads N sets OMP_NUM_THREADS for both (this process and the server): on a CPU shared with other busy
processes, torch's default of one thread per core spin-waits for the busy cores (measured here under a load
average of 6 on 2 cores: SmolLM2 decoded 6x slower with 2 threads than with 1).
"""

import argparse
import contextlib
import io
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GGUF = REPO.parent / "shared" / "data" / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [
    "Name three primary colors.",
    "Give three tips for staying healthy.",
    "What is the capital of France? Answer in one sentence.",
    "Write a haiku about the sea.",
    "Explain what a neural network is to a child.",
    "List four animals that live in the ocean.",
    "Translate 'good morning' into Spanish and French.",
    "Suggest a name for a bakery that sells only bread.",
]
TIMING = re.compile(r"(\d+) new tokens in ([\d.]+)s")


def build_checkpoint(workdir: Path, gguf: Path) -> Path:
    folder = workdir / "SmolLM2-135M-Instruct"
    if (folder / "lit_model.pth").is_file():
        return folder
    if not gguf.is_file():
        raise SystemExit(f"{gguf}: not found; give --gguf or --checkpoint_dir")
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / gguf.name
    if not link.exists():
        link.symlink_to(gguf.resolve())
    print(f"converting {gguf} -> {folder} (littune convert)", flush=True)
    subprocess.run([sys.executable, "-m", "littune.cli", "convert", "--checkpoint_dir", str(folder)], check=True)
    return folder


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def run_generate(checkpoint_dir: Path, max_tokens: int, precision) -> dict:
    """littune generate on every prompt, one after another: its answers and its own timing lines."""
    from littune.generate import generate

    answers, tokens, seconds = [], 0, 0.0
    for prompt in PROMPTS:
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            answers.append(generate(prompt=prompt, checkpoint_dir=checkpoint_dir, temperature=0,
                                    max_new_tokens=max_tokens, precision=precision)[0])
        match = TIMING.search(err.getvalue())
        tokens, seconds = tokens + int(match[1]), seconds + float(match[2])
    n = len(PROMPTS)
    return {"requests_per_s": n / seconds, "tokens_per_s": tokens / seconds, "latency": seconds / n,
            "first_token": None, "tokens": tokens, "answers": answers}


def run_clients(base: str, clients: int, requests: int, max_tokens: int) -> dict:
    """`clients` threads, each sending streamed requests one after another, `requests` in all."""
    import openai

    client = openai.OpenAI(base_url=f"{base}/v1", api_key=os.environ.get("LITTUNE_API_KEY", "none"),
                           max_retries=0, timeout=600)

    def one(index: int) -> dict:
        prompt = PROMPTS[index % len(PROMPTS)]
        start = time.perf_counter()
        first, pieces, usage = None, [], None
        for chunk in client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=max_tokens,
                stream=True, stream_options={"include_usage": True}):
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content and first is None:
                    first = time.perf_counter() - start
                pieces.append(choice.delta.content or "")
        return {"prompt": prompt, "text": "".join(pieces), "tokens": usage.completion_tokens,
                "latency": time.perf_counter() - start, "first_token": first or 0.0}

    def client_loop(c: int) -> list:
        return [one(i) for i in range(c, requests, clients)]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for part in pool.map(client_loop, range(clients)) for r in part]
    wall = time.perf_counter() - start
    return {"requests_per_s": len(results) / wall, "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "latency": statistics.median(r["latency"] for r in results),
            "first_token": statistics.median(r["first_token"] for r in results),
            "tokens": sum(r["tokens"] for r in results),
            "answers": {r["prompt"]: r["text"] for r in results}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint_dir: Path, precision, max_concurrency: int) -> tuple:
    port = free_port()
    command = [sys.executable, "-m", "littune.cli", "serve", "--checkpoint_dir", str(checkpoint_dir), "--port",
               str(port), "--max_concurrency", str(max_concurrency), "--log_level", "warning"]
    if precision:
        command += ["--precision", precision]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    import httpx

    for _ in range(1200):
        if process.poll() is not None:
            raise SystemExit(f"littune serve failed:\n{process.stderr.read()[-3000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return base, process
        except httpx.TransportError:
            time.sleep(0.25)
    raise SystemExit("littune serve did not start")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint_dir", type=Path,
                        help="a converted checkpoint (default: build SmolLM2 from --gguf)")
    parser.add_argument("--gguf", type=Path, default=GGUF, help="the SmolLM2-135M-Instruct GGUF file to convert")
    parser.add_argument("--workdir", type=Path, default=Path("bench-serve"), help="where the converted model goes")
    parser.add_argument("--max_tokens", type=int, default=64, help="most new tokens per answer")
    parser.add_argument("--requests", type=int, default=16, help="requests per server setting and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--precision", default=None, help="for both (default: littune's, 32-true on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for both (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:  # before torch is imported here; the server inherits it
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    checkpoint_dir = (args.checkpoint_dir or build_checkpoint(args.workdir, args.gguf)).resolve()

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    print(f"checkpoint {checkpoint_dir}, {len(PROMPTS)} prompts, greedy, up to {args.max_tokens} new tokens, "
          f"{args.requests} requests per server setting, {device}, load average {load_average()}", flush=True)
    base, process = start_server(checkpoint_dir, args.precision, max_concurrency=4)
    settings = {"littune generate": lambda: run_generate(checkpoint_dir, args.max_tokens, args.precision),
                "serve, 1 client": lambda: run_clients(base, 1, args.requests, args.max_tokens),
                "serve, 4 clients": lambda: run_clients(base, 4, args.requests, args.max_tokens)}
    results = {name: [] for name in settings}
    try:
        run_clients(base, 1, 2, 4)  # warm-up: first calls pay one-time costs
        for round_index in range(args.rounds):
            order = list(settings) if round_index % 2 == 0 else list(settings)[::-1]
            for name in order:
                result = settings[name]()
                results[name].append(result)
                print(f"round {round_index + 1}: {name:<17} {result['requests_per_s']:6.2f} requests/s "
                      f"{result['tokens_per_s']:7.1f} tokens/s ({result['tokens']} tokens), "
                      f"load {load_average()}", flush=True)
    finally:
        process.terminate()
        process.wait(60)

    print(f"\n{'':<17} {'requests/s':>10} {'tokens/s':>9} {'latency':>9} {'1st token':>9}   (medians over "
          f"{args.rounds} rounds; latency: per request, median)")
    medians = {}
    for name, runs in results.items():
        medians[name] = {key: statistics.median(r[key] for r in runs) for key in ("requests_per_s", "tokens_per_s")}
        latency = statistics.median(r["latency"] for r in runs)
        first = "" if runs[0]["first_token"] is None else f"{statistics.median(r['first_token'] for r in runs):8.2f}s"
        print(f"{name:<17} {medians[name]['requests_per_s']:10.2f} {medians[name]['tokens_per_s']:9.1f} "
              f"{latency:8.2f}s {first:>9}")
    generate_answers = dict(zip(PROMPTS, results["littune generate"][0]["answers"]))
    same = {name: sum(run["answers"].get(p) == a for p, a in generate_answers.items() for run in results[name])
            for name in ("serve, 1 client", "serve, 4 clients")}
    total = len(PROMPTS) * args.rounds
    print(f"answers equal to littune generate's: 1 client {same['serve, 1 client']}/{total}, "
          f"4 clients {same['serve, 4 clients']}/{total}")
    one, four, gen = (medians[k]["tokens_per_s"] for k in ("serve, 1 client", "serve, 4 clients", "littune generate"))
    print(f"tokens/s: 4 clients / 1 client {four / one:.2f}x; serve 1 client / littune generate {one / gen:.2f}x; "
          f"serve 4 clients / littune generate {four / gen:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
