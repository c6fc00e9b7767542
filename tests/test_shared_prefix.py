"""Shared-prefix training (`littune.finetune.prefix`): the loss and every trainable gradient equal the plain
forward's; the real loop with it on and off trains the same weights, alone and under DDP; a resumed run keeps it.

Driven on the tiny GPT-NeoX (conftest's `small_checkpoint`) and real SST-2 sentences prepared as a label task: every
prompt starts with the same template and instruction (~107 of its 512-token BPE's tokens), then its own sentence."""

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from conftest import SST2_TRAIN, finetune_argv, max_difference, one_error_line, read_metrics, run_main
from littune.cli import main
from littune.finetune import prefix as prefix_module
from littune.finetune.prefix import packed_batch, packed_loss_sum, shared_prefix_length, sharing_pays
from littune.finetune.state import STATE_FILE
from littune.methods import get_method
from littune.model import collate, forward_loss_sum

COLUMNS = json.dumps({"instruction": "=Is the sentiment of this review positive or negative?", "input": "text",
                      "output": "label"})
VALUES = json.dumps({"1": "positive", "0": "negative"})

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sst2(small_checkpoint, tmp_path_factory) -> dict:
    """64 SST-2 sentences (48 training), prepared with masked prompts (as a label task is by default) and without."""
    folder = tmp_path_factory.mktemp("sst2")
    lines = SST2_TRAIN.read_text(encoding="utf-8").splitlines(keepends=True)[:65]
    (folder / "sst2.tsv").write_text("".join(lines), encoding="utf-8")
    prepared = {}
    for prompts, mask in (("masked", "true"), ("unmasked", "false")):
        prepared[prompts] = folder / prompts
        assert main(["prepare", "--data_file", str(folder / "sst2.tsv"), "--checkpoint_dir", str(small_checkpoint),
                     "--destination_path", str(prepared[prompts]), "--test_size", "8", "--val_size", "8",
                     "--mask_inputs", mask, "--columns", COLUMNS, "--output_values", VALUES]) == 0
    return prepared


def records(sst2: dict, prompts: str) -> list:
    return torch.load(sst2[prompts] / "train.pt", weights_only=True)


def trained_model(checkpoint: Path, method_name: str):
    """The method's model on the checkpoint's base weights, its trainable parameters moved off their
    initialisation (adapter_v2's gates and LoRA's B start at 0, which would leave parts of the gradient 0)."""
    from littune.checkpoints import load_model_config

    method = get_method(method_name)
    method_args = method.args(lora_dropout=0.0, lora_targets=["query", "key", "value", "mlp"]) \
        if method_name == "lora" else method.args()
    config = load_model_config(checkpoint)
    config.block_size = 512  # room for two whole records that share nothing, packed
    torch.manual_seed(0)
    model = method.build_model(config, method_args)
    model.load_state_dict(torch.load(checkpoint / "lit_model.pth", weights_only=True), strict=False)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.requires_grad = method.is_trainable(name)
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model.train(), method


def loss_and_gradients(model, method, compute) -> tuple:
    model.zero_grad(set_to_none=True)
    method.before_forward(model)
    loss = compute()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_close_to(shared: tuple, plain: tuple) -> None:
    """max element-wise |difference| <= 1e-5 x max |value|, for the loss and every trainable gradient."""
    assert shared[0].item() == pytest.approx(plain[0].item(), rel=1e-5)
    assert shared[1].keys() == plain[1].keys()
    for name, expected in plain[1].items():
        worst = (shared[1][name] - expected).abs().max().item()
        assert worst <= 1e-5 * expected.abs().max().item(), (name, worst, expected.abs().max().item())


# ------------------------------------------------------------------------------------------ which tokens share


def test_shared_prefix_length_stops_before_the_first_difference_in_ids_or_labels(sst2):
    train = records(sst2, "unmasked")
    assert shared_prefix_length(train, [5, 5, 5]) == len(train[5]["input_ids"]) - 1  # each record keeps one token
    template = shared_prefix_length(train, [0, 1, 2, 3])  # the template and the instruction, at least
    assert 50 < template < min(len(train[i]["input_ids"]) for i in range(4)) - 1
    ids = torch.stack([train[i]["input_ids"][:template + 1] for i in range(4)])
    assert (ids == ids[0]).all()  # the last prefix position's target is common too
    assert shared_prefix_length(train, [0]) == 0  # one record: nothing to share

    edited = [dict(r) for r in train[:3]]
    edited[2]["input_ids"] = edited[2]["input_ids"].clone()
    edited[2]["input_ids"][0] += 1
    assert shared_prefix_length(edited, [0, 1, 2]) == 0  # no common first token
    edited[2]["input_ids"] = train[2]["input_ids"]
    edited[1]["labels"] = edited[1]["labels"].clone()
    edited[1]["labels"][11] = -100  # the same tokens, one label masked: shared only before it
    assert shared_prefix_length(edited, [0, 1, 2]) == 10


def test_sharing_pays_where_it_cuts_the_tokens_by_a_fifth_and_the_packed_attention_stays_small():
    """The cells of scripts/bench_shared_prefix.py's table (SmolLM2-135M's shape): packed where it ran faster."""
    assert sharing_pays(37, [59] * 4, 8192)  # SST-2 with the chat template: 1.72x measured
    assert sharing_pays(37, [59] * 8, 8192)  # 2.06x
    assert sharing_pays(16, [59] * 4, 8192)  # 1.13x
    assert sharing_pays(37, [120] * 4, 8192)  # 1.17x
    assert not sharing_pays(37, [59] * 4, 124)  # 125 packed tokens: more than the model takes
    assert not sharing_pays(37, [59], 8192)  # one record
    assert not sharing_pays(8, [59] * 4, 8192)  # 0.88x: too few tokens saved
    assert not sharing_pays(16, [120] * 8, 8192)  # 0.83x
    assert not sharing_pays(37, [120] * 8, 8192)  # 701 packed tokens: 1.06x
    assert not sharing_pays(16, [220] * 4, 8192)  # 0.81x
    assert sharing_pays(37, [40, 40, 59], 8192)  # packing also drops the padding the plain forward adds


# ------------------------------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("method_name", ["adapter_v2", "lora"])
@pytest.mark.parametrize("prompts", ["unmasked", "masked"])
def test_loss_and_every_gradient_equal_the_plain_forward(small_checkpoint, sst2, method_name, prompts):
    """float32, on micro-batches whose records share all their tokens but one, the template, a few tokens (any
    prefix length works; the loop packs only where `sharing_pays`) or none; of different lengths (the plain
    forward pads them, the packed sequence has no pads)."""
    model, method = trained_model(small_checkpoint, method_name)
    data = sorted(records(sst2, prompts), key=lambda r: len(r["input_ids"]))[:3]
    other = dict(data[1], input_ids=data[1]["input_ids"].clone(), labels=data[1]["labels"].clone())
    other["input_ids"][0] = (other["input_ids"][0] + 1) % 500
    other["labels"][0] = other["input_ids"][0] if prompts == "unmasked" else -100
    data.append(other)
    assert len({len(r["input_ids"]) for r in data[:3]}) > 1
    cases = {"all": ([0, 0, 0], [len(data[0]["input_ids"]) - 1]), "template": ([0, 1, 2], None),
             "few": ([0, 1], [1, 3]), "none": ([0, 3], [0])}
    cos = model.cos
    for case, (indices, prefixes) in cases.items():
        prefixes = prefixes or [shared_prefix_length(data, indices)]
        assert prefixes[0] == shared_prefix_length(data, indices) or case == "few", case
        input_ids, labels = collate(data, indices, -100, "cpu")
        plain = loss_and_gradients(model, method, lambda: forward_loss_sum(model, input_ids, labels))
        for prefix in prefixes:
            batch = packed_batch(data, indices, prefix, -100)
            for _ in range(2):  # twice: nothing of a step's graph may stay on the model
                shared = loss_and_gradients(model, method, lambda: packed_loss_sum(model, batch, -100,
                                                                                   method.before_forward))
                assert_close_to(shared, plain)
            assert all(block.attn.kv_cache is None for block in model.transformer.h) and model.mask_cache is None
            assert all(getattr(m, "adapter_kv_cache", None) is None for m in model.modules())
            assert model.cos is cos


# ------------------------------------------------------------------------------------------------ the real loop


def finetune_args(checkpoint, data, out_dir, *flags, method: str = "adapter_v2") -> list:
    """Short float32 runs in micro-batches of 2, no evaluation or saved state on the way."""
    return finetune_argv(checkpoint, data, out_dir, "--eval_interval", "1000", "--eval_iters", "1", "--save_interval",
                         "1000", "--precision", "32-true", "--micro_batch_size", "2", *flags, method=method)


def counting_packed_forwards(monkeypatch) -> dict:
    calls = {"packed": 0}
    original = prefix_module.packed_loss_sum

    def counted(*args, **kwargs):
        calls["packed"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(prefix_module, "packed_loss_sum", counted)
    return calls


def assert_same_run(a: Path, b: Path, adapter_file: str, tolerance: float) -> None:
    wa, wb = (torch.load(d / adapter_file, weights_only=True) for d in (a, b))
    assert wa.keys() == wb.keys()
    worst = max_difference(wa, wb)
    assert worst <= tolerance, worst
    la, lb = ([float(r["train_loss"]) for r in read_metrics(d)] for d in (a, b))
    assert la == pytest.approx(lb, rel=1e-5)


def test_finetune_with_shared_prefix_on_and_off_trains_the_same_weights(small_checkpoint, sst2, tmp_path,
                                                                         monkeypatch, capsys):
    """adapter_v2 (masked prompts) and LoRA with --lora_dropout 0 (unmasked), 3 steps of 2 micro-batches at lr
    1e-4: the same losses and weights to float32 rounding (Adam's normalised step amplifies it: 1e-5 after three
    updates, as in test_finetune's accumulation test). LoRA with dropout runs plain and its header says why."""
    flags = ["--max_steps", 3, "--batch_size", 4, "--warmup_steps", 0, "--seed", 4, "--learning_rate", 1e-4]
    calls = counting_packed_forwards(monkeypatch)
    for name, prompts, extra in (("adapter_v2", "masked", []),
                                 ("lora", "unmasked", ["--lora_dropout", 0, "--lora_targets", "[query, mlp]"])):
        capsys.readouterr()
        assert main(finetune_args(small_checkpoint, sst2[prompts], tmp_path / f"{name}-shared", *flags, *extra,
                                  method=name)) == 0
        assert "shared prefix: on" in capsys.readouterr().out
        assert calls["packed"] >= 3, calls  # micro-batches short enough for the tiny model's 256 positions
        packed = calls["packed"]
        assert main(finetune_args(small_checkpoint, sst2[prompts], tmp_path / f"{name}-plain", *flags, *extra,
                                  "--shared_prefix", "false", method=name)) == 0
        assert "shared prefix: off (--shared_prefix false)" in capsys.readouterr().out
        assert calls["packed"] == packed
        calls["packed"] = 0
        assert_same_run(tmp_path / f"{name}-shared", tmp_path / f"{name}-plain", get_method(name).adapter_file, 1e-5)
    assert main(finetune_args(small_checkpoint, sst2["masked"], tmp_path / "dropout", "--max_steps", 1,
                              "--batch_size", 4, "--lora_dropout", 0.05, method="lora")) == 0
    assert "shared prefix: off (--lora_dropout 0.05" in capsys.readouterr().out
    assert calls["packed"] == 0


def test_resume_is_bit_identical_and_keeps_the_setting(small_checkpoint, sst2, tmp_path, monkeypatch, capsys):
    """From a step-2 state, steps 3-4 of a packed run give the uninterrupted run's weights bit for bit; resuming
    with the other --shared_prefix is refused (it is part of the run's fingerprint)."""
    import shutil

    calls = counting_packed_forwards(monkeypatch)
    run, resumed = tmp_path / "run", tmp_path / "resumed"
    flags = ["--max_steps", 4, "--batch_size", 4, "--save_interval", 2, "--learning_rate", 0.01]
    assert main(finetune_args(small_checkpoint, sst2["masked"], run, *flags)) == 0
    assert calls["packed"] >= 2
    shutil.copytree(run / "step-000002", resumed / "step-000002")
    assert main(finetune_args(small_checkpoint, sst2["masked"], resumed, *flags, "--resume", "auto")) == 0
    adapter_file = get_method("adapter_v2").adapter_file
    final, again = (torch.load(d / adapter_file, weights_only=True) for d in (run, resumed))
    assert all(torch.equal(again[k], final[k]) for k in final)
    assert [r["train_loss"] for r in read_metrics(resumed)] == [r["train_loss"] for r in read_metrics(run)][2:]

    result = run_main(capsys, *finetune_args(small_checkpoint, sst2["masked"], resumed, *flags, "--shared_prefix",
                                             "false", "--resume", resumed / "step-000002"))
    one_error_line(result, "cannot resume", "shared_prefix", code=1)
    assert result.stderr.startswith("littune: error: "), result.stderr

    # a state saved before --shared_prefix existed trained on the plain path: it resumes as such, and the default
    # is refused with the flag to give
    state_file = resumed / "step-000002" / STATE_FILE
    state = torch.load(state_file, weights_only=True)
    del state["fingerprint"]["shared_prefix"]
    torch.save(state, state_file)
    assert main(finetune_args(small_checkpoint, sst2["masked"], resumed, *flags, "--resume",
                              str(resumed / "step-000002"))) == 1
    err = capsys.readouterr().err
    assert "shared_prefix: saved False vs now True" in err and "(--shared_prefix false)" in err, err
    assert main(finetune_args(small_checkpoint, sst2["masked"], resumed, *flags, "--shared_prefix", "false",
                              "--resume", str(resumed / "step-000002"))) == 0


# `littune ARGS`, printing at exit how many micro-batches this process packed (every DDP rank runs this script)
COUNTING = r"""
import atexit, os, sys
from littune.finetune import prefix

calls = [0]
packed_loss_sum = prefix.packed_loss_sum

def counted(*args, **kwargs):
    calls[0] += 1
    return packed_loss_sum(*args, **kwargs)

prefix.packed_loss_sum = counted
atexit.register(lambda: print(f"rank {os.environ.get('LOCAL_RANK', '0')} packed {calls[0]}", flush=True))
from littune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ddp_two_processes_sharing_equal_one_process_without(small_checkpoint, sst2, tmp_path):
    """Two CPU processes (gloo) with the same global batch, each packing its micro-batches through DDP's forward,
    give the adapter, losses and validation losses of one process that packs nothing (float32; tolerance 1e-6 after
    one update at lr 1e-4, 1e-5 after three: Adam's normalised step amplifies rounding, see test_finetune's
    accumulation test and max_difference)."""
    import subprocess
    import sys

    flags = ["--max_steps", 3, "--batch_size", 4, "--warmup_steps", 0, "--seed", 9, "--learning_rate", 1e-4,
             "--save_interval", 1, "--eval_interval", 3, "--eval_iters", 2]
    data = sst2["masked"]
    script = tmp_path / "counting.py"
    script.write_text(COUNTING)
    ddp = subprocess.run([sys.executable, str(script), *finetune_args(small_checkpoint, data, tmp_path / "ddp", *flags,
                                                                      "--devices", 2, "--strategy", "ddp")],
                         capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert "shared prefix: on" in ddp.stdout
    packed = {rank: int(n) for rank, n in re.findall(r"rank (\d+) packed (\d+)", ddp.stdout)}  # lines may interleave
    assert packed.keys() == {"0", "1"} and min(packed.values()) >= 1, ddp.stdout[-2000:]
    assert main(finetune_args(small_checkpoint, data, tmp_path / "one", *flags, "--shared_prefix", "false")) == 0
    adapter_file = get_method("adapter_v2").adapter_file
    first = [torch.load(d / "step-000001" / adapter_file, weights_only=True) for d in (tmp_path / "ddp",
                                                                                         tmp_path / "one")]
    assert max_difference(*first) <= 1e-6
    assert_same_run(tmp_path / "ddp", tmp_path / "one", adapter_file, 1e-5)
    losses = [[float(r["train_loss"]) for r in read_metrics(d)] for d in (tmp_path / "ddp", tmp_path / "one")]
    assert len(losses[0]) == 3
    val = [[float(r["val_loss"]) for r in read_metrics(d) if r["val_loss"]] for d in (tmp_path / "ddp", tmp_path / "one")]
    assert len(val[0]) == 1 and val[0] == pytest.approx(val[1], rel=1e-5)


# ------------------------------------------------------------------------------------ the default micro-batch


def common_prefix(data: list) -> int:
    """The (input id, label) pairs every record begins with, less one: written out here as the rule's reference."""
    n = 0
    while all(len(r["input_ids"]) > n + 1 for r in data) and \
            len({(int(r["input_ids"][n]), int(r["labels"][n])) for r in data}) == 1:
        n += 1
    return max(n - 1, 0)


@pytest.mark.parametrize("packs, records, devices, micro, batch, expected", [
    (True, 1900, 1, None, None, (8, 16)),      # SST-2 in the accuracy benchmark
    (True, 100_000, 1, None, None, (8, 64)),
    (True, 1900, 2, None, None, (8, 16)),      # 8 per device, 2 devices: one micro-batch each a step
    (True, 100, 1, None, None, (4, 4)),        # a batch of 4 holds no micro-batch of 8: as before
    (True, 1900, 1, None, 12, (4, 12)),        # nor does a given batch of 12
    (True, 1900, 1, 2, None, (2, 18)),         # a given micro-batch wins (19 records a step, in whole 2s)
    (False, 1900, 1, None, None, (4, 16)),     # records that share little: 4, as before
])
def test_the_default_micro_batch_follows_the_data(packs, records, devices, micro, batch, expected):
    from littune.finetune.args import TrainArgs, resolve_defaults

    args = TrainArgs(checkpoint_dir=Path("c"), data_dir=Path("d"), devices=devices, micro_batch_size=micro,
                     batch_size=batch)
    resolved = resolve_defaults(args, "adapter_v2", records, "32-true", label_task=True, eight_pack_small=packs)
    assert (resolved.micro_batch_size, resolved.batch_size) == expected


def test_eight_records_pack_small_on_a_label_task_not_on_instructions(small_checkpoint, sst2, alpaca64, tmp_path,
                                                                       capsys):
    """SST-2 sentences after one instruction: 8 records with their prefix once hold no more tokens than 4 whole,
    so `littune finetune` with no --micro_batch_size trains in micro-batches of 8; Alpaca's varied instructions:
    4, as before."""
    from littune.finetune.prefix import eight_pack_small

    for data, packs in ((sst2["masked"], True), (alpaca64, False)):
        train = torch.load(data / "train.pt", weights_only=True)
        prefix, mean = common_prefix(train), sum(len(r["input_ids"]) for r in train) / len(train)
        assert (prefix + 8 * (mean - prefix) <= 4 * mean) is packs, (prefix, mean)
        assert eight_pack_small(train) is packs
        capsys.readouterr()
        out = tmp_path / data.name
        assert main(finetune_argv(small_checkpoint, data, out, "--max_steps", "1", "--batch_size", "8", "--eval_iters",
                                  "1", "--precision", "32-true")) == 0
        micro = 8 if packs else 4
        assert f"micro-batches of {micro} " in capsys.readouterr().out
        assert yaml.safe_load((out / "hyperparameters.yaml").read_text())["micro_batch_size"] == micro
    # --shared_prefix false: nothing runs packed, so 4
    assert main(finetune_argv(small_checkpoint, sst2["masked"], tmp_path / "plain", "--max_steps", "1", "--batch_size",
                              "8", "--eval_iters", "1", "--precision", "32-true", "--shared_prefix", "false")) == 0
    assert yaml.safe_load((tmp_path / "plain" / "hyperparameters.yaml").read_text())["micro_batch_size"] == 4
