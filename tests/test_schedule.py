"""`littune.finetune.schedule`: which records each optimizer step trains on (seeded, resumable, dealt to the ranks),
the learning rate at a step, and the optimizer's parameter groups."""

import math
import random

import pytest
import torch

from littune.finetune.schedule import learning_rate_at, make_optimizer, plan_epoch, steps_from


def lengths_of(n: int, longest: int, seed: int) -> list:
    rng = random.Random(seed)
    return [rng.randint(1, longest) for _ in range(n)]


def records_of(step: list) -> list:
    """Every record index of one step, all ranks, in dealing order."""
    return [i for rank in step for mb in rank for i in mb]


def padding(plan: list, lengths: list) -> int:
    """Pad tokens of a plan: each micro-batch is padded to its longest record."""
    return sum(max(lengths[i] for i in mb) * len(mb) - sum(lengths[i] for i in mb)
               for step in plan for rank in step for mb in rank)


# ------------------------------------------------------------------------------------------------ plan_epoch


def test_plan_epoch_sees_every_record_once_and_is_seeded():
    lengths = list(range(37))
    plan = plan_epoch(lengths, batch_size=8, micro_batch_size=2, world_size=2, seed=1, epoch=0)
    seen = [i for step in plan for rank in step for mb in rank for i in mb]
    assert sorted(seen) == list(range(37))
    assert all(len(mb) <= 2 for step in plan for rank in step for mb in rank)
    assert plan == plan_epoch(lengths, 8, 2, 2, seed=1, epoch=0)
    assert plan != plan_epoch(lengths, 8, 2, 2, seed=1, epoch=1)
    assert plan != plan_epoch(lengths, 8, 2, 2, seed=2, epoch=0)


@pytest.mark.parametrize("group_by_length", [True, False])
def test_plan_epoch_deals_disjoint_equal_shares_to_the_ranks(group_by_length):
    """batch_size is a multiple of micro_batch_size x world_size (the CLI checks it): every full step gives each
    rank the same number of micro-batches of micro_batch_size records, no record on two ranks; the one short step
    (the last before group_by_length shuffles the steps) holds the remaining records, dealt in turn (the loop lets
    a rank with fewer repeat one at weight 0)."""
    lengths = lengths_of(53, 90, seed=3)
    plan = plan_epoch(lengths, batch_size=8, micro_batch_size=2, world_size=2, seed=5, epoch=2,
                      group_by_length=group_by_length)
    assert len(plan) == math.ceil(53 / 8)
    assert all(len(step) == 2 for step in plan)  # one list of micro-batches per rank
    full = [step for step in plan if len(records_of(step)) == 8]
    short = [step for step in plan if len(records_of(step)) != 8]
    assert len(full) == 6 and len(short) == 1
    if not group_by_length:
        assert short[0] is plan[-1]
    for step in full:
        assert [len(rank) for rank in step] == [2, 2]
        assert all(len(mb) == 2 for rank in step for mb in rank)
    for step in plan:
        rank0, rank1 = ({i for mb in rank for i in mb} for rank in step)
        assert rank0 and not rank0 & rank1
    # 53 = 6 x 8 + 5: micro-batches of 2, 2, 1 dealt to rank 0, rank 1, rank 0
    assert [[len(mb) for mb in rank] for rank in short[0]] == [[2, 1], [2]]
    assert sorted(i for step in plan for i in records_of(step)) == list(range(53))


@pytest.mark.parametrize("group_by_length", [True, False])
def test_the_steps_hold_the_same_records_whatever_the_number_of_ranks(group_by_length):
    """The world size only deals a step's micro-batches: one device and four see the same records per step, in
    the same order of steps (batch_size is the global batch)."""
    lengths = lengths_of(100, 300, seed=1)
    one = plan_epoch(lengths, 16, 2, 1, seed=9, epoch=1, group_by_length=group_by_length)
    four = plan_epoch(lengths, 16, 2, 4, seed=9, epoch=1, group_by_length=group_by_length)
    assert [sorted(records_of(s)) for s in one] == [sorted(records_of(s)) for s in four]
    assert all(len(rank) == 2 for step in four[:-1] for rank in step)  # 16 = 2 micro-batches x 2 records x 4 ranks


def test_group_by_length_sorts_within_steps_and_shuffles_the_steps():
    """Within one pool (here the whole epoch: fewer than 64 steps' worth of records) the steps are consecutive runs
    of the records sorted by length, so their length ranges do not overlap; the steps' order is random."""
    lengths = random.Random(0).sample(range(1, 10_000), 120)  # distinct lengths
    plan = plan_epoch(lengths, batch_size=8, micro_batch_size=4, world_size=1, seed=4, epoch=0)
    ranges = [(min(lengths[i] for i in records_of(s)), max(lengths[i] for i in records_of(s))) for s in plan]
    ordered = sorted(ranges)
    assert all(a[1] < b[0] for a, b in zip(ordered, ordered[1:]))  # disjoint length intervals
    assert ranges != ordered  # the steps are shuffled, not shortest first
    for step in plan:  # a micro-batch is a contiguous slice of its step's sorted records
        micro_batches = step[0]
        assert all(max(lengths[i] for i in a) < min(lengths[i] for i in b)
                   for a, b in zip(micro_batches, micro_batches[1:]))
    assert sorted(i for step in plan for i in records_of(step)) == list(range(120))


def test_group_by_length_cuts_padding_across_several_pools():
    lengths = lengths_of(1500, 500, seed=2)  # 3 pools of 512 records (batch 8 x 64)
    grouped = plan_epoch(lengths, 8, 4, 1, seed=0, epoch=0, group_by_length=True)
    plain = plan_epoch(lengths, 8, 4, 1, seed=0, epoch=0, group_by_length=False)
    assert sorted(i for s in grouped for i in records_of(s)) == list(range(1500))
    assert padding(grouped, lengths) < 0.1 * padding(plain, lengths)
    # without grouping the steps are the seeded permutation cut in order
    assert [i for s in plain for i in records_of(s)] != list(range(1500))


# ------------------------------------------------------------------------------------------------ steps_from


@pytest.mark.parametrize("group_by_length", [True, False])
def test_a_resumed_schedule_continues_with_the_steps_of_the_uninterrupted_one(group_by_length):
    """steps_from at the position saved after any step (epoch, steps done in it) yields exactly the rest of the
    uninterrupted schedule, across epoch boundaries too (a saved position at an epoch's end included)."""
    lengths = lengths_of(37, 60, seed=7)  # 5 steps per epoch, the last short
    args = (lengths, 8, 2, 2, 11, group_by_length)
    full = [item for item, _ in zip(steps_from(*args, 0, 0), range(17))]
    # the schedule is the epochs' plans, one after the other, numbered 1.. within each epoch
    assert [(e, s) for e, s, _ in full] == [(e, s) for e in range(4) for s in range(1, 6)][:17]
    for epoch in range(4):
        assert [b for e, _, b in full if e == epoch] == plan_epoch(lengths, 8, 2, 2, 11, epoch, group_by_length)[
            :sum(e == epoch for e, _, _ in full)]
    for k in range(len(full) - 1):
        epoch, done, _ = full[k]
        resumed = steps_from(*args, epoch, done)
        assert [item for item, _ in zip(resumed, range(len(full) - k - 1))] == full[k + 1:], k


# ------------------------------------------------------------------------------------------------ learning rate


def test_learning_rate_schedule_warmup_and_cosine():
    lrs = [learning_rate_at(s, 1.0, 4, 12, "cosine") for s in range(1, 13)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]  # step 1 already moves
    assert lrs[4] == 1.0 and all(a > b for a, b in zip(lrs[4:], lrs[5:]))  # then strictly decreasing
    assert lrs[-1] > 0  # no step is wasted at learning rate 0
    assert [learning_rate_at(s, 0.1, 0, 5, "constant") for s in range(1, 6)] == [0.1] * 5  # warmup 0: no division


@pytest.mark.parametrize("warmup, total", [(0, 10), (3, 13), (5, 6), (2, 1000)])
def test_cosine_is_half_a_cosine_period_from_the_peak_to_zero(warmup, total):
    """After warmup: the peak first, half the peak halfway, 0 exactly one step after the last; symmetric about the
    middle (lr(x) + lr(1 - x) = peak), never negative, never rising."""
    peak = 3e-4
    lr = [learning_rate_at(s, peak, warmup, total, "cosine") for s in range(1, total + 2)]  # lr[s - 1]: step s
    assert lr[:warmup] == pytest.approx([peak * s / warmup for s in range(1, warmup + 1)], rel=1e-12)
    after = lr[warmup:]  # steps warmup+1 .. total+1: progress 0, 1/n, .. 1 with n = total - warmup
    n = total - warmup
    assert len(after) == n + 1
    assert after[0] == pytest.approx(peak, rel=1e-12)
    assert after[-1] == pytest.approx(0.0, abs=1e-12 * peak) and min(lr[:-1]) > 0
    assert all(x >= 0 for x in lr) and all(a >= b for a, b in zip(after, after[1:]))
    for i in range(n + 1):
        assert after[i] + after[n - i] == pytest.approx(peak, rel=1e-9)
    if n % 2 == 0:
        assert after[n // 2] == pytest.approx(peak / 2, rel=1e-9)


def test_constant_schedule_warms_up_then_holds_the_peak():
    lrs = [learning_rate_at(s, 0.02, 4, 10, "constant") for s in range(1, 16)]
    assert lrs == pytest.approx([0.005, 0.01, 0.015, 0.02] + [0.02] * 11, rel=1e-12)


def test_a_warmup_as_long_as_the_run_ends_at_the_peak():
    lrs = [learning_rate_at(s, 1.0, 8, 8, "cosine") for s in range(1, 9)]
    assert lrs == pytest.approx([s / 8 for s in range(1, 9)], rel=1e-12)


# ------------------------------------------------------------------------------------------------ optimizer


class Mixed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = torch.nn.Embedding(10, 4)
        self.linear = torch.nn.Linear(4, 3)  # weight 2-D, bias 1-D
        self.norm = torch.nn.LayerNorm(3)
        self.scale = torch.nn.Parameter(torch.ones(()))  # a 0-D gate, as adapter_v2's
        self.frozen = torch.nn.Linear(3, 3)
        self.frozen.requires_grad_(False)


def test_make_optimizer_decays_only_trainable_matrices_and_embeddings():
    model = Mixed()
    optimizer = make_optimizer(model, learning_rate=0.01, weight_decay=0.1)
    assert type(optimizer) is torch.optim.AdamW
    groups = {group["weight_decay"]: {id(p) for p in group["params"]} for group in optimizer.param_groups}
    assert groups == {
        0.1: {id(model.embedding.weight), id(model.linear.weight)},
        0.0: {id(model.linear.bias), id(model.norm.weight), id(model.norm.bias), id(model.scale)},
    }
    assert all(group["lr"] == 0.01 and group["betas"] == (0.9, 0.95) for group in optimizer.param_groups)


def test_make_optimizer_step_shrinks_only_the_decayed_parameters():
    """With zero gradients AdamW's update is only the decoupled decay: p <- p (1 - lr wd) for the decayed ones,
    the others (and the frozen layer) stay exactly as they were."""
    model = Mixed()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = make_optimizer(model, learning_rate=0.5, weight_decay=0.2)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        expected = before[name] * (1 - 0.5 * 0.2) if name in ("embedding.weight", "linear.weight") else before[name]
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0, msg=name)


def test_make_optimizer_without_matrices_has_one_group():
    """Only 1-D trainable parameters (norms, biases): no empty decay group handed to AdamW."""
    model = torch.nn.LayerNorm(6)
    optimizer = make_optimizer(model, learning_rate=1e-3, weight_decay=0.1)
    assert len(optimizer.param_groups) == 1 and optimizer.param_groups[0]["weight_decay"] == 0.0
    assert len(optimizer.param_groups[0]["params"]) == 2
