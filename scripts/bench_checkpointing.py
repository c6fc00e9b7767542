"""Peak memory and time of one training forward + backward with and without activation checkpointing
(`littune finetune --activation_checkpointing`), on a converted checkpoint (e.g. SmolLM2-135M-Instruct), adapter_v2,
one record of 1,024 and 2,048 tokens whose last quarter is the target (a label task's masked prompt), float32.

    python scripts/bench_checkpointing.py --checkpoint_dir checkpoints/HuggingFaceTB/SmolLM2-135M-Instruct

Each case runs in a fresh process (peak RSS is a process's own figure); the cases alternate so that drift in the
machine's speed hits both. Prints one table row per case: tokens, checkpointing, peak RSS GB (minus the process's
RSS after loading the model: the training step's own memory), seconds for the step.
"""

import argparse
import json
import subprocess
import sys

CHILD = r'''
import json, resource, sys, time
import torch
from pathlib import Path
from littune.checkpoints import load_model_config
from littune.methods import get_method
from littune.model import checkpoint_activations, forward_loss_sum

checkpoint, tokens, checkpointing = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
torch.set_num_threads(int(sys.argv[4]))
method = get_method("adapter_v2")
config = load_model_config(checkpoint)
config.block_size = max(config.block_size, tokens)
model = method.build_model(config, method.args())
model.load_state_dict(torch.load(checkpoint / "lit_model.pth", weights_only=True, mmap=True), strict=False)
for name, p in model.named_parameters():
    p.requires_grad_(method.is_trainable(name))
if checkpointing:
    checkpoint_activations(model, method.block_class, method.before_forward)
ids = torch.randint(0, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
labels = ids.clone()
labels[:, : 3 * tokens // 4] = -100
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
start = time.perf_counter()
method.before_forward(model)
forward_loss_sum(model, ids, labels, -100).backward()
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
print(json.dumps({"loaded_gb": loaded, "peak_gb": peak, "seconds": seconds}))
'''


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint_dir", required=True)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print("| tokens | activation checkpointing | step memory GB (peak - loaded) | peak RSS GB | step s |")
    print("| --- | --- | --- | --- | --- |")
    for tokens in args.tokens:
        for checkpointing in (False, True):
            out = subprocess.run([sys.executable, "-c", CHILD, args.checkpoint_dir, str(tokens),
                                  "1" if checkpointing else "0", str(args.threads)],
                                 capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {tokens} | {'on' if checkpointing else 'off'} | {row['peak_gb'] - row['loaded_gb']:.2f} | "
                  f"{row['peak_gb']:.2f} | {row['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
