"""`littune export --format peft`: a LoRA run's weights as PEFT writes them (adapter_model.safetensors +
adapter_config.json), to load onto the original transformers model."""

from pathlib import Path
from typing import Optional

import torch

from littune.export.formats import ExportFormat
from littune.export.hf import lit_to_hf
from littune.model import build_model


def peft_adapter(config, family: str, adapter: dict, checkpoint_dir: Path, dtype_name: Optional[str]) -> tuple:
    """(tensors with PEFT's names, adapter_config.json) for a LoRA run.

    Each LoRA layer's update B @ A * alpha / r is written for the transformers module whose weight litgpt's copier
    makes of it. litgpt's fused qkv LoRA has its own A and B per projection (`lora.qkv_parts`); for Llama they
    become q_proj/k_proj/v_proj adapters of rank r. For GPT-NeoX and Falcon the fused query_key_value is one
    module: its A stacks the projections' A's and its B places each projection's B in that projection's rows
    (zero elsewhere), rank r x (projections with LoRA), so B @ A is exactly litgpt's update, and the rows are
    re-interleaved by the same copier as the base weight. Every module is written with one rank (smaller ones
    padded with zero rows/columns, which add nothing) and alpha scaled with it, because vLLM and llama.cpp read one
    r and lora_alpha from adapter_config.json.
    """
    from littune.methods.lora import lora_modules, qkv_parts

    method, args = adapter["method"], adapter["args"]
    with torch.device("meta"):
        model = build_model(config, method, args)
    model.load_state_dict(adapter["weights"], strict=False, assign=True)
    modules = {}  # transformers module name -> (A, B)
    for name, module in lora_modules(model):
        if hasattr(module, "enable_lora"):  # the fused qkv
            parts = qkv_parts(module)
            a = torch.cat([p[1] for p in parts])
            b = torch.zeros(module.linear.out_features, a.shape[0], dtype=a.dtype)
            used = torch.zeros(module.linear.out_features, a.shape[0], dtype=torch.bool)
            for i, (_, _, part_b, rows) in enumerate(parts):
                b[rows, i * module.r:(i + 1) * module.r] = part_b
                used[rows, i * module.r:(i + 1) * module.r] = True
        else:
            a, b = module.lora_A, module.lora_B
            used = torch.ones_like(b, dtype=torch.bool)
        # which rows of the fused Lit weight each transformers weight takes: litgpt's copier run on row numbers
        row_numbers = torch.arange(module.linear.out_features, dtype=torch.float64).unsqueeze(1)
        for hf_name, rows in lit_to_hf(config, family, {f"{name}.weight": row_numbers}).items():
            rows = rows[:, 0].long()
            columns = used[rows].any(0)
            if columns.any():  # a projection without LoRA (e.g. k_proj when key is not a target) gets none
                modules[hf_name.removesuffix(".weight")] = (a[columns], b[rows][:, columns])
    rank = max(a.shape[0] for a, _ in modules.values())
    tensors = {}
    for hf_module, (a, b) in modules.items():
        pad = rank - a.shape[0]
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
        dtype = getattr(torch, dtype_name) if dtype_name else a.dtype  # default: as trained
        tensors[f"base_model.model.{hf_module}.lora_A.weight"] = a.to(dtype)
        tensors[f"base_model.model.{hf_module}.lora_B.weight"] = b.to(dtype)
    hf = config.hf_config or {}
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": f"{hf['org']}/{hf['name']}" if hf.get("org") else str(checkpoint_dir),
        "r": rank,
        "lora_alpha": args.lora_alpha * rank // args.lora_r,  # alpha / r, the scale of the update, unchanged
        "lora_dropout": args.lora_dropout,
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
        "use_rslora": False,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    return tensors, adapter_config


PEFT_LOAD = """```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("BASE")
model = PeftModel.from_pretrained(base, "PATH")
tokenizer = AutoTokenizer.from_pretrained("PATH")
```
vLLM serves it with `--enable-lora --lora-modules NAME=PATH`; llama.cpp converts it with `convert_lora_to_gguf.py`."""


def write(job, folder: Path) -> str:
    from littune.common import save_json
    from littune.export.card import write_model_card
    from littune.export.hf import copy_tokenizer_files, write_safetensors
    from littune.export.template import write_chat_template

    tensors, adapter_config = peft_adapter(job.config, job.family, job.adapter, job.checkpoint_dir, job.dtype)
    write_safetensors(tensors, folder / "adapter_model.safetensors", None)
    save_json(adapter_config, folder / "adapter_config.json")
    copy_tokenizer_files(job.checkpoint_dir, folder)
    if job.template is not None:
        write_chat_template(folder, job.template)
    write_model_card(folder, FORMAT, job.checkpoint_dir, job.config, job.run_dir, job.card_example)
    return (f"Wrote the PEFT adapter to {job.out_dir} (r={adapter_config['r']}, lora_alpha="
            f"{adapter_config['lora_alpha']}, {len(tensors)} tensors); load it onto the original model with "
            f"PeftModel.from_pretrained")


FORMAT = ExportFormat(
    name="peft",
    summary="the LoRA alone, for PEFT/vLLM",
    write=write,
    merged=False,
    needs_adapter="--format peft writes a LoRA adapter: give the run with --adapter_path",
    card_library="peft",
    card_intro="A LoRA adapter for",
    card_load=PEFT_LOAD,
)
