"""--quantize: the frozen base in bitsandbytes' 4/8-bit layers, the adapter in the run's dtype, through the real CLI."""

import pytest
import torch
import yaml

from conftest import finetune_argv, one_error_line, read_metrics, run_main
from littune.cli import main

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("quantize,method_name", [("bnb.nf4", "adapter_v2"), ("bnb.fp4-dq", "lora"),
                                                  ("bnb.int8", "lora")])
def test_frozen_linears_are_bitsandbytes_layers_and_the_adapter_gets_gradients(small_checkpoint, quantize,
                                                                                method_name):
    import lightning as L

    from littune.methods import get_method
    from littune.model import load_model, unwrap

    method = get_method(method_name)
    fabric = L.Fabric(devices=1, accelerator="cpu", precision="32-true")
    model = load_model(fabric, small_checkpoint, method, trainable=True, quantize=quantize)
    layers = [m for m in unwrap(model).modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]
    assert layers and not any(type(m) is torch.nn.Linear for m in unwrap(model).modules())
    for layer in layers:
        if quantize == "bnb.int8":
            assert isinstance(layer, bnb.nn.Linear8bitLt) and layer.weight.dtype == torch.int8
        else:
            assert isinstance(layer.weight, bnb.nn.Params4bit) and layer.weight.dtype == torch.uint8
            assert layer.weight.quant_state.quant_type == quantize[4:7]
            assert layer.weight.quant_state.nested == quantize.endswith("-dq")
        assert not layer.weight.requires_grad
    trainable = {n: p for n, p in unwrap(model).named_parameters() if p.requires_grad}
    assert trainable and all(method.is_trainable(n) and p.dtype == torch.float32 for n, p in trainable.items())
    assert all(not p.requires_grad for n, p in unwrap(model).named_parameters() if not method.is_trainable(n))
    ids = torch.randint(0, 500, (2, 16))
    method.before_forward(unwrap(model))
    logits = model(ids)
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), ids.roll(-1, 1).reshape(-1)).backward()
    assert all(p.grad is not None for p in trainable.values())


def test_nf4_base_logits_are_close_to_the_float_base_but_not_equal(small_checkpoint):
    import lightning as L

    from littune.model import load_model

    fabric = L.Fabric(devices=1, accelerator="cpu", precision="32-true")
    ids = torch.randint(0, 500, (1, 24))
    with torch.inference_mode():
        plain = load_model(fabric, small_checkpoint).eval()(ids)
        nf4 = load_model(fabric, small_checkpoint, quantize="bnb.nf4").eval()(ids)
    assert (plain - nf4).abs().max() > 0  # 4 bits are not float32
    # ...but the same model: the logits point the same way (a random tiny model's weights quantize coarsely)
    assert torch.nn.functional.cosine_similarity(plain.flatten(), nf4.flatten(), dim=0) > 0.95


def test_finetune_with_nf4_trains_saves_resumes_and_the_adapter_loads_on_both_bases(small_checkpoint, alpaca64,
                                                                                    tmp_path, capsys):
    out = tmp_path / "run"
    flags = finetune_argv(small_checkpoint, alpaca64, out, "--max_steps", "6", "--micro_batch_size", "2", "--batch_size",
                          "4", "--eval_interval", "3", "--eval_iters", "1", "--learning_rate", "0.01",
                          "--save_interval", "3", "--quantize", "bnb.nf4")
    assert run_main(capsys, *flags).returncode == 0
    losses = [float(r["train_loss"]) for r in read_metrics(out)]
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2])
    assert yaml.safe_load((out / "hyperparameters.yaml").read_text())["quantize"] == "bnb.nf4"
    adapter = torch.load(out / "lit_model_adapter_finetuned.pth", weights_only=True)
    assert adapter and all(v.dtype == torch.float32 for v in adapter.values())

    # a resumed run keeps its --quantize: another one is refused, naming the saved flag
    other = [f if f != "bnb.nf4" else "bnb.fp4" for f in flags] + ["--resume", str(out / "step-000003")]
    line = one_error_line(run_main(capsys, *other), "quantize")
    assert "--quantize bnb.nf4" in line
    assert run_main(capsys, *flags, "--resume", str(out / "step-000003")).returncode == 0

    answers = {}
    for quantize in ([], ["--quantize", "bnb.nf4"]):
        result = run_main(capsys, "generate", "--prompt", "Name a color.", "--checkpoint_dir", small_checkpoint,
                          "--adapter_path", out, "--max_new_tokens", "4", "--temperature", "0", *quantize)
        assert result.returncode == 0, result.stderr
        answers[bool(quantize)] = result.stdout
    result = run_main(capsys, "evaluate", "--checkpoint_dir", small_checkpoint, "--data_dir", alpaca64,
                      "--adapter_path", out, "--out_dir", tmp_path / "eval", "--max_new_tokens", "2",
                      "--quantize", "bnb.nf4")
    assert result.returncode == 0, result.stderr
    import json

    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["quantize"] == "bnb.nf4"


def test_quantize_on_several_devices_or_with_named_serve_adapters_is_one_line(small_checkpoint, alpaca64, tmp_path,
                                                                              capsys):
    result = run_main(capsys, *finetune_argv(small_checkpoint, alpaca64, tmp_path / "r", "--devices", "2", "--quantize",
                                             "bnb.nf4", method="lora"))
    one_error_line(result, "--quantize bnb.nf4", "--devices 1")
    assert not (tmp_path / "r").exists()
    result = run_main(capsys, "serve", "--checkpoint_dir", small_checkpoint, "--adapter", f"a={tmp_path}",
                      "--quantize", "bnb.nf4")
    one_error_line(result, "--quantize bnb.nf4", "--adapter_path")
    assert main(["generate", "--prompt", "x", "--checkpoint_dir", str(small_checkpoint), "--quantize", "bnb.nf8"]) == 2


def test_serve_with_an_nf4_base_answers_as_generate_does(small_checkpoint):
    """The real server (uvicorn, OpenAI's client) on an NF4 base: its greedy answer is `littune generate
    --quantize bnb.nf4 --temperature 0`'s."""
    from serving import MAX_TOKENS, chat, client_for, in_process_server

    from littune.generate import generate

    expected = generate(prompt="Name a color.", checkpoint_dir=small_checkpoint, temperature=0,
                        max_new_tokens=MAX_TOKENS, quantize="bnb.nf4")[0]
    with in_process_server(small_checkpoint, quantize="bnb.nf4") as (base, service):
        module = next(iter(service.models.values())).served.module
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in module.modules())
        assert chat(client_for(base, "anything"), "Name a color.")[0] == expected


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="/proc/self/smaps: Linux")
def test_pages_of_the_mapped_file_leave_the_resident_set_once_read_and_read_back_the_same(tmp_path):
    """A 7B NF4 step's RSS was 7.6 GB of lit_model.pth's pages, read once to quantize; released, they are not."""
    from littune.quantize import file_backed_ranges, release_pages

    torch.save({"w": torch.arange(4 * 2**20, dtype=torch.float32)}, tmp_path / "lit_model.pth")  # 16 MB
    w = torch.load(tmp_path / "lit_model.pth", mmap=True, weights_only=True)["w"]

    def resident_kb():  # of the file's mappings, as the kernel counts them
        kb, inside = 0, False
        for line in open("/proc/self/smaps", encoding="utf-8"):
            if "-" in line.split(" ", 1)[0] and len(line.split()) >= 5:  # a mapping's header line
                inside = line.rstrip().endswith(str(tmp_path / "lit_model.pth"))
            elif inside and line.startswith("Rss:"):
                kb += int(line.split()[1])
        return kb

    expected = float(w.double().sum())  # reads every page
    before = resident_kb()
    release_pages(w, file_backed_ranges())
    after = resident_kb()
    assert before >= 15_000 and after <= 1_000, (before, after)
    assert float(w.double().sum()) == expected  # faulted in from the file again
    anonymous = torch.arange(2**20, dtype=torch.float32)
    release_pages(anonymous, file_backed_ranges())  # ordinary memory: untouched
    assert torch.equal(anonymous, torch.arange(2**20, dtype=torch.float32))


@pytest.mark.parametrize("quantize", ["bnb.nf4", "bnb.fp4-dq"])
def test_quantizing_a_slice_of_rows_at_a_time_gives_bitsandbytes_own_bytes(quantize, monkeypatch):
    from littune import quantize as q

    monkeypatch.setattr(q, "CHUNK_ELEMENTS", 3 * 128)  # slices of 3 rows of 128 values
    linear = torch.nn.Linear(128, 10, bias=False)
    ours = q.quantized_linear(linear, quantize, torch.float32, torch.device("cpu"), bnb, training=False)
    kind = quantize.removeprefix("bnb.").removesuffix("-dq")
    theirs = bnb.nn.Linear4bit(128, 10, bias=False, compute_dtype=torch.float32, quant_type=kind,
                               compress_statistics=quantize.endswith("-dq"))
    theirs.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, quant_type=kind,
                                      compress_statistics=quantize.endswith("-dq"), module=theirs)._quantize("cpu")
    assert torch.equal(ours.weight.data, theirs.weight.data)
    x = torch.randn(4, 128)
    assert torch.equal(ours(x), theirs(x))


def test_an_nf4_base_gives_the_logits_of_transformers_load_in_4bit(tmp_path):
    """The test oracle: transformers + bitsandbytes (BitsAndBytesConfig(load_in_4bit, nf4), which leaves the
    vocabulary projection unquantized, as littune does) on the same tiny Llama, float32 compute."""
    import lightning as L
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from conftest import make_hf_checkpoint, max_diff
    from littune.inputs import load_for_inference

    folder = tmp_path / "tiny-llama"
    make_hf_checkpoint(folder, "llama", intermediate_size=256)  # rows of 64 and 256 values: whole 64-value blocks
    assert main(["convert", "--checkpoint_dir", str(folder)]) == 0
    ids = torch.randint(0, 32000, (1, 24), generator=torch.Generator().manual_seed(0))
    theirs = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, device_map="cpu",
                                                  quantization_config=BitsAndBytesConfig(
                                                      load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_compute_dtype=torch.float32))
    for module in theirs.modules():  # the same kernel as littune's layers (its forward-only CPU one is off: SIGFPE)
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    fabric = L.Fabric(devices=1, accelerator="cpu", precision="32-true")
    ours, _, _ = load_for_inference(fabric, folder, quantize="bnb.nf4")
    assert type(ours.lm_head) is torch.nn.Linear  # kept in float, as transformers keeps it
    with torch.no_grad():
        assert max_diff(ours(ids), theirs(ids).logits) <= 1e-4


def test_a_quantized_layer_in_eval_mode_takes_an_empty_batch():
    """bitsandbytes' forward-only AVX512-BF16 kernel (which littune turns off) died of SIGFPE on zero rows: run in a
    subprocess, so that such a crash fails this test rather than the test process."""
    import subprocess
    import sys

    code = ("import torch, bitsandbytes as bnb\n"
            "from littune.quantize import quantized_linear\n"
            "for dtype in (torch.bfloat16, torch.float32):\n"
            "    layer = quantized_linear(torch.nn.Linear(576, 1536, bias=False), 'bnb.nf4', dtype,\n"
            "                             torch.device('cpu'), bnb, training=False).eval()\n"
            "    with torch.no_grad():\n"
            "        assert layer(torch.randn(4, 3, 576, dtype=dtype)).shape == (4, 3, 1536)\n"
            "        assert layer(torch.randn(0, 5, 576, dtype=dtype)).shape == (0, 5, 1536)\n"
            "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, (result.returncode, result.stderr[-500:])
