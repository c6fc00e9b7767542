"""LLaMA-Adapter v2 (litgpt's `adapter_v2` modules): a learned prefix in the upper attention layers, a scale and a
bias on every linear layer, and the norms train; the base weights stay frozen. Adapter weights are a few MB.

The prefix attention cannot be folded into the base weights, so an adapter_v2 run has no merge (LoRA has)."""

from dataclasses import asdict, dataclass

import litgpt.adapter_v2 as litgpt_adapter_v2

from littune.methods import Method


@dataclass
class AdapterV2Args:
    """adapter_v2 has no flags of its own (the prefix length and start layer come from litgpt's Config defaults)."""


def build_model(config, args: AdapterV2Args):
    return litgpt_adapter_v2.GPT(litgpt_adapter_v2.Config(**asdict(config)))


def is_trainable(name: str) -> bool:
    return litgpt_adapter_v2.adapter_filter(name, None)


def clear_adapter_cache(model) -> None:
    """litgpt caches the adapter prefix K/V on every forward, training included. A cached K/V is detached from
    `adapter_wte` (no gradient ever reaches it) and stale after an optimizer step or loading weights: clear it."""
    for module in model.modules():
        if getattr(module, "adapter_kv_cache", None) is not None:
            module.adapter_kv_cache = None


METHOD = Method(
    name="adapter_v2",
    summary="LLaMA-Adapter v2: a learned prompt prefix plus scales and biases; a few MB of weights.",
    args=AdapterV2Args,
    build_model=build_model,
    is_trainable=is_trainable,
    block_class=litgpt_adapter_v2.Block,
    adapter_file="lit_model_adapter_finetuned.pth",
    before_forward=clear_adapter_cache,
    card_label="LLaMA-Adapter v2",
    # 3e-3 (LoRA's) sat at the edge for adapter_v2: the demo's run (760 SST-2 records, batches of 4) blew up at step
    # 79 (train loss 0.3 -> 7.6) with it. On the 2,000-record SST-2 benchmark (README: Accuracy) 1e-3 scored 0.886
    # over 3 seeds (0.883-0.889), 1.5e-3 0.874 (seed 0), 3e-3 0.860
    learning_rate=1e-3,
)
