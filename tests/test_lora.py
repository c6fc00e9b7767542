"""`littune finetune lora`: litgpt's LoRA on the one shared loop, driven through the CLI on the tiny GPT-NeoX and real
Alpaca records (conftest's `small_checkpoint` / `alpaca64`)."""

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import FSDPLikeFabric, finetune_argv, one_error_line, read_metrics, run_main
from littune.cli import main
from littune.methods.lora import METHOD, TARGETS

ADAPTER_FILE = METHOD.adapter_file
ALL_TARGETS = "[" + ", ".join(TARGETS) + "]"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def finetune(checkpoint, data, out_dir, *flags) -> dict:
    argv = finetune_argv(checkpoint, data, out_dir, "--eval_iters", "1", "--micro_batch_size", "4", "--batch_size",
                         "4", *flags, method="lora")
    assert main(argv) == 0
    return torch.load(out_dir / ADAPTER_FILE, weights_only=True)


def lora_model(checkpoint: Path, targets=TARGETS, seed: int = 0):
    """The LoRA model with the checkpoint's base weights (litgpt renames them while loading)."""
    from littune.checkpoints import load_model_config

    torch.manual_seed(seed)
    model = METHOD.build_model(load_model_config(checkpoint), METHOD.args(lora_targets=list(targets)))
    missing, unexpected = model.load_state_dict(torch.load(checkpoint / "lit_model.pth", weights_only=True),
                                                strict=False)
    assert unexpected == [] and all(METHOD.is_trainable(k) for k in missing)
    return model


@pytest.fixture(scope="module")
def run(small_checkpoint, alpaca64, tmp_path_factory) -> Path:
    """Two steps on every target, evaluated and saved after each step."""
    out = tmp_path_factory.mktemp("lora") / "run"
    finetune(small_checkpoint, alpaca64, out, "--max_steps", 2, "--warmup_steps", 0, "--weight_decay", 0,
             "--learning_rate", 0.01, "--eval_interval", 1, "--save_interval", 1, "--lora_targets", ALL_TARGETS)
    return out


# ----------------------------------------------------------------------------------------------------- tests


def test_every_trainable_parameter_gets_a_gradient(small_checkpoint):
    """With B non-zero (after a first step) every A and B of every target gets a gradient; nothing else does."""
    model = lora_model(small_checkpoint).train()
    for name, p in model.named_parameters():
        p.requires_grad = METHOD.is_trainable(name)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.02)
    model(torch.randint(0, 500, (2, 16))).sum().backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # every target: qkv (query, key, value), attention projection, both MLP matrices, the head
    assert {n.rsplit(".", 2)[-2] for n in trainable} == {"qkv", "proj", "fc", "lm_head"}
    assert [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0] == []
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_lora_run_saves_only_lora_weights_and_every_one_moves(run, small_checkpoint):
    import lightning as L

    from littune.checkpoints import load_model_config

    adapter = torch.load(run / ADAPTER_FILE, weights_only=True)
    # the loop's initialisation: the same seed, then the model built the same way
    L.seed_everything(1337, verbose=False)
    init = {k: v for k, v in METHOD.build_model(load_model_config(small_checkpoint),
                                                METHOD.args(lora_targets=list(TARGETS))).state_dict().items()
            if METHOD.is_trainable(k)}
    assert set(adapter) == set(init) and all(k.endswith(("lora_A", "lora_B")) for k in adapter)
    # B starts at 0 (A gets no gradient in step 1); after step 2 every tensor moved (no weight decay here)
    assert all(not init[k].any() for k in init if k.endswith("lora_B"))
    assert [k for k in adapter if torch.equal(adapter[k], init[k])] == []
    hparams = yaml.safe_load((run / "hyperparameters.yaml").read_text())
    assert hparams["method"] == "lora" and hparams["lora_targets"] == list(TARGETS)
    assert (hparams["lora_r"], hparams["lora_alpha"], hparams["lora_dropout"]) == (8, 16, 0.0)
    assert [int(r["step"]) for r in read_metrics(run)] == [1, 2]
    assert (run / "best" / ADAPTER_FILE).is_file() and (run / "step-000001" / "training_state.pt").is_file()
    assert (run / "prompt_style.yaml").is_file()


def test_resume_continues_the_same_run_bit_for_bit(run, small_checkpoint, alpaca64, tmp_path):
    """From the step-1 state (dropout's RNG included), step 2 gives the uninterrupted run's LoRA weights."""
    resumed = tmp_path / "resumed"
    shutil.copytree(run / "step-000001", resumed / "step-000001")
    again = finetune(small_checkpoint, alpaca64, resumed, "--max_steps", 2, "--warmup_steps", 0, "--weight_decay", 0,
                     "--learning_rate", 0.01, "--eval_interval", 1, "--save_interval", 1, "--lora_targets",
                     ALL_TARGETS, "--resume", "auto")
    final = torch.load(run / ADAPTER_FILE, weights_only=True)
    assert all(torch.equal(again[k], final[k]) for k in final)
    # the resumed folder's metrics.csv starts at step 2 (metrics.csv of step 1 was not copied)
    assert [r["train_loss"] for r in read_metrics(resumed)] == [read_metrics(run)[1]["train_loss"]]


def greedy_answer(model, checkpoint: Path, style, prompt: str, max_new_tokens: int) -> str:
    """The greedy answer by the model's full forward (no KV cache), the prompt formatted and tokenised as littune
    does, stopping at EOS."""
    from litgpt import Tokenizer

    from littune.prepared import encode

    tokenizer = Tokenizer(checkpoint)
    ids, new = encode(tokenizer, style.apply(prompt)), []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            token = int(model(torch.cat([ids, torch.tensor(new, dtype=torch.int64)])[None])[0, -1].argmax())
            if token == tokenizer.eos_id:
                break
            new.append(token)
    return tokenizer.decode(torch.tensor(new))


def test_generate_loads_the_lora_run(run, small_checkpoint, capsys):
    """`littune generate --adapter_path RUN` answers with the trained LoRA: as the LoRA model built here with the
    run's weights answers, and not as the base model does for the same prompt in the same (the run's) style."""
    from littune.generate import generate
    from littune.prompts import load_style_file

    prompt, common = "Name a color.", ["--checkpoint_dir", small_checkpoint, "--max_new_tokens", 3, "--temperature", 0,
                                       "--precision", "32-true"]
    tuned = run_main(capsys, "generate", "--prompt", prompt, "--adapter_path", run, *common)
    base = run_main(capsys, "generate", "--prompt", prompt, "--prompt_style", "alpaca", *common)
    assert tuned.returncode == 0 and base.returncode == 0, tuned.stderr + base.stderr
    answer = tuned.stdout.removesuffix("\n")  # generate ends each answer with a newline
    assert answer and answer != base.stdout.removesuffix("\n"), (tuned.stdout, base.stdout)

    # the reference: the LoRA model with the checkpoint's base weights and the run's LoRA weights, in the run's style
    style = load_style_file(run)
    assert type(style).__name__ == "Alpaca"
    model = lora_model(small_checkpoint)
    missing, unexpected = model.load_state_dict(torch.load(run / ADAPTER_FILE, weights_only=True), strict=False)
    assert unexpected == [] and not [k for k in missing if METHOD.is_trainable(k)]
    assert answer == greedy_answer(model.eval(), small_checkpoint, style, prompt, 3)
    # the Python API gives the command's answer
    capsys.readouterr()
    assert generate(prompt, small_checkpoint, adapter_path=run, max_new_tokens=3, temperature=0,
                    precision="32-true") == [answer]


def test_fsdp_load_order_every_base_weight_equals_the_checkpoint(small_checkpoint):
    """Under FSDP the model is built on the meta device and materialised with random values before the weights are
    loaded; litgpt's LoRA model renames the base weights (qkv.weight -> qkv.linear.weight) while loading."""
    from littune.model import load_model

    model = load_model(FSDPLikeFabric(), small_checkpoint, METHOD, METHOD.args(lora_targets=list(TARGETS)),
                       trainable=True, sharded=True)
    state = model.state_dict()
    checkpoint = torch.load(small_checkpoint / "lit_model.pth", weights_only=True)
    for name, value in checkpoint.items():
        ours = state.get(name, state.get(name.rsplit(".", 1)[0] + ".linear." + name.rsplit(".", 1)[1]))
        assert ours is not None and torch.equal(ours, value), name


def test_bad_lora_flags_give_one_line(small_checkpoint, alpaca64, tmp_path, capsys):
    for flags, fragment in ((["--lora_targets", "[]"], "--lora_targets is empty"),
                            (["--lora_r", "0"], "--lora_r 0: must be >= 1"),
                            (["--lora_dropout", "1.0"], "--lora_dropout 1.0: must be >= 0 and < 1")):
        result = run_main(capsys, *finetune_argv(small_checkpoint, alpaca64, tmp_path / "out", *flags, method="lora"))
        one_error_line(result, fragment, code=1, alone=True)
    assert not (tmp_path / "out").exists()
