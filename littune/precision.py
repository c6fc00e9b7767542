"""The precision of a run whose --precision is not given, chosen on the user's machine.

GPUs keep their rule (`model.default_precision`: bf16-true where the GPU has bfloat16, else float16). On a CPU,
bfloat16 is used only where it is measured faster on this CPU, for this model:
- a CPU without bfloat16 units (no avx512_bf16 or amx_bf16 among its x86 flags, no bf16 among its Arm features, as
  /proc/cpuinfo lists them) gets 32-true and nothing is measured: a bf16 matrix product there runs up to ~100x
  slower than a float32 one;
- otherwise one transformer block of the model (litgpt's Block built from the model's config: its width, heads and
  MLP), on a few tokens, is timed in float32 and in bfloat16, doing what the run would do. Fine-tuning: a forward
  and backward through frozen float32 weights, plain (32-true) and under bf16 autocast (bf16-mixed, which keeps
  float32 master weights; bf16-true would round small updates away: 1 + 3e-3 is 1 in bfloat16). Inference: a
  forward with float32 weights and with bfloat16 weights (bf16-true). bf16 is chosen where it is at least
  MIN_SPEEDUP times as fast on the block (see there: for training the gain must survive the rest of a step).
  The measurement is time-boxed (TIME_BOX_S; one that does not fit keeps 32-true, and is tried again next run) and
  cached per machine, in $XDG_CACHE_HOME/littune/precision.json (default ~/.cache/littune; delete it to measure
  again), keyed by the CPU model, torch version and the model's width; a damaged cache is ignored and written
  again. A block too large to time within the box (7B models and up) keeps 32-true. It is timed on one thread: the
  ratio of bf16 to float32 kernels is a property of the core, and on a busy machine a pass on several threads waits
  for the slowest of them (on a loaded 2-core machine a pass took 0.3-1.4 s on two threads, 0.04 s on one), which
  no time box can bound.
The run's header line says which precision was chosen and why. A resumed run keeps the precision it started with,
and under DDP the launching process decides for every rank (`shared_with_ranks`); ranks started by another
launcher (torchrun, SLURM, several machines) do not measure, so that all of them choose alike.
"""

import json
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch

from littune.common import save_json

PROBE_SWITCH = "LITTUNE_PRECISION_PROBE"  # "off": never measure (32-true on CPU); the test suite sets it
INHERITED = "LITTUNE_RUN_PRECISION"  # "precision<TAB>why", from the launching process to the ranks it starts
TIME_BOX_S = 0.5  # the measurement stops starting passes after this; one pass may run past it
# bf16 must be this much faster on the block. Training: on an AMD EPYC with AVX512-BF16 (2 busy cores) the block ran
# 1.07-1.46x under bf16 autocast and SmolLM2's whole bf16-mixed step 0.75-0.97x (11.2-15.5 vs 14.8-15.9 tokens/s);
# on an AMX Xeon a plain bf16 litgpt step ran 1.59x and littune's bf16-mixed step 0.88x (issue 25): the casts,
# the float32 loss and optimizer and the embeddings take back most of a small gain. Inference (bf16 weights, no
# casts): the block's gain carries over.
MIN_SPEEDUP = {"training": 2.0, "inference": 1.15}
PROBE_FLOPS = 1.5e9  # per timed pass: sets the token count, 16 to 128 tokens
MAX_PASS_FLOPS = 8e9  # a block whose pass on 16 tokens costs more (7B models and up) cannot fit the box: not timed
BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 flags, Arm features


def cpu_info() -> dict:
    """The CPU's model name and flags as /proc/cpuinfo lists them (Linux), else the platform's name and no flags."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    name = fields.get("model name") or fields.get("cpu model") or platform.processor() or platform.machine()
    return {"name": name, "flags": set((fields.get("flags") or fields.get("features") or "").split())}


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "littune" / "precision.json"


def cache_key(cpu_name: str, config) -> str:
    return f"{cpu_name} | torch {torch.__version__} | width {config.n_embd}"


def read_cache(path: Path) -> dict:
    """The cached measurements, {} where there is no cache or it is damaged (then it is measured and written again)."""
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cached if isinstance(cached, dict) and all(isinstance(v, dict) for v in cached.values()) else {}


def write_cache(path: Path, cached: dict) -> None:
    try:
        save_json(cached, path)
    except OSError:  # a read-only home: measure again next time rather than fail the run
        pass


# ------------------------------------------------------------------------------------------------- the probe


def probe_block(config, training: bool, time_box: float = TIME_BOX_S) -> dict:
    """Seconds per pass of one block of the model in float32 and in bfloat16 (see the module docstring):
    {"float32_s", "bfloat16_s", "tokens", "seconds" (the whole measurement)}; {"too_large": True} for a block
    whose passes cannot fit the box (not built); {"timed_out": True} where the box ran out before both were timed
    (a busy machine: not cached, measured again next time)."""
    import copy

    from litgpt.model import Block, build_rope_cache

    started = time.perf_counter()
    with torch.device("meta"):
        block = Block(config, block_idx=0)
    parameters = sum(p.numel() for p in block.parameters())
    if 4 * parameters * 16 > MAX_PASS_FLOPS:  # forward 2 + input gradients 2 FLOPs per weight and token
        return {"too_large": True}
    tokens = int(min(128, max(16, PROBE_FLOPS / (4 * parameters))))
    block = block.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in block.named_parameters():  # small weights, unit norms: no inf, nan or denormal slow paths
            p.normal_(0, 0.02, generator=generator) if p.ndim > 1 else p.fill_(1.0 if "norm" in name else 0.0)
        for buffer in block.buffers():
            buffer.zero_()
    block.requires_grad_(False)  # frozen base weights, as in an adapter or LoRA run: the backward is the inputs'
    cos, sin = build_rope_cache(tokens, n_elem=config.rope_n_elem, base=config.rope_base,
                                condense_ratio=config.rope_condense_ratio)
    cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)  # 1 x T x rope_n_elem, as GPT's forward passes them
    x = torch.randn(1, tokens, config.n_embd, generator=generator)

    if training:
        def run(bf16: bool) -> None:
            inputs = x.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = block(inputs, cos, sin)
            out.float().square().mean().backward()
        passes = {"float32": lambda: run(False), "bfloat16": lambda: run(True)}
    else:
        half = copy.deepcopy(block).to(torch.bfloat16)
        x16, cos16, sin16 = x.bfloat16(), cos.bfloat16(), sin.bfloat16()

        @torch.no_grad()
        def forward(bf16: bool) -> None:
            half(x16, cos16, sin16) if bf16 else block(x, cos, sin)
        passes = {"float32": lambda: forward(False), "bfloat16": lambda: forward(True)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _timed(passes, started, time_box, tokens)
    finally:
        torch.set_num_threads(threads)


def _timed(passes: dict, started: float, time_box: float, tokens: int, repeats: int = 5) -> dict:
    """The fastest of up to `repeats` timed passes of each kind, after one warm-up pass each (oneDNN builds its
    kernels on the first call), the kinds taking turns so that a burst of another process's load hits both."""
    best = {name: float("inf") for name in passes}
    for round_ in range(repeats + 1):
        for name, run in passes.items():
            if time.perf_counter() - started > time_box:
                return _result(best, started, tokens) if round_ > 1 else {"timed_out": True}
            begin = time.perf_counter()
            run()
            if round_ > 0:
                best[name] = min(best[name], time.perf_counter() - begin)
    return _result(best, started, tokens)


def _result(best: dict, started: float, tokens: int) -> dict:
    return {"float32_s": best["float32"], "bfloat16_s": best["bfloat16"], "tokens": tokens,
            "seconds": time.perf_counter() - started}


# ------------------------------------------------------------------------------------------------ the decision


def cpu_precision(config, training: bool) -> tuple[str, str]:
    """(precision, why) on this CPU for a model of this config (see the module docstring)."""
    bf16 = "bf16-mixed" if training else "bf16-true"
    if os.environ.get(PROBE_SWITCH, "").lower() in ("off", "0", "false", "no"):
        return "32-true", f"{PROBE_SWITCH}={os.environ[PROBE_SWITCH]}: bf16 not measured"
    cpu = cpu_info()
    if not cpu["flags"] & BF16_FLAGS:
        return "32-true", ("this CPU has no bfloat16 units (no avx512_bf16 or amx_bf16 flag), where bf16 runs many "
                           "times slower")
    path, mode = cache_path(), "training" if training else "inference"
    key = cache_key(cpu["name"], config)
    cached = read_cache(path)
    measured = cached.get(key, {}).get(mode)
    where = f"measured on this CPU earlier, cached in {path}"
    if not isinstance(measured, dict) or not _valid(measured):
        measured = probe_block(config, training)
        if not measured.get("timed_out"):
            cached.setdefault(key, {})[mode] = measured
            write_cache(path, cached)
        where = f"measured on this CPU in {measured.get('seconds', TIME_BOX_S):.2f}s"
    if measured.get("timed_out") or measured.get("too_large"):
        cause = "a busy or slow CPU: measured again next run" if measured.get("timed_out") else "too large a block"
        return "32-true", (f"bf16 not timed: one block of this model did not fit the {TIME_BOX_S:g}s measurement "
                           f"({cause}); --precision {bf16} to try it")
    speedup = measured["float32_s"] / measured["bfloat16_s"]
    what = "bf16 autocast" if training else "bf16"
    figures = f"{where}: {what} {speedup:.2f}x the speed of float32 on one block of this model"
    if speedup >= MIN_SPEEDUP[mode]:
        return bf16, f"{figures}; --precision 32-true to override"
    return "32-true", f"{figures}, bf16 needs {MIN_SPEEDUP[mode]:g}x; --precision {bf16} to override"


def _valid(measured: dict) -> bool:
    if measured.get("too_large") is True:
        return True
    values = [measured.get("float32_s"), measured.get("bfloat16_s")]
    return all(isinstance(v, (int, float)) and 0 < v < float("inf") for v in values)


def run_precision(given: Optional[str], config, resumed: Optional[str], may_measure: bool,
                  device_default: str) -> tuple[str, str]:
    """(precision, why) of a fine-tuning run: the flag; else the precision of the run being resumed (`resumed`, from
    its saved hyperparameters); else the launching process's decision, in a rank it started; else on a GPU
    `device_default` (`model.default_precision(training=True)`, the GPU rule); else, where this process may measure
    (the launching process of a one-machine run), `cpu_precision`; else 32-true. why is "" where the user or the
    GPU rule decided."""
    if given is not None:
        return given, ""
    if resumed is not None:
        return resumed, "kept from the run being resumed"
    inherited = os.environ.get(INHERITED)
    if inherited and not may_measure:
        precision, _, why = inherited.partition("\t")
        return precision, why
    if torch.cuda.is_available():
        return device_default, ""
    if not may_measure:
        return "32-true", "not measured: ranks started by another launcher must all choose alike"
    return cpu_precision(config, training=True)


@contextmanager
def shared_with_ranks(precision: str, why: str) -> Iterator[None]:
    """Within the block (Fabric's launch, which starts this machine's other ranks as copies of this process), the
    decision is in the environment those ranks inherit; afterwards the environment is as it was."""
    before = os.environ.get(INHERITED)
    os.environ[INHERITED] = f"{precision}\t{why}"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(INHERITED, None)
        else:
            os.environ[INHERITED] = before
