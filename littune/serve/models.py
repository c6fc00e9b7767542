"""The models `littune serve` answers with: the base checkpoint alone, with one adapter (--adapter_path), or with
named adapters (--adapter NAME=PATH, once per adapter) on one copy of the base weights.

Many adapters, one base: the base model is loaded once (a litgpt GPT, served under its checkpoint folder's name).
Each adapter needs its method's module classes (LoRA's layers, adapter_v2's prefix, scales and biases), so one
module is built per method and its flags (LoRA's rank, alpha and targets decide the shapes and the scaling), on
the meta device, and given the base's own tensors (`load_state_dict(assign=True)`: the same storage, no copy): the
base weights are in memory once whatever the number of adapters. An adapter's own tensors (LoRA's A and B;
adapter_v2's prefix, gates, scales, biases and norms) are kept per adapter and swapped into its module's parameters
(a pointer, no copy) before the engine runs that adapter's rows (see `littune.serve.engine`); they are read from
their files once, at start, into the process's own memory: a file changed or removed later changes nothing.
"""

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from littune.common import UserError
from littune.inputs import RunInputs
from littune.model import load_model, resolve_adapter, unwrap
from littune.serve.engine import Served

ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


@dataclass(eq=False)
class Model:
    """A model clients can name: what the engine runs its rows through, and how its chat prompts are written."""

    name: str
    served: Served
    style: Any  # the prompt style `littune generate` uses with it
    stop_tokens: tuple  # the prompt style's (EOS, a chat template's end-of-turn token)


def parse_adapter_flags(specs: list[str], base_name: str) -> dict[str, Path]:
    """--adapter NAME=PATH flags as {NAME: PATH}: names that can go in a request's `model` field, each once, none
    the base model's own."""
    adapters = {}
    for spec in specs:
        name, equals, path = spec.partition("=")
        name = name.strip()
        if not equals or not path.strip():
            raise UserError(f"--adapter {spec}: give NAME=PATH, e.g. --adapter sst=out/lora/sst (a run folder or an "
                            f"adapter file), once per adapter")
        if not ADAPTER_NAME.fullmatch(name):
            raise UserError(f"--adapter {spec}: the name {name!r} must be letters, digits, '.', '_', ':' or '-' "
                            f"(at most 64, starting with a letter or digit): clients send it as the model")
        if name in adapters or name == base_name:
            taken = "the base model's name" if name == base_name else "given twice"
            raise UserError(f"--adapter {spec}: the name {name!r} is {taken}; give each adapter its own name")
        adapters[name] = Path(path.strip())
    return adapters


def load_models(fabric, inputs: RunInputs, adapters: dict[str, Path], prompt_style: Optional[str],
                system: Optional[str]) -> tuple[list[Model], Any]:
    """([the base model, then each adapter in the order given], tokenizer) on one copy of the base weights.
    inputs: the run's (the checkpoint's config, tokenizer and files, each read once)."""
    checkpoint_dir = inputs.checkpoint_dir
    tokenizer = inputs.tokenizer
    loaded = {name: load_adapter(name, path, inputs) for name, path in adapters.items()}  # all checked first
    base = unwrap(load_model(fabric, checkpoint_dir, config=inputs.config)).eval()
    base_name = checkpoint_dir.resolve().name

    def model(name: str, served: Served, run_dir: Optional[Path]) -> Model:
        style = inputs.prompt_style(prompt_style, system, run_dir)
        return Model(name, served, style, tuple(style.stop_tokens(tokenizer)))

    models = [model(base_name, Served(base_name, base), None)]
    modules = {}  # one module per method and its flags, shared by the adapters trained with them
    for name, (weights, run_dir, method, method_args) in loaded.items():
        key = (method.name, repr(method_args))
        if key not in modules:
            modules[key] = module_sharing_base(base, method, method_args, weights)
        tensors = {k: v.to(device=fabric.device, dtype=parameter_dtype(base)) for k, v in weights.items()}
        models.append(model(name, Served(name, modules[key], tensors, method.before_forward), run_dir))
    return models, tokenizer


def load_adapter(name: str, path: Path, inputs: RunInputs) -> tuple[dict, Path, Any, Any]:
    """(weights, run folder, method, method flags) of one --adapter, checked to fit the base model of `inputs`."""
    try:
        adapter = resolve_adapter(path)
        weights = inputs.adapter_weights(adapter)
        run_dir, method, method_args = adapter.run_dir, adapter.method, adapter.args
    except UserError as e:  # resolve_adapter names the flag as generate's --adapter_path
        raise UserError(str(e).replace(f"--adapter_path {path}", f"--adapter {name}={path}")) from e
    # load_torch maps the file, and the modules take these tensors as they are (`.to()` of the same dtype and
    # `assign=True` do not copy): without a copy of our own, a file changed on disk would change the answers, and
    # one truncated would kill the server (SIGBUS) on the next request. The copy is read now, once.
    return {k: v.clone() for k, v in weights.items()}, run_dir, method, method_args


def parameter_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def module_sharing_base(base: torch.nn.Module, method, method_args, adapter: dict) -> torch.nn.Module:
    """The method's model (litgpt's LoRA or adapter_v2 GPT) holding the base's own tensors: built on the meta device
    (no memory), then given the base's tensors and, for its adapter parameters, `adapter`'s (until the engine swaps
    another adapter's in) with `assign=True`, so that nothing is copied. litgpt's loading hooks map the base's names
    to the method's (attn.qkv.weight -> attn.qkv.linear.weight) as when a run is loaded."""
    from littune.model import build_model

    device, dtype = next(base.parameters()).device, parameter_dtype(base)
    with torch.device("meta"):
        module = build_model(base.config, method, method_args)
    own = {k: v.to(device=device, dtype=dtype) for k, v in adapter.items()}
    missing, unexpected = module.load_state_dict({**base.state_dict(), **own}, strict=False, assign=True)
    module.cos, module.sin = base.cos, base.sin  # the RoPE tables (buffers, built on meta): the base's, shared
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if missing or unexpected or left:
        raise RuntimeError(f"the {method.name} model does not take the base's weights: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}, unset {left[:3]}")
    module.requires_grad_(False)
    return module.eval()
