"""`littune finetune adapter_v2`: the training loop, driven through the CLI on a tiny GPT-NeoX and real Alpaca data."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import (ALPACA_335, assert_clean_error, finetune_argv, make_hf_checkpoint, max_difference,
                      one_error_line, read_metrics, run_cli, run_main, small_vocab_checkpoint)
from littune.cli import main
from littune.finetune.schedule import learning_rate_at, plan_epoch
from littune.methods.adapter_v2 import METHOD

ADAPTER_FILE = METHOD.adapter_file


@pytest.fixture
def checkpoint(small_checkpoint) -> Path:
    return small_checkpoint


@pytest.fixture
def alpaca_data(alpaca64) -> Path:
    return alpaca64


QUICK = ["--eval_interval", "1000", "--eval_iters", "1", "--save_interval", "1000"]  # no evaluation, no states


def finetune(checkpoint, data, out_dir, *flags) -> dict:
    assert main(finetune_argv(checkpoint, data, out_dir, *QUICK, *flags)) == 0
    return torch.load(out_dir / ADAPTER_FILE, weights_only=True)


def init_adapter(checkpoint: Path) -> dict:
    model = adapter_model(checkpoint)
    return {k: v for k, v in model.state_dict().items() if METHOD.is_trainable(k)}


def base_state(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "lit_model.pth", weights_only=True)


def adapter_model(checkpoint: Path, adapter: dict | None = None):
    from littune.checkpoints import load_model_config

    torch.manual_seed(0)
    model = METHOD.build_model(load_model_config(checkpoint), METHOD.args())
    model.load_state_dict(base_state(checkpoint), strict=False)
    if adapter is not None:
        model.load_state_dict(adapter, strict=False)
    METHOD.before_forward(model)
    return model.eval()


# ----------------------------------------------------------------------------------------------- the model


def test_adapter_model_at_init_gives_base_logits_exactly(checkpoint):
    from littune.checkpoints import load_model_config
    from litgpt import GPT

    base = GPT(load_model_config(checkpoint))
    base.load_state_dict(base_state(checkpoint))
    x = torch.randint(0, 500, (2, 33))
    with torch.no_grad():
        assert torch.equal(adapter_model(checkpoint)(x), base.eval()(x))


def test_every_trainable_parameter_gets_a_gradient_on_every_step(checkpoint):
    """litgpt caches the adapter prefix K/V in training too; littune clears it before each forward."""
    model = adapter_model(checkpoint).train()
    for name, p in model.named_parameters():
        p.requires_grad = METHOD.is_trainable(name)
    with torch.no_grad():  # a gate > 0 so the prefix matters, as after a first optimizer step
        for name, p in model.named_parameters():
            if "gating_factor" in name:
                p.fill_(0.5)
        METHOD.before_forward(model)
        model(torch.randint(0, 500, (1, 8)))  # a no-grad pass fills litgpt's cache
    x = torch.randint(0, 500, (2, 16))
    for _ in range(2):  # the second backward fails if the cache survives
        METHOD.before_forward(model)
        model(x).sum().backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("adapter_wte" in n for n in trainable)
    no_grad = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


# --------------------------------------------------------------------------------------------- training runs


def test_training_moves_only_adapter_weights_and_loss_falls(checkpoint, alpaca_data, tmp_path):
    out = tmp_path / "run"
    adapter = finetune(checkpoint, alpaca_data, out, "--max_steps", 12, "--batch_size", 4,
                       "--micro_batch_size", 4, "--learning_rate", 0.1, "--warmup_steps", 2, "--seed", 7,
                       "--lr_schedule", "constant", "--eval_interval", 6, "--eval_iters", 2)
    # only the trainable parameters are saved, and every one of them moved
    init = dict(adapter_model(checkpoint).named_parameters())
    assert set(adapter) == {n for n in init if METHOD.is_trainable(n)}
    assert [n for n, v in adapter.items() if torch.equal(v, init[n].detach())] == []
    # training loss falls clearly on real records, validation loss is logged at the eval steps
    rows = read_metrics(out)
    losses = [float(r["train_loss"]) for r in rows]
    assert len(rows) == 12 and [int(r["step"]) for r in rows] == list(range(1, 13))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    vals = [float(r["val_loss"]) for r in rows if r["val_loss"]]
    assert len(vals) == 2 and vals[1] < vals[0]
    assert (out / "hyperparameters.yaml").is_file() and (out / "prompt_style.yaml").is_file()
    assert yaml.safe_load((out / "hyperparameters.yaml").read_text())["method"] == "adapter_v2"


def test_base_weights_unchanged_in_model_after_training(checkpoint, alpaca_data, tmp_path):
    """Train in-process and compare the live model's frozen weights with the checkpoint, bit for bit."""
    from littune.finetune import loop

    captured = {}
    original = loop.save_weights

    def spy(fabric, model, method, folder, run_files, **kwargs):
        captured.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return original(fabric, model, method, folder, run_files, **kwargs)

    loop.save_weights = spy
    try:
        finetune(checkpoint, alpaca_data, tmp_path / "run", "--max_steps", 3, "--batch_size", 4,
                 "--micro_batch_size", 2, "--learning_rate", 1e-2, "--warmup_steps", 0)
    finally:
        loop.save_weights = original
    fresh = adapter_model(checkpoint).state_dict()  # the checkpoint's weights, under the adapter model's names
    frozen = [k for k in fresh if not METHOD.is_trainable(k)]
    assert frozen and set(captured) == set(fresh)
    assert [k for k in frozen if not torch.equal(captured[k], fresh[k])] == []
    assert [k for k in fresh if METHOD.is_trainable(k) and not torch.equal(captured[k], fresh[k])]  # adapters moved


def test_gradient_accumulation_equals_one_big_batch(checkpoint, alpaca_data, tmp_path):
    """8 records of different lengths: micro-batch 2 x 4 accumulation steps == micro-batch 8 x 1 (float32).

    Float rounding differs (other padding, other summation order); see max_difference for the one slice left out.
    Adam's normalised step also amplifies rounding where a gradient happens to be near eps, so differences scale
    with lr: one update at lr 1e-4 is held to 1e-6 (real updates are ~1e-4), three at lr 1e-3 to 1e-5."""
    train = torch.load(alpaca_data / "train.pt", weights_only=True)
    first_step = plan_epoch([len(r["input_ids"]) for r in train], 8, 2, 1, seed=3, epoch=0,
                            group_by_length=False)[0][0]
    assert len({len(train[i]["input_ids"]) for mb in first_step for i in mb}) >= 4
    for steps, lr, tolerance in ((1, 1e-4, 1e-6), (3, 1e-3, 1e-5)):
        common = ["--max_steps", steps, "--batch_size", 8, "--learning_rate", lr, "--warmup_steps", 0,
                  "--seed", 3, "--precision", "32-true", "--group_by_length", "false"]
        accumulated = finetune(checkpoint, alpaca_data, tmp_path / f"mb2-{steps}", *common, "--micro_batch_size", 2)
        one_batch = finetune(checkpoint, alpaca_data, tmp_path / f"mb8-{steps}", *common, "--micro_batch_size", 8)
        assert accumulated.keys() == one_batch.keys()
        worst = max_difference(accumulated, one_batch)
        assert worst <= tolerance, (steps, worst)
        losses_a = [float(r["train_loss"]) for r in read_metrics(tmp_path / f"mb2-{steps}")]
        losses_b = [float(r["train_loss"]) for r in read_metrics(tmp_path / f"mb8-{steps}")]
        assert losses_a == pytest.approx(losses_b, rel=1e-5)
    # the logged step loss is the mean over all target tokens of the step, not a mean of micro-batch means
    from littune.model import collate, count_targets, token_cross_entropy_sum

    model = adapter_model(checkpoint)
    with torch.no_grad():
        sums = [token_cross_entropy_sum(model(collate(train, mb, -100, "cpu")[0]), collate(train, mb, -100, "cpu")[1])
                for mb in first_step]
    counts = [count_targets(train, mb) for mb in first_step]
    token_mean = sum(sums).item() / sum(counts)
    mean_of_means = sum(s.item() / c for s, c in zip(sums, counts)) / len(counts)
    logged = float(read_metrics(tmp_path / "mb2-1")[0]["train_loss"])
    assert logged == pytest.approx(token_mean, rel=1e-5)
    assert abs(token_mean - mean_of_means) > 1e-4


def test_loss_of_target_positions_only_equals_the_full_logits_loss(checkpoint, alpaca_data):
    """forward_loss_sum projects only target positions onto the vocabulary when most are masked: same loss, same
    adapter gradients as the loss of the whole logits; with mostly unmasked labels it takes the whole logits."""
    from littune.model import collate, forward_loss_sum, token_cross_entropy_sum

    train = torch.load(alpaca_data / "train.pt", weights_only=True)
    model = adapter_model(checkpoint)
    trainable = [p for p in model.parameters() if p.requires_grad]
    input_ids, labels = collate(train, [0, 1, 2], -100, "cpu")
    masked = labels.clone()
    masked[:, : labels.size(1) - 3] = -100  # a few targets per row, as a classification record has
    masked[2] = -100  # and a row with none
    for case in (masked, input_ids.clone()):  # the second: every position a target
        results = []
        for loss_fn in (lambda: token_cross_entropy_sum(model(input_ids), case), lambda: forward_loss_sum(
                model, input_ids, case)):
            model.zero_grad()
            METHOD.before_forward(model)
            loss = loss_fn()
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in trainable]))
        (full, full_grads), (gathered, gathered_grads) = results
        assert gathered.item() == pytest.approx(full.item(), rel=1e-6)
        for a, b in zip(full_grads, gathered_grads):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)  # float32 sums in another order


def test_same_seed_same_adapter_other_seed_other_adapter(checkpoint, alpaca_data, tmp_path):
    flags = ["--max_steps", 2, "--batch_size", 4, "--micro_batch_size", 2, "--warmup_steps", 0]
    a = finetune(checkpoint, alpaca_data, tmp_path / "a", *flags, "--seed", 11)
    b = finetune(checkpoint, alpaca_data, tmp_path / "b", *flags, "--seed", 11)
    c = finetune(checkpoint, alpaca_data, tmp_path / "c", *flags, "--seed", 12)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_learning_rates_logged_follow_the_schedule(checkpoint, alpaca_data, tmp_path):
    finetune(checkpoint, alpaca_data, tmp_path / "run", "--max_steps", 6, "--batch_size", 2,
             "--micro_batch_size", 2, "--warmup_steps", 2, "--learning_rate", 0.01, "--lr_schedule", "cosine")
    logged = [float(r["learning_rate"]) for r in read_metrics(tmp_path / "run")]
    expected = [learning_rate_at(s, 0.01, 2, 6, "cosine") for s in range(1, 7)]
    assert logged == pytest.approx(expected, rel=1e-5)
    assert logged[0] == pytest.approx(0.005)


def test_weight_decay_and_clipping_take_effect(checkpoint, alpaca_data, tmp_path):
    flags = ["--max_steps", 3, "--batch_size", 2, "--micro_batch_size", 2, "--warmup_steps", 0, "--seed", 5,
             "--learning_rate", 0.05]
    plain = finetune(checkpoint, alpaca_data, tmp_path / "plain", *flags, "--weight_decay", 0, "--grad_clip", 0)
    decayed = finetune(checkpoint, alpaca_data, tmp_path / "wd", *flags, "--weight_decay", 5.0, "--grad_clip", 0)
    clipped = finetune(checkpoint, alpaca_data, tmp_path / "clip", *flags, "--weight_decay", 0,
                       "--grad_clip", 1e-4)
    wte = [k for k in plain if "adapter_wte" in k][0]
    # decoupled decay shrinks the embedding-like adapter prefix; scales and norms are not decayed
    assert decayed[wte].norm() < plain[wte].norm()
    # clipping the global norm to ~0 changes the updates (Adam normalises, but the first moments differ by step 2)
    assert not all(torch.equal(plain[k], clipped[k]) for k in plain)


def test_eval_and_save_intervals_write_step_folders(checkpoint, alpaca_data, tmp_path):
    out = tmp_path / "run"
    args = finetune_argv(checkpoint, alpaca_data, out, "--max_steps", "4", "--batch_size", "2", "--micro_batch_size",
                         "2", "--save_interval", "2", "--eval_interval", "2", "--eval_iters", "1")
    assert main(args) == 0
    assert (out / "step-000002" / ADAPTER_FILE).is_file()
    assert (out / ADAPTER_FILE).is_file()
    assert not list(out.rglob("*.tmp"))


# DDP (two CPU processes, gloo) against one process: tests/test_shared_prefix.py's DDP test, whose ranks also pack
# their micro-batches while the one process does not (one pair of runs checks both).


# ---------------------------------------------------------------------------------------------------- errors


def test_bad_input_gives_one_clear_line(checkpoint, alpaca_data, tmp_path, capsys):
    def run(*flags, data=alpaca_data, ckpt=checkpoint):
        argv = finetune_argv(ckpt, data, tmp_path / "out", "--max_steps", "1", *flags)
        return one_error_line(run_main(capsys, *argv), code=1, alone=True)

    empty = tmp_path / "empty"
    empty.mkdir()
    # one as a user runs it: a separate process, no traceback
    assert_clean_error(run_cli(*finetune_argv(checkpoint, empty, tmp_path / "out")), str(empty), "train.pt")
    assert "lit_model.pth" in run(ckpt=empty)
    err = run("--batch_size", "6", "--micro_batch_size", "4")
    assert "--batch_size 6" in err and "divisible" in err
    err = run("--precision", "16-mixed")
    assert "16-mixed" in err and "CUDA" in err

    # data prepared with another tokenizer (Falcon's) than the checkpoint's
    other = tmp_path / "falcon-tok"
    make_hf_checkpoint(other, "falcon")
    foreign = tmp_path / "foreign"
    source = tmp_path / "few.json"
    source.write_text(json.dumps(json.loads(ALPACA_335.read_text())[:20]))
    assert main(["prepare", "--data_file", str(source), "--checkpoint_dir", str(other),
                 "--destination_path", str(foreign), "--test_size", "4"]) == 0
    err = run(data=foreign)
    assert "another tokenizer" in err and "littune prepare" in err

    # records longer than the model's block size: the same tokenizer, a model with a 64-token context
    short_context = small_vocab_checkpoint(tmp_path / "short-context", block_size=64)
    assert "block size 64" in run(ckpt=short_context)
    assert not (tmp_path / "out" / ADAPTER_FILE).exists()


def test_an_out_dir_with_another_run_is_refused_unless_overwrite_or_resume(checkpoint, alpaca_data, tmp_path,
                                                                         capsys):
    out = tmp_path / "run"
    flags = ["--max_steps", 2, "--batch_size", 4, "--micro_batch_size", 4, "--warmup_steps", 0]
    args = finetune_argv(checkpoint, alpaca_data, out, "--eval_interval", "1", "--eval_iters", "1", "--save_interval",
                         "1", *flags)
    assert main(args) == 0
    (out / "eval").mkdir()
    (out / "eval" / "metrics.json").write_text("{}")
    (out / "notes.txt").write_text("mine")  # a file of the user's
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    one_error_line(run_main(capsys, *args), "holds another run", "--overwrite", "--resume auto", code=1, alone=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing touched
    assert main([*args, "--max_steps", "1", "--overwrite", "true"]) == 0
    assert sorted(p.name for p in out.glob("step-*")) == ["step-000001"]  # the old run's step 2 is gone
    assert not (out / "eval").exists() and (out / "notes.txt").read_text() == "mine"
    assert [r["step"] for r in read_metrics(out)] == ["1"]
