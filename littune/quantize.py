"""--quantize: a frozen base model in 4 bits (NF4 or FP4, optionally with double-quantized statistics: QLoRA) or
8 bits (LLM.int8()), with bitsandbytes' own `Linear4bit` / `Linear8bitLt` modules, on CPU and CUDA by the same code.
The names are litgpt's: bnb.nf4, bnb.nf4-dq, bnb.fp4, bnb.fp4-dq, bnb.int8.

Why not Lightning Fabric's `BitsandbytesPrecision` (litgpt's way): its layers' `quantize` raise "Unexpected device
type" on any device but CUDA (lightning 2.6), so on a CPU it cannot be used. littune wires the same bitsandbytes
modules itself, and quantizes while loading: the model is built on the meta device, the memory-mapped lit_model.pth
is assigned to it (nothing copied), and each frozen `nn.Linear` is replaced by its bitsandbytes layer, its weight
read and quantized one tensor at a time; only the rest (embeddings, norms, the method's parameters) is copied into
memory in the run's dtype. The full float32 model is never in RAM. The method's parameters (LoRA's A and B,
adapter_v2's prefix, scales, biases and norms) are not quantized: they train, are saved and load in the run's dtype,
so an adapter trained on a quantized base loads onto the unquantized one and back.

bitsandbytes is an extra: `pip install 'littune[quantize]'`.
"""

import ctypes
import logging
import mmap
import sys
from typing import Callable, Literal, Optional

import torch

from littune.common import UserError, first_line

Quantize = Literal["bnb.nf4", "bnb.nf4-dq", "bnb.fp4", "bnb.fp4-dq", "bnb.int8"]
INT8_THRESHOLD = 6.0  # LLM.int8()'s outlier threshold, as Fabric's and litgpt's int8 layers use


def require_bitsandbytes(quantize: str):
    """The bitsandbytes module, or one line saying how to install it."""
    # bitsandbytes 0.50 logs, on a CPU with AVX512-BF16, that it could not fetch an optional kernel from a model hub
    # (the `kernels` package); its own kernels run instead. The advice would make littune download code at run time.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError as e:
        raise UserError(f"--quantize {quantize} needs bitsandbytes ({first_line(e)}): pip install "
                        f"'littune[quantize]'") from e
    return bitsandbytes


def check_quantize(quantize: Optional[str], strategy: str = "auto", world: int = 1) -> None:
    """Refuse what a quantized base does not support here, before any file is read."""
    if quantize is None:
        return
    if strategy == "fsdp":
        raise UserError(f"--quantize {quantize} with --strategy fsdp: FSDP would shard bitsandbytes' packed weights "
                        f"without their quantization state; drop --quantize, or train on one device without fsdp")
    if world > 1:
        raise UserError(f"--quantize {quantize} trains on one device only (as litgpt's), and --devices x --num_nodes "
                        f"is {world}; use --devices 1 --num_nodes 1, or drop --quantize")
    require_bitsandbytes(quantize)


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype the quantized layers dequantize to and multiply in: the run's (bfloat16/float16 under mixed)."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return torch.float32


def check_backward(quantize: str, device: torch.device, dtype: torch.dtype) -> None:
    """One small forward and backward through the quantized layer on this device: a backend without a backward for
    it (e.g. an int8 matmul without one) is one line here, not a traceback in the first step."""
    bnb = require_bitsandbytes(quantize)
    layer = quantized_linear(torch.nn.Linear(64, 64, bias=False), quantize, dtype, device, bnb, training=True)
    x = torch.randn(2, 64, device=device, dtype=dtype, requires_grad=True)
    try:
        layer(x).float().sum().backward()
        ok = x.grad is not None and bool(torch.isfinite(x.grad).all())
        error = "no gradient reached the input"
    except Exception as e:  # the backend's own error, whatever it is
        ok, error = False, f"{type(e).__name__}: {first_line(e)}"
    if not ok:
        raise UserError(f"--quantize {quantize}: bitsandbytes {bnb.__version__} has no backward for it on "
                        f"{device.type} with {str(dtype).removeprefix('torch.')} ({error}); fine-tune with "
                        f"--quantize bnb.nf4, or without --quantize")


def quantized_linear(linear: torch.nn.Linear, quantize: str, dtype: torch.dtype, device: torch.device, bnb,
                     training: bool) -> torch.nn.Module:
    """bitsandbytes' layer for `linear`, its weight quantized on `device` (the bias stays as it is: the caller
    casts it with the module's other tensors)."""
    weight = linear.weight.detach()
    with torch.device("meta"):
        if quantize == "bnb.int8":
            layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                        has_fp16_weights=False, threshold=INT8_THRESHOLD)
        else:
            quant_type = quantize.removeprefix("bnb.").removesuffix("-dq")
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                      compute_dtype=dtype, compress_statistics=quantize.endswith("-dq"),
                                      quant_type=quant_type)
    if quantize == "bnb.int8":  # quantized from float16 by bitsandbytes itself
        layer.weight = bnb.nn.Int8Params(weight.contiguous(), requires_grad=False,
                                         has_fp16_weights=False)._quantize(device)
    else:
        layer.weight = quantized_4bit(weight, quant_type, quantize.endswith("-dq"), dtype, device, layer, bnb)
        # On an AVX512-BF16 CPU, bitsandbytes repacks the weight in place for a forward-only kernel the first time
        # the layer runs in eval mode without gradients. That kernel has no backward (a fine-tuning run evaluates,
        # then trains through the layer again), and it dies of SIGFPE on an input of zero rows (bitsandbytes 0.50.2,
        # measured: `littune evaluate --quantize bnb.nf4` on SmolLM2 killed the process): every layer keeps the
        # plain layout.
        layer.support_avx512bf16_for_cpu = False
    if linear.bias is not None:
        layer.bias = torch.nn.Parameter(linear.bias.detach(), requires_grad=False)
    return layer.train(linear.training)


def file_backed_ranges() -> list[tuple[int, int]]:
    """(start, end) of this process's memory mapped from files (Linux /proc/self/maps; [] elsewhere)."""
    try:
        lines = open("/proc/self/maps", encoding="utf-8", errors="replace").read().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):  # a path: file-backed (not [heap], not anonymous)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            ranges.append((start, end))
    return ranges


LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None  # this process's C library (madvise), opened once


def release_pages(tensor: torch.Tensor, ranges: list[tuple[int, int]]) -> None:
    """Take the pages of a tensor read from the memory-mapped lit_model.pth out of this process's resident set
    (madvise MADV_DONTNEED), once it has been quantized or copied: read once, a 7B file's pages would otherwise count
    in the RSS until the whole file is unmapped (measured: 7.6 of a Llama-2-7B NF4 step's 10.5 GB). Only whole pages
    inside a file-backed mapping are released (`ranges`); the file is never written, so a later read of them
    faults them in from the file again. Nothing happens on other systems or for tensors in ordinary memory."""
    if sys.platform != "linux" or tensor.device.type != "cpu" or not ranges or not tensor.is_contiguous():
        return
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    if not any(low <= start and end <= high for low, high in ranges):
        return
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        LIBC.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # MADV_DONTNEED


# linear layers left unquantized, as transformers' load_in_4bit leaves them (its modules_to_not_convert): the output
# projection onto the vocabulary. Quantized, it alone moved SmolLM2-135M's logits by 3.1 on average (top-1 token
# agreement with the float model 0.57 on SST-2 prompts); kept, see the README. It costs vocabulary x width values in
# the run's dtype (32000 x 4096 for a 7B model: 0.5 GB in float32).
KEPT = {"lm_head"}
CHUNK_ELEMENTS = 2**24  # weights quantized 16M values at a time: bitsandbytes' quantizer holds ~20 bytes per value


def quantized_4bit(weight: torch.Tensor, quant_type: str, double: bool, dtype: torch.dtype, device, layer, bnb):
    """bitsandbytes' Params4bit of `weight`, the same bytes as its own `_quantize` gives (blocks of 64 along the
    flattened weight), quantized a slice of rows at a time: its quantizer keeps float32 copies, scales and int32
    codes of the whole tensor at once (~20 bytes per value: 2.6 GB for a 7B model's 32000 x 4096 head), which is most
    of a quantized load's peak memory. Rows slice into whole blocks where a row is a multiple of 64 values; other
    shapes go in one piece. double: the -dq variants' absmax quantized again, as bitsandbytes does it."""
    from bitsandbytes.functional import QuantState, get_4bit_type, quantize_blockwise

    blocksize, rows = 64, weight.shape[0]
    step = max(1, CHUNK_ELEMENTS // max(1, weight[0].numel())) if weight[0].numel() % blocksize == 0 else rows
    packed, absmax = [], []
    for start in range(0, rows, step):
        chunk = weight[start:start + step].to(device=device, dtype=dtype).contiguous()
        out, scale = torch.ops.bitsandbytes.quantize_4bit.default(chunk, blocksize, quant_type, torch.uint8)
        packed.append(out)
        absmax.append(scale)
        del chunk
    data, absmax = torch.cat(packed), torch.cat(absmax)
    code = get_4bit_type(quant_type, device=data.device)
    if double:
        offset = absmax.mean()
        nested, state2 = quantize_blockwise(absmax - offset, blocksize=256)
        state = QuantState(absmax=nested, shape=weight.shape, dtype=dtype, blocksize=blocksize, code=code,
                           quant_type=quant_type, offset=offset, state2=state2)
    else:
        state = QuantState(absmax=absmax, shape=weight.shape, dtype=dtype, blocksize=blocksize, code=code,
                           quant_type=quant_type)
    layer.quant_state = state
    return bnb.nn.Params4bit(data, requires_grad=False, quant_state=state, blocksize=blocksize,
                             compress_statistics=double, quant_type=quant_type, module=layer, bnb_quantized=True)


def is_quantized(module: torch.nn.Module) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))


def load_quantized(fabric, build: Callable[[], torch.nn.Module], state: dict, quantize: str,
                   trainable: Callable[[str], bool], training: bool) -> tuple[torch.nn.Module, list, list]:
    """(the model with every frozen linear layer quantized and every other tensor on the device in the run's dtype,
    missing names, unexpected names). `state`: the base weights (memory-mapped) plus an adapter's; `trainable`:
    parameter name -> trains (when `training`). The method's parameters `state` lacks keep their initialisation."""
    bnb = require_bitsandbytes(quantize)
    precision = fabric.strategy.precision.precision
    device = fabric.device
    with fabric.init_module(empty_init=True), torch.device("meta"):  # the run's default dtype, no memory
        model = build()
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    for name, param in model.named_parameters():
        param.requires_grad = training and trainable(name)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)  # litgpt's renaming hooks run
    if training:
        check_backward(quantize, device, compute_dtype(precision))
    mapped = file_backed_ranges()
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{parent_name}.{child_name}" if parent_name else child_name
            if type(child) is torch.nn.Linear and not child.weight.is_meta and full not in KEPT and not (
                    training and trainable(f"{full}.weight")):
                setattr(parent, child_name, quantized_linear(child, quantize, compute_dtype(precision), device, bnb,
                                                             training))
                release_pages(child.weight, mapped)
    materialize(model, device, dtype, mapped)
    return fabric.setup_module(model), missing, unexpected


@torch.no_grad()
def materialize(model: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                mapped: list[tuple[int, int]] = ()) -> None:
    """Every tensor but the quantized weights copied onto `device` (floating ones in `dtype`): none is left a view
    of the memory-mapped file (whose pages are then released: `release_pages`). A module with tensors still on the meta device (the method's parameters, the RoPE
    cache) gets them allocated and its `reset_parameters` run, its loaded tensors kept as they were."""
    for module in model.modules():
        quantized = is_quantized(module)
        loaded, empty = {}, False
        for kind in ("_parameters", "_buffers"):
            tensors = getattr(module, kind)
            for name, tensor in list(tensors.items()):
                if tensor is None or (quantized and name == "weight"):
                    continue
                wanted = dtype if tensor.is_floating_point() else tensor.dtype
                if tensor.is_meta:
                    new, empty = torch.empty_like(tensor, device=device, dtype=wanted), True
                else:
                    new = tensor.to(device=device, dtype=wanted, copy=True)
                    loaded[(kind, name)] = new
                    release_pages(tensor, mapped)
                tensors[name] = torch.nn.Parameter(new, requires_grad=tensor.requires_grad) \
                    if kind == "_parameters" else new
        if empty and hasattr(module, "reset_parameters"):
            module.reset_parameters()
            for (kind, name), tensor in loaded.items():  # a reset may touch every tensor of its module
                getattr(module, kind)[name].data.copy_(tensor)
