#!/usr/bin/env python
"""littune serve at 1 and 4 concurrent clients beside littune generate: requests/s and tokens/s (issue 17); with
--adapters, one base serving 1 and 4 adapters: peak memory and tokens/s (issue 27 #1).

    python scripts/bench_serve.py                    # SmolLM2-135M-Instruct converted from the shared GGUF file
    python scripts/bench_serve.py --checkpoint_dir /work/cache/checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct
    python scripts/bench_serve.py --rounds 3 --max_tokens 128
    python scripts/bench_serve.py --adapters --threads 1

Without --checkpoint_dir the model is built as a user builds it: the GGUF file is linked into WORKDIR/SmolLM2-135M-
Instruct and `littune convert` turns it into a Lit-GPT checkpoint (once; later runs reuse it).

Every request is greedy (temperature 0) on the same 8 instructions, so littune generate and the server produce the
same tokens, which the script checks. littune generate runs in this process (the command's own function, one
prompt at a time, its printed timing: prefill + decode, no model loading). The server is the real `littune serve`
in a subprocess; a client is a thread sending one streamed request after another through the official openai
client, and each setting sends --requests requests in all. requests/s and tokens/s are over the wall time of a
setting; latency and time to first token are per request. The settings alternate order from round to round so
drifting load hits all alike; the medians over rounds are reported.

--adapters: four adapter runs are written beside the model (LoRA r=8 on query and value, adapter_v2, LoRA,
adapter_v2; their tensors small random updates of the base, as a short fine-tune leaves them: for memory and speed,
not quality) and three servers started: the base alone, `--adapter a0=...` (1 adapter) and `--adapter a0=...
--adapter a3=...` (4 adapters). The settings: 4 clients on a0 (1 adapter), 4 clients each on its own adapter
(4 adapters: round-robin, one adapter's row per step), 1 client on each server. Memory is each server
process's VmHWM (peak resident set) after its load and after the runs, and its VmRSS after the runs; greedy answers of every adapter are checked
against `littune generate --adapter_path`.

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


def alternate(settings: dict, rounds: int, describe) -> dict:
    """Each setting (name -> a function that runs it and returns its result) once a round, the order reversed every
    other round (ABBA: drifting load from other processes hits every setting alike); name -> its results. Each run
    is printed as `describe(name, result)` with the round and the load average."""
    results = {name: [] for name in settings}
    for round_index in range(rounds):
        for name in list(settings) if round_index % 2 == 0 else list(settings)[::-1]:
            result = settings[name]()
            results[name].append(result)
            print(f"round {round_index + 1}: {describe(name, result)}, load {load_average()}", flush=True)
    return results


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


def run_clients(base: str, clients: int, requests: int, max_tokens: int, models=("m",)) -> dict:
    """`clients` threads, each sending streamed requests one after another, `requests` in all; request i asks for
    models[i % len(models)] (with as many clients as models: each client its own model)."""
    import openai

    client = openai.OpenAI(base_url=f"{base}/v1", api_key=os.environ.get("LITTUNE_API_KEY", "none"),
                           max_retries=0, timeout=600)

    def one(index: int, model: str) -> dict:
        prompt = PROMPTS[index % len(PROMPTS)]
        start = time.perf_counter()
        first, pieces, usage = None, [], None
        for chunk in client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], temperature=0, max_tokens=max_tokens,
                stream=True, stream_options={"include_usage": True}):
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content and first is None:
                    first = time.perf_counter() - start
                pieces.append(choice.delta.content or "")
        return {"prompt": prompt, "model": model, "text": "".join(pieces), "tokens": usage.completion_tokens,
                "latency": time.perf_counter() - start, "first_token": first or 0.0}

    def client_loop(c: int) -> list:
        return [one(i, models[i % len(models)]) for i in range(c, requests, clients)]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for part in pool.map(client_loop, range(clients)) for r in part]
    wall = time.perf_counter() - start
    return {"requests_per_s": len(results) / wall, "tokens_per_s": sum(r["tokens"] for r in results) / wall,
            "latency": statistics.median(r["latency"] for r in results),
            "first_token": statistics.median(r["first_token"] for r in results),
            "tokens": sum(r["tokens"] for r in results),
            "answers": {r["prompt"]: r["text"] for r in results},
            "model_answers": {(r["model"], r["prompt"]): r["text"] for r in results}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint_dir: Path, precision, max_concurrency: int, flags=()) -> tuple:
    port = free_port()
    command = [sys.executable, "-m", "littune.cli", "serve", "--checkpoint_dir", str(checkpoint_dir), "--port",
               str(port), "--max_concurrency", str(max_concurrency), "--log_level", "warning", *flags]
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
    parser.add_argument("--adapters", action="store_true", help="one base serving 1 and 4 adapters (see above)")
    args = parser.parse_args(argv)
    if args.threads:  # before torch is imported here; the server inherits it
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    checkpoint_dir = (args.checkpoint_dir or build_checkpoint(args.workdir, args.gguf)).resolve()

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else \
        f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    print(f"checkpoint {checkpoint_dir}, {len(PROMPTS)} prompts, greedy, up to {args.max_tokens} new tokens, "
          f"{args.requests} requests per server setting, {device}, load average {load_average()}", flush=True)
    if args.adapters:
        return bench_adapters(checkpoint_dir, args)
    base, process = start_server(checkpoint_dir, args.precision, max_concurrency=4)
    settings = {"littune generate": lambda: run_generate(checkpoint_dir, args.max_tokens, args.precision),
                "serve, 1 client": lambda: run_clients(base, 1, args.requests, args.max_tokens),
                "serve, 4 clients": lambda: run_clients(base, 4, args.requests, args.max_tokens)}
    try:
        run_clients(base, 1, 2, 4)  # warm-up: first calls pay one-time costs
        results = alternate(settings, args.rounds, lambda name, result: (
            f"{name:<17} {result['requests_per_s']:6.2f} requests/s {result['tokens_per_s']:7.1f} tokens/s "
            f"({result['tokens']} tokens)"))
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


# ------------------------------------------------------------------------------------ many adapters (issue 27 #1)


ADAPTER_METHODS = ["lora", "adapter_v2", "lora", "adapter_v2"]


def write_adapter_runs(checkpoint_dir: Path, folder: Path) -> dict:
    """NAME -> run folder for a0..a3 (LoRA and adapter_v2 in turn), written once: the method's trained tensors as
    small random updates of the base (adapter_v2's norms: the base's own), the model's chat template as the style."""
    import torch
    import yaml
    from dataclasses import asdict

    from littune.checkpoints import load_model_config
    from littune.methods import get_method
    from littune.prompts import save_style, style_by_name

    base = torch.load(checkpoint_dir / "lit_model.pth", map_location="cpu", weights_only=True, mmap=True)
    runs = {}
    for index, method_name in enumerate(ADAPTER_METHODS):
        run = runs[f"a{index}"] = folder / f"a{index}-{method_name}"
        method = get_method(method_name)
        if (run / method.adapter_file).is_file():
            continue
        args = method.args(lora_dropout=0.0) if method_name == "lora" else method.args()
        with torch.device("meta"):
            model = method.build_model(load_model_config(checkpoint_dir), args)
        generator = torch.Generator().manual_seed(index)

        def noise(shape, scale):
            return scale * torch.randn(shape, generator=generator)

        weights = {}
        for name, value in model.state_dict().items():
            if method.is_trainable(name):
                start = base[name].float() if name in base else torch.ones(value.shape) if "scale" in name else 0.0
                weights[name] = start + noise(value.shape, 0.01 if name in base or "scale" in name else 0.02)
        run.mkdir(parents=True, exist_ok=True)
        torch.save(weights, run / method.adapter_file)
        (run / "hyperparameters.yaml").write_text(yaml.dump({"method": method_name, **asdict(args)}))
        save_style(style_by_name("chat", checkpoint_dir), run)
    return runs


def rss_mb(pid: int, field: str = "VmHWM") -> float:
    """The process's peak resident set (VmHWM) or its resident set now (VmRSS), in MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status)[1]) / 1024


def bench_adapters(checkpoint_dir: Path, args) -> int:
    from littune.generate import generate

    runs = write_adapter_runs(checkpoint_dir, (args.workdir / "adapters").resolve())
    servers, loaded = {}, {}
    flags = {"base alone": [], "1 adapter": ["--adapter", f"a0={runs['a0']}"],
             "4 adapters": [a for name, run in runs.items() for a in ("--adapter", f"{name}={run}")]}
    try:
        for name, extra in flags.items():  # one at a time, so that their loads do not overlap
            servers[name] = start_server(checkpoint_dir, args.precision, 4, extra)
            run_clients(servers[name][0], 1, 1, 4, models=["a0"] if extra else ["m"])  # warm-up
            loaded[name] = rss_mb(servers[name][1].pid)
        settings = {
            "1 adapter, 1 client": lambda: run_clients(servers["1 adapter"][0], 1, args.requests // 2,
                                                       args.max_tokens, ["a0"]),
            "4 adapters, 1 client": lambda: run_clients(servers["4 adapters"][0], 1, args.requests // 2,
                                                        args.max_tokens, list(runs)),
            "1 adapter, 4 clients": lambda: run_clients(servers["1 adapter"][0], 4, args.requests, args.max_tokens,
                                                        ["a0"]),
            "4 adapters, 4 clients": lambda: run_clients(servers["4 adapters"][0], 4, args.requests,
                                                         args.max_tokens, list(runs)),
        }
        results = alternate(settings, args.rounds, lambda name, result: (
            f"{name:<22} {result['tokens_per_s']:7.1f} tokens/s ({result['tokens']} tokens)"))
        peak = {name: rss_mb(process.pid) for name, (_, process) in servers.items()}
        now = {name: rss_mb(process.pid, "VmRSS") for name, (_, process) in servers.items()}
    finally:
        for _, process in servers.values():
            process.terminate()
            process.wait(60)

    print(f"\n{'server':<12} {'peak RSS after load':>20} {'after the runs':>15} {'RSS after the runs':>19}")
    for name in servers:
        print(f"{name:<12} {loaded[name]:17.0f} MB {peak[name]:12.0f} MB {now[name]:16.0f} MB")
    print(f"4 adapters / 1 adapter, peak RSS after the runs: {peak['4 adapters'] / peak['1 adapter']:.3f}x "
          f"(+{peak['4 adapters'] - peak['1 adapter']:.0f} MB); 1 adapter / base alone "
          f"{peak['1 adapter'] / peak['base alone']:.3f}x")
    medians = {name: statistics.median(r["tokens_per_s"] for r in runs_) for name, runs_ in results.items()}
    print(f"\n{'':<22} {'tokens/s':>9}   (medians over {args.rounds} rounds)")
    for name, value in medians.items():
        print(f"{name:<22} {value:9.1f}")
    one, four = (medians[f"4 adapters, {n}"] / medians[f"1 adapter, {n}"] for n in ("1 client", "4 clients"))
    print(f"4 adapters / 1 adapter tokens/s: 1 client {one:.2f}x, 4 clients {four:.2f}x")

    served = {}
    for name in ("4 adapters, 4 clients", "4 adapters, 1 client"):
        for run in results[name]:
            served.update(run["model_answers"])
    same = total = 0
    checked = [key for adapter in runs for key in sorted(k for k in served if k[0] == adapter)[:2]]
    for adapter, prompt in checked:
        text = served[adapter, prompt]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            expected = generate(prompt=prompt, checkpoint_dir=checkpoint_dir, adapter_path=runs[adapter],
                                temperature=0, max_new_tokens=args.max_tokens, precision=args.precision)[0]
        same, total = same + (text == expected), total + 1
    print(f"answers of the 4-adapter server equal to littune generate --adapter_path: {same}/{total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
