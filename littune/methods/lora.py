"""LoRA (litgpt's `lora` modules): each targeted weight matrix W gets a trainable low-rank update B @ A, scaled by
lora_alpha / lora_r; the base weights stay frozen. Only A and B are saved (a few MB at most).

LoRA folds into the base weights (W + B @ A * alpha / r), so a LoRA run can be merged (`littune merge`) and exported
(`littune export`: a merged transformers model, a PEFT adapter, a GGUF file).

litgpt keeps the query, key and value projections in one fused `attn.qkv` matrix, but its `LoRAQKVLinear` gives
each of q, k and v its own A (r rows of lora_A, in the order q, k, v of those enabled) and B (the rows of lora_B of
that projection's outputs): see `qkv_parts`.
"""

from dataclasses import asdict, dataclass, field
from typing import Annotated, Literal

import litgpt.lora as litgpt_lora
import torch

from littune.common import Check, UserError
from littune.methods import Method

Target = Literal["query", "key", "value", "projection", "mlp", "head"]
TARGETS = ("query", "key", "value", "projection", "mlp", "head")


@dataclass
class LoRAArgs:
    lora_r: Annotated[int, Check(ge=1)] = 8
    """Rank of the low-rank update B @ A of each targeted weight matrix (adapter size grows with it)."""
    lora_alpha: Annotated[int, Check(ge=1)] = 16
    """Scale of the update: B @ A is multiplied by lora_alpha / lora_r."""
    lora_dropout: Annotated[float, Check(ge=0, lt=1)] = 0.0
    """Dropout on the input of the LoRA branch while training (default 0, as PEFT's: on SST-2 it scored as well as
    litgpt's 0.05, and only without dropout do a micro-batch's records share their prompt's forward pass)."""
    lora_targets: list[Target] = field(default_factory=lambda: ["query", "value"])
    """Which weights get LoRA: any of query, key, value (the attention's input projections), projection (the
    attention's output), mlp (every MLP matrix), head (the output layer)."""

    def __post_init__(self):  # runs when the flags are read: before any file is touched
        if not self.lora_targets:
            raise UserError(f"--lora_targets is empty: name at least one of {', '.join(TARGETS)}")
        unknown = [t for t in self.lora_targets if t not in TARGETS]
        if unknown:
            raise UserError(f"--lora_targets {unknown[0]!r} is not a target; choose from {', '.join(TARGETS)}")
        self.lora_targets = [t for t in TARGETS if t in self.lora_targets]  # one order: same run, same fingerprint


def lora_config(config, args: LoRAArgs):
    """litgpt's LoRA Config: the base config plus rank, alpha, dropout and one switch per target."""
    targets = set(args.lora_targets)
    return litgpt_lora.Config(**asdict(config), lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                              lora_dropout=args.lora_dropout, **{f"lora_{t}": t in targets for t in TARGETS})


def build_model(config, args: LoRAArgs):
    return litgpt_lora.GPT(lora_config(config, args))


def is_trainable(name: str) -> bool:
    return litgpt_lora.lora_filter(name, None)


def lora_modules(model) -> list:
    """(name, module) of every litgpt LoRA layer that has A and B (rank > 0 and, for qkv, a projection enabled)."""
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, litgpt_lora.LoRALinear) and m.r > 0 and hasattr(m, "lora_A")]


@torch.no_grad()
def merge(model) -> None:
    """Fold every LoRA update into its base weight, in float32, and keep the base weight's dtype.

    litgpt's `merge_lora_weights` adds the update in the weight's own dtype (bfloat16 rounding of a small update on
    a large weight loses most of it) and in place (a tied lm_head would change the embedding too): here each merged
    weight is a new tensor W + B @ A * alpha / r computed in float32.
    """
    for _, module in lora_modules(model):
        if module.merged:
            continue
        module.lora_A.data, module.lora_B.data = module.lora_A.data.float(), module.lora_B.data.float()
        weight = module.linear.weight
        delta = module.get_lora_AB().to(weight.device)  # litgpt's B @ A * scaling, zero-padded for qkv
        module.linear.weight = torch.nn.Parameter((weight.float() + delta).to(weight.dtype), requires_grad=False)
        module.merged = True


def qkv_parts(module) -> list[tuple[str, torch.Tensor, torch.Tensor, slice]]:
    """For litgpt's fused qkv LoRA: (projection, A, B, the rows of the fused [q | k | v] weight it updates) for each
    of query, key, value that has LoRA. The update of that projection is B @ A * scaling (litgpt's `conv1d` in
    `get_lora_AB` applies the r rows of A of each enabled projection to that projection's rows of B)."""
    r, q_size = module.r, module.head_size * module.n_head
    kv_size = module.head_size * module.n_query_groups
    rows = {"query": slice(0, q_size), "key": slice(q_size, q_size + kv_size),
            "value": slice(q_size + kv_size, q_size + 2 * kv_size)}
    parts, a_start, b_start = [], 0, 0
    for name, enabled in zip(("query", "key", "value"), module.enable_lora):
        if not enabled:
            continue
        size = rows[name].stop - rows[name].start
        parts.append((name, module.lora_A[a_start:a_start + r], module.lora_B[b_start:b_start + size], rows[name]))
        a_start, b_start = a_start + r, b_start + size
    return parts


def unshared_reason(args: LoRAArgs):
    """Dropout on the LoRA branch draws one mask per record in the plain forward: one mask for a shared prefix would
    be another regularisation."""
    if args.lora_dropout > 0:
        return (f"--lora_dropout {args.lora_dropout}: one dropout mask for a shared prefix is another "
                f"regularisation; --lora_dropout 0 shares it")
    return None


METHOD = Method(
    name="lora",
    summary="LoRA: a trainable low-rank update of the attention (and optionally MLP/head) weights; mergeable and "
            "exportable.",
    args=LoRAArgs,
    build_model=build_model,
    is_trainable=is_trainable,
    block_class=litgpt_lora.Block,
    adapter_file="lit_model_lora_finetuned.pth",
    merge=merge,
    unshared_reason=unshared_reason,
    card_label="a LoRA adapter",
    card_tags=("lora",),
)
