"""Peak memory of `littune convert` against litgpt's own `convert_hf_checkpoint`, on the same checkpoint.

    python scripts/convert_memory.py                      # pythia-70m shape, ~282 MB float32
    python scripts/convert_memory.py --model pythia-160m  # ~650 MB

1. Writes a random-init GPT-NeoX checkpoint with the shapes of a litgpt Pythia config (so litgpt's converter, which
   only takes named configs, can convert it too): config.json from transformers' GPTNeoXConfig, parameter names and
   shapes from GPTNeoXForCausalLM built on the meta device, and a model.safetensors written one tensor at a time
   (never more than one tensor in memory).
2. Runs, each in a fresh subprocess, whose peak RSS is read with os.wait4 (ru_maxrss of that child alone):
   - a Python that only imports littune.checkpoints and torch (what any littune command costs),
   - the same plus litgpt and its converter module (what any conversion must import: lightning, ...),
   - `littune convert --checkpoint_dir DIR`,
   - litgpt's `convert_hf_checkpoint(DIR)` (loads each safetensors file whole with `load_file`).
3. Prints each peak, as MB and as a multiple of the weights' size, also above the import baseline (a converter
   that streams one tensor at a time needs about the largest tensor above it), and checks that both conversions
   wrote the same tensors.

RSS counts the pages of memory-mapped files that were touched, so a converter that mmaps a file and reads all of
it shows the whole file even if it never copies it.
"""

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MB = 1e6

SAFETENSORS_DTYPES = {"torch.float32": "F32", "torch.bfloat16": "BF16", "torch.float16": "F16"}


def write_checkpoint(folder: Path, model: str) -> tuple[int, int]:
    """A random-init GPT-NeoX with the shapes of litgpt's `model` config; returns (weights' bytes, largest tensor's)."""
    import torch
    import transformers
    from litgpt import Config

    c = Config.from_name(model)
    hf_config = transformers.GPTNeoXConfig(
        vocab_size=c.padded_vocab_size, hidden_size=c.n_embd, num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head, intermediate_size=c.intermediate_size, rotary_pct=c.rotary_percentage,
        max_position_embeddings=c.block_size, use_parallel_residual=c.parallel_residual, hidden_act="gelu",
        tie_word_embeddings=False, torch_dtype="float32",
    )
    hf_config.architectures = ["GPTNeoXForCausalLM"]
    folder.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(folder)
    with torch.device("meta"):
        shapes = {k: (tuple(v.shape), v.dtype) for k, v in transformers.GPTNeoXForCausalLM(hf_config).state_dict().items()}

    # safetensors layout: u64 header size, JSON header (offsets), then the tensors' bytes back to back
    header, offset, largest = {}, 0, 0
    for name, (shape, dtype) in shapes.items():
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        largest = max(largest, nbytes)
        header[name] = {"dtype": SAFETENSORS_DTYPES[str(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    generator = torch.Generator().manual_seed(0)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, (shape, dtype) in shapes.items():
            tensor = torch.randn(shape, generator=generator, dtype=dtype) * 0.02
            if name.endswith(("layernorm.weight", "layer_norm.weight")):
                tensor += 1
            f.write(tensor.numpy().tobytes())
            del tensor
    tokenizer = REPO.parent / "shared" / "data" / "tokenizers" / "pythia"
    for file in tokenizer.glob("*.json"):
        shutil.copyfile(file, folder / file.name)
    return offset, largest


def peak_rss(cmd: list[str], env: dict) -> tuple[float, float]:
    """(peak RSS in bytes, seconds) of one subprocess, from os.wait4: that child's ru_maxrss alone.

    A forked child starts with its parent's resident set counted in ru_maxrss until it execs, so this process
    imports nothing heavy (torch, transformers) itself: the checkpoint is written and compared in children too.
    """
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{output.decode(errors='replace')[-3000:]}")
    return usage.ru_maxrss * 1024, time.perf_counter() - start  # ru_maxrss is in KiB on Linux


def same_tensors(a: Path, b: Path) -> bool:
    import torch

    x = torch.load(a, map_location="cpu", weights_only=True, mmap=True)
    y = torch.load(b, map_location="cpu", weights_only=True, mmap=True)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="pythia-70m", help="litgpt Pythia config whose shapes to use")
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the checkpoints (default: a temp dir)")
    parser.add_argument("--_step", nargs="+", help=argparse.SUPPRESS)  # internal: run one step in a child process
    args = parser.parse_args()
    if args._step:  # the heavy steps run in children so that this process stays small (see peak_rss)
        step, *rest = args._step
        if step == "write":
            print(*write_checkpoint(Path(rest[0]), rest[1]))
        elif step == "compare":
            print(same_tensors(Path(rest[0]), Path(rest[1])))
        return

    work = Path(args.workdir or tempfile.mkdtemp(prefix="convert_memory_"))
    ours, theirs = work / "littune" / args.model, work / "litgpt" / args.model
    shutil.rmtree(work / "littune", ignore_errors=True)
    shutil.rmtree(work / "litgpt", ignore_errors=True)
    py, me = sys.executable, str(Path(__file__).resolve())
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    t = time.perf_counter()
    size, largest = map(int, child([py, me, "--_step", "write", str(ours), args.model], env).split()[-2:])
    shutil.copytree(ours, theirs, copy_function=os.link)  # the same file, no extra disk
    print(f"wrote {ours / 'model.safetensors'}: {size / MB:.1f} MB float32 ({args.model} shapes) "
          f"in {time.perf_counter() - t:.1f}s", file=sys.stderr)

    rows = [
        ("baseline: import littune.checkpoints, torch",
         peak_rss([py, "-c", "import torch, littune.checkpoints"], env)),
        ("baseline: + litgpt and its converter",
         peak_rss([py, "-c", "import torch, littune.checkpoints, litgpt.scripts.convert_hf_checkpoint"], env)),
        ("littune convert",
         peak_rss([py, "-m", "littune.cli", "convert", "--checkpoint_dir", str(ours)], env)),
        ("litgpt convert_hf_checkpoint",
         peak_rss([py, "-c", "import sys; from pathlib import Path; "
                   "from litgpt.scripts.convert_hf_checkpoint import convert_hf_checkpoint; "
                   "convert_hf_checkpoint(Path(sys.argv[1]))", str(theirs)], env)),
    ]
    base = rows[1][1][0]
    print(f"\nweights: {size / MB:.1f} MB ({args.model} shapes, float32 safetensors, 1 file); "
          f"largest tensor {largest / MB:.1f} MB = {largest / size:.2f}x")
    print(f"{'':46} {'peak RSS':>9} {'x weights':>10} {'above baseline+litgpt':>22} {'time':>7}")
    for label, (rss, seconds) in rows:
        above = "" if label.startswith("baseline") else f"{(rss - base) / MB:7.1f} MB = {(rss - base) / size:4.2f}x"
        print(f"{label:46} {rss / MB:6.0f} MB {rss / size:9.2f}x {above:>22} {seconds:6.1f}s")
    same = child([py, me, "--_step", "compare", str(ours / "lit_model.pth"), str(theirs / "lit_model.pth")], env)
    print(f"\nlittune and litgpt wrote the same tensors: {same.split()[-1]}")
    if not args.workdir:
        shutil.rmtree(work)
    if same.split()[-1] != "True":
        sys.exit(1)


def child(cmd: list[str], env: dict) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{result.stderr[-3000:]}")
    return result.stdout.strip()


if __name__ == "__main__":
    main()
