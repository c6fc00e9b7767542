"""Shared-prefix training: the tokens every record of a micro-batch begins with run once.

With a chat template every record of a label task starts with the same system message, user turn and instruction
(37 of SST-2's ~59 tokens with SmolLM2's template). Such a micro-batch runs as one packed sequence: the shared
prefix once, at positions 0..P-1, then the rest of each record, at its own positions P.. (no padding). A mask lets
each record's tokens attend to the prefix and to its own tokens before them, and nothing else, so every token sees
what it sees in the plain forward; in backward, autograd sums every record's gradient into the one prefix. A prefix
position's loss target is the same for every record, so its loss counts once per record (weighted by the records).
The prefix stops one token before the records' first difference, in input ids or labels (`shared_prefix_length`),
so the last prefix position's target (the next label) is common too.

litgpt's forward does it as it is: given positions and a mask (its KV-cache path), with the rotary tables read at
each packed token's position and a "cache" that passes the sequence's own keys and values through (`PackedCache`).
It runs inside one call of the model (Fabric's wrapper: precision and autocast; under it DDP's forward, which
prepares the gradient sync), see `shared_prefix_loss_sum`.

Where it pays (`sharing_pays`): the packed sequence saves (records - 1) x prefix tokens of every matrix product, and
the padding, but its attention runs over all its tokens at once (the mask hides most pairs; the kernel computes
them all), which grows as the square of its length. scripts/bench_shared_prefix.py measured both on SmolLM2-135M's
shape (2-core AMD EPYC, float32, adapter_v2, masked prompts; see README "Training details"): a micro-batch is packed
where it has at most 4/5 of the plain forward's tokens (records x the longest) and at most 512 tokens.

In float32 the loss and the gradients equal the plain forward's to rounding (tests/test_shared_prefix.py). Where it
does not apply every micro-batch runs whole (`plain_reason`): FSDP (not measured sharded), LoRA dropout > 0 (one
dropout mask for the shared prefix would be another regularisation than one per record), sliding-window attention
and attention logit softcapping (litgpt's KV-cache path does not mask them as its plain forward does).
"""

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
from litgpt.model import KVCache

from littune.model import target_loss_sum, unwrap

MIN_TOKEN_RATIO = 1.25  # plain tokens / packed tokens: below it packing saved at most ~10%, often nothing
MAX_PACKED_TOKENS = 512  # beyond it the packed attention cost more than the tokens saved (8 x 120 tokens: 1.06x)


def plain_reason(enabled: bool, strategy: str, method, method_args, config, activation_checkpointing: bool = False
                 ) -> Optional[str]:
    """Why a run's micro-batches all run whole, or None where a shared prefix is used (the run's header says it).
    The method's own reason comes from its flags (`Method.unshared_reason`: LoRA's dropout)."""
    if not enabled:
        return "--shared_prefix false"
    if activation_checkpointing:
        return "--activation_checkpointing: a block recomputed in the backward would not find the packed positions"
    if strategy == "fsdp":
        return "FSDP: not measured sharded"
    reason = method.unshared_reason(method_args)
    if reason is not None:
        return reason
    if config.sliding_window_size is not None:
        return "sliding-window attention"
    if config.attention_logit_softcapping is not None:
        return "attention logit softcapping"
    return None


def shared_prefix_length(data: list, indices: list) -> int:
    """Tokens the records `indices` of `data` can share: their common first (input id, label) pairs less one (the
    last prefix position predicts the next label, which must be common too); every record keeps at least one token
    after it. 0 for a single record."""
    if len(indices) < 2:
        return 0
    shortest = min(len(data[i]["input_ids"]) for i in indices)
    ids = torch.stack([data[i]["input_ids"][:shortest] for i in indices])
    labels = torch.stack([data[i]["labels"][:shortest] for i in indices])
    differs = ((ids != ids[:1]) | (labels != labels[:1])).any(dim=0)
    common = int(differs.int().argmax()) if bool(differs.any()) else shortest
    return max(common - 1, 0)


def eight_pack_small(data: list, sample: int = 1024) -> bool:
    """Whether 8 records of `data` run packed hold no more tokens than 4 whole ones: the first `sample` records'
    common prefix P and mean length L give P + 8 (L - P) <= 4 L (SST-2 with the chat template: 37 of 59 tokens, 213
    packed against 236). Then a micro-batch of 8 costs no more memory than today's 4 (`resolve_defaults`)."""
    indices = list(range(min(len(data), sample)))
    if len(indices) < 2:
        return False
    prefix = shared_prefix_length(data, indices)
    mean = sum(len(data[i]["input_ids"]) for i in indices) / len(indices)
    return prefix > 0 and prefix + 8 * (mean - prefix) <= 4 * mean


def sharing_pays(prefix: int, lengths: list[int], max_tokens: int) -> bool:
    """Whether records of `lengths` that share `prefix` tokens run faster packed than padded to the longest, on a
    model that takes at most `max_tokens` positions."""
    packed = prefix + sum(n - prefix for n in lengths)
    return (len(lengths) > 1 and packed <= min(MAX_PACKED_TOKENS, max_tokens)
            and len(lengths) * max(lengths) >= MIN_TOKEN_RATIO * packed)


def prefix_to_share(data: list, indices: list, module) -> int:
    """The prefix length the records `indices` run packed with on `module` (the model itself), 0: run plain."""
    prefix = shared_prefix_length(data, indices)
    lengths = [len(data[i]["input_ids"]) for i in indices]
    return prefix if prefix and sharing_pays(prefix, lengths, module.max_seq_length) else 0


def packed_batch(data: list, indices: list, prefix: int, ignore_index: int) -> dict:
    """The records `indices` as one sequence: their shared `prefix` once, then each record's other tokens.
    {"tokens": 1 x N, "positions": N, "mask": 1 x 1 x N x N (query, key: True where attended), "targets": 1 x N,
    "weights": 1 x N (the records, on prefix positions)}."""
    first = data[indices[0]]
    tokens, positions = [first["input_ids"][:prefix]], [torch.arange(prefix)]
    owner = [torch.full((prefix,), -1)]  # -1: the prefix, every record's
    targets = [first["labels"][1:prefix + 1]]  # position t predicts label t + 1
    weights = [torch.full((prefix,), float(len(indices)))]
    for row, i in enumerate(indices):
        ids, labels = data[i]["input_ids"], data[i]["labels"]
        n = len(ids)
        tokens.append(ids[prefix:])
        positions.append(torch.arange(prefix, n))
        owner.append(torch.full((n - prefix,), row))
        targets.append(torch.cat([labels[prefix + 1:], labels.new_full((1,), ignore_index)]))
        weights.append(torch.ones(n - prefix))
    positions, owner = torch.cat(positions), torch.cat(owner)
    mask = (positions[:, None] >= positions[None, :]) & ((owner[None, :] == -1) | (owner[:, None] == owner[None, :]))
    return {"tokens": torch.cat(tokens)[None].long(), "positions": positions, "mask": mask[None, None],
            "targets": torch.cat(targets)[None].long(), "weights": torch.cat(weights)[None]}


class PackedCache(KVCache):
    """The "KV cache" of a packed forward: the sequence's own keys and values, passed through (litgpt's attention
    takes positions and a mask only on its KV-cache path, and checks the cache's class). Nothing is stored or
    written in place."""

    def __init__(self) -> None:
        super().__init__((1, 1, 0, 1), (1, 1, 0, 1))  # empty buffers

    def forward(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return k, v


def packed_loss_sum(module, batch: dict, ignore_index: int, before_forward: Callable) -> torch.Tensor:
    """The summed token loss of a `packed_batch` (on the module's device), as `forward_loss_sum` computes it for the
    records one per row. `module`: the model itself, not a wrapper; `before_forward`: the method's cache clearing,
    run before the forward and after it (nothing of the micro-batch's graph stays on the model)."""
    cos, sin = module.cos, module.sin
    n = batch["tokens"].size(1)
    for block in module.transformer.h:
        block.attn.kv_cache = PackedCache()
    module.cos, module.sin, module.mask_cache = cos[batch["positions"]], sin[batch["positions"]], batch["mask"]
    try:
        before_forward(module)
        arange = torch.arange(n, device=batch["tokens"].device)
        return target_loss_sum(module, lambda: module(batch["tokens"], arange, n), batch["targets"], ignore_index,
                               batch["weights"])
    finally:
        module.cos, module.sin = cos, sin
        module.clear_kv_cache()
        before_forward(module)


def shared_prefix_loss_sum(model, batch: dict, ignore_index: int, before_forward: Callable) -> torch.Tensor:
    """`packed_loss_sum` through `model`'s own call (Fabric's wrapper, DDP's forward): for that one call the model's
    forward is the packed loss, as Fabric's `mark_forward_method` redirects a method (which on one device would
    bypass the precision context)."""
    module = unwrap(model)
    with forward_redirected(module, lambda packed: packed_loss_sum(module, packed, ignore_index, before_forward)):
        return model(batch)


@contextmanager
def forward_redirected(module: torch.nn.Module, function: Callable) -> Iterator[None]:
    """Within the block, the next call of `module` runs `function` instead of its forward; the module's own forward
    is back before `function` runs (it calls it), and whatever happens."""

    def once(*args, **kwargs):
        del module.forward
        return function(*args, **kwargs)

    module.forward = once
    try:
        yield
    finally:
        module.__dict__.pop("forward", None)
